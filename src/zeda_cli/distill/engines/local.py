"""One process, one device: the :class:`~zeda_cli.distill.engines.Backend` and ``Engine`` contracts with plain
torch (fp32 master weights, optional bf16 autocast of the forward)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...recipes import OptimSection
from ...runtime.loading import load_model, resolve_device
from ..precision import precision
from ..student import prepare_student
from ..teachers import ModelTeacher
from . import lr_multiplier, param_groups

RESUME_FILE = "state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class LocalEngine:
    """One process, one device. fp32 master weights; optional bf16 autocast for the forward pass."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        model: nn.Module,
        optim: OptimSection,
        total_steps: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.module = model
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.grad_clip = optim.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(optim, total_steps))

    def forward(self, **inputs: Any) -> Any:
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def all_reduce_sum(self, value: float) -> float:
        return value

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_object(self, value: Any) -> Any:
        return value

    def barrier(self) -> None:
        return None

    def save_resume(self, folder: Path) -> None:
        state = {
            "model": trainable_state(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, folder / RESUME_FILE)

    def load_resume(self, folder: Path) -> None:
        state = torch.load(folder / RESUME_FILE, map_location=self.device, weights_only=False)
        missing = self.module.load_state_dict(state["model"], strict=False).unexpected_keys
        if missing:
            raise RuntimeError(f"resume state has unknown parameters: {missing[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_pretrained(self, folder: Path, max_shard_size: str) -> None:
        self.module.save_pretrained(folder, max_shard_size=max_shard_size)


@contextlib.contextmanager
def module_state(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """A module's parameters and buffers by local name (already whole in one process)."""
    yield {**dict(module.named_parameters()), **dict(module.named_buffers())}


class LocalBackend:
    """The stage in this process, on ``runtime.device``."""

    name = "none"
    rank = 0
    world_size = 1

    def __init__(self, job: Any):
        self.job = job
        self.device = resolve_device(job.recipe.runtime.device)
        self.precision = precision(job.recipe, job.section.trainable, self.device.type)

    def load_student(self, job: Any) -> nn.Module:
        runtime = job.recipe.runtime
        model = load_model(job.student, dtype=self.precision.master, use_zce_mask=False,
                           experts_implementation=runtime.experts_implementation)  # fmt: skip
        return prepare_student(model, job.section).to(self.device)

    def load_teacher(self, path: str, masked: bool) -> ModelTeacher:
        model = load_model(path, dtype=self.precision.frozen, use_zce_mask=masked or None,
                           experts_implementation=self.job.recipe.runtime.experts_implementation)  # fmt: skip
        return ModelTeacher(model.to(self.device))

    def make_engine(self, model: Any, total_steps: int) -> LocalEngine:
        return LocalEngine(model, self.job.section.optim, total_steps, self.device, self.precision.autocast)

    def full_state(self, module: nn.Module) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
        return module_state(module)


BACKEND = LocalBackend
