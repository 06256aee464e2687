"""The run folder: what every zeda output (inject, rollout, stage1, stage2, export) is, in one place.

Each output documents itself in ``zeda.json`` (a :class:`Manifest`): its stage, inputs, settings, versions, the
sha256 of every file, metrics, and ``parent``, the zeda folder it was made from (``None`` for an injection, whose
input is the static model, recorded as ``inputs.origin``). The ``done`` flag is written last; a folder whose
manifest is missing or not done is never treated as complete. Outputs written in one go are staged in a hidden
sibling folder and renamed into place at the end.

Lineage follows ``parent`` only: :func:`lineage` walks it, and everything that needs the history (the frozen
teacher, the original model, default data files, the stages a model went through) reads that one walk.
Manifests written before ``format_version`` 2 have no ``parent``; :func:`read_manifest` fills it from their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadInputError, CheckpointError

MANIFEST_FILE = "zeda.json"
FORMAT_VERSION = 2  # 1: round-1 manifests (no format_version, no parent)
MAX_LINEAGE = 16
_ORIGIN_KEYS = {"inject": "source", "export": "base_model"}
_VERSIONED = ("zeda", "torch", "transformers", "safetensors", "huggingface_hub", "deepspeed")


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int
    sha256: str


class TeacherSpec(BaseModel):
    """The frozen original model a stage distils from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    masked: bool  # load a dynamic folder with use_zce_mask=True (= the original static model)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    stage: str
    done: bool = False
    parent: str | None = None  # absolute path of the zeda folder this output was made from
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    zeda_version: str = Field(default_factory=lambda: _version("zeda"))
    versions: dict[str, str] = Field(default_factory=lambda: {p: _version(p) for p in _VERSIONED})
    inputs: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @property
    def origin(self) -> dict[str, Any]:
        """The static model the run started from (``Source.describe()``: spec, folder, repo_id, revision): an
        injection's source or an export's base model (training stages find it through ``parent``; manifests written
        before format 2 carried a copy as ``origin``)."""
        value = self.inputs.get(_ORIGIN_KEYS.get(self.stage, "origin"))
        return value if isinstance(value, dict) else {}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# --- reading and writing -----------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    return FileRecord(size=path.stat().st_size, sha256=sha256_file(path))


def folder_records(folder: Path, known: dict[str, FileRecord] | None = None) -> dict[str, FileRecord]:
    """Records of every regular, non-hidden file of ``folder``; files in ``known`` are not hashed again."""
    records = dict(known or {})
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in records:
            records[path.name] = file_record(path)
    return records


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return Manifest.model_validate(_migrate(json.loads(path.read_text())))
    except (json.JSONDecodeError, ValidationError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a valid zeda manifest ({err.__class__.__name__})",
            expected="a zeda.json written by zeda",
            fix="re-run the stage that produced this folder",
        ) from err


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (round 1) -> 2: ``parent`` from the input each stage used to name its predecessor by."""
    if raw.get("format_version", 1) >= FORMAT_VERSION:
        return raw
    inputs = raw.get("inputs") or {}
    parent = {"stage1": inputs.get("student"), "stage2": inputs.get("student"),
              "export": (inputs.get("run") or {}).get("folder")}.get(raw.get("stage"))  # fmt: skip
    return {**raw, "format_version": FORMAT_VERSION, "parent": str(Path(parent).resolve()) if parent else None}


def verify_files(folder: Path, manifest: Manifest) -> list[str]:
    """Problems (missing / resized / checksum mismatch) of the files the manifest lists; empty when all good.

    Checksums of several files are computed in parallel threads (hashlib releases the GIL), one per core."""
    problems: dict[str, str] = {}
    to_hash = []
    for name, record in manifest.files.items():
        path = folder / name
        if not path.exists():
            problems[name] = f"{name} is missing"
        elif path.stat().st_size != record.size:
            problems[name] = f"{name} has {path.stat().st_size} bytes, the manifest says {record.size}"
        else:
            to_hash.append(name)
    workers = max(1, min(len(to_hash), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        digests = dict(zip(to_hash, pool.map(lambda n: sha256_file(folder / n), to_hash), strict=True))
    for name, digest in digests.items():
        if digest != manifest.files[name].sha256:
            problems[name] = f"{name} does not match its sha256 checksum"
    return [problems[name] for name in manifest.files if name in problems]


def verified_manifest(folder: Path, what: str = "RUN_DIR") -> Manifest:
    """The folder's manifest, refused unless it exists, says done, and every listed file matches its checksum."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"{what} {folder} has no {MANIFEST_FILE}",
            expected="a finished zeda output folder (inject-zero-experts, distill, export)",
            fix="pass the output folder of a zeda stage, or re-run the stage that should have written it",
        )
    if not manifest.done:
        raise CheckpointError(
            f"{what} {folder}: stage {manifest.stage!r} did not finish ({MANIFEST_FILE} says done: false)",
            expected="a completed stage",
            fix="re-run (or resume) that stage, then try again",
        )
    problems = verify_files(folder, manifest)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{what} {folder} fails checksum verification: {'; '.join(problems[:3])}{more}",
            expected=f"the files exactly as the {manifest.stage} stage wrote them",
            fix="re-run the stage that produced this folder (or restore the damaged files)",
        )
    return manifest


