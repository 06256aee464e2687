"""The stage folder's record: a manifest written at the start (``done: false``), and at the end the trained model in
the layout ``inject-zero-experts`` writes, its config, then the manifest with ``done: true``, last."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..architectures import resolve_config
from ..io.sources import read_config_json
from ..recipes import Recipe, dump_recipe
from ..runs import Manifest, file_record, read_manifest, write_manifest
from ..runtime.packaging import write_loading_code
from .checkpoints import CHECKPOINTS
from .teachers import TEACHER_ROUTER_FILE

_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "chat_template.jinja", "generation_config.json", "added_tokens.json")  # fmt: skip


def start_manifest(job: Any, out: Path) -> None:
    """Written at the start (done: false) so an interrupted folder is never mistaken for a finished one."""
    existing = read_manifest(out)
    if existing is not None and job.resume:
        return
    write_manifest(out, stage_manifest(job, done=False))


def stage_inputs(job: Any) -> dict[str, Any]:
    """What the stage read; the original model is found through ``parent`` (runs.lineage), not copied here."""
    source = read_manifest(Path(job.student))
    return {
        "student": job.student,
        "teacher": job.teacher.model_dump(),
        "rollouts": job.rollouts,
        "student_stage": source.stage if source else None,
    }


def stage_manifest(job: Any, **fields: Any) -> Manifest:
    """This stage's manifest: its parent is the student folder it trains."""
    return Manifest(stage=f"stage{job.stage}", parent=str(Path(job.student).resolve()), inputs=stage_inputs(job),
                    **fields)  # fmt: skip


def finish_stage(engine: Any, job: Any, out: Path, metrics: dict[str, Any], settings: dict[str, Any]) -> None:
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
    """Keep the student's dynamic config (format, router spec, auto_map) and record the distillation; the dtype is
    the one the weights were saved in (a sharded save writes no config of its own: the student's is kept)."""
    config = read_config_json(student)
    written = read_config_json(staging) if (staging / "config.json").exists() else {}
    for key in ("dtype", "torch_dtype"):
        if key in written:
            config[key] = written[key]
    config["use_zce_mask"] = False
    zeda = dict(config.get("zeda") or {})
    zeda.update(target_skip=recipe.balance.target_skip, distilled_stages=[*zeda.get("distilled_stages", []), stage])
    config["zeda"] = zeda
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
