"""What ``zeda distill`` does (also ``zeda convert``'s stage 1 and 2), top to bottom in :func:`run_stage`: validate
the job, prepare the output folder, make the teacher rollouts (stage 1), then train in this process or, with a
DeepSpeed config / several processes, on ranks started by the launcher."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from ..console import Output, ProgressBar
from ..errors import BadInputError
from ..model_ref import ModelRef
from ..recipes import Recipe
from ..runs import read_manifest
from ..runtime.loading import load_model, load_tokenizer, resolve_device
from .engines.local import LocalEngine
from .generation import student_engine
from .job import DistillJob, build_job
from .loop import StepCallback
from .rollout import ROLLOUTS_FILE, generate_rollouts
from .stage1 import run_stage1
from .stage2 import run_stage2, stage2_prompts
from .state import TEACHER_ROUTER_FILE, compute_dtype, load_student, stage_section
from .teachers import (
    ModelTeacher,
    RouterViewTeacher,
    Teacher,
    load_router_rows,
    original_router_rows,
    save_router_rows,
)

Launcher = Callable[[DistillJob, Path], dict[str, Any]]


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
    recipe = job.recipe
    generate_rollouts(job.teacher, recipe.data, recipe.rollout, recipe.runtime, path, progress=progress,
                      generation=recipe.generation)  # fmt: skip
    return job.model_copy(update={"rollouts": str(path)})


def run_job(job: DistillJob, on_step: StepCallback | None = None, launcher: Launcher | None = None) -> dict[str, Any]:
    """Run the stage here or on the launcher's ranks; a vLLM generation engine (stage 2) lives for the whole run."""
    with student_engine(job, lambda: stage2_prompts(job, load_tokenizer(job.student))) as url:
        job = job.model_copy(update={"engine_url": url}) if url else job
        distributed = job.recipe.distributed
        if distributed.deepspeed or distributed.nproc > 1:
            from .launch import launch_job

            return (launcher or launch_job)(job, Path(job.out))
        return run_local(job, on_step)


def run_local(job: DistillJob, on_step: StepCallback | None = None) -> dict[str, Any]:
    section = stage_section(job)
    device = resolve_device(job.recipe.runtime.device)
    dtype = compute_dtype(job.recipe.runtime, device)
    tokenizer = load_tokenizer(job.student)
    model = load_student(job, device)
    rows = teacher_router_rows(job, model)
    autocast = dtype if section.trainable == "full" and dtype != torch.float32 else None

    def make_engine(m: Any, total: int) -> LocalEngine:
        return LocalEngine(m, section.optim, total, device, autocast)

    if job.stage == 1 and job.recipe.stage1.loss == "ce":
        return run_stage1(job, model, tokenizer, make_engine, on_step)
    teacher: Teacher
    if rows is not None:
        teacher = RouterViewTeacher(model, rows)
    else:
        frozen = load_model(job.teacher.path, dtype=dtype, use_zce_mask=job.teacher.masked or None)
        teacher = ModelTeacher(frozen.to(device))
    if job.stage == 1:
        return run_stage1(job, model, tokenizer, make_engine, on_step, teacher)
    return run_stage2(job, model, teacher, tokenizer, make_engine, on_step)


def teacher_router_rows(job: DistillJob, model: Any) -> dict[str, torch.Tensor] | None:
    """Router-only training: the original router rows, kept beside the run so the teacher needs no copy.

    Valid only while every stage so far trained the router alone (the body is then still the original's).
    """
    if stage_section(job).trainable != "router":
        return None
    student = Path(job.student)
    if (student / TEACHER_ROUTER_FILE).exists():
        rows = load_router_rows(student / TEACHER_ROUTER_FILE)
    elif job.teacher.masked and Path(job.teacher.path).resolve() == student.resolve():
        rows = original_router_rows(model)  # the student is the untrained injection
    else:
        return None
    save_router_rows(rows, Path(job.out) / TEACHER_ROUTER_FILE)
    return rows
