"""Entry point of every rank under the launcher: ``python -m zeda_cli.distill.worker OUT/job.json``."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..runtime.loading import load_model, load_tokenizer
from .engines.deepspeed import DeepSpeedEngine, DeepSpeedTeacher, hf_deepspeed_config, student_config, teacher_config
from .job import DistillJob, load_deepspeed_config
from .stage1 import run_stage1
from .stage2 import run_stage2
from .state import compute_dtype, enable_checkpointing, select_trainable, stage_section


def batch_geometry(job: DistillJob, world: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) per rank; every rank must run the same number of micro-batches."""
    section = stage_section(job)
    if job.stage == 1:
        per_rank = job.recipe.stage1.global_batch_size // world
    else:
        per_rank = job.recipe.stage2.prompts_per_step // world * job.recipe.stage2.samples_per_prompt
    micro = min(section.micro_batch_size, per_rank)
    return micro, math.ceil(per_rank / micro)


def check_divisible(job: DistillJob, world: int) -> None:
    size, name = (
        (job.recipe.stage1.global_batch_size, "stage1.global_batch_size")
        if job.stage == 1
        else (job.recipe.stage2.prompts_per_step, "stage2.prompts_per_step")
    )
    if size % world:
        from ..errors import BadInputError

        raise BadInputError(f"{name}={size} does not split over {world} ranks", expected=f"a multiple of {world}")


def deepspeed_config(job: DistillJob, world: int, device: torch.device) -> dict[str, Any]:
    user = load_deepspeed_config(job.recipe.distributed.deepspeed) if job.recipe.distributed.deepspeed else {}
    user.setdefault("zero_optimization", {"stage": 3})
    if compute_dtype(job.recipe.runtime, device) == torch.bfloat16 and "bf16" not in user:
        user["bf16"] = {"enabled": True}
    micro, accumulation = batch_geometry(job, world)
    return student_config(user, stage_section(job).optim, micro, accumulation, world)


def run_rank(job: DistillJob) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world, rank = dist.get_world_size(), dist.get_rank()
    check_divisible(job, world)
    device = torch.device(get_accelerator().current_device_name())
    config = deepspeed_config(job, world, device)
    dtype = torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32
    section = stage_section(job)
    tokenizer = load_tokenizer(job.student)
    keep_alive = [hf_deepspeed_config(config)]  # the student loads partitioned (zero.Init)
    model = load_model(job.student, dtype=dtype, use_zce_mask=False)
    select_trainable(model, section.trainable)
    if section.trainable == "router":
        # ZeRO-3 reduces a leaf module's gradients in a full backward hook, which fires too early (before the
        # router's weight gradient exists) when none of the block's inputs requires a gradient, as with a frozen
        # body upstream of the first router. Inputs that require gradients make it fire at the right time.
        model.enable_input_require_grads()
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    block = model.config.zeda["router"]["block_class"]

    def make_engine(m: Any, total: int) -> DeepSpeedEngine:
        return DeepSpeedEngine(m, section.optim, total, config, block)

    on_step = _printer(rank)
    if job.stage == 1 and job.recipe.stage1.loss == "ce":
        return run_stage1(job, model, tokenizer, make_engine, on_step)
    t_config = teacher_config(config)
    keep_alive.append(hf_deepspeed_config(t_config))  # the teacher loads partitioned too
    frozen = load_model(job.teacher.path, dtype=dtype, use_zce_mask=job.teacher.masked or None)
    teacher = DeepSpeedTeacher(frozen, t_config, block)
    if job.stage == 1:
        summary = run_stage1(job, model, tokenizer, make_engine, on_step, teacher)
    else:
        summary = run_stage2(job, model, teacher, tokenizer, make_engine, on_step)
    del keep_alive
    return summary


def _printer(rank: int):
    def on_step(record: dict[str, Any]) -> None:
        if rank == 0:
            keys = ("step", "total_steps", "loss", "ce", "kl", "aux", "zero_share", "tokens_per_s")
            sys.stdout.write(json.dumps({k: record[k] for k in keys if k in record}) + "\n")
            sys.stdout.flush()

    return on_step


def main(argv: list[str] | None = None) -> None:
    # torch.distributed's deprecation notices for the collectives DeepSpeed calls, once per call and rank.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = sys.argv[1:] if argv is None else argv
    job = DistillJob.read(Path(args[0]))
    run_rank(job)


if __name__ == "__main__":
    main()
