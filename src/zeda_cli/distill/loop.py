"""The part of a training stage both stages share: set-up, resume point, the micro-step skeleton (routing record →
L_GA → backward → tally), the step's record reduced over the ranks, and the finish."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..runtime.zeda_dynamic_moe import RouterSpec, RoutingRecorder, RoutingTally
from .checkpoints import MetricsLog, latest_checkpoint, load_checkpoint, save_checkpoint
from .engines import Engine
from .job import DistillJob
from .logits import HeadFn, head_computes
from .losses import GroupBalance
from .output import finish_stage, start_manifest
from .student import seed_everything

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class StageLoop:
    job: DistillJob
    engine: Engine
    spec: RouterSpec
    balance: GroupBalance
    log: MetricsLog
    start: int
    total: int
    tokens_seen: int
    on_step: StepCallback | None

    @classmethod
    def begin(cls, job: DistillJob, engine: Engine, total: int, on_step: StepCallback | None) -> StageLoop:
        out = Path(job.out)
        spec = RouterSpec.from_config(engine.module.config)
        b = job.recipe.balance
        balance = GroupBalance.for_target(spec.num_experts, spec.num_zero_experts, b.target_skip, b.aux_loss_coeff)
        log = MetricsLog(out, engine.rank == 0)
        if engine.rank == 0:
            start_manifest(job, out)
        start, state = load_checkpoint(engine, out) if job.resume and latest_checkpoint(out) else (0, {})
        log.truncate_after(start)
        seed_everything(job.section.seed + start)
        return cls(job, engine, spec, balance, log, start, total, int(state.get("tokens_seen", 0)), on_step)

    def steps(self) -> range:
        return range(self.start, self.total)

    def micro_step(self) -> MicroSteps:
        return MicroSteps(self.engine, self.spec, self.balance)

    def end_step(self, step: int, record: dict[str, Any], began: float) -> None:
        """Log the step, report it, and checkpoint every ``save_every`` steps (not after the last one)."""
        self.tokens_seen += record["step_tokens"]
        record.update(step=step + 1, total_steps=self.total, lr=self.engine.current_lr(), tokens_seen=self.tokens_seen)
        record["tokens_per_s"] = round(record["step_tokens"] / max(time.perf_counter() - began, 1e-9), 1)
        self.log.append(record)
        if self.on_step:
            self.on_step(record)
        if (step + 1) % self.job.section.save_every == 0 and step + 1 < self.total:
            save_checkpoint(self.engine, Path(self.job.out), step + 1, {"tokens_seen": self.tokens_seen})

    def finish(self) -> dict[str, Any]:
        records = self.log.records()
        summary = summarize(records, self.total, self.tokens_seen)
        summary["peak_memory_gb"] = peak_memory_per_rank(self.engine)
        if self.job.stage == 2 or "kl" in (records or [{}])[-1]:  # stage 2, or stage 1 with the dense KL
            summary["final_kl"] = (records or [{}])[-1].get("kl")
        settings = {f"stage{self.job.stage}": self.job.section.model_dump(mode="json"),
                    "balance": self.job.recipe.balance.model_dump(mode="json"),
                    "runtime": {"dtype": self.job.recipe.runtime.dtype}}  # fmt: skip
        finish_stage(self.engine, self.job, Path(self.job.out), summary, settings)
        return summary


@dataclass
class MicroSteps:
    """One optimizer step's micro-batches: each forward runs under the routing recorder, adds its share of L_GA to
    the caller's loss, backpropagates, and is tallied; :meth:`record` reduces the step over the ranks."""

    engine: Engine
    spec: RouterSpec
    balance: GroupBalance
    tally: RoutingTally = field(init=False)
    sums: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tally = RoutingTally(self.spec.num_experts)

    def forward(self, head_fn: HeadFn, **inputs: Any) -> tuple[torch.Tensor, RoutingRecorder]:
        """The student's forward whose head computes ``head_fn(hidden, head)`` (the micro-batch's loss, chunk by
        chunk: ``distill.logits``), and the routing it recorded."""
        model = self.engine.module
        with RoutingRecorder(model, keep_logits=True) as rec, head_computes(model, head_fn):
            value = self.engine.forward(**inputs, use_cache=False).logits
        return value, rec

    def backward(self, fit: torch.Tensor, rec: RoutingRecorder, token_mask: torch.Tensor, share: float,
                 logged: dict[str, float]) -> None:  # fmt: skip
        """``fit`` + L_GA weighted by ``share`` (this micro-batch's part of the step's tokens), backpropagated;
        ``logged`` values (and the loss, fit + L_GA) are summed into the step's record."""
        aux = self.balance.loss([r[1] for r in rec.records], [r[2] for r in rec.records], self.spec.scoring,
                                token_mask) * share  # fmt: skip
        self.engine.backward(fit + aux)
        self.tally.add(rec.records, token_mask)
        values = {**logged, "aux": float(aux.detach()), "loss": float(fit.detach()) + float(aux.detach())}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, grad_norm: float) -> dict[str, Any]:
        """The step's means over ranks (each rank's sums estimate the global mean) and its zero share, overall and
        per layer, counted over every rank's tokens."""
        layers = sorted(self.tally.slots)
        keys = sorted(self.sums)
        local = [self.sums[k] for k in keys] + [float(self.tally.skipped[n]) for n in layers]
        local += [float(self.tally.slots[n]) for n in layers]
        summed = self.engine.all_reduce_sums(local)
        world = self.engine.world_size
        means = {k: v / world for k, v in zip(keys, summed[: len(keys)], strict=True)}
        skipped = summed[len(keys) : len(keys) + len(layers)]
        slots = summed[len(keys) + len(layers) :]
        return {
            **{k: round(v, 6) for k, v in means.items()},
            "zero_share": round(sum(skipped) / max(sum(slots), 1.0), 4),
            "zero_share_per_layer": {
                n: round(z / max(s, 1.0), 4) for n, z, s in zip(layers, skipped, slots, strict=True)
            },  # fmt: skip
            "grad_norm": round(grad_norm, 4),
        }


def peak_memory_per_rank(engine: Engine) -> list[float]:
    """Each rank's peak memory so far (GB): the GPU's allocator peak on CUDA, the process's peak resident set
    (VmHWM, which exec resets, unlike rusage's maxrss) on CPU."""
    if engine.device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(engine.device))
    else:
        peak = float(_status_kib("VmHWM") * 1024)
    values = [0.0] * engine.world_size
    values[engine.rank] = peak / 1024**3
    return [round(v, 3) for v in engine.all_reduce_sums(values)]


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def summarize(records: list[dict[str, Any]], steps: int, tokens_seen: int) -> dict[str, Any]:
    """The stage's metrics for its manifest: last-5-step averages of the zero share (overall and per layer)."""
    last = records[-5:] or [{}]
    per_layer: dict[str, float] = {}
    for r in last:
        for k, v in r.get("zero_share_per_layer", {}).items():
            per_layer[k] = per_layer.get(k, 0.0) + v / len(last)
    return {
        "steps": steps,
        "tokens_seen": tokens_seen,
        "final_loss": last[-1].get("loss"),
        "final_ce": last[-1].get("ce"),
        "zero_share": round(sum(r.get("zero_share", 0.0) for r in last) / len(last), 4),
        "zero_share_per_layer": {k: round(v, 4) for k, v in per_layer.items()},
    }
