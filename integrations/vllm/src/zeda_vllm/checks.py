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
    """Tensor parallelism is served: vLLM shards every expert along its intermediate dimension, each rank routes the
    same tokens identically and computes its share of the same real pairs, and the block all-reduces the sum (tested
    on 2 CPU ranks). Refused, with the reason in the line:

    * expert parallelism, EPLB and data parallelism of the MoE layers: vLLM then moves each token to the rank that
      holds its expert inside its MoE runner (all-to-all dispatch/combine, a global-to-local expert map); zeda-vllm
      hands the real pairs to the local expert kernel itself, outside that path, so pairs of experts held by other
      ranks would never be computed;
    * pipeline parallelism: never run with zeda-vllm (the per-layer blocks would work rank by rank, but nothing
      has checked the routing counters and in-place loads across pipeline stages)."""
    del tensor  # any tensor_parallel_size vLLM accepts
    if expert or eplb or data > 1:
        raise ZedaVllmError(
            f"data_parallel_size={data}, enable_expert_parallel={expert}, enable_eplb={eplb}",
            expected="no expert parallelism, EPLB or data parallelism: zeda-vllm calls the local expert kernel on "
            "the real (token, expert) pairs itself, outside vLLM's all-to-all dispatch, so experts held by other "
            "ranks would be skipped",
            fix="shard with --tensor-parallel-size instead (supported), or run one engine per device",
        )
    if pipeline > 1:
        raise ZedaVllmError(
            f"pipeline_parallel_size={pipeline}",
            expected="pipeline_parallel_size 1: pipeline stages have not been run with zeda-vllm",
            fix="shard with --tensor-parallel-size instead (supported)",
        )


FULL_GRAPH_MODES = ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")


def piecewise_defaults(
    cudagraph_mode: str | None, splitting_ops: list[str] | None, default_mode: str, enforce_eager: bool
) -> tuple[str | None, list[str] | None]:
    """The CUDA graph settings zeda-vllm gives a VllmConfig before vLLM applies its defaults (a model config hook,
    :mod:`zeda_vllm.hooks`): (cudagraph_mode, splitting_ops) to set, ``None`` = leave to vLLM.

    Skipping is data-dependent (the number of real pairs is read on the host), so it cannot run inside a captured
    graph: vLLM's default ``FULL_AND_PIECEWISE`` (optimization level >= 2) would capture decode steps as one full
    graph. Unset, the mode becomes ``PIECEWISE`` (vLLM's own choice at -O1), where the forward pass is captured in
    pieces split at vLLM's attention ops and at ``zeda_vllm::routed_experts``, which then runs eagerly between
    them. An explicit splitting_ops list gets the op appended; an unset one is filled by vLLM with its attention ops,
    and the model appends the op when it is built (:func:`with_skipping_split`). A full mode chosen explicitly is
    refused (:func:`check_cuda_graphs`)."""
    mode = None
    if cudagraph_mode is None and not enforce_eager and default_mode in FULL_GRAPH_MODES:
        mode = "PIECEWISE" if default_mode == "FULL_AND_PIECEWISE" else "NONE"
    ops = None
    if splitting_ops is not None and OP_NAME not in splitting_ops:
        ops = [*splitting_ops, OP_NAME]
    return mode, ops


def with_skipping_split(cudagraph_mode: str, splitting_ops: list[str] | None) -> list[str] | None:
    """vLLM's resolved splitting_ops plus the plugin's op when graphs are captured piecewise (``None``: unchanged)."""
    if cudagraph_mode in ("PIECEWISE", "FULL_AND_PIECEWISE") and OP_NAME not in (splitting_ops or []):
        return [*(splitting_ops or []), OP_NAME]
    return None


# vLLM 0.32's multiprocessing executor (tensor_parallel_size > 1) allocates, in /dev/shm: the scheduler's broadcast
# queue, 10 chunks of VLLM_MQ_MAX_CHUNK_BYTES_MB (16 by default), and each worker's response queue, 10 chunks of
# 24 MiB (not configurable) -- 640 MiB for 2 ranks. Short of it, the workers die one by one at start-up.
MQ_CHUNKS, RESPONSE_CHUNK_MIB = 10, 24


def shared_memory_needed_mib(tensor: int, chunk_mib: int) -> int:
    return MQ_CHUNKS * chunk_mib + tensor * MQ_CHUNKS * RESPONSE_CHUNK_MIB


