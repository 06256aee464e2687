"""Curves at equal FLOPs with their uncertainty: interpolation on a grid, bootstrap intervals over held-out records,
seeds, and the pass criterion of benchmarks/quality.py.

* A curve point carries each held-out record's NLL sums (model and teacher) and each agreement prompt's metrics
  (``zeda eval`` with ``per_record``). A bootstrap replicate resamples the records (and, independently, the
  prompts) with replacement; the same draws are used for every method of a fixture, so differences are paired.
* NLL rise of a replicate = 100 * (sum of the model's NLL - the teacher's) / the teacher's, over the drawn records;
  token agreement = the mean over the drawn prompts. Each replicate's curve is interpolated at the grid's FLOPs
  share with the full sample's measured FLOPs (the interpolation weights are not resampled).
* Seeds: a ZEDA row is the mean of its seeds' interpolated values (per replicate, on the same draws); the spread
  is the seeds' standard deviation and range. Intervals are percentile intervals (2.5 %, 97.5 %) and cover record
  sampling only: the seed spread is reported beside them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRICS = ("nll_delta_pct", "token_agreement")
LOWER_IS_BETTER = {"nll_delta_pct": True, "token_agreement": False}


def draws(records: int, prompts: int, replicates: int, seed: int) -> dict[str, np.ndarray]:
    """Resampling counts, [replicates, n], for the held-out records and the agreement prompts."""
    rng = np.random.default_rng(seed)

    def counts(n: int) -> np.ndarray:
        picks = rng.integers(0, n, size=(replicates, n))
        out = np.zeros((replicates, n))
        np.add.at(out, (np.arange(replicates)[:, None], picks), 1.0)
        return out

    return {"records": counts(records), "prompts": counts(max(prompts, 1))}


def replicate_values(point: dict[str, Any], metric: str, w: dict[str, np.ndarray]) -> np.ndarray | None:
    """A curve point's metric in every bootstrap replicate."""
    if metric == "nll_delta_pct":
        rec = point.get("records") or {}
        if "teacher_nll" not in rec:
            return None
        nll, teacher = w["records"] @ np.asarray(rec["nll"]), w["records"] @ np.asarray(rec["teacher_nll"])
        return 100.0 * (nll - teacher) / teacher
    values = (point.get("per_sample") or {}).get(metric)
    if values is None:
        return None
    return w["prompts"] @ np.asarray(values) / len(values)


def interpolate(points: list[dict[str, Any]], flops: float, metric: str) -> float | None:
    """The metric at ``flops`` on the measured curve (linear between the two measured points around it)."""
    found = _segment(points, flops, metric)
    if found is None:
        return None
    (p0, p1), t = found
    return (1 - t) * p0[metric] + t * p1[metric]


def _segment(points: list[dict[str, Any]], flops: float, metric: str) -> tuple[tuple[dict, dict], float] | None:
    pts = sorted((p for p in points if p.get(metric) is not None), key=lambda p: p["expert_flops_ratio"])
    for p0, p1 in zip(pts, pts[1:], strict=False):
        x0, x1 = p0["expert_flops_ratio"], p1["expert_flops_ratio"]
        if x0 <= flops <= x1:
            return (p0, p1), (flops - x0) / max(x1 - x0, 1e-12)
    return None


def interpolate_replicates(points: list[dict[str, Any]], flops: float, metric: str,
                           w: dict[str, np.ndarray]) -> np.ndarray | None:  # fmt: skip
    found = _segment(points, flops, metric)
    if found is None:
        return None
    (p0, p1), t = found
    v0, v1 = replicate_values(p0, metric, w), replicate_values(p1, metric, w)
    return None if v0 is None or v1 is None else (1 - t) * v0 + t * v1


def interval(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def cell(curves: list[list[dict[str, Any]]], flops: float, metric: str, w: dict[str, np.ndarray]) -> dict[str, Any]:
    """One method's value at one grid point: the mean over its curves (one per seed), interval, spread."""
    estimates = [interpolate(c, flops, metric) for c in curves]
    reps = [interpolate_replicates(c, flops, metric, w) for c in curves]
    if any(e is None for e in estimates):
        return {"value": None, "per_seed": estimates}
    mean_reps = None if any(r is None for r in reps) else np.mean(reps, axis=0)
    out: dict[str, Any] = {"value": float(np.mean(estimates)), "interval": interval(mean_reps)}
    if len(curves) > 1:
        out |= {"per_seed": estimates, "seed_std": float(np.std(estimates, ddof=1)),
                "seed_range": [min(estimates), max(estimates)]}  # fmt: skip
    out["_replicates"] = mean_reps
    return out


def grid_cells(curves: list[list[dict[str, Any]]], grid: tuple[float, ...], w: dict[str, np.ndarray]) -> dict:
    return {f"{f:.1f}": {m: cell(curves, f, m, w) for m in METRICS} for f in grid}


def compare(zeda: dict[str, Any], baselines: dict[str, dict[str, Any]], flops: str) -> dict[str, Any]:
    """ZEDA against every baseline at one grid point, per metric: below / above each, the difference to the best
    baseline (paired bootstrap interval), and the baselines that beat it."""
    out: dict[str, Any] = {}
    for metric in METRICS:
        lower = LOWER_IS_BETTER[metric]
        mine = zeda[flops][metric]
        rivals = {b: c[flops][metric] for b, c in baselines.items() if c[flops][metric]["value"] is not None}
        if mine["value"] is None or not rivals:
            out[metric] = {"measured": False}
            continue
        best = (min if lower else max)(rivals, key=lambda b: rivals[b]["value"])
        diff = mine["value"] - rivals[best]["value"]
        reps = None
        if mine.get("_replicates") is not None and rivals[best].get("_replicates") is not None:
            reps = mine["_replicates"] - rivals[best]["_replicates"]
        span = interval(reps)
        beaten_by = [b for b, r in rivals.items() if (r["value"] - mine["value"]) * (1 if lower else -1) <= 0]
        excludes_zero = span is not None and (span[1] < 0 if lower else span[0] > 0)
        out[metric] = {"measured": True, "best_baseline": best, "best_baseline_value": rivals[best]["value"],
                       "zeda": mine["value"], "difference": diff, "difference_interval": span,
                       "interval_excludes_zero": excludes_zero, "beats_every_baseline": not beaten_by,
                       "beaten_by": beaten_by, "met": not beaten_by and excludes_zero}  # fmt: skip
    return out


def public(cells: dict[str, Any]) -> dict[str, Any]:
    """The grid without the bootstrap replicates (for the JSON)."""
    return {f: {m: {k: v for k, v in c.items() if k != "_replicates"} for m, c in row.items()}
            for f, row in cells.items()}  # fmt: skip
