"""Calibration: set one routing parameter so that the share of routing slots kept (reaching a real expert) on
calibration texts hits a budget. Used for the training-free baselines (p, beta, tau, s), for a dynamic model's
``zero_expert_bias`` (``zeda calibrate``, and the points of ``zeda eval --sweep-bias``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from ..runtime.zeda_dynamic_moe import RoutingRecorder, RoutingTally, routers, set_zero_expert_bias

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), both [batch, length]
BIAS_RANGE = (-30.0, 30.0)  # zero-expert logit shifts: from (practically) never to always a zero expert


def kept_share(model: nn.Module, batches: Sequence[Batch], num_experts: int) -> float:
    """Realised share of the routing slots that reach a real expert, over ``batches`` (no LM head computed)."""
    tally = RoutingTally(num_experts)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # only routing matters here: skip the vocabulary projection
    with RoutingRecorder(model) as recorder, torch.no_grad():
        for ids, mask in batches:
            recorder.clear()
            body(input_ids=ids.to(device), attention_mask=mask.to(device))
            tally.add(recorder.records, mask)
    return 1.0 - tally.share


@dataclass(frozen=True)
class Bisection:
    param: float
    value: float  # the measured value at ``param``
    steps: int


def bisect(
    measure: Callable[[float], float],
    low: float,
    high: float,
    increasing: bool,
    target: float,
    *,
    tol: float = 0.002,
    max_steps: int = 24,
) -> Bisection:
    """The parameter in [low, high] whose (monotone) measured value is closest to ``target`` after at most
    ``max_steps`` measurements, stopping once within ``tol``."""
    best = Bisection(low, float("nan"), 0)
    gap = float("inf")
    for step in range(1, max_steps + 1):
        mid = (low + high) / 2
        value = measure(mid)
        if abs(value - target) < gap:
            best, gap = Bisection(mid, value, step), abs(value - target)
        if gap <= tol:
            return Bisection(best.param, best.value, step)
        if (value < target) == increasing:
            low = mid
        else:
            high = mid
    return Bisection(best.param, best.value, max_steps)


@dataclass(frozen=True)
class Calibration:
    method: str
    param_name: str
    param: float
    budget: float  # the kept share aimed at
    kept_share: float  # realised on the calibration texts
    steps: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "param_name": self.param_name, "param": self.param, "budget": self.budget,
            "calibration_kept_share": self.kept_share, "calibration_steps": self.steps,
            "calibration_tokens": self.tokens,
        }  # fmt: skip


def calibrate_bias(
    model: nn.Module,
    budget: float,
    batches: Sequence[Batch],
    num_experts: int,
    *,
    tol: float = 0.002,
    max_steps: int = 30,
    on_step: Callable[[float, float], None] | None = None,
) -> Calibration:
    """Set the dynamic model's ``zero_expert_bias`` so that it keeps ``budget`` of the routing slots on ``batches``
    (its zero share is then 1 - budget). The model keeps the calibrated bias."""
    if not routers(model) or all(r.spec.num_zero_experts == 0 for _, r in routers(model)):
        raise BadInputError(
            "the model has no zero experts to calibrate",
            expected="a dynamic model (zeda inject-zero-experts / distill / export output)",
            fix="calibrate a dynamic folder; for a static model use a baseline (zeda eval --baseline)",
        )

    def measure(bias: float) -> float:
        set_zero_expert_bias(model, bias)
        share = kept_share(model, batches, num_experts)
        if on_step:
            on_step(bias, share)
        return share

    found = bisect(measure, *BIAS_RANGE, increasing=False, target=budget, tol=tol, max_steps=max_steps)
    set_zero_expert_bias(model, found.param)
    if abs(found.value - budget) > 0.02:
        raise BadInputError(
            f"no zero_expert_bias in {BIAS_RANGE} keeps {budget:.3f} of the slots (closest: {found.value:.3f})",
            expected="a model whose zero experts are live (use_zce_mask: false) and a reachable share",
            fix="check the folder's use_zce_mask, or pick another target",
        )
    tokens = sum(int(mask.sum()) for _, mask in batches)
    return Calibration("zero_expert_bias", "bias", found.param, budget, found.value, found.steps, tokens)
