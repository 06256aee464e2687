"""A distillation job: everything a stage needs, resolved and validated once, serialisable for the launcher.

Validation happens before anything is written: the student must be dynamic, the teacher (by default the
injected model with its zero experts masked, which is exactly the original static model) of the same family and
vocabulary, the recipe valid, the DeepSpeed config readable. All problems are reported together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BadInputError, UnsupportedModelError, ZedaError, raise_all
from ..model_ref import ModelRef, as_model, resolve_model
from ..recipes import Recipe
from ..runs import TeacherSpec, lineage, original_teacher

JOB_FILE = "job.json"
__all__ = ["DistillJob", "TeacherSpec", "build_job", "default_teacher"]


class DistillJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: Literal[1, 2]
    student: str
    teacher: TeacherSpec
    out: str
    recipe: Recipe
    resume: bool = False
    rollouts: str | None = None  # stage 1: the teacher-rollout JSONL to train on
    engine_url: str | None = None  # stage 2 with generation.engine vllm: the running engine (set by run_job)

    def write(self, folder: Path) -> Path:
        path = folder / JOB_FILE
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def read(cls, path: Path) -> DistillJob:
        return cls.model_validate(json.loads(path.read_text()))


def default_teacher(student: Path) -> TeacherSpec:
    """The frozen original from the lineage, else the student (an untrained injection) with zero experts masked."""
    return original_teacher(lineage(student)) or TeacherSpec(path=str(student), masked=True)


def check_student(student: ModelRef) -> None:
    if not student.rc.dynamic:
        raise UnsupportedModelError(
            f"{student.source.spec} has no zero experts (a static {student.adapter.model_type} model)",
            expected="a dynamic model: the output of `zeda inject-zero-experts` or of a previous stage",
            fix=f"run `zeda inject-zero-experts {student.source.spec} --out DIR` first and distill DIR",
        )


def check_teacher(teacher: TeacherSpec, student: ModelRef) -> list[ZedaError]:
    student_rc = student.rc
    try:
        rc = resolve_model(teacher.path).rc
    except ZedaError as err:
        return [err]
    problems: list[ZedaError] = []
    if rc.adapter.model_type != student_rc.adapter.model_type:
        problems.append(
            BadInputError(
                f"teacher family {rc.adapter.model_type} differs from the student's {student_rc.adapter.model_type}",
                expected="the original model the student was made from",
                fix="pass --teacher with the original static model (or omit it)",
            )
        )
    if int(rc.hf.vocab_size) != int(student_rc.hf.vocab_size):
        problems.append(
            BadInputError(
                f"teacher vocabulary ({rc.hf.vocab_size}) differs from the student's ({student_rc.hf.vocab_size})",
                expected="teacher and student sharing one tokenizer",
                fix="pass --teacher with the original static model (or omit it)",
            )
        )
    return problems


def check_deepspeed_config(path: str | None) -> list[ZedaError]:
    if path is None:
        return []
    try:
        load_deepspeed_config(path)
    except ZedaError as err:
        return [err]
    return []


def load_deepspeed_config(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    fix = "pass a DeepSpeed JSON config, e.g. recipes/deepspeed/zero3.json"
    if not file.exists():
        raise BadInputError(f"DeepSpeed config {path} does not exist", expected="a JSON file", fix=fix)
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise BadInputError(f"DeepSpeed config {path} is not valid JSON ({err.msg})", fix=fix) from err
    stage = config.get("zero_optimization", {}).get("stage", 0) if isinstance(config, dict) else None
    if not isinstance(config, dict) or stage not in (0, 1, 2, 3):
        raise BadInputError(
            f"DeepSpeed config {path} has zero_optimization.stage={stage!r}", expected="0, 1, 2 or 3", fix=fix
        )
    return config


def _check_prompts(recipe: Recipe) -> list[ZedaError]:
    """Read the prompt set once up front, so a bad file is reported before any output is written."""
    from .data import load_prompt_records

    try:
        load_prompt_records(recipe.data)
    except ZedaError as err:
        return [err]
    return []


def build_job(
    stage: Literal[1, 2],
    student: ModelRef | str,
    out: Path,
    recipe: Recipe,
    *,
    teacher: str | None = None,
    resume: bool = False,
    rollouts: str | None = None,
) -> DistillJob:
    problems: list[ZedaError] = check_deepspeed_config(recipe.distributed.deepspeed)
    try:
        ref = as_model(student)
        check_student(ref)
    except ZedaError as err:
        raise_all([err, *problems])
    folder = ref.folder
    spec = TeacherSpec(path=teacher, masked=False) if teacher else default_teacher(folder)
    problems += check_teacher(spec, ref)
    if stage == 1 and rollouts is None and not recipe.data.prompts:
        problems.append(
            BadInputError(
                "stage 1 needs teacher rollouts or prompts to generate them",
                expected="--rollouts FILE or --prompts FILE (data.prompts in the recipe)",
                fix="pass --prompts with a prompt set",
            )
        )
    if stage == 2 and not recipe.data.prompts:
        problems.append(BadInputError("stage 2 needs prompts", expected="--prompts FILE", fix="pass --prompts"))
    if recipe.data.prompts and (stage == 2 or rollouts is None):
        problems += _check_prompts(recipe)
    raise_all(problems)
    return DistillJob(
        stage=stage, student=str(folder), teacher=spec, out=str(out), recipe=recipe, resume=resume, rollouts=rollouts
    )
