"""Streaming safetensors writer: plan shards up front, then write each file header-first, tensor by tensor.

safetensors' own ``save_file`` needs the whole state dict in memory; here every tensor arrives as an iterable of
byte chunks (copied straight from a source shard, or a tensor produced on the fly), so memory stays at one chunk.
The output follows transformers' layout: ``model.safetensors`` alone, or ``model-0000k-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` in bytes, ``weight_map``), ``{"format": "pt"}`` metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, ExternalError
from .reader import DTYPES, INDEX_FILE, SINGLE_FILE, TORCH_TO_CODE, nbytes_of

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(value: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal, as huggingface_hub), '512MiB' -> binary; ints pass through."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise BadInputError(
                f"size {value!r} is not understood", expected="a size like 5GB, 500MB or 2GiB", fix="fix the value"
            )
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise BadInputError(f"size {value!r} must be positive", expected="a size like 5GB", fix="fix the value")
    return size


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[bytes | memoryview]]  # called once, when the tensor is written

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return self.nbytes // DTYPES[self.dtype][1]


def tensor_out(name: str, tensor: torch.Tensor) -> OutTensor:
    """An OutTensor backed by an in-memory tensor (bytes taken without a copy when contiguous on CPU)."""
    t = tensor.detach()

    def chunks() -> Iterable[memoryview]:
        flat = t.to("cpu").contiguous().reshape(-1)
        yield memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")

    return OutTensor(name, TORCH_TO_CODE[t.dtype], tuple(t.shape), chunks)


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy in the given order (like huggingface_hub); a tensor larger than the limit gets its own shard."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def safetensors_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, int]:
    """The length-prefixed header for (name, dtype code, shape) entries laid out in the given order, and the size of
    the data region that follows it (padded to 8 bytes, as safetensors does)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, code, shape in tensors:
        size = nbytes_of(code, shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_safetensors(
    path: Path,
    tensors: list[OutTensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[OutTensor], None] | None = None,
) -> WrittenFile:
    # Larger elements first keeps every tensor aligned to its element size (as safetensors itself does).
    ordered = sorted(tensors, key=lambda t: -DTYPES[t.dtype][1])
    header, _ = safetensors_header(((t.name, t.dtype, t.shape) for t in ordered), metadata)
    digest = hashlib.sha256()
    # SHA-256 (~0.8 GB/s on a CI core) would otherwise add a full pass after the write: hash each block in a second
    # thread while this one writes it (both release the GIL on large buffers), and finish before the next block,
    # whose buffer the producer may reuse.
    with path.open("wb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:

        def put(block: bytes | memoryview) -> None:
            pending = hasher.submit(digest.update, block)
            f.write(block)
            pending.result()

        put(header)
        for t in ordered:
            written = 0
            for chunk in t.chunks():
                put(chunk)
                written += len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
            if written != t.nbytes:
                raise ValueError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
            if on_tensor:
                on_tensor(t)
    return WrittenFile(path.name, path.stat().st_size, digest.hexdigest())


def write_sharded(
    folder: Path,
    tensors: list[OutTensor],
    max_shard_size: int,
    on_tensor: Callable[[OutTensor], None] | None = None,
) -> list[WrittenFile]:
    """Write tensors as transformers-style shards (+ index when more than one); returns the written files."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    shards = plan_shards(tensors, max_shard_size)
    n = len(shards)
    written: list[WrittenFile] = []
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        name = SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        written.append(write_safetensors(folder / name, shard, on_tensor=on_tensor))
        weight_map.update({t.name: name for t in shard})
    if n > 1:
        index = {
            "metadata": {
                "total_size": sum(t.nbytes for t in tensors),
                "total_parameters": sum(t.numel for t in tensors),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def write_sharded_with_progress(
    folder: Path, tensors: list[OutTensor], max_shard_size: int, progress: Any = None, label: str = "writing tensors"
) -> list[WrittenFile]:
    """``write_sharded`` with one progress step per tensor (``progress``: a console.ProgressBar or None)."""
    if progress is None:
        return write_sharded(folder, tensors, max_shard_size)
    task = progress.task(label, total=len(tensors))
    return write_sharded(folder, tensors, max_shard_size, on_tensor=lambda t: progress.advance(task, info=t.name))


def ensure_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ExternalError(
            f"not enough disk space in {folder}: {free / 1e9:.2f} GB free",
            expected=f"at least {needed / 1e9:.2f} GB for the output",
            fix="free disk space or write the output elsewhere (--out)",
        )
