"""zeda convert: every stage on CPU, resumable after kill -9, reruns skip finished stages, early refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM
from typer.testing import CliRunner

from tiny_models import save_distill_teacher, write_prompts
from zeda_cli import load_model
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_EXTERNAL
from zeda_cli.io.skeleton import GLM_4_7_FLASH, QWEN3_30B_A3B, write_skeleton
from zeda_cli.runs import read_manifest, verify_files

runner = CliRunner()
RECIPE = """version: 1
name: tiny-test
balance: {{target_skip: 0.5, aux_loss_coeff: 2.0}}
data: {{prompts: {prompts}}}
rollout: {{max_new_tokens: 16, batch_size: 32}}
stage1: {{optim: {{lr: 1.0e-3}}, global_batch_size: 8, micro_batch_size: 8, epochs: 1, save_every: 3}}
stage2: {{optim: {{lr: 2.0e-4}}, steps: 3, prompts_per_step: 4, max_new_tokens: 8, micro_batch_size: 8}}
runtime: {{device: cpu}}
export: {{max_shard_size: 50KB}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    static = save_distill_teacher(root / "static")
    prompts = write_prompts(root / "prompts.jsonl", 128, seed=5)
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE.format(prompts=prompts))
    return root, static, recipe


def _convert(static: Path | str, out: Path, recipe: Path, *extra: str):
    return runner.invoke(app, ["convert", str(static), "--out", str(out), "--recipe", str(recipe), "--json", *extra])


def _statuses(result) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads(result.stdout)["stages"]}


def _check_manifests(out: Path) -> None:
    for stage in ("inject", "rollouts", "stage1", "stage2", "export"):
        manifest = read_manifest(out / stage)
        assert manifest is not None and manifest.done, stage
        assert verify_files(out / stage, manifest) == [], stage


def test_convert_runs_every_stage_then_skips_them(setup):
    root, static, recipe = setup
    out = root / "run"
    result = _convert(static, out, recipe)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ok"] and set(_statuses(result).values()) == {"run"}
    assert summary["exported"] == str(out / "export")
    _check_manifests(out)
    ids = torch.randint(3, 80, (2, 10))
    exported = AutoModelForCausalLM.from_pretrained(out / "export", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, load_model(out / "stage2")(ids).logits)
    card = (out / "export" / "README.md").read_text()
    assert "library_name: transformers" in card and "zero" in card.lower()

    again = _convert(static, out, recipe)
    assert again.exit_code == 0 and set(_statuses(again).values()) == {"done"}
    # The run is identified by what was read, not by how the path was spelled; how often a stage checkpoints is
    # not part of what it made.
    for spelled in (f"{static}/", os.path.relpath(static)):
        same = _convert(spelled, out, recipe, "--set", "stage1.save_every=5")
        assert same.exit_code == 0 and set(_statuses(same).values()) == {"done"}, (spelled, same.output)

    stock = _convert(static, out, recipe, "--from", "export", "--overwrite", "--set", "export.format=stock")
    assert stock.exit_code == 0, stock.output
    assert _statuses(stock) == {"export": "run"}
    model = Qwen3MoeForCausalLM.from_pretrained(out / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load_model(out / "stage2")(ids).logits, rtol=1e-4, atol=1e-5)


