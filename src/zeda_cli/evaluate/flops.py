"""Expert FLOPs: the formula (:class:`ExpertFlops`, from the config) and a counter of the matrix-multiply FLOPs a
piece of code really executes, grouped_mm included (:func:`measured_expert_flops` cross-checks the two).

torch's FlopCounterMode has no formula for ``aten._grouped_mm`` and only sees shapes, while a grouped GEMM's work
depends on its offsets (rows past ``offs[-1]`` are skipped). This dispatch mode reads the offsets, so it measures
what zero-expert skipping saves, whatever experts implementation runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..architectures import ResolvedConfig

aten = torch.ops.aten


def _mm(a: torch.Tensor, b: torch.Tensor) -> int:
    return 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> int:
    if offs is None or (a.dim() == 3 and b.dim() == 3):
        return _mm(a, b)
    used = int(offs[-1].item()) if offs.numel() else 0
    if a.dim() == 2 and b.dim() == 3:  # (rows, k) x (groups, k, n): forward and input grads
        return 2 * used * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:  # (m, rows) x (rows, n): weight grads, grouped over the inner dimension
        return 2 * a.shape[0] * used * b.shape[1]
    return 2 * used * a.shape[-1] * b.shape[-1]  # (groups, m, k) x (k, rows): grouped over columns


class MatmulFlopCounter(TorchDispatchMode):
    """``with MatmulFlopCounter() as c: ...; c.total`` -> FLOPs of mm / addmm / bmm / baddbmm / _grouped_mm."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flops = self._flops(func, args, kwargs)
        if flops:
            self.total += flops
            name = str(func.overloadpacket.__name__)
            self.by_op[name] = self.by_op.get(name, 0) + flops
        return func(*args, **kwargs)

    @staticmethod
    def _flops(func: Any, args: tuple, kwargs: dict) -> int:
        packet = func.overloadpacket
        if packet in (aten.mm, aten.bmm):
            return _mm(args[0], args[1])
        if packet in (aten.addmm, aten.baddbmm):
            return _mm(args[1], args[2])
        if packet is aten._grouped_mm:
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            return _grouped_mm(args[0], args[1], offs)
        return 0


@dataclass(frozen=True)
class ExpertFlops:
    per_expert: int  # one routed expert on one token: gate, up and down projections, 2 FLOPs per multiply-add
    moe_layers: int
    top_k: int
    shared_per_token: int | None  # always-on shared expert(s), all MoE layers

    @classmethod
    def of(cls, rc: ResolvedConfig) -> ExpertFlops:
        hidden, adapter = int(rc.hf.hidden_size), rc.adapter
        shared = None
        if adapter.shared_expert is not None:
            shared = 2 * 3 * hidden * adapter.shared_expert.intermediate(rc.hf) * len(rc.moe_layers)
        return cls(2 * 3 * hidden * adapter.expert_intermediate(rc.hf), len(rc.moe_layers), rc.top_k, shared)

    @property
    def static_per_token(self) -> int:
        return self.per_expert * self.top_k * self.moe_layers


def measured_expert_flops(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Matmul FLOPs really executed inside the routed-experts modules during one forward (a cross-check)."""
    experts = [m for m in model.modules() if any(c.__name__ == "ZeroSkippingExperts" for c in type(m).__mro__)]
    starts: dict[int, int] = {}
    total = 0
    with MatmulFlopCounter() as counter, torch.no_grad():

        def before(module: nn.Module, args: Any) -> None:
            starts[id(module)] = counter.total

        def after(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal total
            total += counter.total - starts.pop(id(module))

        handles = [h for m in experts for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
    return total
