"""In-place loading of whole modules into a live vLLM model (dynamic or stock), e.g. the weights a trainer changed.

Built on vLLM's layerwise reload (``vllm.model_executor.model_loader.reload``): every layer is put back into its
checkpoint layout on the meta device, the model's own ``load_weights`` maps checkpoint names to parameters (fused
q/k/v, gate/up, experts), each layer that received all of its elements is materialised, loaded, processed into its
kernel layout (on CPU: repacked for oneDNN / the CPU MoE kernel) and copied into the live tensors, which keeps their
addresses (CUDA graphs). Layers that received nothing keep their current weights. Three things vLLM 0.32 does not do
on its own, done here:

* the CPU MoE kernel's repacking on updates (:func:`zeda_vllm.moe.redo_expert_processing_on_update`, installed on
  every unquantized MoE layer before loading);
* a tied LM head (``tie_word_embeddings``): it shares the embedding's weight, but on CPU it computes logits from its
  own packed copy, which is rebuilt here when the embedding was loaded;
* a layer that received only part of its elements (e.g. ``q_proj`` without ``k_proj``/``v_proj``, which vLLM fuses
  into one ``qkv_proj``): vLLM would process it with uninitialised memory in the missing part. It keeps its current
  weights instead and the load ends with one error line naming it (the layers loaded fully in the same call stay
  loaded). A padded vocabulary is not a partial load.

Also quiet: vLLM warns once per layer that received nothing ("Failed to load weights"), which is every layer but the
sent ones in a partial load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .errors import ZedaVllmError

LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _DropUntouchedLayerWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in str(record.msg)


@contextlib.contextmanager
def _quiet_untouched_layers() -> Iterator[None]:
    flt = _DropUntouchedLayerWarnings()
    logger = logging.getLogger(LAYERWISE_LOGGER)
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def safetensors_weights(paths: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every file, in file order, read lazily (one tensor in memory at a time)."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)


def count_tensors(paths: Iterable[str]) -> int:
    from safetensors import safe_open

    total = 0
    for path in paths:
        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    return total


def load_in_place(model: nn.Module, vllm_config: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load checkpoint-named tensors of whole modules into the live ``model``; returns vLLM's names of the loaded
    parameters. Modules not in ``weights`` keep their current weights."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from .moe import redo_expert_processing_on_update

    for module in model.modules():
        if hasattr(module, "quant_method") and hasattr(module, "w13_weight"):
            redo_expert_processing_on_update(module)
    began = time.perf_counter()
    with _quiet_untouched_layers():
        initialize_layerwise_reload(model)
        try:
            loaded = set(model.load_weights(weights) or ())
            partial = _keep_partial_layers(model)
        except BaseException:
            _keep_partial_layers(model, every_pending=True)
            finalize_layerwise_reload(model, vllm_config.model_config)
            raise
        finalize_layerwise_reload(model, vllm_config.model_config)
    _reprocess_tied_embeddings(model, loaded)
    if partial:
        raise ZedaVllmError(
            f"an in-place load gave only part of the elements of {len(partial)} vLLM layers: "
            + ", ".join(partial[:4])
            + (" ..." if len(partial) > 4 else "")
            + " (they kept their previous weights; the other sent tensors were loaded)",
            expected="whole modules: vLLM fuses q_proj/k_proj/v_proj, gate_proj/up_proj, q_a_proj/kv_a_proj_with_mqa "
            "and all experts of a layer into one tensor each, so they must come together",
            fix="send every tensor of each module you change (e.g. all of self_attn, all experts of a layer)",
        )
    logging.getLogger("vllm.zeda_vllm").debug("in-place load: %.3f s", time.perf_counter() - began)
    return loaded


def _keep_partial_layers(model: nn.Module, every_pending: bool = False) -> list[str]:
    """Layers with some but not all of their elements buffered are reset to "nothing loaded" (vLLM then puts their
    current kernel tensors back); returns their names. ``every_pending``: all buffered layers (after an error)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    partial = []
    for name, module in model.named_modules():
        info = get_layerwise_info(module)
        if not info.can_load() or info.load_numel <= 0 or is_deferred_attention_layer(module):
            continue
        if not every_pending and (info.load_numel >= _loadable(module) or _only_padding_missing(module, info)):
            continue  # complete; vLLM processes it in finalize (its count includes buffers no checkpoint holds)
        partial.append(f"{name} ({info.load_numel} of {_loadable(module)} elements)")
        info.loaded_weights.clear()
        info.load_numel = 0
    return partial


def _loadable(module: nn.Module) -> int:
    """Elements a checkpoint fills: the layer's parameters (in their checkpoint layout while reloading). vLLM's own
    count adds every buffer, e.g. a rotary cache or the router's ``zero_expert_shift``, which are never loaded."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
    from vllm.model_executor.model_loader.reload.utils import get_tensor_load_numel

    params = module._parameters.items()
    return sum(get_tensor_load_numel(p) for n, p in params if p is not None and n not in SKIP_LOAD_TENSORS)


def _only_padding_missing(module: nn.Module, info: Any) -> bool:
    """A vocabulary embedding pads its rows to a multiple of 64 (per rank) and loads only the real ones."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    if not isinstance(module, VocabParallelEmbedding):
        return False
    shard = module.shard_indices
    return info.load_numel >= (shard.org_vocab_end_index - shard.org_vocab_start_index) * module.embedding_dim


def _reprocess_tied_embeddings(model: nn.Module, loaded: set[str]) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding) and isinstance(getattr(module, "weight", None), torch.Tensor):
            by_weight.setdefault(id(module.weight), []).append((name, module))
    for group in by_weight.values():
        if len(group) > 1 and any(f"{name}.weight" in loaded for name, _ in group):
            for _, module in group:
                module.quant_method.process_weights_after_loading(module)
