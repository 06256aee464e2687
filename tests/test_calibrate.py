"""zeda calibrate: the zero-expert share on the user's texts meets the target, measured on other texts; the folder
stays valid (config, card, manifest); bad inputs get one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_UNSUPPORTED
from zeda_cli.export import export_run
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ExportSection, ZeroExpertsSection
from zeda_cli.runs import read_manifest, verified_manifest

runner = CliRunner()
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "pystdlib-moe"
SHORT = ["--max-length", "256", "--batch-size", "16"]


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> tuple[Path, Path]:
    """The bundled held-out files split in two: calibrate on one half, check on the other."""
    root = tmp_path_factory.mktemp("halves")
    lines = (BUNDLED / "data" / "heldout.jsonl").read_text().splitlines()
    (root / "a.jsonl").write_text("\n".join(lines[:60]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[100:160]) + "\n")
    return root / "a.jsonl", root / "b.jsonl"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calibrate")
    inject = inject_zero_experts(str(BUNDLED), root / "inject", zero=ZeroExpertsSection()).out
    return export_run(inject, root / "export", settings=ExportSection()).out


def test_calibrated_share_meets_the_target_on_other_texts(exported, halves):
    calibration, check = halves
    args = ["calibrate", str(exported), "--target-skip", "0.5", "--data", str(calibration), *SHORT, "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert abs(found["zero_share"] - 0.5) <= 0.005 and found["previous_zero_expert_bias"] == 0.0
    config = json.loads((exported / "config.json").read_text())
    assert config["zero_expert_bias"] == pytest.approx(found["zero_expert_bias"])
    manifest = verified_manifest(exported)  # checksums re-recorded: still valid for zeda push
    assert manifest.metrics["calibration"]["target_skip"] == 0.5
    assert f"(default {found['zero_expert_bias']:g}, set by zeda calibrate)" in (exported / "README.md").read_text()
    result = runner.invoke(app, ["eval", str(exported), "--data", str(check), *SHORT, "--no-record", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["zero_share"] - 0.5) <= 0.02


def test_bad_inputs(tmp_path, halves):
    calibration, _ = halves
    masked = inject_zero_experts(str(BUNDLED), tmp_path / "masked", zero=ZeroExpertsSection(init="masked")).out
    cases = [
        ([str(BUNDLED), "--target-skip", "0.5"], EXIT_UNSUPPORTED, "is a static model"),
        ([str(masked), "--target-skip", "1.5"], EXIT_BAD_INPUT, "(0, 1)"),
        ([str(masked), "--target-skip", "0.5"], EXIT_BAD_INPUT, "use_zce_mask"),
    ]
    for args, code, text in cases:
        result = runner.invoke(app, ["calibrate", *args, "--data", str(calibration), *SHORT, "--max-samples", "8"])
        assert result.exit_code == code, result.output
        err = result.stderr.strip()
        assert err.startswith("Error:") and "\n" not in err and text in err, err
    assert "calibration" not in read_manifest(masked).metrics
