"""A distillation job: everything a stage needs, resolved and validated once, serialisable for the launcher.

Validation happens before anything is written: the student must be dynamic, the teacher (by default the
injected model with its zero experts masked, which is exactly the original static model) of the same family and
vocabulary, the recipe valid, the DeepSpeed config readable. All problems are reported together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..errors import BadInputError, UnsupportedModelError, ZedaError, raise_all
from ..model_ref import ModelRef, as_model, resolve_model
from ..recipes import Recipe, TrainCommon
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

    # --- the facts of a stage that the shared code asks for (the only place that branches on the stage) ---------
    @property
    def section(self) -> TrainCommon:
        return self.recipe.stage1 if self.stage == 1 else self.recipe.stage2

    @property
    def needs_teacher(self) -> bool:
        """Whether the training processes hold a teacher: stage 2 scores every sample with it (unless its server does,
        ``stage2.teacher_logprobs: engine``); stage 1 only for its dense KL loss."""
        if self.stage == 2:
            return self.recipe.stage2.teacher_logprobs == "trainer"
        return self.recipe.stage1.loss == "kl"

    @property
    def split(self) -> tuple[str, int]:
        """The recipe key whose value the ranks split between them, and that value."""
        if self.stage == 1:
            return "stage1.global_batch_size", self.recipe.stage1.global_batch_size
        return "stage2.prompts_per_step", self.recipe.stage2.prompts_per_step

    def sequences_per_rank(self, world: int) -> int:
        per_rank = self.split[1] // world
        return per_rank * (self.recipe.stage2.samples_per_prompt if self.stage == 2 else 1)

    def check_split(self, world: int) -> None:
        name, size = self.split
        if size % world:
            raise BadInputError(
                f"{name}={size} does not split over {world} ranks",
                expected=f"a multiple of {world}",
                fix=f"set {name} to a multiple of {world}, or change the number of processes",
            )

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


def check_precision(recipe: Recipe, stage: int) -> list[ZedaError]:
    """The DeepSpeed config readable, and one precision for trainer and generation server (``distill.precision``),
    before any process starts."""
    from ..runtime.loading import resolve_device
    from .engines.deepspeed import load_deepspeed_config
    from .precision import precision

    path = recipe.distributed.deepspeed
    try:
        config = load_deepspeed_config(path) if path and recipe.distributed.kind == "deepspeed" else None
        trainable = (recipe.stage1 if stage == 1 else recipe.stage2).trainable
        precision(recipe, trainable, resolve_device(recipe.runtime.device, strict=False).type, deepspeed=config)
    except ZedaError as err:
        return [err]
    return []


def check_distributed(recipe: Recipe, student: ModelRef) -> list[ZedaError]:
    """FSDP2's mesh (sizes against the processes and the experts) and, with expert parallelism, a family whose
    transformers config declares the token dispatch (``base_model_ep_plan``), before any process starts."""
    dist = recipe.distributed
    if dist.kind != "fsdp2":
        return []
    from .engines.fsdp2 import mesh_sizes

    problems: list[ZedaError] = []
    try:
        mesh_sizes(dist, dist.world_size, student.rc.num_experts)
    except ZedaError as err:
        problems.append(err)
    plan = getattr(type(student.rc.hf), "base_model_ep_plan", None) or {}
    if dist.ep_size > 1 and "ep_dispatch_experts" not in plan.values():
        problems.append(
            BadInputError(
                f"distributed.ep_size {dist.ep_size} for {student.adapter.model_type}, whose transformers config has "
                "no expert-parallel plan (base_model_ep_plan with ep_dispatch_experts)",
                expected="a family transformers can dispatch experts for",
                fix="set distributed.ep_size 1 (FSDP2 alone)",
            )
        )
    return problems


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
    resume: bool = False,
    rollouts: str | None = None,
) -> DistillJob:
    """The validated job; the teacher is ``recipe.teacher`` when set, else the original from the run's lineage."""
    problems: list[ZedaError] = check_precision(recipe, stage)
    try:
        ref = as_model(student)
        check_student(ref)
    except ZedaError as err:
        raise_all([err, *problems])
    folder = ref.folder
    problems += check_distributed(recipe, ref)
    spec = TeacherSpec(path=recipe.teacher, masked=False) if recipe.teacher else default_teacher(folder)
    problems += check_teacher(spec, ref)
    if stage == 1 and rollouts is None and not recipe.data.prompts and not recipe.data.rollouts:
        problems.append(
            BadInputError(
                "stage 1 needs teacher rollouts or prompts to generate them",
                expected="--rollouts FILE (data.rollouts) or --prompts FILE (data.prompts in the recipe)",
                fix="pass --prompts with a prompt set",
            )
        )
    if stage == 2 and not recipe.data.prompts:
        problems.append(BadInputError("stage 2 needs prompts", expected="--prompts FILE", fix="pass --prompts"))
    if recipe.data.prompts and (stage == 2 or (rollouts is None and not recipe.data.rollouts)):
        problems += _check_prompts(recipe)
    raise_all(problems)
    return DistillJob(
        stage=stage, student=str(folder), teacher=spec, out=str(out), recipe=recipe, resume=resume, rollouts=rollouts
    )
