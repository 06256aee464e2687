"""benchmarks/serve_vllm.py --quick (in .venv-vllm): runs end to end, static and dynamic engines side by side, and
writes a complete, consistent JSON (no timing thresholds: the quick shapes are too small to mean anything)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

import vllm_harness as vh

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("serve-bench")
    out = tmp / "serve.json"
    cmd = [str(vh.VLLM_PYTHON), str(vh.ROOT / "benchmarks" / "serve_vllm.py"), "--quick", "--out", str(out),
           "--workdir", str(tmp / "folders")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=vh.ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_reports_every_workload_for_both_engines(quick):
    report, stdout = quick
    assert report["schema"] == "zeda.bench.serve_vllm/1" and report["quick"] is True
    assert "| workload | static tokens/s | dynamic tokens/s |" in stdout
    batch = report["workload"]["batch"]
    assert set(report["results"]) == {"prefill", "decode_batch1", f"decode_batch{batch}"}
    for name, r in report["results"].items():
        assert len(r["static_s"]) == len(r["dynamic_s"]) == report["settings"]["repeats"], name
        numbers = [r["static_tokens_per_s"], r["dynamic_tokens_per_s"], r["speedup"], r["cpu_speedup"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (name, numbers)
    assert set(report["goals"]) == {"prefill", f"decode_batch{batch}"}
    assert all({"met_wall", "met_cpu_time"} <= set(g) for g in report["goals"].values())


def test_the_dial_sets_about_half_of_the_slots_to_zero_experts(quick):
    report, _ = quick
    assert report["calibration_share"] == pytest.approx(0.5, abs=0.05)
    for name, r in report["results"].items():
        assert 0.2 < r["zero_share"] < 0.8, (name, r["zero_share"])
