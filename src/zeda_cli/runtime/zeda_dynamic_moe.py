"""ZEDA dynamic-MoE runtime: parameter-free zero-output experts that are skipped, not computed.

This module is self-contained (it imports only torch and transformers): zeda copies it verbatim into every model
folder it writes, next to a small generated ``modeling_zeda.py``, so the folder loads in stock transformers with
``trust_remote_code=True``. ``zeda_cli`` imports the very same file, so both loading paths run one implementation.

How a static MoE block becomes dynamic (``make_dynamic``):

* its router (``block.gate``) is replaced by :class:`ZeroExpertRouter`, which scores N real + Z zero experts with
  the family's own rule (softmax or sigmoid + correction bias) and keeps top-K unchanged, so zero experts compete
  for the same K slots; the tensor names (``gate.weight``, ``gate.e_score_correction_bias``) stay the same;
* its experts module keeps its weights and its transformers kernel (eager / grouped_mm / ...), but the class
  gains :class:`ZeroSkippingExperts` in front: the (token, slot) pairs routed to zero experts are removed
  *before* the expert computation, so they cost no FLOPs.

Everything architecture-specific the runtime needs is data in ``config.zeda["router"]``, written by zeda's
architecture adapters when the zero experts were injected.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DynamicMoeMixin",
    "RouterHooks",
    "RouterSpec",
    "RoutingRecorder",
    "RoutingTally",
    "ZeroExpertRouter",
    "ZeroSkippingExperts",
    "make_dynamic",
    "register_key_conversion",
    "set_zero_expert_bias",
    "zero_experts_masked",
    "zero_skipping_expert_parallel",
]


@dataclass(frozen=True)
class RouterSpec:
    """What the runtime must know about one family's router; stored as ``config.zeda["router"]``."""

    block_class: str  # class name of the MoE block whose ``gate`` / ``experts`` children are converted
    num_experts: int  # N real routed experts
    num_zero_experts: int  # Z zero experts, the last Z router rows
    top_k: int  # K slots per token, unchanged by the conversion
    scoring: str  # "softmax" or "sigmoid"
    normalize: bool  # divide the K chosen weights by their sum (zero slots included)
    weights_in_logits_dtype: bool = True  # softmax routers cast the top-k weights back to the logits dtype
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False  # sigmoid routers: e_score_correction_bias steers the choice, not the weights

    @classmethod
    def from_config(cls, config: Any) -> RouterSpec:
        zeda = getattr(config, "zeda", None) or {}
        router = dict(zeda.get("router") or {})
        if not router:
            raise ValueError("config has no zeda['router'] section: this folder was not written by zeda")
        router["num_zero_experts"] = int(sum(getattr(config, "zce_nums", None) or [0]))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in router.items() if k in known})

    @property
    def total_experts(self) -> int:
        return self.num_experts + self.num_zero_experts