def check_shared_memory(*, tensor: int, free_mib: float, chunk_mib: int) -> None:
    """One line before any worker starts, instead of a worker's traceback after the first ones started."""
    needed = shared_memory_needed_mib(tensor, chunk_mib)
    if tensor > 1 and free_mib < needed:
        raise ZedaVllmError(
            f"tensor_parallel_size {tensor} with {free_mib:.0f} MiB free in /dev/shm",
            expected=f"at least {needed} MiB free in /dev/shm: vLLM's worker processes exchange requests and "
            "results through shared-memory queues",
            fix="give the container more shared memory (docker run --shm-size=2g, or --ipc=host), or serve with "
            "--tensor-parallel-size 1",
        )


def check_cuda_graphs(cudagraph_mode: str, splitting_ops: list[str] | None) -> None:
    """Allowed: no CUDA graphs, or piecewise graphs split at the plugin's op (it runs eagerly between pieces)."""
    if cudagraph_mode == "NONE" or (cudagraph_mode == "PIECEWISE" and OP_NAME in (splitting_ops or [])):
        return
    why = (
        "a full CUDA graph captures the whole forward pass, and zero-expert skipping reads the number of real "
        "(token, expert) pairs on the host at every step, which a captured graph cannot replay"
        if cudagraph_mode in FULL_GRAPH_MODES
        else f"piecewise graphs must be split at {OP_NAME!r} so that it runs eagerly between the pieces"
    )
    raise ZedaVllmError(
        f"CUDA graph mode {cudagraph_mode} with splitting_ops {splitting_ops or []}",
        expected=f"cudagraph_mode PIECEWISE with {OP_NAME!r} among splitting_ops (zeda-vllm's default when "
        f"cudagraph_mode is left unset) or NONE: {why}",
        fix="leave -cc.cudagraph_mode unset (or set it to PIECEWISE), or add --enforce-eager",
    )


def check_cpu_mla_latent(architecture: str, kv_lora_rank: int, qk_rope_head_dim: int, supported: list[int]) -> None:
    """vLLM-CPU's MLA backend caches the latent (kv_lora_rank + qk_rope_head_dim) per token and its decode kernel is
    compiled for few sizes (vLLM-CPU 0.32: 576 = 512 + 64, DeepSeek-V3 / GLM-4.7-Flash); anything else fails only at
    the first request ("Head dimension 24 is not supported by MLA")."""
    latent = kv_lora_rank + qk_rope_head_dim
    if latent in supported:
        return
    raise ZedaVllmError(
        f"{architecture} with an MLA latent of kv_lora_rank {kv_lora_rank} + qk_rope_head_dim {qk_rope_head_dim} = "
        f"{latent} on vLLM-CPU",
        expected=f"a latent vLLM-CPU's MLA attention is built for: {supported} (DeepSeek-V3 and GLM-4.7-Flash use "
        "512 + 64)",
        fix="serve this model on a GPU, or generate with zeda's own runtime (generation.engine hf)",
    )


def check_cpu_mla_backend(architecture: str, dtype: str, amx: bool, backend: str | None) -> None:
    """With AMX tiles vLLM-CPU picks its AMX MLA attention, which packs 16-bit / int8 weights only: float32 needs the
    reference CPU_MLA backend (``zeda_vllm.compat``)."""
    if dtype != "float32" or not amx or backend == "CPU_MLA":
        return
    raise ZedaVllmError(
        f"{architecture} in float32 on a CPU with AMX: vLLM-CPU picks its AMX MLA attention, which takes bfloat16, "
        "float16 or int8 weights only",
        expected="the reference CPU_MLA attention backend for float32, or a 16-bit dtype",
        fix="pass --attention-backend CPU_MLA (LLM(..., attention_backend='CPU_MLA')), or --dtype bfloat16",
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


def check_serving_setup(vllm_config: Any, family: Family, on_cpu: bool) -> None:
    par = vllm_config.parallel_config
    check_parallelism(
        tensor=par.tensor_parallel_size,
        pipeline=par.pipeline_parallel_size,
        data=par.data_parallel_size,
        expert=bool(par.enable_expert_parallel),
        eplb=bool(par.enable_eplb),
    )
    comp = vllm_config.compilation_config
    if (ops := with_skipping_split(comp.cudagraph_mode.name, comp.splitting_ops)) is not None:
        comp.splitting_ops = ops  # still before torch.compile splits the graph (first forward pass)
    check_cuda_graphs(comp.cudagraph_mode.name, list(comp.splitting_ops or []))
    hf = vllm_config.model_config.hf_config
    if family.mla and on_cpu:
        from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

        rank, rope = int(hf.kv_lora_rank), int(hf.qk_rope_head_dim)
        check_cpu_mla_latent(family.architecture, rank, rope, list(CPUMLABackend.get_supported_head_sizes()))
    check_dtype(family, str(vllm_config.model_config.dtype).removeprefix("torch."))
    check_quantization(vllm_config.model_config.quantization)
