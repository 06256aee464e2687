"""What ``zeda distill`` does (also ``zeda convert``'s stage 1 and 2), top to bottom in :func:`run_stage`: validate
the job, prepare the output folder, make the teacher rollouts (stage 1), start the generation servers the stage
needs, then train in this process or on the ranks the launcher starts (``distributed.kind``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..console import Output, ProgressBar
from ..errors import BadInputError
from ..inheritance import inherit
from ..model_ref import ModelRef, as_model
from ..recipes import Recipe
from ..runs import read_manifest
from ..runtime.loading import load_tokenizer
from .engines.local import LocalBackend
from .generation import Servers, generator
from .job import JOB_FILE, DistillJob, build_job
from .loop import StepCallback
from .process import run_in_process
from .resume import reconcile
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
    rollouts: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    launcher: Launcher | None = None,
) -> dict[str, Any]:
    """Run one distillation stage into ``out``; returns its summary (the manifest's metrics). Settings the student
    folder recorded are inherited where nothing explicit sets them (each one said on the log)."""
    ref = as_model(student)
    recipe, lines = inherit(recipe, ref)
    if (topology := outer_topology()) is not None:  # this process is one rank of a torchrun / srun the user started
        recipe = recipe.with_values(topology)
    job = build_job(stage, ref, out, recipe, resume=resume, rollouts=rollouts)
    if resume and (out / JOB_FILE).exists() and not _finished(out):
        lines += reconcile(DistillJob.read(out / JOB_FILE), job)
    for line in lines:  # once the job is valid: a refused job is one error line and nothing else
        output.log(line)
    if topology is not None:
        return run_as_rank(job, output, overwrite)
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


def _finished(out: Path) -> bool:
    manifest = read_manifest(out)
    return bool(manifest and manifest.done)


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
    """Stage 1 trains on job.rollouts; without one, ``<out>/rollouts.jsonl`` is imported from ``data.rollouts``
    (checked record by record) or written by the teacher first."""
    if job.stage != 1 or job.rollouts:
        return job
    path = Path(job.out) / ROLLOUTS_FILE
    if job.recipe.data.rollouts:
        import_user_rollouts(job.recipe.data, job.student, path)
    else:
        generate_rollouts(job.teacher, job.recipe, path, progress=progress)
    return job.model_copy(update={"rollouts": str(path)})


def import_user_rollouts(data: Any, student: str, path: Path) -> dict[str, Any]:
    from ..io.sources import read_config_json
    from .data import special_ids
    from .rollout_import import import_rollouts

    tokenizer = load_tokenizer(student)
    _, eos = special_ids(tokenizer, None)
    vocab = int(read_config_json(Path(student)).get("vocab_size") or len(tokenizer))
    return import_rollouts(data, tokenizer, eos[0] if eos else 0, vocab, path)


def run_job(job: DistillJob, on_step: StepCallback | None = None, launcher: Launcher | None = None) -> dict[str, Any]:
    """Run the stage here or on the launcher's ranks; generation servers (stage 2) live for the whole run."""
    with generator(job.recipe).serve_student(job, lambda: stage2_prompts(job, load_tokenizer(job.student))) as servers:
        if job.recipe.distributed.launched:
            return (launcher or _launch)(job, Path(job.out), servers)
        return run_in_process(job, LocalBackend(job), servers, on_step)


def outer_topology() -> dict[str, Any] | None:
    """``distributed.*`` of the ranks an outer launcher started (torchrun's ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_WORLD_SIZE``, or srun's ``SLURM_PROCID`` / ``SLURM_NTASKS``, mapped to torch's names), or None when
    this process was not started as one of several ranks."""
    env = os.environ
    if "SLURM_PROCID" in env and "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env["WORLD_SIZE"]).split("(")[0]
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in env:
        return None
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    return {"distributed.nproc": local, "distributed.nnodes": max(world // local, 1),
            "distributed.node_rank": int(env["RANK"]) // local}  # fmt: skip


def run_as_rank(job: DistillJob, output: Output, overwrite: bool) -> dict[str, Any]:
    """One rank of an outer launcher: rank 0 prepares the folder (rollouts, job file, generation servers, which only
    rank 0 talks to) while the others wait; then every rank trains. The folder must be on a shared filesystem."""
    import torch.distributed as dist

    from .engines import backend_for, collective_timeout_s
    from .worker import init_process_group

    dist_env = job.recipe.distributed
    os.environ.setdefault("MASTER_ADDR", dist_env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(dist_env.master_port or 29500))
    init_process_group(collective_timeout_s(job.recipe))
    out, rank = Path(job.out), dist.get_rank()
    done = [False]
    if rank == 0:
        done[0] = prepare_stage_dir(out, job.resume, overwrite)
        if not done[0]:
            job = ensure_rollouts(job, None)
            job.write(out)
    dist.broadcast_object_list(done, src=0)
    if done[0]:
        return {"ok": True, "out": str(out), "skipped": True}
    dist.barrier()
    job = DistillJob.read(out / JOB_FILE)
    serve = generator(job.recipe).serve_student if rank == 0 else _no_servers
    with serve(job, lambda: stage2_prompts(job, load_tokenizer(job.student))) as servers:
        summary = run_in_process(job, backend_for(job), servers, _rank_zero(output, rank))
    dist.barrier()  # every rank has finished writing before any takes the group down
    dist.destroy_process_group()
    return {"ok": True, "out": str(out), "stage": job.stage, "rank": rank, **summary}


def _no_servers(job: DistillJob, prompts: Any) -> Any:
    from .generation import no_servers

    return no_servers()


def _rank_zero(output: Output, rank: int) -> StepCallback:
    def report(record: dict[str, Any]) -> None:
        if rank == 0:
            output.log(f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} "
                       f"zero {record['zero_share']:.3f}")  # fmt: skip

    return report


def _launch(job: DistillJob, out: Path, servers: Servers) -> dict[str, Any]:
    from .launch import launch_job

    return launch_job(job, out, servers)
