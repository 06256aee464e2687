"""Quality gates for release pipelines: thresholds on ``zeda eval``'s metrics (``--max-nll-rise 3%``,
``--min-zero-share 0.45``, ...). A violated gate makes the command exit with ``EXIT_GATE_FAILED`` and name it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..recipes import EvalSection


@dataclass(frozen=True)
class GateRule:
    setting: str  # EvalSection field (flag: --max-nll-rise ...)
    metric: str  # key of the eval result
    upper: bool  # True: the metric must not exceed the threshold; False: must reach it
    unit: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.setting.replace("_", "-")


RULES = (
    GateRule("max_nll_rise", "nll_delta_pct", upper=True, unit="%"),
    GateRule("max_kl", "kl_to_teacher", upper=True),
    GateRule("min_top1", "top1_agreement", upper=False),
    GateRule("min_zero_share", "zero_share", upper=False),
    GateRule("max_expert_flops", "expert_flops_ratio", upper=True),
    GateRule("min_agreement", "tasks.agreement.token_agreement", upper=False),
)


@dataclass(frozen=True)
class GateResult:
    gate: str  # the flag
    metric: str
    threshold: float
    value: float | None  # None: the metric was not measured (e.g. no teacher)
    passed: bool

    def describe(self) -> str:
        if self.value is None:
            return f"{self.gate} {self.threshold:g}: {self.metric} was not measured"
        sign = ">" if not self.passed and self.gate.startswith("--max") else "<"
        relation = "within" if self.passed else sign
        return f"{self.gate} {self.threshold:g}: {self.metric} = {self.value:.4g} ({relation} the threshold)"


def check_gates(result: dict[str, Any], settings: EvalSection) -> list[GateResult]:
    """The gates ``settings`` sets, each checked against ``result`` (an unmeasured metric fails its gate)."""
    checked = []
    for rule in RULES:
        threshold = getattr(settings, rule.setting)
        if threshold is None:
            continue
        value = _lookup(result, rule.metric)
        passed = value is not None and (value <= threshold if rule.upper else value >= threshold)
        checked.append(GateResult(rule.flag, rule.metric, float(threshold), value, passed))
    return checked


def _lookup(result: dict[str, Any], path: str) -> float | None:
    node: Any = result
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, int | float) else None


def gate_summary(checked: list[GateResult]) -> dict[str, Any]:
    return {"passed": all(g.passed for g in checked), "checks": [asdict(g) for g in checked]}
