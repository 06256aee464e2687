"""FSDP2 + expert parallelism built by transformers itself: the backend of every rank with ``distributed.backend:
fsdp2``, and its engine.

Student and frozen teacher load through ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size,
ep_size, dp_replicate_size, ...))``: transformers shards every parameter with FSDP2 and, with ``ep_size`` > 1, keeps
whole experts on ``ep_size`` ranks and dispatches tokens to them with an all-to-all (the model's ``ep_plan``). The
dispatch is zeda's zero-skipping one (``runtime.zeda_dynamic_moe.zero_skipping_expert_parallel``): zero-expert
slots are dropped before the all-to-all. The teacher has no gradients and no optimizer state. Resume checkpoints
and the stage's final weights are sharded ``torch.distributed.checkpoint`` files, each rank writing its own part
(no rank gathers the model); ``zeda export`` consolidates them shard by shard, and the next stage loads them
directly (resharded when the mesh differs).

Precision: parameters keep the dtype they load in (fp32 master weights for full training); with
``distributed.mixed_precision`` FSDP2 computes in bf16 and reduces gradients in fp32. Routers take the parameters'
dtype (fp32 whenever the master weights are fp32).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import BadInputError
from ...io.sources import read_config_json
from ...recipes import OptimSection
from ...runtime.loading import load_model
from ...runtime.zeda_dynamic_moe import zero_skipping_expert_parallel
from ..precision import precision
from ..student import prepare_student
from ..teachers import ModelTeacher
from . import lr_multiplier, param_groups

RESUME_DIR = "fsdp2"


def mesh_sizes(distributed: Any, world: int, num_experts: int) -> dict[str, int]:
    """``fsdp_size`` (default: the world / replicas), ``dp_replicate_size``, ``ep_size``, checked against the
    world size and the number of routed experts; every problem at once, as one line each."""
    replicas = distributed.dp_replicate_size
    fsdp = distributed.fsdp_size or max(world // replicas, 1)
    ep = distributed.ep_size
    problems = []
    if fsdp * replicas != world:
        problems.append(f"fsdp_size {fsdp} x dp_replicate_size {replicas} is not the {world} processes")
    if fsdp % ep:
        problems.append(f"ep_size {ep} does not divide fsdp_size {fsdp}")
    if num_experts % ep:
        problems.append(f"ep_size {ep} does not divide the {num_experts} routed experts")
    if problems:
        raise BadInputError(
            f"distributed: {'; '.join(problems)}",
            expected="world = fsdp_size x dp_replicate_size, with ep_size dividing fsdp_size and the experts",
            fix="change distributed.ep_size / fsdp_size / dp_replicate_size or the number of processes",
        )
    return {"fsdp_size": fsdp, "dp_replicate_size": replicas, "ep_size": ep}


def distributed_config(job: Any, world: int) -> Any:
    from transformers.distributed import DistributedConfig

    router = read_config_json(Path(job.student))["zeda"]["router"]
    sizes = mesh_sizes(job.recipe.distributed, world, int(router["num_experts"]))
    d = job.recipe.distributed
    ep = {"ep_implementation": zero_skipping_expert_parallel()} if sizes["ep_size"] > 1 else {}
    return DistributedConfig(**sizes, fsdp_cpu_offload=d.cpu_offload, fsdp_mixed_precision=d.mixed_precision, **ep)


def local_square_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """This rank's share of Σ‖g‖²: every DTensor's local shard once, a replicated one divided by its copies (all
    meshes span the world, so the all-reduce of these shares is the global squared norm)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        grad = p.grad
        copies = 1
        if hasattr(grad, "to_local"):
            copies = math.prod(grad.device_mesh.size(i) for i, pl in enumerate(grad.placements) if pl.is_replicate())
            grad = grad.to_local()
        total += grad.detach().double().pow(2).sum().cpu() / copies
    return total


class Fsdp2Engine:
    """The ``Engine`` contract over a model sharded by transformers (FSDP2 hooks do the gathers and reductions)."""

    def __init__(self, model: nn.Module, optim: OptimSection, total_steps: int, device: torch.device):
        import torch.distributed as dist

        self.module, self.device, self._dist = model, device, dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.grad_clip = optim.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=optim.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(optim, total_steps))

    def forward(self, **inputs: Any) -> Any:
        return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = math.sqrt(self.all_reduce_sum(float(local_square_norm(self.params))))
        if self.grad_clip > 0 and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def all_reduce_sum(self, value: float) -> float:
        return self.all_reduce_sums([value])[0]

    def all_reduce_sums(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier()

    def save_resume(self, folder: Path) -> None:
        """Every rank writes its shard of the weights and the optimizer state (DCP); rank 0 the schedule."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder / RESUME_DIR))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_resume(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder / RESUME_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])  # fmt: skip
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))

    def save_pretrained(self, folder: Path, max_shard_size: str) -> None:
        """The stage's weights as sharded DCP safetensors (each rank its part); every rank calls it."""
        self.module.save_pretrained(folder, distributed_checkpoint=True)
        self.barrier()


class Fsdp2Backend:
    """One rank of an FSDP2 (+ EP) run; the process group is set up by the worker (or an outer launcher)."""

    name = "fsdp2"

    def __init__(self, job: Any):
        import torch.distributed as dist

        self.job, self.rank, self.world_size = job, dist.get_rank(), dist.get_world_size()
        job.check_split(self.world_size)
        cuda = torch.cuda.is_available() and job.recipe.runtime.device != "cpu"
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        self.precision = precision(job.recipe, job.section.trainable, self.device.type)
        self.config = distributed_config(job, self.world_size)

    def _load(self, path: str, dtype: torch.dtype, masked: bool | None) -> nn.Module:
        return load_model(path, dtype=dtype, use_zce_mask=masked, distributed_config=self.config,
                          experts_implementation=self.job.recipe.runtime.experts_implementation)  # fmt: skip

    def load_student(self, job: Any) -> nn.Module:
        return prepare_student(self._load(job.student, self.precision.master, False), job.section, fp32_routers=False)

    def load_teacher(self, path: str, masked: bool) -> ModelTeacher:
        return ModelTeacher(self._load(path, self.precision.frozen, masked or None))

    def make_engine(self, model: Any, total_steps: int) -> Fsdp2Engine:
        return Fsdp2Engine(model, self.job.section.optim, total_steps, self.device)

    @contextlib.contextmanager
    def full_state(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors of a module's parameters and buffers, gathered from their shards (every rank calls it)."""
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        yield {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


BACKEND = Fsdp2Backend
