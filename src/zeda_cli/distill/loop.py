"""The part of a training stage both stages share: set-up, resume point, per-step bookkeeping, the finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.zeda_dynamic_moe import RouterSpec
from .engines import Engine
from .job import DistillJob
from .losses import GroupBalance
from .state import (
    MetricsLog,
    finish_stage,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    stage_section,
    start_manifest,
)

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
        seed_everything(stage_section(job).seed + start)
        return cls(job, engine, spec, balance, log, start, total, int(state.get("tokens_seen", 0)), on_step)

    def steps(self) -> range:
        return range(self.start, self.total)

    def end_step(self, step: int, record: dict[str, Any], began: float) -> None:
        """Log the step, report it, and checkpoint every ``save_every`` steps (not after the last one)."""
        self.tokens_seen += record["step_tokens"]
        record.update(step=step + 1, total_steps=self.total, lr=self.engine.current_lr(), tokens_seen=self.tokens_seen)
        record["tokens_per_s"] = round(record["step_tokens"] / max(time.perf_counter() - began, 1e-9), 1)
        self.log.append(record)
        if self.on_step:
            self.on_step(record)
        if (step + 1) % stage_section(self.job).save_every == 0 and step + 1 < self.total:
            save_checkpoint(self.engine, Path(self.job.out), step + 1, {"tokens_seen": self.tokens_seen})

    def finish(self) -> dict[str, Any]:
        records = self.log.records()
        summary = summarize(records, self.total, self.tokens_seen)
        if self.job.stage == 2 or "kl" in (records or [{}])[-1]:  # stage 2, or stage 1 with the dense KL
            summary["final_kl"] = (records or [{}])[-1].get("kl")
        section = f"stage{self.job.stage}"
        settings = {section: stage_section(self.job).model_dump(mode="json"),
                    "balance": self.job.recipe.balance.model_dump(mode="json")}  # fmt: skip
        finish_stage(self.engine, self.job, Path(self.job.out), summary, settings)
        return summary


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
