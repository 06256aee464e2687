"""The frozen teacher of stage 2, behind one small interface.

* ``ModelTeacher``: a separate frozen model (the original static model, or an injected one loaded with its zero
  experts masked, which is exactly the original).
* ``RouterViewTeacher``: for ``--trainable router``, the student itself with its original router rows swapped in
  and zero experts masked: identical to the original (the rest of the weights never change), no second copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..runtime.zeda_dynamic_moe import routers, zero_experts_masked
from .sampling import SequenceBatch


class Teacher(Protocol):
    def logits(self, batch: SequenceBatch) -> torch.Tensor: ...


def _forward(model: Any, batch: SequenceBatch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits


class ModelTeacher:
    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch: SequenceBatch) -> torch.Tensor:
        return _forward(self.model, batch)


def original_router_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """First N rows of every router: the original (static) router, as long as they have not been trained."""
    return {name: r.weight.detach()[: r.spec.num_experts].clone() for name, r in routers(model)}


def save_router_rows(rows: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.cpu() for k, v in rows.items()}, path)


def load_router_rows(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def original_router_view(model: nn.Module, rows: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily route like the original model: original rows in, zero experts masked; restored on exit."""
    saved = {}
    with torch.no_grad():
        for name, router in routers(model):
            n = router.spec.num_experts
            saved[name] = router.weight[:n].clone()
            router.weight[:n].copy_(rows[name].to(router.weight.device, router.weight.dtype))
    try:
        with zero_experts_masked(model):
            yield
    finally:
        with torch.no_grad():
            for name, router in routers(model):
                router.weight[: router.spec.num_experts].copy_(saved[name])


class RouterViewTeacher:
    def __init__(self, student: nn.Module, rows: dict[str, torch.Tensor]):
        self.student = student
        self.rows = rows

    @torch.no_grad()
    def logits(self, batch: SequenceBatch) -> torch.Tensor:
        was_training = self.student.training
        self.student.eval()
        try:
            with original_router_view(self.student, self.rows):
                return _forward(self.student, batch)
        finally:
            self.student.train(was_training)
