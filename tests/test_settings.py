"""One source of truth for settings, as a user meets it through the CLI: a stage inherits what the folder it starts
from recorded and says so, an explicit value overrides and says so, settings fixed by the folder cannot be
overridden, and a recipe whose precision contradicts its DeepSpeed config is refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tiny_models import save_distill_teacher, write_prompts
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT
from zeda_cli.runs import read_manifest

runner = CliRunner()
FAST = ["rollout.max_new_tokens=8", "rollout.batch_size=8", "stage1.global_batch_size=4", "stage1.micro_batch_size=4",
        "stage1.max_steps=1", "runtime.device=cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("settings")
    static = save_distill_teacher(root / "static")
    result = runner.invoke(app, ["inject-zero-experts", str(static), "--out", str(root / "inject"), "--target-skip",
                                 "0.3", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "inject", write_prompts(root / "prompts.jsonl", 8, seed=3)


def _stage1(inject: Path, out: Path, prompts: Path, *extra: str):
    sets = [a for s in FAST for a in ("--set", s)]
    return runner.invoke(app, ["distill", "--stage", "1", str(inject), "--out", str(out), "--prompts", str(prompts),
                               *sets, *extra])  # fmt: skip


def _trained_target(out: Path) -> float:
    recorded = read_manifest(out).settings["balance"]["target_skip"]
    assert json.loads((out / "config.json").read_text())["zeda"]["target_skip"] == recorded
    return recorded


def test_distill_inherits_the_target_recorded_at_inject_and_says_so(injected, tmp_path):
    inject, prompts = injected
    result = _stage1(inject, tmp_path / "s1", prompts)
    assert result.exit_code == 0, result.output
    assert "target_skip 0.3 inherited from the inject record" in result.stderr
    assert _trained_target(tmp_path / "s1") == 0.3
    # and stage 2 inherits it from stage 1's record in turn
    s2 = runner.invoke(app, ["distill", "--stage", "2", str(tmp_path / "s1"), "--out", str(tmp_path / "s2"),
                             "--prompts", str(prompts), "--steps", "1", "--set", "stage2.prompts_per_step=2",
                             "--set", "stage2.max_new_tokens=4", "--set", "runtime.device=cpu"])  # fmt: skip
    assert s2.exit_code == 0, s2.output
    assert "target_skip 0.3 inherited from the stage1 record" in s2.stderr
    assert _trained_target(tmp_path / "s2") == 0.3


def test_a_flag_overrides_the_record_and_says_so(injected, tmp_path):
    inject, prompts = injected
    result = _stage1(inject, tmp_path / "s1", prompts, "--target-skip", "0.5")
    assert result.exit_code == 0, result.output
    assert "--target-skip 0.5 overrides 0.3 recorded at inject" in result.stderr
    assert _trained_target(tmp_path / "s1") == 0.5


def test_the_number_of_zero_experts_is_fixed_by_the_folder(injected, tmp_path):
    inject, prompts = injected
    result = _stage1(inject, tmp_path / "s1", prompts, "--set", "zero_experts.num_zero_experts=2")
    [err] = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT and "4 zero experts per layer" in err and "inject" in err, err
    assert not (tmp_path / "s1").exists()


def test_teacher_flag_goes_through_the_recipe_and_is_said(injected, tmp_path):
    inject, prompts = injected
    teacher = inject.parent / "static"
    result = _stage1(inject, tmp_path / "s1", prompts, "--teacher", str(teacher))
    assert result.exit_code == 0, result.output
    assert f"--teacher {teacher} overrides {inject} recorded at inject" in result.stderr
    assert read_manifest(tmp_path / "s1").inputs["teacher"] == {"path": str(teacher), "masked": False}


def test_a_deepspeed_config_that_contradicts_the_recipe_dtype_is_refused(injected, tmp_path):
    inject, prompts = injected
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    result = _stage1(inject, tmp_path / "s1", prompts, "--deepspeed", str(ds), "--set", "runtime.dtype=float32")
    [err] = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "runtime.dtype float32 contradicts the DeepSpeed config" in err and "bf16" in err, err
    assert not (tmp_path / "s1").exists()
