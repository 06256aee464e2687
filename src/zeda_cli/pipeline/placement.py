"""Where every process of a stage runs and what it holds, per GPU, plus the host RAM and the tokens the stage will
generate and train on (upper bounds: prompts x caps): what ``zeda convert --dry-run`` prints, and what a real run
checks before it starts.

* Training ranks use ``distributed.devices`` (default: GPUs 0..nproc-1 of each node).
* Generation servers (``generation.num_engines`` per role, ``tensor_parallel_size`` GPUs each) use groups of
  ``generation.devices`` in order: in stage 2 the student's servers first, then the teacher's; without
  ``generation.devices`` they share the training ranks' GPUs. A vLLM server takes ``gpu_memory_utilization`` of each
  of its GPUs, which must hold its weights and KV cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..recipes import Recipe
from .memory import GB, ModelShape, StageEstimate


@dataclass(frozen=True)
class PromptStats:
    count: int | None  # None: a Hub dataset that was not read (planning offline)
    longest: int  # tokens of the longest prompt (or the assumption)


@dataclass
class StagePlacement:
    stage: str
    gpus: dict[int, list[tuple[str, float]]] = field(default_factory=dict)  # GPU -> [(what runs there, GB)]
    host_gb: float = 0.0
    tokens: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, gpu: int, what: str, gb: float) -> None:
        self.gpus.setdefault(gpu, []).append((what, round(gb, 1)))

    def used(self, gpu: int) -> float:
        return sum(gb for _, gb in self.gpus.get(gpu, []))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gpus": {str(k): v for k, v in self.gpus.items()}}


def _server_gb(shape: ModelShape, bytes_: int, tp: int, sequences: int, tokens: int) -> float:
    """What one server needs on each of its GPUs: weights and KV cache split over tensor parallelism, + workspace."""
    kv = sequences * tokens * shape.layers * shape.kv_width * bytes_
    return (bytes_ * shape.total_params + kv) / tp / GB + 1.0


def _servers(placement: StagePlacement, role: str, shape: ModelShape, recipe: Recipe, groups: list[tuple[int, ...]],
             first: int, sequences: int, tokens: int, gpu_gb: float | None) -> None:  # fmt: skip
    gen = recipe.generation
    bytes_ = 2 if gen.dtype in ("auto", "bfloat16", "float16") else 4
    need = _server_gb(shape, bytes_, gen.tensor_parallel_size, sequences, tokens)
    share = gen.gpu_memory_utilization * gpu_gb if gpu_gb else need
    for i in range(gen.num_engines):
        group = groups[(first + i) % len(groups)]
        for gpu in group:
            placement.add(gpu, f"{role} server {i} (TP {gen.tensor_parallel_size}, needs {need:.1f})", share)
        if gpu_gb and share < need:
            placement.notes.append(f"{role} server {i}: gpu_memory_utilization {gen.gpu_memory_utilization} x "
                                   f"{gpu_gb:.0f} GB = {share:.1f} GB < the {need:.1f} GB it needs")  # fmt: skip


def _groups(recipe: Recipe, trainer: list[int]) -> list[tuple[int, ...]]:
    gen = recipe.generation
    devices = gen.devices or trainer
    tp = gen.tensor_parallel_size
    return [tuple(devices[i : i + tp]) for i in range(0, len(devices), tp) if len(devices[i : i + tp]) == tp] or [
        tuple(devices[:tp])
    ]


def place(shape: ModelShape, recipe: Recipe, estimates: dict[str, StageEstimate], prompts: PromptStats,
          gpu_gb: float | None) -> list[StagePlacement]:  # fmt: skip
    """Per stage: what each GPU holds, the host RAM, the tokens; notes name every GPU that would not fit."""
    d, gen = recipe.distributed, recipe.generation
    trainer = list(d.devices) or list(range(d.nproc))
    out = []
    for stage, est in estimates.items():
        if stage not in ("rollout", "stage1", "stage2") or est.device != "cuda":
            continue
        p = StagePlacement(stage, tokens=_tokens(stage, recipe, prompts))
        if stage == "rollout" and gen.engine == "vllm":
            r = recipe.rollout
            _servers(p, "teacher", shape, recipe, _groups(recipe, trainer), 0, r.batch_size,
                     prompts.longest + r.max_new_tokens, gpu_gb)  # fmt: skip
        elif stage == "rollout":
            p.add(trainer[0], "teacher (HF generate)", est.per_process_gb)
        else:
            for rank, gpu in enumerate(trainer):
                p.add(gpu, f"training rank {rank}", est.per_process_gb)
            if stage == "stage2" and gen.engine == "vllm":
                s2 = recipe.stage2
                sequences, tokens = s2.prompts_per_step * s2.samples_per_prompt, prompts.longest + s2.max_new_tokens
                groups = _groups(recipe, trainer)
                _servers(p, "student", shape, recipe, groups, 0, sequences, tokens, gpu_gb)
                if s2.teacher_logprobs == "engine":
                    _servers(p, "teacher", shape, recipe, groups, gen.num_engines, sequences, tokens, gpu_gb)
            if d.kind != "none":
                from ..distill.engines import collective_timeout_s

                p.notes.append(f"collective timeout {collective_timeout_s(recipe)} s (distributed.timeout_s, default "
                               "2 x generation.request_timeout_s)")  # fmt: skip
        p.host_gb = round(est.host_gb + 4.0 * max(len(trainer), 1), 1)  # + each process's own host memory
        if gpu_gb:
            for gpu in sorted(p.gpus):
                if p.used(gpu) > gpu_gb:
                    p.notes.append(f"GPU {gpu} needs {p.used(gpu):.1f} GB of {gpu_gb:.0f}")
        out.append(p)
    return out


def _tokens(stage: str, recipe: Recipe, prompts: PromptStats) -> dict[str, int | None]:
    n = recipe.data.max_prompts or prompts.count
    if stage == "rollout":
        return {"generated": n * recipe.rollout.max_new_tokens if n else None, "trained": 0}
    if stage == "stage1":
        s1 = recipe.stage1
        steps = -(-n * s1.epochs // s1.global_batch_size) if n else None
        if steps and s1.max_steps:
            steps = min(steps, s1.max_steps)
        return {"generated": 0, "trained": steps * s1.global_batch_size * s1.max_seq_len if steps else None}
    s2 = recipe.stage2
    sequences = s2.steps * s2.prompts_per_step * s2.samples_per_prompt
    return {"generated": sequences * s2.max_new_tokens, "trained": sequences * (prompts.longest + s2.max_new_tokens)}
