"""Training-free expert-skipping baselines on a static MoE, calibrated to an expert-FLOPs budget.

Every baseline post-processes the static router's top-K choice of each token (a forward hook on each runtime
router): it decides which of the K slots to keep, marks the dropped ones with the id N (the first zero-expert id),
so :class:`~zeda_cli.runtime.zeda_dynamic_moe.ZeroSkippingExperts` never computes them, and rescales the kept
weights. Kept experts are always a subset of the static top-K, so the budget b (the share of the static top-K
expert FLOPs kept) is the kept share of the routing slots.

* ``top_p``: per token, the smallest prefix of the top-K slots (by weight) whose weight mass, renormalised over
  the K slots, reaches p; at least one slot, at most K (post-hoc top-p routing, Huang et al. 2024).
* ``naee``: drop slot i when its weight < beta * the token's top weight (NAEE dynamic skipping, Lu et al. 2024).
* ``threshold``: drop slots whose router probability (softmax over the N experts, or the sigmoid score) < tau.
* ``static_topk``: keep the k heaviest of the K slots for every token (a smaller fixed K; k = round(b·K)).
* ``entropy_k``: a per-token k from the entropy of the token's top-K weights: k = ceil(s · exp(H)), 1 ≤ k ≤ K,
  where exp(H) (between 1 and K) is the effective number of experts the router spreads its weight over; keep the
  k heaviest slots.
* ``random``: drop each slot independently with probability 1 - b.

Renormalisation (``renorm``): ``kept`` (default, as NAEE's code does) rescales the kept weights so that they sum
to what the token's K static weights summed to, keeping the layer's output scale; ``none`` leaves them as they
are, so the routed output shrinks like a ZEDA zero slot does. The parameter (p, beta, tau, s) is found by
bisection on calibration texts so that the realised kept share hits b; static_topk and random take it from b.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from ..runtime.zeda_dynamic_moe import RouterHooks, RoutingTally, make_dynamic, routers
from .calibration import Batch, Calibration, bisect, kept_share

__all__ = ["METHODS", "BaselineRouting", "Calibration", "RoutingTally", "calibrate", "kept_share", "runtime_form"]

RENORM_MODES = ("kept", "none")


@dataclass(frozen=True)
class Slots:
    """One router call's top-K slots as a baseline sees them."""

    logits: torch.Tensor  # [T, N(+Z)] router logits
    weights: torch.Tensor  # [T, K] the static top-K weights
    ids: torch.Tensor  # [T, K]
    scoring: str
    uniform: Callable[[], torch.Tensor]  # seeded U(0, 1) draws of the slots' shape


KeepRule = Callable[[Slots, float], torch.Tensor]  # (slots, parameter) -> [T, K] bool, True = keep


@dataclass(frozen=True)
class Method:
    name: str
    param: str  # name of the calibrated parameter
    increasing: bool  # the kept share grows with the parameter
    low: float  # bisection interval
    high: float
    summary: str
    keep: KeepRule
    from_budget: Callable[[float, int], float] | None = None  # (budget, K) -> parameter, when no bisection is needed


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise BadInputError(
            f"unknown baseline {name!r}", expected=f"one of: {', '.join(METHODS)}", fix="pick one with --baseline"
        )
    return METHODS[name]


def check_budget(budget: float) -> None:
    if not 0.0 < budget <= 1.0:
        raise BadInputError(
            f"budget {budget} is outside (0, 1]",
            expected="the share of the static top-K expert FLOPs to keep, e.g. 0.5",
            fix="pass --budget in (0, 1]",
        )


# --- which slots to keep ------------------------------------------------------------------------------------------
def keep_top_p(weights: torch.Tensor, p: float) -> torch.Tensor:
    w = weights.float()
    q = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    order = q.argsort(dim=-1, descending=True)
    sorted_q = q.gather(-1, order)
    keep_sorted = (sorted_q.cumsum(-1) - sorted_q) < p  # mass before this slot is still short of p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def keep_naee(weights: torch.Tensor, beta: float) -> torch.Tensor:
    w = weights.float()
    return w >= beta * w.max(dim=-1, keepdim=True).values


def keep_threshold(router_probs: torch.Tensor, tau: float) -> torch.Tensor:
    return router_probs >= tau


def keep_heaviest(weights: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """The ``k`` heaviest slots of each token (``k`` an int or a [T] tensor of counts)."""
    ranks = weights.float().argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = heaviest
    limit = k if isinstance(k, int) else k[:, None]
    return ranks < limit


def keep_entropy_k(weights: torch.Tensor, s: float) -> torch.Tensor:
    """k = ceil(s · exp(H(q))) slots per token, q the token's top-K weights renormalised."""
    w = weights.float()
    q = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    effective = torch.exp(-(q * q.clamp_min(1e-20).log()).sum(-1))  # between 1 and K
    k = torch.ceil(s * effective).clamp(1, weights.shape[-1]).long()
    return keep_heaviest(weights, k)


def router_probs(logits: torch.Tensor, ids: torch.Tensor, scoring: str) -> torch.Tensor:
    """The router probability of each chosen slot: softmax over all experts, or the sigmoid score."""
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    return scores.gather(1, ids.clamp_max(scores.shape[1] - 1))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("top_p", "p", True, 0.0, 1.0, "smallest top-K prefix whose renormalised mass >= p",
               lambda slots, p: keep_top_p(slots.weights, p)),
        Method("naee", "beta", False, 0.0, 1.0, "drop slot i when w_i < beta * w_top",
               lambda slots, beta: keep_naee(slots.weights, beta)),
        Method("threshold", "tau", False, 0.0, 1.0, "drop slots whose router probability < tau",
               lambda slots, tau: keep_threshold(router_probs(slots.logits, slots.ids, slots.scoring), tau)),
        Method("static_topk", "k", True, 1.0, 1.0, "keep the k heaviest slots of every token",
               lambda slots, k: keep_heaviest(slots.weights, int(k)),
               from_budget=lambda budget, top_k: float(max(1, round(budget * top_k)))),
        Method("entropy_k", "s", True, 0.0, 64.0, "keep ceil(s * exp(entropy of the top-K weights)) slots",
               lambda slots, s: keep_entropy_k(slots.weights, s)),
        Method("random", "keep_prob", True, 0.0, 1.0, "drop each slot with probability 1 - keep_prob",
               lambda slots, x: slots.uniform() < x, from_budget=lambda budget, top_k: budget),
    )
}  # fmt: skip


