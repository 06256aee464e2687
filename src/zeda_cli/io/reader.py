"""A validated, model-free view of safetensors checkpoints.

Only headers are parsed up front; tensor bytes are read on demand with plain file reads (no mmap), one tensor (or
one chunk) at a time, so memory stays bounded by the largest tensor however big the checkpoint is.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ZedaError, raise_all

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
READ_CHUNK = 16 * 1024 * 1024

_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {code: (dtype, dtype.itemsize) for code, dtype in _CODES.items()}
TORCH_TO_CODE = {dtype: code for code, dtype in _CODES.items()}


def nbytes_of(dtype_code: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of this safetensors dtype and shape (0 for an unknown dtype)."""
    return DTYPES.get(dtype_code, (None, 0))[1] * math.prod(int(d) for d in shape)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and sanity-check one safetensors header; returns (header, data start offset)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise _corrupt(path, "file shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise _corrupt(path, f"header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    start = 8 + header_len
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, size - start)
    return header, start


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    try:
        begin, end = entry["data_offsets"]
        expected = DTYPES[entry["dtype"]][1] * math.prod(int(d) for d in entry["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise _corrupt(path, f"tensor {name!r} has a malformed entry") from err
    if not 0 <= begin <= end <= data_size or end - begin != expected:
        raise _corrupt(path, f"tensor {name!r} has offsets {begin}..{end} outside the file or of the wrong size")


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path.name} is corrupted: {what}",
        expected="a valid safetensors file",
        fix="re-download or re-create the checkpoint",
    )


@dataclass
class Checkpoint:
    """All tensors of a safetensors checkpoint folder (single file or index + shards), headers only."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_chunks(self, name: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        info = self.tensors[name]
        with info.file.open("rb") as f:
            f.seek(info.offset)
            left = info.nbytes
            while left > 0:
                data = f.read(min(chunk, left))
                if not data:
                    raise _corrupt(info.file, f"tensor {name!r} is truncated")
                left -= len(data)
                yield data

    def read_tensor(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        data = bytearray(b"".join(self.read_chunks(name)))
        dtype = DTYPES[info.dtype][0]
        if not data:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(info.shape)


def open_checkpoint(folder: Path) -> Checkpoint:
    """Validate the whole checkpoint (index, shard presence, headers) and report every problem at once."""
    index_path = folder / INDEX_FILE
    if index_path.exists():
        weight_map = _read_index(index_path)
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / SINGLE_FILE).exists():
        weight_map, files = None, [folder / SINGLE_FILE]
    else:
        others = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}" + (f" (found {', '.join(others[:3])})" if others else ""),
            expected="a safetensors checkpoint as written by transformers' save_pretrained",
            fix="re-save the model with save_pretrained(..., safe_serialization=True)",
        )
    problems: list[ZedaError] = []
    ckpt = Checkpoint(folder, files)
    for path in files:
        try:
            _add_file(ckpt, path)
        except ZedaError as err:
            problems.append(err)
    if weight_map is not None and not problems:
        problems += _index_mismatches(ckpt, weight_map)
    raise_all(problems)
    return ckpt


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return weight_map
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path.name} is not a valid index ({err})",
            expected='{"metadata": ..., "weight_map": {tensor: shard}}',
            fix="re-download or re-create the checkpoint",
        ) from err


def _add_file(ckpt: Checkpoint, path: Path) -> None:
    if not path.exists():
        raise CheckpointError(
            f"shard {path.name} is listed in {INDEX_FILE} but missing",
            expected="every shard named in the index to be present",
            fix="finish the download (e.g. `hf download` again) or re-create the checkpoint",
        )
    header, start = read_header(path)
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        ckpt.tensors[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path, start + begin, end - begin)


def _index_mismatches(ckpt: Checkpoint, weight_map: dict[str, str]) -> list[ZedaError]:
    problems: list[ZedaError] = []
    for name, shard in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.file.name != shard:
            problems.append(
                CheckpointError(
                    f"tensor {name!r} is listed in {INDEX_FILE} under {shard} but that shard does not hold it",
                    expected="the index to match the shards",
                    fix="re-download or re-create the checkpoint",
                )
            )
            break  # one example is enough; the checkpoint is inconsistent
    return problems