class ZeroExpertRouter(nn.Module):
    """Top-K router over N real + Z zero experts; returns ``(logits, top_k_weights, top_k_ids)`` like transformers.

    Zero experts are ids ``>= N``. ``zero_expert_bias`` is added to the zero-expert logits (a runtime dial:
    negative = fewer zero slots, more compute, closer to the original model). ``mask_zero_experts`` (the official
    ``use_zce_mask``) routes exactly like the original static router: only the first N rows are used.
    """

    def __init__(
        self,
        hidden_size: int,
        spec: RouterSpec,
        zero_expert_bias: float = 0.0,
        mask: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if spec.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router scoring {spec.scoring!r}; expected 'softmax' or 'sigmoid'")
        self.spec = spec
        self.hidden_dim = hidden_size
        self.zero_expert_bias = float(zero_expert_bias)
        self.mask_zero_experts = bool(mask)
        # A plain tensor of N rows that, while set, replaces the first N rows of ``weight`` with zero experts masked:
        # the original static router, viewed without touching the (possibly sharded or partitioned) parameter.
        self.view_rows: torch.Tensor | None = None
        self.weight = nn.Parameter(torch.zeros(spec.total_experts, hidden_size, device=device, dtype=dtype))
        if spec.correction_bias:
            bias = torch.zeros(spec.total_experts, dtype=torch.float32, device=device)
            self.register_buffer("e_score_correction_bias", bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"experts={s.num_experts}+{s.num_zero_experts} zero, top_k={s.top_k}, scoring={s.scoring}"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec = self.spec
        x = hidden_states.reshape(-1, self.hidden_dim)
        # Masked: score only the N real rows, exactly as the static router did (bit-identical outputs).
        masked = self.mask_zero_experts or self.view_rows is not None
        rows = spec.num_experts if masked else spec.total_experts
        weight = self.weight[:rows] if self.view_rows is None else self.view_rows
        if spec.scoring == "softmax":
            # Same dtype: a no-op (bit-exact with the static router). Training keeps routers in fp32 (as official).
            logits = F.linear(x.to(weight.dtype), weight)
        else:
            logits = F.linear(x.float(), weight.float())
        if self.zero_expert_bias and not masked:
            shift = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
            shift[spec.num_experts :] = self.zero_expert_bias
            logits = logits + shift
        if spec.scoring == "softmax":
            weights, ids = self._softmax_topk(logits)
        else:
            weights, ids = self._sigmoid_topk(logits, rows)
        if masked and spec.num_zero_experts:
            logits = torch.cat([logits, logits.new_full((logits.shape[0], spec.num_zero_experts), float("-inf"))], 1)
        return logits, weights, ids

    def _softmax_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.spec.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, ids

    def _sigmoid_topk(self, logits: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        scores = logits.sigmoid()
        choice = scores
        if spec.correction_bias:
            choice = scores + self.e_score_correction_bias[:rows]
        if spec.n_group > 1:
            grouped = choice.view(-1, spec.n_group, rows // spec.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, rows)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if spec.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * spec.routed_scaling_factor, ids


class ZeroSkippingExperts:
    """Mixin put in front of a transformers experts class: zero-expert slots never reach the expert kernel.

    The (token, slot) pairs whose id is a real expert are compacted into a K=1 problem and handed to the
    original implementation (whichever ``experts_implementation`` is active); results are scattered back with
    ``index_add_``. When no slot of the batch picked a zero expert, the original call runs unchanged.
    """

    num_experts: int

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        real = top_k_index < self.num_experts
        if bool(real.all()):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        token_idx, slot_idx = real.nonzero(as_tuple=True)
        out = torch.zeros_like(hidden_states)
        if token_idx.numel() == 0:
            if not torch.is_grad_enabled():
                return out
            # Keep the expert weights in the autograd graph (one pair at weight 0) so that data-parallel ranks
            # whose tokens all chose zero experts still take part in the gradient collectives.
            token_idx = slot_idx = torch.zeros(1, dtype=torch.long, device=hidden_states.device)
            ids = torch.zeros(1, 1, dtype=top_k_index.dtype, device=top_k_index.device)
            weights = torch.zeros(1, 1, dtype=top_k_weights.dtype, device=top_k_weights.device)
        else:
            ids = top_k_index[token_idx, slot_idx].unsqueeze(1)
            weights = top_k_weights[token_idx, slot_idx].unsqueeze(1)
        pair_out = super().forward(hidden_states[token_idx], ids, weights)
        return out.index_add(0, token_idx, pair_out.to(out.dtype))


ZERO_SKIPPING_EP = "zeda_zero_skipping"  # the EPImplementation name under transformers' expert parallelism


@functools.cache
def zero_skipping_expert_parallel() -> str:
    """Register, once, the expert-parallel token dispatch that drops zero-expert slots *before* the all-to-all
    (they cost neither expert compute nor communication) and return its name for
    ``DistributedConfig(ep_implementation=...)``.

    transformers' ``ep_dispatch_experts`` replaces the experts module's forward with a dispatch that sends every
    (token, slot) pair to the rank owning its expert; zero experts are owned by no rank. This dispatch compacts the
    real pairs into a K=1 problem, hands them to transformers' all-to-all implementation, and scatters the weighted
    results back per token. ``experts.zero_skipping_dispatch.sent`` / ``.received`` count the (token, expert) rows
    this rank sent and its experts were given. A rank whose tokens all chose zero experts still joins both
    all-to-alls with no rows.
    """
    from transformers.distributed.expert_parallel import AllToAllEP, EPImplementationInterface

    class ZeroSkippingAllToAll(AllToAllEP):
        def __init__(self, experts: nn.Module, ep_mesh: Any, tp_mesh: Any):
            super().__init__(experts, ep_mesh, tp_mesh)
            self.received = self.sent = 0
            experts.zero_skipping_dispatch = self  # where tests and benchmarks read the counts

        def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            total = self.num_local_experts * self.ep_mesh.size()  # N: every id >= N is a zero expert
            token_idx, slot_idx = (top_k_index < total).nonzero(as_tuple=True)
            ids = top_k_index[token_idx, slot_idx].unsqueeze(1)
            weights = top_k_weights[token_idx, slot_idx].unsqueeze(1)
            self.sent += int(token_idx.numel())
            pair_out = super().__call__(hidden_states[token_idx], ids, weights)
            return torch.zeros_like(hidden_states).index_add(0, token_idx, pair_out.to(hidden_states.dtype))

        def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
            rows, *rest = super()._dispatch_tokens(hidden_states, top_k_index, top_k_weights)
            self.received += int(rows.shape[0])
            return (rows, *rest)

    EPImplementationInterface.register(ZERO_SKIPPING_EP, ZeroSkippingAllToAll)
    return ZERO_SKIPPING_EP


@functools.cache
def _zero_skipping_class(experts_class: type) -> type:
    return type(f"ZeroSkipping{experts_class.__name__}", (ZeroSkippingExperts, experts_class), {})


def make_dynamic(model: nn.Module, config: Any) -> list[str]:
    """Convert every MoE block named by ``config.zeda['router']`` in place; returns the converted block paths."""
    spec = RouterSpec.from_config(config)
    bias = float(getattr(config, "zero_expert_bias", 0.0) or 0.0)
    mask = bool(getattr(config, "use_zce_mask", False))
    converted = []
    for name, block in model.named_modules():
        if type(block).__name__ != spec.block_class:
            continue
        old = block.gate.weight
        block.gate = ZeroExpertRouter(
            config.hidden_size, spec, zero_expert_bias=bias, mask=mask, device=old.device, dtype=old.dtype
        )
        block.experts.__class__ = _zero_skipping_class(type(block.experts))
        converted.append(name)
    if not converted:
        raise ValueError(f"no {spec.block_class} block found in {type(model).__name__}")
    return converted


def routers(model: nn.Module) -> list[tuple[str, ZeroExpertRouter]]:
    # Matched by name: a model loaded with trust_remote_code holds its own copy of this module's classes.
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == ZeroExpertRouter.__name__]


def set_zero_expert_bias(model: nn.Module, bias: float) -> None:
    """Runtime speed/quality dial: shift every zero-expert logit by ``bias`` (0.0 = as trained)."""
    for _, router in routers(model):
        router.zero_expert_bias = float(bias)
    if hasattr(model, "config"):
        model.config.zero_expert_bias = float(bias)


@contextlib.contextmanager
def zero_experts_masked(model: nn.Module) -> Iterator[None]:
    """The dynamic model with its zero experts masked while active: exactly the original static routing
    (``use_zce_mask``); each router's own setting is restored on exit."""
    found = [router for _, router in routers(model)]
    saved = [router.mask_zero_experts for router in found]
    for router in found:
        router.mask_zero_experts = True
    try:
        yield
    finally:
        for router, value in zip(found, saved, strict=True):
            router.mask_zero_experts = value


class RouterHooks:
    """Context manager: a forward hook on every ZeroExpertRouter of ``model`` while it is active.

    Subclasses implement ``_hook(name)``; ``prepend`` hooks run before the others (to edit the routing that the
    rest observe).
    """

    prepend = False

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []

    def __enter__(self):
        for name, router in routers(self.model):
            self._handles.append(router.register_forward_hook(self._hook(name), prepend=self.prepend))
        if not self._handles:
            raise ValueError(f"{type(self).__name__}: the model has no zero-expert routers")
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        raise NotImplementedError


class RoutingRecorder(RouterHooks):
    """Records each ZeroExpertRouter's output during forward passes.

    ``records`` holds one ``(router_name, logits | None, top_k_ids)`` entry per router call. Logits are kept (with
    their autograd graph) only when ``keep_logits=True``, e.g. for the balancing loss.
    """

    def __init__(self, model: nn.Module, keep_logits: bool = False):
        super().__init__(model)
        self.keep_logits = keep_logits
        self.records: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
            logits, _, ids = output
            self.records.append((name, logits if self.keep_logits else None, ids.detach()))

        return hook

    def clear(self) -> None:
        self.records.clear()


@dataclass
class RoutingTally:
    """Routing slots that went to zero experts (id >= N: skipped) and all slots, per router, over real tokens."""

    num_experts: int
    skipped: dict[str, int] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)

    def add(self, records: Any, token_mask: torch.Tensor | None = None) -> None:
        """``records`` as RoutingRecorder's; ``token_mask`` (any shape, True = a real token) drops padding."""
        valid = None if token_mask is None else token_mask.reshape(-1).bool()
        for name, _, ids in records:
            if valid is not None:
                if ids.shape[0] != valid.numel():
                    raise ValueError(f"{name}: {ids.shape[0]} routed tokens for a batch of {valid.numel()}")
                ids = ids[valid.to(ids.device)]
            self.skipped[name] = self.skipped.get(name, 0) + int((ids >= self.num_experts).sum())
            self.slots[name] = self.slots.get(name, 0) + ids.numel()

    @property
    def share(self) -> float:
        total = sum(self.slots.values())
        return sum(self.skipped.values()) / total if total else 0.0

    def per_layer(self) -> dict[str, float]:
        return {k: self.skipped[k] / v if v else 0.0 for k, v in self.slots.items()}


class DynamicMoeMixin:
    """Put in front of a transformers ``...ForCausalLM`` class: builds the base model, then makes it dynamic."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        make_dynamic(self, config)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers detects kernel support by grepping the class's module for its decorator; the experts
        # modules here are the base family's own (decorated) classes, so every implementation applies.
        return True


def register_key_conversion(dynamic_model_type: str, base_model_type: str) -> None:
    """Let the dynamic model type reuse the base family's checkpoint-key conversion (per-expert <-> fused)."""
    from transformers import conversion_mapping as cm

    mapping = cm.get_checkpoint_conversion_mapping(base_model_type)
    if mapping is not None:
        cm.register_checkpoint_conversion_mapping(dynamic_model_type, mapping, overwrite=True)
