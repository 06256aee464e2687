"""The --quick modes of the quality, I/O, training and memory-plan benchmarks run and write consistent results.

Structure and sanity only: no timing or quality thresholds (those belong to the full runs in the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_quick(script: str, out: Path, timeout: int = 900, extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra]
    proc = subprocess.run(command, cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_quality_quick(tmp_path):
    from zeda_cli.recipes import BASELINES

    result = run_quick("quality.py", tmp_path / "quality.json", timeout=1800)
    assert set(result["fixtures"]) == {"pystdlib-moe", "pystdlib-glm"}
    for name, fx in result["fixtures"].items():
        demo = "ZEDA tiny-demo" if name == "pystdlib-moe" else "ZEDA tiny-glm-demo"
        assert set(fx["curves"]) == {demo, *BASELINES}, name
        for method, runs in fx["curves"].items():
            for c in runs:
                assert len(c["points"]) == 2, method  # the quick budgets 0.4, 0.6
                for p in c["points"]:
                    assert abs(p["expert_flops_ratio"] + p["zero_share"] - 1.0) < 1e-6, method
                    assert p["nll_delta_pct"] > 0 and 0.0 <= p["token_agreement"] <= 1.0, method
                    assert "records" not in p and "per_sample" not in p  # the per-record sums stay out of the JSON
                flops = [p["expert_flops_ratio"] for p in c["points"]]
                assert all(0.3 < f < 0.75 for f in flops) and flops[0] <= flops[1], method  # calibrated elsewhere
        run = fx["runs"][demo][0]
        assert run["recipe"] == demo.removeprefix("ZEDA ") and run["seed"] == 0 and run["train_seconds"] > 0
        cell = fx["grid"]["top_p"]["0.5"]["nll_delta_pct"]
        assert cell["value"] is not None and cell["interval"][0] <= cell["value"] <= cell["interval"][1]
        assert set(fx["comparisons"][demo]) == {"0.3", "0.4", "0.5", "0.6", "0.7"}
        assert fx["flops_accounting"]["routed_static_per_token"] > 0
    glm = result["fixtures"]["pystdlib-glm"]["flops_accounting"]
    assert glm["dense_layers"] == [0] and glm["shared_expert_per_token"] > 0
    assert result["provenance"]["command"].startswith("python benchmarks/quality.py --quick")
    assert isinstance(result["goal"]["met"], bool)


def test_io_quick(tmp_path):
    result = run_quick("io.py", tmp_path / "io.json")
    steps = result["result"]
    assert set(steps) == {"plain copy", "inject-zero-experts", "export"}
    assert all(v["seconds"] > 0 and v["peak_rss_bytes"] > 0 for v in steps.values())
    assert steps["plain copy"]["peak_rss_bytes"] < steps["inject-zero-experts"]["peak_rss_bytes"]
    assert result["largest_shard_bytes"] <= result["checkpoint_bytes"]


def test_training_quick(tmp_path):
    result = run_quick("training.py", tmp_path / "training.json")
    rows = result["result"]
    assert set(rows) == {"static", "dynamic-masked", "dynamic-init", "dynamic-50"}
    assert rows["dynamic-masked"]["zero_share"] == 0
    assert abs(rows["dynamic-50"]["zero_share"] - 0.5) < 0.15
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rows.values())


def test_memory_plan_quick(tmp_path):
    result = run_quick("memory_plan.py", tmp_path / "memory.json")
    rows = {(r["model"], r["plan"], r["stage"]): r for r in result["estimates"]}
    recipe = "the recipe: FSDP2 + EP 8 + offload, vLLM servers beside it, 1 node x 8"
    for model in ("Qwen3-30B-A3B", "GLM-4.7-Flash"):
        for stage in ("rollout", "stage1", "stage2"):
            assert rows[(model, recipe, stage)]["fits"] and rows[(model, recipe, stage)]["busiest_gpu_gb"] <= 80
        stage2 = rows[(model, recipe, "stage2")]
        assert {w.split()[0] for w, _ in stage2["runs_on_busiest_gpu"]} == {"training", "student", "teacher"}
        # without offload the two servers beside the trainer do not fit at 32k samples: the planner says so
        crowded = rows[(model, "FSDP2 + EP 8, no offload, vLLM servers, 1 node x 8", "stage2")]
        assert not crowded["fits"] and any("GB of 80" in p for p in crowded["problems"])
        two = "FSDP2 + EP 8, no offload, vLLM servers (0.2 of a GPU), 8k caps, 2 nodes x 8"
        assert all(rows[(model, two, stage)]["fits"] for stage in ("rollout", "stage1", "stage2"))
        two_nodes = rows[(model, two, "stage1")]
        one_node = rows[(model, "FSDP2 + EP 8, no offload, vLLM servers, 8k caps, 1 node x 8", "stage1")]
        assert two_nodes["processes"] == 16 and two_nodes["per_process_gb"] < one_node["per_process_gb"]
    offload = rows[("Qwen3-30B-A3B", recipe, "stage1")]
    assert offload["node_host_gb"] > 8 * 40  # 8 ranks' fp32 master, grads and Adam state of ~30B params / 8
    assert result["provenance"]["command"].startswith("python benchmarks/memory_plan.py --quick")


def test_generation_quick(tmp_path):
    from vllm_harness import vllm_skip_reason

    if vllm_skip_reason():
        pytest.skip(vllm_skip_reason())
    result = run_quick("generation.py", tmp_path / "generation.json", extra=("--parts", "rollouts", "stage2"))
    for engine in ("hf", "vllm"):
        rollout, stage2 = result["rollout"][engine], result["stage2"][engine]
        assert rollout["tokens"] > 0 and rollout["tokens_per_s"] > 0 and rollout["startup_s"] > 0, engine
        assert stage2["steps"] == 3 and stage2["median_step_s"] > 0, engine
    assert result["stage2"]["vllm"]["median_sync_s"] > 0 and result["stage2"]["hf"]["median_sync_s"] == 0
    assert result["rollout_speedup_vllm_over_hf"] > 0
    assert result["provenance"]["command"].startswith("python benchmarks/generation.py --quick")
