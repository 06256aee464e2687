"""``zeda.json``: every stage output documents itself (inputs, settings, versions, file checksums, metrics).

The ``done`` flag is written last; a folder whose manifest is missing or not done is never treated as complete.
Outputs that are written in one go are staged in a hidden sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import BadInputError, CheckpointError

MANIFEST_FILE = "zeda.json"
_VERSIONED = ("zeda", "torch", "transformers", "safetensors", "huggingface_hub", "deepspeed")


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    done: bool = False
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    zeda_version: str = Field(default_factory=lambda: _version("zeda"))
    versions: dict[str, str] = Field(default_factory=lambda: {p: _version(p) for p in _VERSIONED})
    inputs: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileRecord] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    return FileRecord(size=path.stat().st_size, sha256=sha256_file(path))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return Manifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as err:
        raise CheckpointError(
            f"{path} is not a valid zeda manifest ({err.__class__.__name__})",
            expected="a zeda.json written by zeda",
            fix="re-run the stage that produced this folder",
        ) from err


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
