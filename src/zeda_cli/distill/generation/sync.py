"""The student's weights into a generation server after an optimizer step, streamed with bounded memory.

* **What:** whole modules, never part of one (vLLM's in-place reload rebuilds a module from the tensors it gets):
  every router (its weight and, for sigmoid routers, ``e_score_correction_bias``) under ``trainable: router``;
  every decoder layer and the modules around them under ``trainable: full``. Parameters and persistent buffers,
  under their checkpoint names (transformers' reverse weight conversion, per module: fused experts become
  per-expert matrices); parameters in the server's dtype, buffers (a correction bias, kept in fp32) as they are.
* **How much at once:** one module is gathered from its shards at a time (ZeRO-3, FSDP2: the backend's
  ``full_state``; every rank takes part, rank 0 keeps the tensors), and rank 0 stages at most one bucket of
  ``generation.sync_bucket_mb`` (a module larger than a bucket is a bucket of its own): extra memory is one bucket +
  one module, however large the model.
* **Through what:** a :class:`Transport`. :class:`FileTransport` (what runs here): each bucket is a safetensors file
  in ``generation.sync_dir`` (default ``/dev/shm``, else the run folder when ``/dev/shm`` cannot hold a bucket) that
  the server loads in place (``POST /load_weights``) and zeda deletes. A transport over vLLM's own weight-transfer
  API (NCCL / CUDA IPC) takes the same buckets.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ...errors import ExternalError
from ...runtime.zeda_dynamic_moe import routers

FullState = Callable[[nn.Module], AbstractContextManager[dict[str, torch.Tensor]]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Transport(Protocol):
    """Hands one bucket of tensors (checkpoint names -> CPU tensors) to the server, which loads it in place."""

    name: str

    def send(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    bytes: int
    buckets: int
    tensors: int
    largest_bucket_bytes: int


def staging_dir(configured: str | None, run_folder: Path, bucket_bytes: int) -> Path:
    """Where buckets are staged: ``generation.sync_dir`` if set (it must hold a bucket), else ``/dev/shm`` when it
    can, else the run folder. Too little space anywhere is one error, before the first sync."""
    candidates = [Path(configured)] if configured else [Path("/dev/shm"), run_folder]
    for folder in candidates:
        if folder.is_dir() and os.access(folder, os.W_OK) and shutil.disk_usage(folder).free >= bucket_bytes:
            return folder
    where = ", ".join(f"{f} ({shutil.disk_usage(f).free / 2**20:.0f} MB free)" if f.is_dir() else f"{f} (missing)"
                      for f in candidates)  # fmt: skip
    raise ExternalError(
        f"no room to stage a weight-sync bucket of {bucket_bytes / 2**20:.0f} MB: {where}",
        expected="a writable folder with at least one bucket free (generation.sync_bucket_mb)",
        fix="set generation.sync_dir to a folder with space (on the server's machine), or lower "
        "generation.sync_bucket_mb",
    )


class FileTransport:
    name = "file"

    def __init__(self, load: Callable[[Path], Any], folder: Path):
        self.load, self.folder = load, folder
        self.path = folder / f"zeda-sync-{os.getpid()}.safetensors"

    def send(self, tensors: dict[str, torch.Tensor]) -> None:
        from ...io.writer import tensor_out, write_safetensors

        try:  # streamed from the tensors' own memory: no second copy of the bucket while it is written
            write_safetensors(self.path, [tensor_out(name, t) for name, t in tensors.items()])
        except OSError as err:
            self.path.unlink(missing_ok=True)
            raise ExternalError(f"could not stage a weight-sync bucket in {self.folder} ({err})",
                                expected="room for one bucket", fix="set generation.sync_dir, or lower "
                                "generation.sync_bucket_mb") from None  # fmt: skip
        try:
            self.load(self.path)
        finally:
            self.path.unlink(missing_ok=True)


def sync_units(model: nn.Module, trainable: str) -> list[tuple[str, nn.Module]]:
    """The modules a sync sends, whole: the routers (router-only), else every decoder layer and every module
    holding parameters outside the layers (embedding, final norm, head)."""
    if trainable == "router":
        return routers(model)
    layers = _decoder_layers(model)
    inside = {id(m) for _, layer in layers for m in layer.modules()}
    outside = [(n, m) for n, m in model.named_modules() if m is not model and id(m) not in inside
               and any(True for _ in m.parameters(recurse=False))]  # fmt: skip
    return [*outside, *layers]


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    return []


def _persistent(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers: what a checkpoint holds (not, e.g., the rotary ``inv_freq``)."""
    keep = set(module.state_dict(keep_vars=True))
    return {k: v for k, v in tensors.items() if k in keep}


def stream_module_states(
    model: nn.Module, units: list[tuple[str, nn.Module]], full_state: FullState, dtype: torch.dtype, rank: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Per module, its tensors under checkpoint names on CPU in ``dtype`` (floating ones): rank 0 gets them, every
    rank takes part in the gather."""
    from transformers.core_model_loading import revert_weight_conversion

    seen: set[int] = set()  # a tied head shares the embedding's parameter: sent once
    for prefix, module in units:
        params = dict(module.named_parameters())
        originals = {**params, **dict(module.named_buffers())}
        with full_state(module) as tensors:
            if rank != 0:
                continue
            state = {}
            for name, tensor in _persistent(module, tensors).items():
                if id(originals.get(name, tensor)) in seen:
                    continue
                seen.add(id(originals.get(name, tensor)))
                value = tensor.detach()  # parameters in the server's dtype; buffers (fp32 biases) as they are
                cast = name in params and value.is_floating_point()
                value = value.to("cpu", dtype, copy=True) if cast else value.to("cpu", copy=True)
                state[f"{prefix}.{name}"] = value
        if rank == 0 and state:
            yield {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}


def sync_weights(
    model: nn.Module,
    units: list[tuple[str, nn.Module]],
    full_state: FullState,
    dtype: torch.dtype,
    bucket_bytes: int,
    rank: int,
    transport: Transport | None,
) -> SyncStats:
    """Send ``units`` bucket by bucket; on every rank (the gathers are collective), rank 0 sends."""
    began = time.perf_counter()
    bucket: dict[str, torch.Tensor] = {}
    size = total = buckets = tensors = largest = 0
    for state in stream_module_states(model, units, full_state, dtype, rank):
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        if bucket and size + nbytes > bucket_bytes:
            assert transport is not None
            transport.send(bucket)
            buckets, largest, bucket, size = buckets + 1, max(largest, size), {}, 0
        bucket.update(state)
        size, total, tensors = size + nbytes, total + nbytes, tensors + len(state)
    if bucket:
        assert transport is not None
        transport.send(bucket)
        buckets, largest = buckets + 1, max(largest, size)
    return SyncStats(time.perf_counter() - began, total, buckets, tensors, largest)
