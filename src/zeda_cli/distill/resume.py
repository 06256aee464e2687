"""``--resume`` (and a ``zeda convert`` rerun) against the job an interrupted stage started with (``OUT/job.json``),
field by field, as torchtune reconciles a config with its checkpoint: a change that alters what is being trained
is refused, naming every changed key (old -> new); a change of how the stage runs is applied and listed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..recipes import CAPS, HARMLESS, changed
from .job import DistillJob

# Recipe sections a stage's training depends on (other stages' sections, eval, export and push do not matter).
_STAGE_SECTIONS = {1: ("teacher", "balance", "data", "rollout", "stage1", "runtime", "distributed", "generation"),
                   2: ("teacher", "balance", "data", "stage2", "runtime", "distributed", "generation")}  # fmt: skip


def _view(job: DistillJob) -> dict[str, Any]:
    """The job as compared: the stage's recipe sections, the student and teacher by real path, the rollouts."""
    recipe = job.recipe.model_dump(mode="json")
    out = Path(job.out)
    rollouts = job.rollouts or str(out / "rollouts.jsonl") if job.stage == 1 else None
    return {
        "student": str(Path(job.student).resolve()),
        "teacher_model": {"path": str(Path(job.teacher.path).resolve()), "masked": job.teacher.masked},
        "rollouts": str(Path(rollouts).resolve()) if rollouts else None,
        **{k: recipe.get(k) for k in _STAGE_SECTIONS[job.stage]},
    }


def _cap_raised(key: str, old: Any, new: Any, job: DistillJob) -> bool:
    """A step cap raised on a schedule that does not depend on it (constant, no warmup)."""
    if key not in CAPS or old is None or new is None or new <= old:
        return False
    optim = job.section.optim
    return optim.schedule == "constant" and optim.warmup_ratio == 0


def reconcile(old: DistillJob, new: DistillJob) -> list[str]:
    """The harmless changes (one line each) when ``new`` may continue ``old``'s checkpoints; else one error."""
    applied, refused = [], []
    for key, before, after in changed(_view(old), _view(new)):
        if key in HARMLESS or _cap_raised(key, before, after, new):
            applied.append(f"resume: {key} {before!r} -> {after!r} applied")
        else:
            refused.append(f"{key} {before!r} -> {after!r}")
    if refused:
        raise BadInputError(
            f"--resume of {old.out} with settings that change what is trained: {', '.join(refused)}",
            expected=f"the settings the interrupted run started with ({Path(old.out) / 'job.json'})",
            fix="rerun with those settings to continue, or pass --overwrite to start this stage fresh",
        )
    return applied
