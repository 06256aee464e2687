"""``zeda export``: the final artifact of a run, streamed from a finished and verified stage output.

The format (``export.format``) comes from the :data:`~zeda_cli.export.formats.FORMATS` registry. Tensors are
streamed chunk by chunk, optionally converted to another float dtype; the card and the manifest come last, and the
folder appears only when complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..architectures import ResolvedConfig, resolve_config
from ..console import ProgressBar
from ..errors import BadInputError, UnsupportedModelError, ZedaError, raise_all
from ..io.reader import DTYPES, Checkpoint, TensorInfo
from ..io.sources import copy_top_level_files, read_config_json
from ..io.writer import OutTensor, WrittenFile, ensure_free_space, parse_size, write_sharded_with_progress
from ..recipes import ExportSection
from ..runs import (
    MANIFEST_FILE,
    FileRecord,
    Lineage,
    Manifest,
    folder_records,
    lineage,
    origin_of,
    sha256_file,
    staged_output,
    verified_manifest,
    write_manifest,
)
from ..runtime.loading import open_weights
from .card import CardFacts, build_model_card, source_license
from .formats import FORMATS, ExportFormat

_DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})  # fp8 holds quantised weights: never converted
# Files of a stage folder that export rewrites, or that are not part of a model (training leftovers).
_SKIP_FILES = re.compile(
    r"(\.safetensors|\.bin|\.pt|\.pth|\.h5|\.msgpack|\.gguf|\.index\.json|\.meta\.json|\.jsonl|\.log)$|"
    r"^(config\.json|README\.md|zeda\.json|\.gitattributes|modeling_zeda\.py|zeda_dynamic_moe\.py|"
    r"trainer_state\.json|job\.json|convert\.json)$"
)


@dataclass(frozen=True)
class Run:
    folder: Path
    manifest: Manifest
    rc: ResolvedConfig
    ckpt: Checkpoint
    chain: Lineage  # this run and the zeda folders it was made from, newest first


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    model_type: str
    num_experts: int
    num_zero_experts: int
    base_model: str | None
    stages: list[str]
    files: list[WrittenFile]


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise BadInputError(
            f"RUN_DIR {run_dir} is not a folder", expected="a zeda stage output folder", fix="check the path"
        )
    manifest = verified_manifest(run_dir)
    rc = resolve_config(read_config_json(run_dir))
    if not rc.dynamic:
        raise UnsupportedModelError(
            f"{run_dir} holds a static {rc.adapter.model_type} model (no zero experts)",
            expected="a stage output with zero experts (inject-zero-experts or distill)",
            fix="run `zeda inject-zero-experts` (and distillation) first, then export that folder",
        )
    return Run(run_dir, manifest, rc, open_weights(run_dir), lineage(run_dir, manifest))


# --- tensors -----------------------------------------------------------------------------------------------------
def _target_code(info: TensorInfo, dtype: str, keep: frozenset[str]) -> str:
    if dtype == "auto" or info.dtype not in _FLOAT_CODES or info.name in keep:
        return info.dtype
    return _DTYPE_CODES[dtype]


def _copied(ckpt: Checkpoint, info: TensorInfo, code: str) -> OutTensor:
    """The tensor streamed chunk by chunk: bytes as stored, or each chunk converted to ``code``."""
    if code == info.dtype:
        return OutTensor(info.name, code, info.shape, lambda: ckpt.read_chunks(info.name))
    src, dst = DTYPES[info.dtype][0], DTYPES[code][0]

    def chunks() -> Iterator[memoryview]:
        for chunk in ckpt.read_chunks(info.name):  # READ_CHUNK is a multiple of every element size
            converted = torch.frombuffer(bytearray(chunk), dtype=src).to(dst)
            yield memoryview(converted.view(torch.uint8).numpy())

    return OutTensor(info.name, code, info.shape, chunks)


def planned_tensors(run: Run, settings: ExportSection, fmt: ExportFormat) -> list[OutTensor]:
    adapter = run.rc.adapter
    # Correction biases steer the routing choice; bf16 would round them, so they keep their stored dtype.
    keep = frozenset(adapter.router_bias_key(b) for b in adapter.moe_block_prefixes(run.ckpt.tensors))
    tensors = [_copied(run.ckpt, info, _target_code(info, settings.dtype, keep)) for info in run.ckpt.tensors.values()]
    return fmt.tensors(run.rc, tensors)


def export_config(rc: ResolvedConfig, settings: ExportSection, fmt: ExportFormat) -> dict[str, Any]:
    config = fmt.config(rc)
    if settings.dtype != "auto":
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = settings.dtype
    return config


# --- export ------------------------------------------------------------------------------------------------------
def export_run(
    run_dir: Path,
    out: Path,
    *,
    settings: ExportSection,
    overwrite: bool = False,
    progress: ProgressBar | None = None,
) -> ExportResult:
    """Validate everything (manifest, checksums, format) before writing; then stream into ``out``."""
    fmt = FORMATS[settings.format]
    problems = _overlap(run_dir, out)
    try:
        run = load_run(run_dir)
        fmt.check(run.rc)
    except ZedaError as err:
        raise_all([*problems, err])
    raise_all(problems)
    base = dict(origin_of(run.chain))
    if settings.base_model:
        base.update(repo_id=settings.base_model, spec=base.get("spec") or settings.base_model)
    tensors = planned_tensors(run, settings, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out.parent, sum(t.nbytes for t in tensors))
    with staged_output(out, overwrite) as tmp:
        written = write_sharded_with_progress(
            tmp, tensors, parse_size(settings.max_shard_size), progress, "exporting tensors"
        )
        (tmp / "config.json").write_text(json.dumps(export_config(run.rc, settings, fmt), indent=2) + "\n")
        fmt.extra_files(tmp, run.rc)
        copy_top_level_files(run.folder, tmp, _SKIP_FILES)
        build_model_card(card_facts(run, base, settings)).save(tmp / "README.md")
        known = {f.name: FileRecord(size=f.size, sha256=f.sha256) for f in written}
        write_manifest(tmp, _manifest(run, base, settings, folder_records(tmp, known)))
    rc = run.rc
    return ExportResult(out, settings.format, rc.adapter.model_type, rc.num_experts, rc.num_zero_experts,
                        base.get("repo_id"), stages_of(run), written)  # fmt: skip


def stages_of(run: Run) -> list[str]:
    return [m.stage for _, m in reversed(run.chain)]


def _overlap(run_dir: Path, out: Path) -> list[ZedaError]:
    if out.resolve() != run_dir.resolve() and out.resolve() not in run_dir.resolve().parents:
        return []
    return [
        BadInputError(
            f"--out {out} would replace RUN_DIR {run_dir}",
            expected="an output folder outside the run",
            fix="choose another --out",
        )
    ]


def card_facts(run: Run, base: dict[str, Any], s: ExportSection) -> CardFacts:
    rc, adapter = run.rc, run.rc.adapter
    zeda = rc.raw.get("zeda") or {}
    inject = next((m for _, m in run.chain if m.stage == "inject"), None)
    shared = adapter.shared_expert
    folder = base.get("folder")
    return CardFacts(
        family=adapter.model_type,
        base_architecture=adapter.causal_lm_class,
        dynamic_architecture=adapter.dynamic_architecture,
        format=s.format,
        num_experts=rc.num_experts,
        num_zero_experts=rc.num_zero_experts,
        top_k=rc.top_k,
        moe_layers=len(rc.moe_layers),
        expert_intermediate=adapter.expert_intermediate(rc.hf),
        stages=stages_of(run),
        base_model=base.get("repo_id"),
        base_model_ref=base.get("spec"),
        license=source_license(Path(folder) if folder else None),
        target_skip=zeda.get("target_skip", inject.settings.get("target_skip") if inject else None),
        init=zeda.get("init"),
        shared_intermediate=shared.intermediate(rc.hf) if shared else None,
        use_zce_mask=rc.use_zce_mask,
        correction_bias=adapter.correction_bias,
        zero_expert_bias=float(rc.raw.get("zero_expert_bias") or 0.0),
        dtype=s.dtype,
        metrics=run.manifest.metrics,
    )


def _manifest(run: Run, base: dict[str, Any], settings: ExportSection, files: dict[str, FileRecord]) -> Manifest:
    return Manifest(
        stage="export",
        done=True,
        parent=str(run.folder.resolve()),
        inputs={
            "run": {
                "folder": str(run.folder.resolve()),
                "stage": run.manifest.stage,
                "manifest_sha256": sha256_file(run.folder / MANIFEST_FILE),
            },
            "base_model": base,
            "lineage": [{"stage": m.stage, "folder": str(f)} for f, m in run.chain],
            "model_type": run.rc.adapter.model_type,
            "num_experts": run.rc.num_experts,
            "num_zero_experts": run.rc.num_zero_experts,
        },
        settings=settings.model_dump(mode="json"),
        files=files,
        metrics=run.manifest.metrics,
    )