def test_kill_9_during_stage_1_then_rerun(setup):
    root, static, recipe = setup
    out = root / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    args = [sys.executable, "-m", "zeda_cli", "convert", str(static), "--out", str(out), "--recipe", str(recipe), "-q"]
    proc = subprocess.Popen(args, env=env)
    metrics = out / "stage1" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)  # poll fast: on an idle machine the 16 steps take well under a second each
    proc.kill()
    proc.wait()
    assert not read_manifest(out / "stage1").done
    rollouts = (out / "rollouts" / "rollouts.jsonl").read_text()
    result = _convert(static, out, recipe)
    assert result.exit_code == 0, result.output
    assert _statuses(result) == {"inject": "done", "rollout": "done", "stage1": "resume", "stage2": "run",
                                 "export": "run"}  # fmt: skip
    assert (out / "rollouts" / "rollouts.jsonl").read_text() == rollouts
    steps = [json.loads(line)["step"] for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 16
    _check_manifests(out)
    state = json.loads((out / "convert.json").read_text())
    assert all(s["done"] for s in state["stages"].values())


def test_changed_settings_are_not_mixed_with_old_outputs(setup, tmp_path):
    root, static, recipe = setup
    out = tmp_path / "run"
    assert _convert(static, out, recipe, "--to", "inject").exit_code == 0
    changed = _convert(static, out, recipe, "--to", "inject", "--set", "zero_experts.seed=7")
    assert changed.exit_code == EXIT_BAD_INPUT and "other settings" in changed.stderr
    assert "zero_experts.seed 0 -> 7" in changed.stderr, changed.stderr
    late = _convert(static, out, recipe, "--from", "stage2")
    assert late.exit_code == EXIT_BAD_INPUT and "needs stage rollout done" in late.stderr


def test_dry_run_plans_and_writes_nothing(setup, tmp_path):
    _, static, recipe = setup
    result = _convert(static, tmp_path / "plan", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and [s["stage"] for s in summary["stages"]] == [
        "inject", "rollout", "stage1", "stage2", "export"]  # fmt: skip
    assert all(s["estimate"]["per_process_gb"] > 0 for s in summary["stages"])
    assert not (tmp_path / "plan").exists()


@pytest.fixture(scope="module")
def qwen30b(tmp_path_factory):
    return write_skeleton(QWEN3_30B_A3B, tmp_path_factory.mktemp("skeleton") / "Qwen3-30B-A3B")


def test_30b_model_is_refused_early_on_this_machine(qwen30b, tmp_path):
    out = tmp_path / "dyn"
    no_gpu = runner.invoke(app, ["convert", str(qwen30b), "--out", str(out), "--recipe", "qwen3-30b-a3b"])
    assert no_gpu.exit_code == EXIT_EXTERNAL and "no GPU" in no_gpu.stderr
    cpu = ["--set", "runtime.device=cpu", "--set", "distributed.nproc=1", "--set", "distributed.deepspeed=null"]
    result = runner.invoke(app, ["convert", str(qwen30b), "--out", str(out), *cpu])
    assert result.exit_code == EXIT_EXTERNAL, result.output
    assert "stage rollout needs" in result.stderr or "stage stage1 needs" in result.stderr
    assert "Recipe: qwen3-30b-a3b.yaml" in result.stderr and not out.exists()
    plan = runner.invoke(app, ["convert", str(qwen30b), "--out", str(out), "--dry-run", "--json"])
    assert plan.exit_code == 0, plan.output
    stage1 = next(s for s in json.loads(plan.stdout)["stages"] if s["stage"] == "stage1")
    assert stage1["estimate"]["processes"] == 8 and 20 < stage1["estimate"]["per_process_gb"] < 200


def test_dry_run_places_the_vllm_servers_on_their_gpus(qwen30b, tmp_path):
    def plan(*sets: str) -> dict:
        args = ["convert", str(qwen30b), "--out", str(tmp_path / "dyn"), "--dry-run", "--json",
                "--gpu-memory-gb", "80"]  # fmt: skip
        result = runner.invoke(app, [*args, *(a for s in sets for a in ("--set", s))])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    hf = plan("generation.engine=hf", "stage2.teacher_logprobs=trainer")
    vllm = plan("generation.engine=vllm", "generation.devices=[6,7]", "generation.tensor_parallel_size=2")
    estimate = {s["stage"]: s["estimate"] for s in vllm["stages"]}
    hf_estimate = {s["stage"]: s["estimate"] for s in hf["stages"]}
    # HF generate's KV cache is the trainer's in hf; with vLLM the student's server holds it, on its own GPUs
    assert "HF generate" in hf_estimate["stage2"]["formula"] and "HF generate" not in estimate["stage2"]["formula"]
    assert estimate["stage1"] == hf_estimate["stage1"]
    placed = {p["stage"]: p for p in vllm["placement"]}
    gpus = placed["stage2"]["gpus"]
    assert all(any("student server" in what for what, _ in gpus[g]) for g in ("6", "7"))
    assert any("training rank" in what for what, _ in gpus["0"])
    assert placed["stage2"]["tokens"]["generated"] == 321 * 16 * 2 * 32768
    assert any("collective timeout" in n for n in placed["stage2"]["notes"])
    assert any("teacher server" in what for what, _ in placed["rollout"]["gpus"]["6"])


@pytest.mark.parametrize("config", [QWEN3_30B_A3B, GLM_4_7_FLASH], ids=["qwen3-30b-a3b", "glm-4.7-flash"])
def test_shipped_30b_recipes_fit_one_node_of_eight_80gb_gpus(config, tmp_path):
    """The recipe's own placement (FSDP2 + EP 8, vLLM servers beside the trainer): every GPU of every stage within
    80 GB, no note that something does not fit, teacher log-probs from its server, offloaded state counted on the
    host for all 8 ranks."""
    skeleton = write_skeleton(config, tmp_path / "model")
    args = ["convert", str(skeleton), "--out", str(tmp_path / "dyn"), "--dry-run", "--json", "--gpu-memory-gb", "80"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    placed = {p["stage"]: p for p in summary["placement"]}
    assert set(placed) == {"rollout", "stage1", "stage2"}
    for p in placed.values():
        assert not [n for n in p["notes"] if "collective timeout" not in n], p["notes"]
        assert all(sum(gb for _, gb in held) <= 80 for held in p["gpus"].values()), p["gpus"]
    stage2 = placed["stage2"]["gpus"]
    assert sorted(stage2) == [str(g) for g in range(8)]
    assert all({"training", "student", "teacher"} <= {w.split()[0] for w, _ in stage2[g]} for g in stage2)
    estimate = {s["stage"]: s["estimate"] for s in summary["stages"]}
    assert estimate["stage2"]["components"]["frozen teacher"] == 0.0
    assert estimate["stage1"]["host_gb"] > 8 * 40  # 8 ranks x (fp32 master + grads + Adam) / 8 of ~30B params