def renormalise(weights: torch.Tensor, keep: torch.Tensor, mode: str) -> torch.Tensor:
    w = weights.float()
    kept = w * keep
    if mode == "kept":
        total, kept_sum = w.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
        kept = kept * torch.where(kept_sum > 0, total / kept_sum.clamp_min(1e-20), torch.zeros_like(total))
    return kept.to(weights.dtype)


# --- the static model in runtime form ---------------------------------------------------------------------------
def runtime_form(model: nn.Module, router_spec: dict[str, Any], hidden_size: int) -> None:
    """Give a static model the runtime's routers (no zero experts; routing bit-identical) and zero-slot skipping.

    Then RoutingRecorder sees its routing and a baseline's dropped slots are really skipped. No-op for a model
    that already has runtime routers (a dynamic folder).
    """
    if routers(model):
        return
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ == router_spec["block_class"]}
    old = {name: block.gate for name, block in blocks.items()}
    config = SimpleNamespace(zeda={"router": router_spec}, zce_nums=[0], hidden_size=hidden_size)
    with torch.no_grad():
        for name in make_dynamic(model, config):
            new = model.get_submodule(name).gate
            new.weight.copy_(old[name].weight)
            if router_spec.get("correction_bias"):
                new.e_score_correction_bias.copy_(old[name].e_score_correction_bias)


# --- applying a baseline ---------------------------------------------------------------------------------------
class BaselineRouting(RouterHooks):
    """``with BaselineRouting(model, "naee", 0.4): model(...)``: every router's top-K is thinned by the baseline.

    The hooks run before any other forward hook (e.g. a RoutingRecorder's), which thus records the dropped slots
    as zero slots. ``with routing.disabled():`` gives the untouched static model (the teacher) in between.
    """

    prepend = True

    def __init__(self, model: nn.Module, method: str, param: float, renorm: str = "kept", seed: int = 0):
        if renorm not in RENORM_MODES:
            raise BadInputError(f"renorm {renorm!r} is unknown", expected=" or ".join(RENORM_MODES))
        super().__init__(model)
        self.method = get_method(method)
        self.param = float(param)
        self.renorm = renorm
        self.seed = seed
        self.enabled = True
        self._generators: dict[str, torch.Generator] = {}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _hook(self, name: str) -> Any:
        return self._thin

    def _thin(self, module: nn.Module, args: Any, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if not self.enabled:
            return None
        logits, weights, ids = output
        n = module.spec.num_experts
        keep = self.keep(logits, weights, ids, module.spec.scoring) & (ids < n)
        dropped = torch.full_like(ids, n)  # id N: the first zero-expert id, skipped by the experts module
        return logits, renormalise(weights, keep, self.renorm), torch.where(keep, ids, dropped)

    def keep(self, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, scoring: str) -> torch.Tensor:
        def uniform() -> torch.Tensor:
            generator = self._generator(ids.device)
            return torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)

        return self.method.keep(Slots(logits, weights, ids, scoring, uniform), self.param)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]


# --- counting and calibration -------------------------------------------------------------------------------------
def calibrate(
    routing: BaselineRouting,
    budget: float,
    batches: Sequence[Batch],
    num_experts: int,
    *,
    tol: float = 0.002,
    max_steps: int = 24,
    on_step: Callable[[float, float], None] | None = None,
) -> Calibration:
    """Set the method's parameter so that the kept share on ``batches`` is within ``tol`` of ``budget``: directly
    from the budget where the method allows it, else by bisection."""
    check_budget(budget)
    method = routing.method
    tokens = sum(int(mask.sum()) for _, mask in batches)

    def measure(x: float) -> float:
        routing.param = x
        share = kept_share(routing.model, batches, num_experts)
        if on_step:
            on_step(x, share)
        return share

    if method.from_budget is not None:
        top_k = routers(routing.model)[0][1].spec.top_k
        param = method.from_budget(budget, top_k)
        return Calibration(method.name, method.param, param, budget, measure(param), 1, tokens)
    sparsest = method.low if method.increasing else method.high
    _check_reachable(method, budget, measure(sparsest))
    found = bisect(measure, method.low, method.high, method.increasing, budget, tol=tol, max_steps=max_steps - 1)
    routing.param = found.param
    return Calibration(method.name, method.param, found.param, budget, found.value, found.steps + 1, tokens)


def _check_reachable(method: Method, budget: float, floor: float) -> None:
    if budget < floor - 0.01:
        raise BadInputError(
            f"budget {budget} is below the smallest kept share the {method.name} baseline can reach ({floor:.3f}: "
            "it always keeps each token's top slot)",
            expected=f"--budget >= {floor:.2f} for {method.name}",
            fix="raise --budget, or use the threshold or random baseline",
        )
