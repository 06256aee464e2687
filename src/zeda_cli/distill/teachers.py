"""The frozen teacher, behind one small interface, and the one place that decides which a stage gets.

* ``ModelTeacher``: a separate frozen model (the original static model, or an injected one loaded with its zero
  experts masked, which is exactly the original), built by the backend (one process, ZeRO-3 inference, FSDP2).
* ``RouterViewTeacher``: while every stage so far trained the router alone, the student itself with its original
  router rows viewed in (``ZeroExpertRouter.view_rows``) and zero experts masked: identical to the original (the
  rest of the weights never changed), no second copy, under every backend (the view never writes a parameter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ..runtime.zeda_dynamic_moe import routers
from .data import SequenceBatch
from .logits import HeadFn, distributions, head_computes, token_logprobs

TEACHER_ROUTER_FILE = "teacher_router.pt"
Need = Literal["tokens", "distribution"]


@dataclass
class TeacherScores:
    """What a loss needs of the teacher: ``tokens`` the log-probs of the batch's targets [B, S] (the sampled stage-2
    loss), or ``distribution`` the whole next-token log-distribution [B, S, V] in bf16 (the dense losses)."""

    tokens: torch.Tensor | None = None
    distribution: torch.Tensor | None = None


class Teacher(Protocol):
    """``rows``: the batch's rows as indices into the step's sequences (a teacher server scored them all at once)."""

    def score(self, batch: SequenceBatch, need: Need, chunk: int, rows: list[int] | None = None) -> TeacherScores: ...


def run_with_head(model: Any, batch: SequenceBatch, fn: HeadFn) -> torch.Tensor:
    """The model's forward on ``batch`` with its head computing ``fn`` (``distill.logits``)."""
    with head_computes(model, fn):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     use_cache=False).logits  # fmt: skip


def scores_of(model: Any, batch: SequenceBatch, need: Need, chunk: int) -> TeacherScores:
    if need == "tokens":
        return TeacherScores(tokens=run_with_head(model, batch, lambda h, head: token_logprobs(head, h, batch.targets,
                                                                                               chunk)))  # fmt: skip
    return TeacherScores(
        distribution=run_with_head(model, batch, lambda h, head: torch.cat(distributions(head, h, chunk), 1))
    )


class ModelTeacher:
    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def score(self, batch: SequenceBatch, need: Need, chunk: int, rows: list[int] | None = None) -> TeacherScores:
        return scores_of(self.model, batch, need, chunk)


def original_router_rows(model: nn.Module, full_state: Any = None) -> dict[str, torch.Tensor]:
    """First N rows of every router: the original (static) router, as long as they have not been trained.
    ``full_state`` (a backend's) gathers a sharded router's full weight (small: N x hidden per layer)."""
    out = {}
    for name, r in routers(model):
        if full_state is None:
            out[name] = r.weight.detach()[: r.spec.num_experts].clone()
            continue
        with full_state(r) as tensors:
            out[name] = tensors["weight"].detach()[: r.spec.num_experts].clone()
    return out


def save_router_rows(rows: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.cpu() for k, v in rows.items()}, path)


def load_router_rows(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def original_router_view(model: nn.Module, rows: dict[str, torch.Tensor]) -> Iterator[None]:
    """Route like the original model while active: original rows viewed in, zero experts masked."""
    found = routers(model)
    for name, router in found:
        router.view_rows = rows[name]
    try:
        yield
    finally:
        for _, router in found:
            router.view_rows = None


class RouterViewTeacher:
    def __init__(self, student: nn.Module, rows: dict[str, torch.Tensor], device: torch.device):
        self.student = student
        self.rows = {k: v.to(device, torch.float32) for k, v in rows.items()}

    @torch.no_grad()
    def score(self, batch: SequenceBatch, need: Need, chunk: int, rows: list[int] | None = None) -> TeacherScores:
        was_training = self.student.training
        self.student.eval()
        try:
            with original_router_view(self.student, self.rows):
                return scores_of(self.student, batch, need, chunk)
        finally:
            self.student.train(was_training)


def teacher_router_rows(job: Any, model: nn.Module, full_state: Any = None) -> dict[str, torch.Tensor] | None:
    """Router-only training: the original router rows, kept beside the run so the teacher needs no copy.

    Valid only while every stage so far trained the router alone (the body is then still the original's); written
    to the stage folder by rank 0 only.
    """
    if job.section.trainable != "router":
        return None
    student = Path(job.student)
    if (student / TEACHER_ROUTER_FILE).exists():
        return load_router_rows(student / TEACHER_ROUTER_FILE)
    if job.teacher.masked and Path(job.teacher.path).resolve() == student.resolve():
        return original_router_rows(model, full_state)  # the student is the untrained injection
    return None


def choose_teacher(job: Any, student: nn.Module, backend: Any) -> Teacher | None:
    """The teacher of this stage: none when it needs none, else the router view of the student when that is
    exactly the original, else a separate frozen model the backend loads."""
    rows = teacher_router_rows(job, student, backend.full_state)
    if rows is not None and backend.rank == 0:  # the next router-only stage views the original through it too
        save_router_rows(rows, Path(job.out) / TEACHER_ROUTER_FILE)
    if not job.needs_teacher:
        return None
    if rows is not None:
        return RouterViewTeacher(student, rows, backend.device)
    return backend.load_teacher(job.teacher.path, job.teacher.masked)
