"""Machinery shared by both stages: model set-up, trainable scope, resume checkpoints, metrics, the final save.

A stage output folder while training holds ``job.json``, ``metrics.jsonl``, ``checkpoints/step-*`` and a manifest
with ``done: false``; at the end the model files are written in the layout ``inject-zero-experts`` uses and the
manifest is rewritten with ``done: true`` last. ``--resume`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import resolve_config
from ..io.sources import read_config_json
from ..recipes import Recipe, RuntimeSection, TrainCommon, dump_recipe
from ..runs import Manifest, file_record, read_manifest, write_manifest
from ..runtime.loading import load_model
from ..runtime.packaging import write_loading_code
from ..runtime.zeda_dynamic_moe import routers
from .job import DistillJob

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TEACHER_ROUTER_FILE = "teacher_router.pt"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "chat_template.jinja", "generation_config.json", "added_tokens.json")  # fmt: skip


# --- dtype policy ------------------------------------------------------------------------------------------------
def compute_dtype(runtime: RuntimeSection, device: torch.device) -> torch.dtype:
    if runtime.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, runtime.dtype)


def load_student(job: DistillJob, device: torch.device, **kwargs: Any) -> nn.Module:
    """The student in training form: zero experts live (mask off), routers in fp32, trainable scope applied.

    Full training keeps fp32 master weights (the forward may autocast); router-only training loads the frozen body
    in the compute dtype.
    """
    runtime = job.recipe.runtime
    scope = stage_section(job).trainable
    dtype = torch.float32 if scope == "full" else compute_dtype(runtime, device)
    model = load_model(
        job.student, dtype=dtype, use_zce_mask=False, experts_implementation=runtime.experts_implementation, **kwargs
    )
    for _, router in routers(model):
        router.float()
    select_trainable(model, scope)
    if stage_section(job).gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device).train()


def enable_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def stage_section(job: DistillJob) -> TrainCommon:
    return job.recipe.stage1 if job.stage == 1 else job.recipe.stage2


def select_trainable(model: nn.Module, scope: str) -> int:
    """``full``: every parameter; ``router``: only the router rows. Returns the number of trainable values."""
    router_params = {id(r.weight) for _, r in routers(model)}
    for p in model.parameters():
        p.requires_grad_(scope == "full" or id(p) in router_params)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- metrics and resume checkpoints ------------------------------------------------------------------------------
class MetricsLog:
    def __init__(self, folder: Path, enabled: bool):
        self.path = folder / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps a resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None]
        kept = [line for line in kept if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if _step_of(line) is not None]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    folder = out / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if (p / "trainer_state.json").exists()] if folder.exists() else []
    if not done:
        return None
    best = max(done, key=lambda p: int(p.name.split("-")[1]))
    return best, int(best.name.split("-")[1])


def save_checkpoint(engine: Any, out: Path, step: int, state: dict[str, Any]) -> None:
    """Atomic: written under a temporary name, renamed once complete; older checkpoints are removed after."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".partial-step-{step:08d}"
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_resume(tmp)
    engine.barrier()
    if engine.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()


def load_checkpoint(engine: Any, out: Path) -> tuple[int, dict[str, Any]]:
    found = latest_checkpoint(out)
    if found is None:
        return 0, {}
    folder, step = found
    engine.load_resume(folder)
    return step, json.loads((folder / "trainer_state.json").read_text())


# --- stage manifests and the final model ---------------------------------------------------------------------------
def start_manifest(job: DistillJob, out: Path) -> None:
    """Written at the start (done: false) so an interrupted folder is never mistaken for a finished one."""
    existing = read_manifest(out)
    if existing is not None and job.resume:
        return
    write_manifest(out, stage_manifest(job, done=False))


def stage_inputs(job: DistillJob) -> dict[str, Any]:
    source = read_manifest(Path(job.student))
    return {
        "student": job.student,
        "teacher": job.teacher.model_dump(),
        "rollouts": job.rollouts,
        "origin": source.origin or None if source else None,
        "student_stage": source.stage if source else None,
    }


def stage_manifest(job: DistillJob, **fields: Any) -> Manifest:
    """This stage's manifest: its parent is the student folder it trains."""
    return Manifest(stage=f"stage{job.stage}", parent=str(Path(job.student).resolve()), inputs=stage_inputs(job),
                    **fields)  # fmt: skip


def finish_stage(engine: Any, job: DistillJob, out: Path, metrics: dict[str, Any], settings: dict[str, Any]) -> None:
    """Write the trained model (layout of inject-zero-experts), then the manifest with done: true, last."""
    staging = out / ".model-partial"
    if engine.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    engine.barrier()
    engine.save_pretrained(staging, job.recipe.zero_experts.max_shard_size)
    if engine.rank != 0:
        return
    student = Path(job.student)
    _write_config(staging, student, job.recipe, job.stage)
    code = write_loading_code(staging, resolve_config(read_config_json(student)).adapter)
    for name in _COPIED:
        if (student / name).exists() and not (staging / name).exists():
            shutil.copyfile(student / name, staging / name)
    if (out / TEACHER_ROUTER_FILE).exists():
        shutil.copyfile(out / TEACHER_ROUTER_FILE, staging / TEACHER_ROUTER_FILE)
    (staging / "recipe.yaml").write_text(dump_recipe(job.recipe))
    files = {p.name: file_record(p) for p in sorted(staging.iterdir()) if p.is_file()}
    assert set(code) <= set(files)
    for name in files:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    write_manifest(out, stage_manifest(job, done=True, settings=settings, files=files, metrics=metrics))


def _write_config(staging: Path, student: Path, recipe: Recipe, stage: int) -> None:
    """Keep the student's dynamic config (format, router spec, auto_map) and record the distillation."""
    config = read_config_json(student)
    written = read_config_json(staging)
    for key in ("dtype", "torch_dtype"):
        if key in written:
            config[key] = written[key]
    config["use_zce_mask"] = False
    zeda = dict(config.get("zeda") or {})
    zeda.update(target_skip=recipe.balance.target_skip, distilled_stages=[*zeda.get("distilled_stages", []), stage])
    config["zeda"] = zeda
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
