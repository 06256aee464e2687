"""benchmarks/quality_stats.py: curve interpolation, bootstrap intervals over records, seeds and the pass check, on
synthetic curves whose answer is known (numpy only, milliseconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_stats as qs  # noqa: E402

N, M = 120, 40
FLOPS = (0.26, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def make_curve(scale: float, seed: int, noise: float = 4.0) -> list[dict]:
    """A curve whose NLL rise is ``scale`` x (1 - FLOPs) x 10 %, measured on N records with per-record noise."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(0).uniform(400, 900, N)  # the same records (and teacher) for every method
    points = []
    for x in FLOPS:
        nll = teacher * (1 + scale * (1 - x) / 10) + rng.normal(0, noise, N)
        agree = np.clip(rng.normal(0.6 - scale * (1 - x) / 4, 0.15, M), 0, 1)
        points.append({"expert_flops_ratio": x, "nll_delta_pct": 100 * (nll.sum() - teacher.sum()) / teacher.sum(),
                       "token_agreement": float(agree.mean()),
                       "records": {"nll": nll.tolist(), "teacher_nll": teacher.tolist()},
                       "per_sample": {"token_agreement": agree.tolist()}})  # fmt: skip
    return points


def test_a_replicate_with_every_record_once_is_the_point_estimate():
    curve = make_curve(1.0, 1)
    ones = {"records": np.ones((1, N)), "prompts": np.ones((1, M))}
    for p in curve:
        assert qs.replicate_values(p, "nll_delta_pct", ones)[0] == pytest.approx(p["nll_delta_pct"])
        assert qs.replicate_values(p, "token_agreement", ones)[0] == pytest.approx(p["token_agreement"])


def test_interpolation_is_linear_between_the_measured_points_and_none_outside():
    curve = make_curve(1.0, 1)
    at = qs.interpolate(curve, 0.45, "nll_delta_pct")
    assert at == pytest.approx((curve[2]["nll_delta_pct"] + curve[3]["nll_delta_pct"]) / 2)
    assert qs.interpolate(curve, 0.2, "nll_delta_pct") is None and qs.interpolate(curve, 0.9, "nll_delta_pct") is None


def test_the_interval_holds_the_estimate_and_seeds_give_mean_and_spread():
    w = qs.draws(N, M, 500, seed=0)
    cell = qs.grid_cells([make_curve(1.0, s) for s in (1, 2, 3)], (0.5,), w)["0.5"]["nll_delta_pct"]
    lo, hi = cell["interval"]
    assert lo < cell["value"] < hi and hi - lo > 0
    assert cell["value"] == pytest.approx(np.mean(cell["per_seed"])) and cell["seed_std"] > 0
    assert cell["seed_range"][0] <= cell["value"] <= cell["seed_range"][1]


def test_a_clearly_better_method_passes_and_a_copy_of_the_best_baseline_does_not():
    w = qs.draws(N, M, 500, seed=0)
    baselines = {"a": qs.grid_cells([make_curve(1.0, 11)], (0.5,), w), "b": qs.grid_cells([make_curve(1.3, 12)],
                                                                                            (0.5,), w)}  # fmt: skip
    better = qs.compare(qs.grid_cells([make_curve(0.5, s) for s in (1, 2, 3)], (0.5,), w), baselines, "0.5")
    nll = better["nll_delta_pct"]
    assert nll["best_baseline"] == "a" and nll["beats_every_baseline"] and nll["difference"] < 0
    assert nll["difference_interval"][1] < 0 and nll["met"]
    same = qs.compare(qs.grid_cells([make_curve(1.0, 11)], (0.5,), w), baselines, "0.5")["nll_delta_pct"]
    assert same["difference"] == pytest.approx(0.0) and not same["met"]  # a tie is not a win
    assert same["difference_interval"][0] <= 0 <= same["difference_interval"][1]


def test_the_json_form_has_no_replicates():
    w = qs.draws(N, M, 50, seed=0)
    cells = qs.grid_cells([make_curve(1.0, 1)], (0.5,), w)
    assert "_replicates" in cells["0.5"]["nll_delta_pct"]
    assert "_replicates" not in qs.public(cells)["0.5"]["nll_delta_pct"]
