"""What the plugin needs to route one MoE layer, read and validated from a dynamic folder's config.

Both config styles are read: zeda's exports (``zce_*`` keys plus a ``zeda["router"]`` section, which is the same
statement of the router rule that zeda's own runtime executes) and the official ZEDA release (``zce_*`` keys only;
the rule then follows from the family, exactly as zeda derives it). No vLLM or torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ZedaVllmError
from .families import Family

_ZEDA_ROUTER_KEYS = (
    "scoring",
    "normalize",
    "weights_in_logits_dtype",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
)


@dataclass(frozen=True)
class ZeroExpertSpec:
    num_experts: int  # N real routed experts: ids 0..N-1
    num_zero_experts: int  # Z zero-output experts: the last Z router rows, ids N..N+Z-1
    top_k: int
    scoring: str  # "softmax" | "sigmoid"
    normalize: bool  # divide the K chosen weights by their sum, zero slots included
    weights_in_logits_dtype: bool
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    mask: bool = False  # ``use_zce_mask``: route over the N real rows only (exactly the static model)
    zero_expert_bias: float = 0.0  # added to every zero-expert logit (runtime dial)

    @property
    def total_experts(self) -> int:
        return self.num_experts + self.num_zero_experts

    @property
    def correction_bias(self) -> bool:
        return self.scoring == "sigmoid"

    def describe(self) -> str:
        rule = f"{self.scoring} routing" + (f", {self.n_group} groups" if self.n_group > 1 else "")
        state = "zero experts masked (use_zce_mask)" if self.mask else f"zero_expert_bias={self.zero_expert_bias:g}"
        return f"N={self.num_experts} real + Z={self.num_zero_experts} zero experts, top-{self.top_k}, {rule}, {state}"

    @classmethod
    def from_config(cls, config: Any, family: Family) -> ZeroExpertSpec:
        num_zero = _num_zero_experts(config, family)
        n = int(getattr(config, family.num_experts_attr, 0) or 0)
        k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        rule = _family_rule(config, family)
        stored = dict((getattr(config, "zeda", None) or {}).get("router") or {})
        if stored:
            _check_stored_router(stored, n, k, family)
            rule.update({key: stored[key] for key in _ZEDA_ROUTER_KEYS if key in stored})
        spec = cls(
            num_experts=n,
            num_zero_experts=num_zero,
            top_k=k,
            mask=bool(getattr(config, "use_zce_mask", True)),  # the official loader's default: masked
            zero_expert_bias=float(getattr(config, "zero_expert_bias", 0.0) or 0.0),
            **rule,
        )
        spec._validate(family)
        return spec

    def _validate(self, family: Family) -> None:
        if self.scoring != family.scoring:
            raise ZedaVllmError(
                f"config.json zeda.router.scoring is {self.scoring!r} for {family.architecture}",
                expected=f"{family.scoring!r}, the router rule of {family.base_model_type}",
                fix="re-export the folder with zeda (zeda export) so the router section matches its architecture",
            )
        if not 0 < self.top_k <= self.num_experts:
            raise ZedaVllmError(
                f"num_experts_per_tok={self.top_k} with {family.num_experts_attr}={self.num_experts}",
                expected="1 <= num_experts_per_tok <= the number of real experts",
                fix="check config.json against the original model's config",
            )
        if self.n_group > 1 and (self.total_experts % self.n_group or self.topk_group > self.n_group):
            raise ZedaVllmError(
                f"group-limited routing with n_group={self.n_group}, topk_group={self.topk_group} over "
                f"N+Z={self.total_experts} router rows",
                expected="N+Z divisible by n_group and topk_group <= n_group",
                fix="inject a zero-expert count that keeps N+Z divisible by n_group (zeda inject-zero-experts -z Z)",
            )


def _num_zero_experts(config: Any, family: Family) -> int:
    types = getattr(config, "zce_types", None)
    types = ["copy"] if types is None else list(types)  # the official config class defaults to "copy"
    if not types or any(t != "zero" for t in types):
        raise ZedaVllmError(
            f"zce_types {types} in config.json of a {family.architecture} folder",
            expected='zce_types ["zero"] (parameter-free zero-output experts, the ZEDA method)',
            fix='copy/constant experts (MoE++) are not served by zeda-vllm; a ZEDA folder has "zce_types": ["zero"]',
        )
    nums = getattr(config, "zce_nums", None)
    try:
        total = sum(int(x) for x in nums) if nums else 0
    except (TypeError, ValueError):
        total = 0
    if total <= 0 or len(list(nums)) != len(types):
        raise ZedaVllmError(
            f"zce_nums {nums!r} with zce_types {types} in config.json of a {family.architecture} folder",
            expected="one positive count of zero experts per zce_types entry, e.g. zce_nums [64]",
            fix="set zce_nums to the number of router rows beyond the real experts (N+Z-N)",
        )
    return total


def _family_rule(config: Any, family: Family) -> dict[str, Any]:
    """The router rule zeda derives for the family (zeda_cli.architectures: MoEAdapter.router_spec)."""
    normalize = True if family.normalize_attr is None else bool(getattr(config, family.normalize_attr, False))
    rule: dict[str, Any] = dict(
        scoring=family.scoring, normalize=normalize, weights_in_logits_dtype=family.weights_in_logits_dtype
    )
    if family.scoring == "sigmoid":
        rule.update(
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0),
            n_group=int(getattr(config, "n_group", 1) or 1),
            topk_group=int(getattr(config, "topk_group", 1) or 1),
        )
    return rule


def _check_stored_router(stored: dict[str, Any], n: int, k: int, family: Family) -> None:
    if int(stored.get("num_experts", n)) != n or int(stored.get("top_k", k)) != k:
        raise ZedaVllmError(
            f"config.json zeda.router says N={stored.get('num_experts')}, top_k={stored.get('top_k')} but "
            f"{family.num_experts_attr}={n}, num_experts_per_tok={k}",
            expected="the router section and the model config to agree",
            fix="re-export the folder with zeda export (the config was edited by hand)",
        )
