"""zeda eval for release pipelines: quality gates with their own exit code, and the quality-vs-FLOPs curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ZeroExpertsSection

runner = CliRunner()
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "pystdlib-moe"
SMALL = ["--max-samples", "12", "--max-length", "128", "--calibration-samples", "48", "--no-record"]


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> Path:
    """The bundled model, zero experts injected (untrained: ~21% zero slots, +0.6% NLL)."""
    return inject_zero_experts(
        str(BUNDLED), tmp_path_factory.mktemp("gates") / "inject", zero=ZeroExpertsSection()
    ).out


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args, *SMALL])


def test_passing_gates_exit_0_and_are_reported(injected):
    result = _eval(str(injected), "--max-nll-rise", "5%", "--min-zero-share", "0.05", "--json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["gates"]["passed"] is True
    assert [g["gate"] for g in data["gates"]["checks"]] == ["--max-nll-rise", "--min-zero-share"]


def test_a_violated_gate_exits_with_its_own_code_and_names_the_gate(injected):
    result = _eval(str(injected), "--max-nll-rise", "0.01%", "--min-zero-share", "0.05", "--max-kl", "1e-6", "--json")
    assert result.exit_code == EXIT_GATE_FAILED, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["gates"]["passed"] is False
    failed = {g["gate"] for g in data["gates"]["checks"] if not g["passed"]}
    assert failed == {"--max-nll-rise", "--max-kl"}
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("Error: quality gate failed: --max-nll-rise 0.01: nll_delta_pct = ") and "--max-kl" in err


def test_a_gate_on_an_unmeasured_metric_fails(tmp_path):
    result = _eval(str(BUNDLED), "--max-nll-rise", "3")  # a static model without a teacher has no NLL rise
    assert result.exit_code == EXIT_GATE_FAILED and "nll_delta_pct was not measured" in result.stderr


def test_bad_gate_values_are_bad_input(injected):
    result = _eval(str(injected), "--max-nll-rise", "three", "--min-zero-share", "1.5")
    assert result.exit_code == EXIT_BAD_INPUT and "2 problems" in result.stderr and "--min-zero-share" in result.stderr


@pytest.mark.parametrize("extra", [[], ["--baseline", "top_p"]], ids=["zero-expert-bias", "top-p"])
def test_the_curve_is_calibrated_to_each_budget(injected, extra):
    result = _eval(str(injected), "--sweep-bias", "--budgets", "0.5,0.7", *extra, "--json", "-q")
    assert result.exit_code == 0, result.output
    curve = json.loads(result.stdout)["curve"]
    assert [p["budget"] for p in curve] == [0.5, 0.7]
    for point in curve:
        assert abs(point["calibration"]["calibration_kept_share"] - point["budget"]) <= 0.01
        assert abs(point["expert_flops_ratio"] - point["budget"]) <= 0.08  # held-out texts, not the calibration
        assert point["nll_delta_pct"] > 0
    assert curve[0]["nll_delta_pct"] > curve[1]["nll_delta_pct"]  # fewer FLOPs cost more quality


def test_the_documented_release_workflow_uses_real_flags():
    import re

    import yaml

    workflow = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "ci" / "release.yml").read_text())
    steps = {s["name"]: s.get("run", "") for s in workflow["jobs"]["convert-gate-push"]["steps"] if "name" in s}
    gate = next(run for name, run in steps.items() if name.startswith("Quality gates"))
    help_text = runner.invoke(app, ["eval", "--help"]).stdout
    for flag in re.findall(r"--[a-z-]+", gate):
        assert flag in help_text, flag
    names = list(steps)
    assert names.index("Quality gates") < names.index("Push (only reached when every gate passed)")
