"""Training backends behind two contracts: a :class:`Backend` sets up the process and builds the student, its frozen
teacher and the :class:`Engine` that trains it; the stage loops only ever call what ``Engine`` lists. The same
process assembly (``distill.process``) and the same loops run in one process (:mod:`.local`), on DeepSpeed ZeRO
ranks (:mod:`.deepspeed`) or on FSDP2 (+ expert-parallel) ranks built by transformers (:mod:`.fsdp2`); a backend is
one module with one ``BACKEND`` entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ...recipes import OptimSection
from ...runtime.zeda_dynamic_moe import routers


class Engine(Protocol):
    """The contract of a training engine.

    * ``forward(**inputs)`` runs the (wrapped) model on one micro-batch and returns its output.
    * ``backward(loss)`` adds the gradients of one micro-batch's loss, which the caller has already normalised
      over the whole optimizer step (engines never divide by the number of micro-batches). An engine may apply
      the update at the accumulation boundary inside it (DeepSpeed does).
    * ``step()`` ends the optimizer step: afterwards the update has been applied exactly once, the learning-rate
      schedule has advanced and the gradients are cleared. Returns the global gradient norm (before clipping).
    * ``all_reduce_sum`` / ``all_reduce_sums`` / ``broadcast_object`` (rank 0's value to every rank) / ``barrier``
      are collectives over the ranks (no-ops in one process); ``rank`` 0 writes.
    * ``save_resume`` / ``load_resume`` write and read everything a resumed run needs (trainable weights,
      optimizer, schedule) in a folder; ``save_pretrained`` writes the full model, every rank calling it.
    """

    module: Any  # the (unwrapped) transformers model
    rank: int
    world_size: int
    device: torch.device

    def forward(self, **inputs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float: ...
    def current_lr(self) -> float: ...
    def all_reduce_sum(self, value: float) -> float: ...
    def all_reduce_sums(self, values: list[float]) -> list[float]: ...
    def broadcast_object(self, value: Any) -> Any: ...
    def barrier(self) -> None: ...
    def save_resume(self, folder: Path) -> None: ...
    def load_resume(self, folder: Path) -> None: ...
    def save_pretrained(self, folder: Path, max_shard_size: str) -> None: ...


EngineFactory = Callable[[Any, int], Engine]  # (student model, total optimizer steps) -> engine


class Backend(Protocol):
    """How a training process is set up (built from the job at the start of the process).

    * ``load_student(job)`` loads the student and puts it in training form (``distill.student.prepare_student``).
    * ``load_teacher(path, masked)`` loads a separate frozen teacher (no gradients, no optimizer state).
    * ``make_engine(model, total_steps)`` wraps the student for training.
    * ``full_state(module)`` yields the module's full parameters and buffers by local name while active (gathered
      from their shards; a collective where weights are sharded: every rank calls it).
    """

    name: str
    rank: int
    world_size: int
    device: torch.device

    def load_student(self, job: Any) -> nn.Module: ...
    def load_teacher(self, path: str, masked: bool) -> Any: ...
    def make_engine(self, model: Any, total_steps: int) -> Engine: ...
    def full_state(self, module: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]: ...


def collective_timeout_s(recipe: Any) -> int:
    """How long a rank waits in a collective: ``distributed.timeout_s``, else long enough for rank 0 to wait out a
    whole generation request (``generation.request_timeout_s``, e.g. 32k-token stage-2 samples) twice over."""
    return recipe.distributed.timeout_s or max(1800, 2 * recipe.generation.request_timeout_s)


BACKENDS = {"none": ".local", "deepspeed": ".deepspeed", "fsdp2": ".fsdp2"}  # distributed.kind -> its module


def backend_for(job: Any) -> Backend:
    """Set up this process for ``job`` with the backend its recipe names (``distributed.kind``)."""
    module = importlib.import_module(BACKENDS[job.recipe.distributed.kind], __name__)
    return module.BACKEND(job)


def lr_multiplier(optim: OptimSection, total_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_ratio`` of the steps, then constant / cosine / linear decay to min_lr_ratio."""
    warmup = int(round(optim.warmup_ratio * total_steps))
    floor = optim.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * (1.0 - progress)

    return multiplier


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or 1-D tensors), trainable parameters only; the router
    weights form a third group with their own lr / weight decay when ``optim.router_lr`` or
    ``optim.router_weight_decay`` is set."""
    split = optim.router_lr is not None or optim.router_weight_decay is not None
    router_ids = {id(r.weight) for _, r in routers(model)} if split else set()
    decay, no_decay, router = [], [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # ZeRO-3 parameters are flat 1-D partitions; their real shape is ds_shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            (router if id(p) in router_ids else decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router:
        wd = optim.weight_decay if optim.router_weight_decay is None else optim.router_weight_decay
        groups.append({"params": router, "weight_decay": wd, "lr": optim.router_lr or optim.lr})
    return [g for g in groups if g["params"]]
