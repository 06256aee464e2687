"""Per-stage memory estimates from config + safetensors headers, and the early refusal when they cannot fit.

Rough by design (documented formulas, not a profiler): what dominates is counted (weights, gradients, Adam
moments, the KV cache of generation, activations of one micro-batch) and the rest is a fixed margin. ``zeda convert
--dry-run`` prints the plan; a real run refuses before starting when a stage obviously exceeds the machine.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ExternalError
from ..recipes import Recipe, Stage1Section, TrainCommon

GB = 1024**3
MARGIN = {"cuda": 2 * GB, "cpu": GB // 2}  # runtime, CUDA context, allocator slack
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PROMPT_TOKENS = 1024  # prompt length assumed for generation-time estimates (prompts are not read when planning)


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    routed_expert_params: int
    router_params: int
    hidden: int
    layers: int
    vocab: int
    kv_width: int  # key + value values stored per token per layer
    largest_block_params: int  # one MoE layer's parameters (ZeRO-3 gathers a leaf block at once)
    largest_tensor_bytes: int

    @classmethod
    def from_report(cls, report: Any, hf_config: Any) -> ModelShape:
        p = report.params
        moe = max(len(report.moe_layers), 1)
        heads = int(getattr(hf_config, "num_key_value_heads", 0) or getattr(hf_config, "num_attention_heads", 1))
        head_dim = int(getattr(hf_config, "head_dim", 0) or hf_config.hidden_size // hf_config.num_attention_heads)
        kv = 2 * heads * head_dim
        if getattr(hf_config, "kv_lora_rank", None):  # MLA caches the compressed latent + rope key
            kv = int(hf_config.kv_lora_rank) + int(getattr(hf_config, "qk_rope_head_dim", 0) or 0)
        return cls(
            total_params=p["total"],
            routed_expert_params=p["routed_experts"],
            router_params=p["router"],
            hidden=int(hf_config.hidden_size),
            layers=int(hf_config.num_hidden_layers),
            vocab=int(hf_config.vocab_size),
            kv_width=kv,
            largest_block_params=(p["routed_experts"] + p.get("shared_experts", 0)) // moe,
            largest_tensor_bytes=int(report.checkpoint.get("largest_tensor_bytes", 0)),
        )


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    device: str  # where the bulk lives: "cpu" or "cuda"
    per_process_gb: float  # device memory per process (RAM for cpu runs)
    host_gb: float  # host RAM on top (offloaded optimizer / streaming buffers)
    processes: int
    formula: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sequence_tokens(section: TrainCommon) -> int:
    """Stage 1 trains on rollouts cut to max_seq_len; stage 2 on prompt + sampled response."""
    if isinstance(section, Stage1Section):
        return section.max_seq_len
    return PROMPT_TOKENS + section.max_new_tokens


def _activations(shape: ModelShape, section: TrainCommon, bytes_: int) -> int:
    tokens = section.micro_batch_size * _sequence_tokens(section)
    per_layer = 34 * shape.hidden * bytes_  # attention + MLP intermediates of one token (no recompute)
    stored = shape.layers * (shape.hidden * bytes_ if section.gradient_checkpointing else per_layer)
    recompute = per_layer if section.gradient_checkpointing else 0
    return tokens * (stored + recompute + shape.vocab * 8)  # + fp32 logits and their gradient


def _train(shape: ModelShape, section: TrainCommon, recipe: Recipe, bytes_: int, n: int) -> tuple[int, int, str]:
    p = shape.total_params
    act = _activations(shape, section, bytes_)
    if section.trainable == "router":
        return bytes_ * p + 16 * shape.router_params + act, 0, "weights + router fp32 state x4 + activations"
    if not recipe.distributed.deepspeed and n == 1:
        return 16 * p + act, 0, "fp32 weights, grads, Adam m and v (16 B/param) + activations"
    zero_offload = _offload(recipe)
    gathered = 2 * bytes_ * shape.largest_block_params
    if zero_offload:
        return (
            2 * p // n + gathered + act,
            14 * p,
            "ZeRO-3 offload: bf16 shard + gathered block + act; host 14 B/param",
        )
    return 16 * p // n + gathered + act, 0, "ZeRO-3: 16 B/param / ranks + gathered block + activations"


def _engine(shape: ModelShape, bytes_: int, sequences: int, new_tokens: int) -> int:
    """A vLLM generation engine: the served weights + the KV cache of one batch (on a GPU, vLLM reserves
    ``generation.gpu_memory_utilization`` of the device, which must cover at least this)."""
    kv = sequences * (new_tokens + PROMPT_TOKENS) * shape.layers * shape.kv_width * bytes_
    return bytes_ * shape.total_params + kv


def _offload(recipe: Recipe) -> bool:
    import json

    path = recipe.distributed.deepspeed
    if not path or not os.path.exists(path):
        return False
    zero = json.loads(open(path).read()).get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") != "none"


def estimate_stages(shape: ModelShape, recipe: Recipe, device: str, stages: list[str]) -> list[StageEstimate]:
    bytes_ = DTYPE_BYTES.get(recipe.runtime.dtype, 2 if device == "cuda" else 4)
    n = recipe.distributed.nproc
    out = []
    for stage in stages:
        if stage in ("inject", "export"):
            stream = shape.largest_tensor_bytes * 2 + 256 * 1024**2
            out.append(StageEstimate(stage, "cpu", stream / GB, 0.0, 1, "streamed: largest tensor x2 + buffers"))
        elif stage == "rollout":
            r = recipe.rollout
            total = _engine(shape, bytes_, r.batch_size, r.max_new_tokens) + MARGIN[device]
            if recipe.generation.engine == "vllm":
                formula = "vLLM engine: teacher weights + KV cache"
            else:
                total += r.batch_size * shape.vocab * 4
                formula = "teacher weights + KV cache (HF generate)"
            out.append(StageEstimate(stage, device, total / GB, 0.0, 1, formula))
        elif stage in ("stage1", "stage2"):
            section = recipe.stage1 if stage == "stage1" else recipe.stage2
            dev, host, formula = _train(shape, section, recipe, bytes_, n)
            needs_teacher = stage == "stage2" or recipe.stage1.loss == "kl"  # the dense stage-1 loss reads it
            if needs_teacher and section.trainable != "router":
                dev += bytes_ * shape.total_params // (n if recipe.distributed.deepspeed else 1)
                formula += " + frozen teacher"
            if stage == "stage2" and recipe.generation.engine == "vllm":
                s2 = recipe.stage2
                dev += _engine(shape, bytes_, s2.prompts_per_step * s2.samples_per_prompt, s2.max_new_tokens)
                formula += " + vLLM engine (student weights + KV cache, beside rank 0)"
            out.append(StageEstimate(stage, device, (dev + MARGIN[device]) / GB, host / GB, n, formula))
    return out


def available_memory(device: str) -> tuple[float, float]:
    """(per-process device GB, host RAM GB) of this machine."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    if device != "cuda":
        return host, host
    import torch

    if not torch.cuda.is_available():
        return 0.0, host
    return torch.cuda.get_device_properties(0).total_memory / GB, host


def check_fits(estimates: list[StageEstimate], device: str) -> None:
    per_device, host = available_memory(device)
    if device == "cuda" and per_device == 0.0:
        raise ExternalError(
            "the recipe runs on CUDA (runtime.device) but no GPU is visible",
            expected="a CUDA device",
            fix="run on a GPU machine, or set runtime.device=cpu for small models",
        )
    for e in estimates:
        host_need = e.host_gb + (e.per_process_gb * e.processes if e.device == "cpu" else 0.0)
        if e.per_process_gb > per_device or host_need > host:
            need = f"~{e.per_process_gb:.1f} GB per process ({e.formula})"
            raise ExternalError(
                f"stage {e.stage} needs {need}, host {host_need:.1f} GB; this machine has {per_device:.1f} GB per "
                f"{'GPU' if device == 'cuda' else 'process'} and {host:.1f} GB RAM",
                expected="a machine that can hold the model",
                fix="use more GPUs (distributed.nproc + a ZeRO-3 config), CPU offload "
                "(recipes/deepspeed/zero3-offload.json), or stage1/stage2.trainable=router",
            )
