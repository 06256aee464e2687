"""A sharded stage output (``torch.distributed.checkpoint`` in safetensors form, as FSDP2 ranks write it) read as one
checkpoint, streamed: every rank's file holds slices of the model's tensors (``shard-R-model-i-of-n.safetensors``,
each slice's place in the full tensor in the header's ``DCP_SHARDING_INFO``). Headers alone give the full tensors'
names, shapes and dtypes; a tensor's bytes are assembled from its slices when it is read, one tensor or one group
of tensors (a decoder layer) at a time, so memory stays bounded by a layer however large the model is.

The files hold the model's names as it lives in memory (e.g. transformers 5's fused 3-D experts); a ``revert``
function (transformers' ``revert_weight_conversion`` over a meta-device model) turns each group into the names a
checkpoint on disk uses, so this view reads like any other checkpoint (``io.reader.Checkpoint``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .reader import DTYPES, READ_CHUNK, TORCH_TO_CODE, TensorInfo, read_header

SHARD_FILE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")
Revert = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def is_sharded(folder: Path) -> bool:
    return folder.is_dir() and any(SHARD_FILE.match(p.name) for p in folder.iterdir())


@dataclass(frozen=True)
class Slice:
    file: Path
    start: int  # absolute byte offset of the slice's data
    offsets: tuple[int, ...]  # where the slice sits in the full tensor
    shape: tuple[int, ...]


@dataclass
class ShardedTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    slices: list[Slice] = field(default_factory=list)

    def read(self) -> torch.Tensor:
        dtype = DTYPES[self.dtype][0]
        full = torch.empty(self.shape, dtype=dtype)
        for s in self.slices:
            with s.file.open("rb") as f:
                f.seek(s.start)
                data = bytearray(f.read(dtype.itemsize * math.prod(s.shape)))
            part = torch.frombuffer(data, dtype=dtype).reshape(s.shape) if data else torch.empty(s.shape, dtype=dtype)
            full[tuple(slice(o, o + n) for o, n in zip(s.offsets, s.shape, strict=True))] = part
        return full


def read_sharded(folder: Path) -> dict[str, ShardedTensor]:
    """Every tensor's full shape and slices, from the headers of every rank's file."""
    tensors: dict[str, ShardedTensor] = {}
    for path in sorted(p for p in folder.iterdir() if SHARD_FILE.match(p.name)):
        header, start = read_header(path)
        info = json.loads((header.get("__metadata__") or {}).get(SHARDING_KEY) or "null")
        if not isinstance(info, dict):
            raise CheckpointError(f"{path.name} has no {SHARDING_KEY} metadata", expected="a file DCP wrote",
                                  fix="re-run the stage that wrote the folder")  # fmt: skip
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            offsets = tuple(int(o) for o in info[name]["saved_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            t = tensors.setdefault(name, ShardedTensor(name, entry["dtype"], shape))
            t.shape = tuple(max(a, o + n) for a, o, n in zip(t.shape, offsets, shape, strict=True))
            t.slices.append(Slice(path, start + entry["data_offsets"][0], offsets, shape))
    return tensors


def _group(name: str) -> str:
    match = _LAYER.match(name)
    return match.group(1) if match else name


class ShardedCheckpoint:
    """The ``io.reader.Checkpoint`` interface (``tensors``, ``read_chunks``, ``read_tensor``) over a sharded folder,
    in checkpoint names; one group (a decoder layer, or a single tensor) is held in memory at a time."""

    def __init__(self, folder: Path, revert: Revert):
        self.folder = folder
        self.files = sorted(p for p in folder.iterdir() if SHARD_FILE.match(p.name))
        self._sharded = read_sharded(folder)
        self._revert = revert
        self._groups: dict[str, list[str]] = {}
        for name in self._sharded:
            self._groups.setdefault(_group(name), []).append(name)
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self._group_of: dict[str, str] = {}
        for group, names in self._groups.items():  # names and shapes without reading data: meta tensors
            meta = {n: torch.empty(self._sharded[n].shape, dtype=DTYPES[self._sharded[n].dtype][0], device="meta")
                    for n in names}  # fmt: skip
            for out_name, tensor in revert(meta).items():
                code = TORCH_TO_CODE[tensor.dtype]
                nbytes = tensor.dtype.itemsize * math.prod(tensor.shape)
                self.tensors[out_name] = TensorInfo(out_name, code, tuple(tensor.shape), folder, 0, nbytes)
                self._group_of[out_name] = group

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_tensor(self, name: str) -> torch.Tensor:
        group = self._group_of[name]
        if self._cached is None or self._cached[0] != group:
            self._cached = None  # drop the previous layer before reading the next
            state = {n: self._sharded[n].read() for n in self._groups[group]}
            self._cached = (group, {k: v.contiguous() for k, v in self._revert(state).items()})
        return self._cached[1][name]

    def read_chunks(self, name: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        data = self.read_tensor(name).view(torch.uint8).reshape(-1).numpy().tobytes()
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]
