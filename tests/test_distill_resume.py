"""Interrupted runs: kill -9 in the middle of stage 1, rerun with --resume; interrupted rollout files; bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tiny_models import save_distill_teacher, save_tiny_model, write_prompts
from zeda_cli.cli import app
from zeda_cli.distill.rollout import generate_rollouts
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_UNSUPPORTED
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ZeroExpertsSection, load_recipe
from zeda_cli.runs import TeacherSpec, read_manifest

runner = CliRunner()
STEPS = 36  # 48 prompts / global batch 4 x 3 epochs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    static = save_distill_teacher(root / "static")
    inject = inject_zero_experts(str(static), root / "inject", zero=ZeroExpertsSection()).out
    return root, static, inject, write_prompts(root / "prompts.jsonl", 48, seed=4)


def _stage1_args(inject: Path, out: Path, prompts: Path) -> list[str]:
    # 3 epochs (STEPS steps) so that a kill after step 5 reliably lands mid-stage, even on a fast idle machine
    sets = ["rollout.max_new_tokens=12", "rollout.batch_size=16", "stage1.global_batch_size=4",
            "stage1.micro_batch_size=4", "stage1.save_every=3", "stage1.optim.lr=1e-3",
            "stage1.epochs=3"]  # fmt: skip
    return ["distill", "--stage", "1", str(inject), "--out", str(out), "--prompts", str(prompts),
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_kill_9_mid_stage_1_then_resume(small):
    root, _, inject, prompts = small
    out = root / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "zeda_cli", *_stage1_args(inject, out, prompts), "-q"], env=env)
    deadline = time.time() + 300
    while len(_metrics(out)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.wait()
    before = _metrics(out)
    assert 5 <= len(before) < STEPS, "the run should have been killed mid-stage"
    assert not read_manifest(out).done and (out / "checkpoints").exists()
    checkpointed = int(next((out / "checkpoints").glob("step-*")).name.split("-")[1])
    rollouts_before = (out / "rollouts.jsonl").read_text()

    # A new learning rate (or target) would train something else than the run that was interrupted: refused, the
    # changed keys named, nothing touched.
    refused = runner.invoke(app, [*_stage1_args(inject, out, prompts), "--resume", "--set", "stage1.optim.lr=2e-3",
                                  "--set", "balance.target_skip=0.4"])  # fmt: skip
    [err] = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert refused.exit_code == EXIT_BAD_INPUT, refused.output
    assert "stage1.optim.lr 0.001 -> 0.002" in err and "balance.target_skip 0.5 -> 0.4" in err and "--overwrite" in err
    assert _metrics(out) == before
    # How often it checkpoints does not change what is trained: applied and said.
    result = runner.invoke(app, [*_stage1_args(inject, out, prompts), "--resume", "--set", "stage1.save_every=4",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "resume: stage1.save_every 3 -> 4 applied" in result.stderr
    after = _metrics(out)
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))  # every step once, none twice
    assert after[:checkpointed] == before[:checkpointed]  # finished steps were not redone
    manifest = read_manifest(out)
    assert manifest.done and manifest.metrics["steps"] == STEPS
    assert (out / "rollouts.jsonl").read_text() == rollouts_before  # rollouts neither redone nor duplicated
    ids = [json.loads(line)["id"] for line in rollouts_before.splitlines()]
    assert sorted(ids) == list(range(48))
    again = runner.invoke(app, [*_stage1_args(inject, out, prompts), "--resume"])
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again.output
    assert json.loads((out / "job.json").read_text())["recipe"]["stage1"]["save_every"] == 4


def test_interrupted_rollout_file_resumes_without_duplicates(small, tmp_path):
    _, static, _, prompts = small
    recipe = load_recipe(None, [f"data.prompts={prompts}", "rollout.max_new_tokens=8", "rollout.batch_size=16"])
    teacher = TeacherSpec(path=str(static), masked=False)
    whole = tmp_path / "whole.jsonl"
    generate_rollouts(teacher, recipe, whole)
    cut = tmp_path / "cut.jsonl"
    shutil.copy(whole.with_name("whole.meta.json"), tmp_path / "cut.meta.json")
    lines = whole.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:20]) + lines[20][:15])  # a batch and a bit, the last line cut short
    summary = generate_rollouts(teacher, recipe, cut)
    assert summary.generated_now == 48 - 16  # resumed at the first incomplete batch
    assert cut.read_text() == whole.read_text()
    other = load_recipe(None, [f"data.prompts={prompts}", "rollout.max_new_tokens=9", "rollout.batch_size=16"])
    with pytest.raises(Exception, match="other settings"):
        generate_rollouts(teacher, other, cut)


def _bad(tmp_path, static, inject, prompts):
    glm = save_tiny_model("glm4_moe_lite", tmp_path / "glm")
    small_vocab = save_tiny_model("qwen3_moe", tmp_path / "v80", vocab_size=80)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "bad.json").write_text("{not json")
    base = ["distill", "--stage", "1", str(inject), "--out", str(tmp_path / "out")]
    return {
        "static student": (
            ["distill", "--stage", "1", str(static), "--out", str(tmp_path / "out"), "--prompts", str(prompts)],
            EXIT_UNSUPPORTED,
            "no zero experts",
        ),  # fmt: skip
        "other family": ([*base, "--prompts", str(prompts), "--teacher", str(glm)], EXIT_BAD_INPUT, "family"),
        "other vocab": ([*base, "--prompts", str(prompts), "--teacher", str(small_vocab)], EXIT_BAD_INPUT, "vocab"),
        "empty prompts": ([*base, "--prompts", str(tmp_path / "empty.jsonl")], EXIT_BAD_INPUT, "is empty"),
        "malformed": ([*base, "--prompts", str(tmp_path / "broken.jsonl")], EXIT_BAD_INPUT, "line 2"),
        "no prompts": (base, EXIT_BAD_INPUT, "--prompts"),
        "target": ([*base, "--prompts", str(prompts), "--target-skip", "1.2"], EXIT_BAD_INPUT, "target_skip"),
        "trainable": ([*base, "--prompts", str(prompts), "--trainable", "some"], EXIT_BAD_INPUT, "'full' or 'router'"),
        "ds missing": ([*base, "--prompts", str(prompts), "--deepspeed", "nope.json"], EXIT_BAD_INPUT, "nope.json"),
        "ds invalid": (
            [*base, "--prompts", str(prompts), "--deepspeed", str(tmp_path / "bad.json")],
            EXIT_BAD_INPUT,
            "not valid JSON",
        ),  # fmt: skip
    }


def test_distill_bad_inputs(small, tmp_path):
    _, static, inject, prompts = small
    for name, (args, code, text) in _bad(tmp_path, static, inject, prompts).items():
        result = runner.invoke(app, args)
        err = result.stderr.strip()
        assert result.exit_code == code, (name, result.output)
        assert err.startswith("Error:") and "\n" not in err and text in err, (name, err)
        assert not (tmp_path / "out").exists(), name


def test_distill_refuses_a_used_output_folder(small, tmp_path):
    _, _, inject, prompts = small
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    result = runner.invoke(app, ["distill", "--stage", "1", str(inject), "--out", str(out), "--prompts", str(prompts)])
    assert result.exit_code == EXIT_BAD_INPUT and "--resume" in result.stderr and (out / "notes.txt").exists()
