"""DeepSpeed ZeRO: the backend of every rank started by the launcher, the student engine (with optimizer) and the
frozen teacher (inference, partitioned).

Models are loaded while an ``HfDeepSpeedConfig`` is alive, so ``from_pretrained`` builds them under ``zero.Init``
and each rank only ever holds its partition; MoE blocks are ZeRO-3 leaf modules (all of a block's parameters are
gathered together, whatever experts its tokens chose); the final weights are the consolidated 16-bit state dict,
written by rank 0 through ``save_pretrained``. DeepSpeed's bf16 mode casts every parameter, routers included, to
bf16 for compute (fp32 master copies live in its optimizer), so routers are not kept in fp32 here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
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
from ..precision import precision
from ..student import prepare_student
from ..teachers import Need, TeacherScores, scores_of
from . import collective_timeout_s, lr_multiplier, param_groups

DS_TAG = "deepspeed"


def student_config(user: dict[str, Any], optim: OptimSection, micro: int, accumulation: int, world: int) -> dict:
    """The user's DeepSpeed config with the batch geometry, clipping and save options zeda needs filled in."""
    config = copy.deepcopy(user)
    zero = config.setdefault("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * world,
        gradient_clipping=optim.grad_clip,
        # AdamW from the recipe: DeepSpeedCPUAdam when the optimizer state is offloaded, else torch's (no JIT build).
        optimizer={
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "weight_decay": optim.weight_decay,
                **({} if offload else {"torch_adam": True}),
            },
        },  # fmt: skip
    )
    config.pop("scheduler", None)
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    config.setdefault("steps_per_print", 10**9)
    return config


def teacher_config(student: dict[str, Any]) -> dict[str, Any]:
    """Inference-only: no optimizer state, parameters partitioned like the student's (stage 3) or replicated."""
    config = {k: v for k, v in student.items() if k in ("bf16", "fp16", "steps_per_print")}
    stage = student.get("zero_optimization", {}).get("stage", 0)
    zero = {"stage": 3 if stage == 3 else 0}
    offload = student.get("zero_optimization", {}).get("offload_param")
    if stage == 3 and offload:
        zero["offload_param"] = offload
    config.update(zero_optimization=zero, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    config["train_batch_size"] = (
        student["train_batch_size"]
        // max(student["gradient_accumulation_steps"], 1)
        // max(student["train_micro_batch_size_per_gpu"], 1)
    )
    return config


def hf_deepspeed_config(config: dict[str, Any]) -> Any:
    """Keep the returned object alive while loading: transformers then builds the model under zero.Init."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def mark_moe_leaves(model: torch.nn.Module, block_class: str) -> None:
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if type(m).__name__ == block_class}
    if classes:
        set_z3_leaf_modules(model, list(classes))


class DeepSpeedEngine:
    def __init__(self, model: Any, optim: OptimSection, total_steps: int, config: dict[str, Any], block_class: str):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        mark_moe_leaves(model, block_class)

        def schedule(optimizer: Any) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(optim, total_steps))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, optim), lr_scheduler=schedule, config=config
        )
        self.module = self.engine.module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())
        self.zero_stage = self.engine.zero_optimization_stage()
        self._dist = dist

    def forward(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # zeda normalises the loss over the whole step itself, so DeepSpeed must not divide by accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # an optimizer step only at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

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
        self.engine.save_checkpoint(str(folder), tag=DS_TAG)

    def load_resume(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint in {folder}")

    def save_pretrained(self, folder: Path, max_shard_size: str) -> None:
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        else:
            state = self.engine.module.state_dict()
        if self.rank == 0:
            self.module.save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size)
        self.barrier()


class DeepSpeedTeacher:
    """The frozen teacher as a ZeRO inference engine (partitioned at load under stage 3)."""

    def __init__(self, model: Any, config: dict[str, Any], block_class: str):
        import deepspeed

        mark_moe_leaves(model, block_class)
        for p in model.parameters():
            p.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=model, config=config)
        self.engine.eval()

    @torch.no_grad()
    def score(self, batch: Any, need: Need, chunk: int, rows: list[int] | None = None) -> TeacherScores:
        # the module's own forward: ZeRO-3's gather hooks sit on its submodules, the head included
        return scores_of(self.engine.module, batch, need, chunk)


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


def batch_geometry(job: Any, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) per rank; every rank must run the same number of micro-batches."""
    per_rank = job.sequences_per_rank(world)
    micro = min(job.section.micro_batch_size, per_rank)
    return micro, math.ceil(per_rank / micro)


class DeepSpeedBackend:
    """One rank of a ZeRO run (process group, device and DeepSpeed config set up from the job)."""

    name = "deepspeed"

    def __init__(self, job: Any):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        timeout = datetime.timedelta(seconds=collective_timeout_s(job.recipe))
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timeout)
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.job, self.rank, self.world_size = job, dist.get_rank(), dist.get_world_size()
        job.check_split(self.world_size)
        self.device = torch.device(get_accelerator().current_device_name())
        user = load_deepspeed_config(job.recipe.distributed.deepspeed) if job.recipe.distributed.deepspeed else {}
        self.precision = precision(job.recipe, job.section.trainable, self.device.type, deepspeed=user)
        user.setdefault("zero_optimization", {"stage": 3})
        if self.precision.compute == torch.bfloat16 and "bf16" not in user:
            user["bf16"] = {"enabled": True}
        micro, accumulation = batch_geometry(job, self.world_size)
        self.config = student_config(user, job.section.optim, micro, accumulation, self.world_size)
        self.block = read_config_json(Path(job.student))["zeda"]["router"]["block_class"]
        self._alive: list[Any] = []  # HfDeepSpeedConfig objects: models load partitioned while they live

    def load_student(self, job: Any) -> nn.Module:
        self._alive.append(hf_deepspeed_config(self.config))
        model = load_model(job.student, dtype=self.precision.compute, use_zce_mask=False,
                           experts_implementation=job.recipe.runtime.experts_implementation)  # fmt: skip
        model = prepare_student(model, job.section, fp32_routers=False)
        if job.section.trainable == "router":
            # ZeRO-3 reduces a leaf module's gradients in a full backward hook, which fires too early (before the
            # router's weight gradient exists) when none of the block's inputs requires a gradient, as with a
            # frozen body upstream of the first router. Inputs that require gradients make it fire at the right time.
            model.enable_input_require_grads()
        return model

    def load_teacher(self, path: str, masked: bool) -> DeepSpeedTeacher:
        config = teacher_config(self.config)
        self._alive.append(hf_deepspeed_config(config))  # the teacher loads partitioned too
        frozen = load_model(path, dtype=self.precision.frozen, use_zce_mask=masked or None,
                            experts_implementation=self.job.recipe.runtime.experts_implementation)  # fmt: skip
        return DeepSpeedTeacher(frozen, config, self.block)

    def make_engine(self, model: Any, total_steps: int) -> DeepSpeedEngine:
        return DeepSpeedEngine(model, self.job.section.optim, total_steps, self.config, self.block)

    @contextlib.contextmanager
    def full_state(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        params = list(module.parameters())
        if params and hasattr(params[0], "ds_id"):  # ZeRO-3 partitions: gathered on every rank while active
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                yield {**dict(module.named_parameters()), **dict(module.named_buffers())}
        else:
            yield {**dict(module.named_parameters()), **dict(module.named_buffers())}


BACKEND = DeepSpeedBackend
