"""The one dtype policy of a training stage: what the forward computes in, what trainable weights are kept in, and
what a generation server samples in. The trainer, the server spec and the memory plan all ask :func:`precision`.

* ``runtime.dtype`` ``auto`` means bf16 on a GPU that supports it, else fp32.
* A DeepSpeed JSON that enables ``bf16`` / ``fp16`` decides the compute dtype; an explicit ``runtime.dtype`` that
  says otherwise is refused (the engine and the trainer would run different precisions).
* ``distributed.mixed_precision`` (FSDP2) computes in bf16 over fp32 master weights; with an explicit
  ``runtime.dtype: float32`` it is refused for the same reason.
* Full-parameter training keeps fp32 master weights (bf16 autocast in one process); router-only training keeps the
  frozen body in the compute dtype. Routers are always fp32, as the official code keeps them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ..recipes import Recipe

NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # the forward / backward math (autocast or the weights' own dtype)
    master: torch.dtype  # trainable weights and their optimizer state
    frozen: torch.dtype  # weights that never train (a router-only body, a separate teacher)
    server: str  # the generation server's dtype (vLLM's name)

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype one process autocasts its forward to (None: the weights' own)."""
        return self.compute if self.compute != self.master else None

    @property
    def compute_bytes(self) -> int:
        return BYTES[self.compute]


def requested_dtype(name: str, device_type: str) -> torch.dtype:
    """``runtime.dtype`` as a torch dtype; ``auto`` is bf16 on a GPU that supports it, else fp32."""
    if name != "auto":
        return getattr(torch, name)
    if device_type != "cuda":
        return torch.float32
    # A plan made on a machine without the GPU it describes assumes a bf16-capable one.
    return torch.bfloat16 if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else torch.float32


def deepspeed_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The precision a DeepSpeed config switches on (None: it says nothing)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (config.get(key) or {}).get("enabled"):
            return dtype
    return None


def read_deepspeed_json(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).expanduser().is_file():
        return {}
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def precision(recipe: Recipe, trainable: str, device_type: str, deepspeed: dict[str, Any] | None = None) -> Precision:
    """Every dtype of a stage, decided once; ``deepspeed`` is the DeepSpeed JSON when the stage runs under it."""
    runtime, dist = recipe.runtime, recipe.distributed
    compute = requested_dtype(runtime.dtype, device_type)
    forced, source = None, None
    if deepspeed is not None and (ds := deepspeed_dtype(deepspeed)) is not None:
        forced, source = ds, f"the DeepSpeed config {dist.deepspeed} ({'bf16' if ds == torch.bfloat16 else 'fp16'})"
    if dist.kind == "fsdp2" and dist.mixed_precision:
        forced, source = torch.bfloat16, "distributed.mixed_precision: true (bf16)"
    if forced is not None:
        if runtime.dtype != "auto" and getattr(torch, runtime.dtype) != forced:
            raise BadInputError(
                f"runtime.dtype {runtime.dtype} contradicts {source}",
                expected="one precision for the trainer and its generation server",
                fix=f"set runtime.dtype {NAMES[forced]} (or auto), or change the distributed settings",
            )
        compute = forced
    master = torch.float32 if trainable == "full" else compute
    server = recipe.generation.dtype if recipe.generation.dtype != "auto" else NAMES[compute]
    return Precision(compute=compute, master=master, frozen=compute, server=server)


def compute_dtype(recipe: Recipe, device_type: str) -> torch.dtype:
    """The dtype inference work of a stage (rollouts, a frozen teacher) runs in."""
    return precision(recipe, "router", device_type).compute
