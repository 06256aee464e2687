"""What every training process does, in one process or as one rank of many: set up the backend, load the student
(and its teacher, where the stage needs one), and run the stage's loop. ``run_stage`` calls it directly for a
one-process stage; every rank started by the launcher calls it through ``distill.worker``."""

from __future__ import annotations

from typing import Any

from ..runtime.loading import load_tokenizer
from .engines import Backend
from .generation import Servers
from .job import DistillJob
from .loop import StepCallback
from .stage1 import run_stage1
from .stage2 import run_stage2
from .teachers import choose_teacher

STAGES = {1: run_stage1, 2: run_stage2}


def run_in_process(job: DistillJob, backend: Backend, servers: Servers, on_step: StepCallback | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    tokenizer = load_tokenizer(job.student)
    model = backend.load_student(job)
    teacher = choose_teacher(job, model, backend)
    run = STAGES[job.stage]
    return run(job, model, tokenizer, backend, teacher, servers, on_step)