# --- writing outputs ---------------------------------------------------------------------------------------------
def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output {out} is a file", expected="a folder path", fix="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInputError(
            f"output folder {out} exists and is not empty",
            expected="a new or empty folder",
            fix="choose another --out, or pass --overwrite to replace it",
        )


@contextmanager
def staged_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into; rename it to ``out`` on success, delete it on failure."""
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.zeda-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


# --- lineage -----------------------------------------------------------------------------------------------------
Lineage = list[tuple[Path, Manifest]]


def lineage(folder: Path, manifest: Manifest | None = None) -> Lineage:
    """``folder`` and the zeda folders it was made from, newest first, following ``parent`` (ends where a parent
    is gone or has no manifest; an unreadable parent manifest ends it too)."""
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        return []
    chain = [(folder.resolve(), manifest)]
    while chain[-1][1].parent and len(chain) < MAX_LINEAGE:
        parent = Path(chain[-1][1].parent)
        if parent in {f for f, _ in chain}:
            break
        try:
            found = read_manifest(parent) if parent.is_dir() else None
        except CheckpointError:
            found = None
        if found is None:
            break
        chain.append((parent, found))
    return chain


def origin_of(chain: Lineage) -> dict[str, Any]:
    """The original static model of a run (the first manifest in the chain that records one)."""
    return next((m.origin for _, m in chain if m.origin), {})


def original_teacher(chain: Lineage) -> TeacherSpec | None:
    """The frozen original model behind a run: the teacher a stage recorded, else an injection with its zero
    experts masked (exactly the original), else the origin folder if it is still on disk."""
    for folder, manifest in chain:
        if "teacher" in manifest.inputs:
            return TeacherSpec.model_validate(manifest.inputs["teacher"])
        if manifest.stage == "inject":
            return TeacherSpec(path=str(folder), masked=True)
    origin = Path(str(origin_of(chain).get("folder") or ""))
    return TeacherSpec(path=str(origin), masked=False) if origin_of(chain) and origin.is_dir() else None


def find_file(folder: Path, candidates: Sequence[str]) -> Path | None:
    """The first candidate that exists in ``folder``, in a folder of its lineage, or in its original model's folder
    (never anywhere else: a missing lineage is no reason to look in the working directory)."""
    chain = lineage(folder)
    places = [folder.resolve(), *(f for f, _ in chain[1:])]
    origin = origin_of(chain).get("folder")
    if origin and Path(origin).is_dir():
        places.append(Path(origin))
    for place in places:
        for name in candidates:
            if (place / name).is_file():
                return place / name
    return None
