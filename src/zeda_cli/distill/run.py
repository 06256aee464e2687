"""What ``zeda distill`` does (also ``zeda convert``'s stage 1 and 2), top to bottom in :func:`run_stage`: validate
the job, prepare the output folder, make the teacher rollouts (stage 1), start the generation servers the stage
needs, then train in this process or on the ranks the launcher starts (``distributed.kind``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..console import Output, ProgressBar
from ..errors import BadInputError
from ..model_ref import ModelRef
from ..recipes import Recipe
from ..runs import read_manifest
from ..runtime.loading import load_tokenizer
from .engines.local import LocalBackend
from .generation import Servers, generator
from .job import DistillJob, build_job
from .loop import StepCallback
from .process import run_in_process
from .rollout import ROLLOUTS_FILE, generate_rollouts
from .stage2 import stage2_prompts

Launcher = Callable[[DistillJob, Path, Servers], dict[str, Any]]


def run_stage(
    stage: Literal[1, 2],
    student: ModelRef | str,
    out: Path,
    recipe: Recipe,
    *,
    output: Output,
    teacher: str | None = None,
    rollouts: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    launcher: Launcher | None = None,
) -> dict[str, Any]:
    """Run one distillation stage into ``out``; returns its summary (the manifest's metrics)."""
    job = build_job(stage, student, out, recipe, teacher=teacher, resume=resume, rollouts=rollouts)
    if recipe.distributed.node_rank > 0:  # another node's launcher: node 0 prepares the folder and the servers
        return (launcher or _launch)(job, out, Servers())
    if prepare_stage_dir(out, resume, overwrite):
        output.log(f"{out} is already complete (zeda.json done); nothing to do.")
        manifest = read_manifest(out)
        return {"ok": True, "out": str(out), "skipped": True, **(manifest.metrics if manifest else {})}
    with output.progress() as progress:
        job = ensure_rollouts(job, progress)
        job.write(out)
        summary = run_job(job, on_step=StepReporter(progress), launcher=launcher)
    output.log(f"Per-layer zero share: {summary.get('zero_share_per_layer')}")
    return {"ok": True, "out": str(out), "stage": stage, **summary}


class StepReporter:
    """One progress line per stage: step, loss, CE or KL, L_GA, zero share, tokens/s."""

    def __init__(self, progress: ProgressBar):
        self.progress = progress
        self.task: Any = None

    def __call__(self, record: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.progress.task("training", total=record.get("total_steps"))
        signal = f"kl {record['kl']:.4f}" if "kl" in record else f"ce {record.get('ce', 0):.4f}"
        info = (f"loss {record['loss']:.4f} {signal} aux {record['aux']:.4f} "
                f"zero {record['zero_share']:.3f} {record['tokens_per_s']:.0f} tok/s")  # fmt: skip
        self.progress.advance(self.task, info=info)


def prepare_stage_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Returns True when the stage is already complete (a finished manifest and --resume)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} is a file", expected="a folder", fix="choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif resume:
            manifest = read_manifest(out)
            return bool(manifest and manifest.done)
        else:
            raise BadInputError(
                f"output folder {out} exists and is not empty",
                expected="a new folder, or an interrupted run to continue",
                fix="pass --resume to continue it, --overwrite to start over, or choose another --out",
            )
    out.mkdir(parents=True, exist_ok=True)
    return False


def ensure_rollouts(job: DistillJob, progress: ProgressBar | None) -> DistillJob:
    """Stage 1 trains on job.rollouts; without one, the teacher writes ``<out>/rollouts.jsonl`` first."""
    if job.stage != 1 or job.rollouts:
        return job
    path = Path(job.out) / ROLLOUTS_FILE
    generate_rollouts(job.teacher, job.recipe, path, progress=progress)
    return job.model_copy(update={"rollouts": str(path)})


def run_job(job: DistillJob, on_step: StepCallback | None = None, launcher: Launcher | None = None) -> dict[str, Any]:
    """Run the stage here or on the launcher's ranks; generation servers (stage 2) live for the whole run."""
    with generator(job.recipe).serve_student(job, lambda: stage2_prompts(job, load_tokenizer(job.student))) as servers:
        if job.recipe.distributed.launched:
            return (launcher or _launch)(job, Path(job.out), servers)
        return run_in_process(job, LocalBackend(job), servers, on_step)


def _launch(job: DistillJob, out: Path, servers: Servers) -> dict[str, Any]:
    from .launch import launch_job

    return launch_job(job, out, servers)
