"""Quality at equal expert FLOPs on the bundled model: ZEDA's curves vs the training-free baselines' curves.

Every method is measured along a curve, not at one point. Each ZEDA model (the shipped recipes, run end to end by
``zeda convert``) is swept along its runtime dial ``zero_expert_bias``; each baseline (top-p, NAEE, threshold,
static top-k, entropy-k, random) along its own parameter; at each point the parameter is calibrated on the
calibration prompts to a share of the static expert FLOPs, and the model is scored on the held-out texts by
``zeda eval``: NLL rise over the static teacher, and the generation agreement with it (``--tasks agreement``: greedy
continuations of held-out prompts, tokens up to the first divergence and the next line exact). Curves are
interpolated at equal *measured* held-out FLOPs 0.3 ... 0.7. Output: a table, a JSON and a PNG of both metrics.

The goal, checked in the JSON: at <= 0.5 of the expert FLOPs, a ZEDA model's NLL rise is below, and its generation
agreement above, every baseline's at the same FLOPs.

    python benchmarks/quality.py            # the full comparison (CPU, see README for the runtime)
    python benchmarks/quality.py --quick    # the demo recipe only, fewer texts and points: the CI smoke run
    python benchmarks/quality.py --trained "ZEDA quality=runs/q/stage2"   # reuse a finished zeda convert
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, machine, print_table, write_result
from zeda_cli.console import Output
from zeda_cli.evaluate import run_eval
from zeda_cli.pipeline.convert import ConvertOptions, run_convert
from zeda_cli.recipes import BASELINES, EvalSection

BUNDLED = ROOT / "models" / "pystdlib-moe"
HELDOUT = BUNDLED / "data" / "heldout.jsonl"
GRID = (0.3, 0.4, 0.5, 0.6, 0.7)  # expert-FLOPs shares the curves are compared at
# The ZEDA models: shipped recipes run by `zeda convert` (overrides for variants), each swept along its dial.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ZEDA demo": ("tiny-demo", []),
    "ZEDA quality": ("tiny-quality", []),
}
QUICK_VARIANTS = {"ZEDA demo": ("tiny-demo", ["data.max_prompts=64", "rollout.max_new_tokens=64",
                                              "stage2.steps=6", "stage2.prompts_per_step=4"])}  # fmt: skip
METRICS = ("nll_delta_pct", "token_agreement", "next_line_exact")


def point(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one curve point (or of the model as trained)."""
    agreement = (r.get("tasks") or {}).get("agreement", {})
    return {
        "expert_flops_ratio": r["expert_flops_ratio"], "zero_share": r["zero_share"], "heldout_nll": r["heldout_nll"],
        "nll_delta_pct": r.get("nll_delta_pct"), "kl_to_teacher": r.get("kl_to_teacher"),
        "top1_agreement": r.get("top1_agreement"), "token_agreement": agreement.get("token_agreement"),
        "prefix_tokens": agreement.get("prefix_tokens"), "next_line_exact": agreement.get("next_line_exact"),
        "param": (r.get("calibration") or {}).get("param"),
    }  # fmt: skip


def curve(model: Path, args: argparse.Namespace, baseline: str | None = None) -> dict[str, Any]:
    """``zeda eval --sweep-bias --tasks agreement`` of a model (or a baseline on the static one)."""
    settings = EvalSection(data=HELDOUT, record=False, max_samples=args.eval_samples, max_length=args.max_length,
                           calibration_samples=args.calibration_samples, baseline=baseline, sweep_bias=True,
                           budgets=list(args.budgets), tasks=["agreement"], limit=args.gen_prompts,
                           max_new_tokens=args.new_tokens, batch_size=16)  # fmt: skip
    began = time.perf_counter()
    r = run_eval(str(model), settings)
    return {"as_evaluated": point(r), "points": [point(p) for p in r["curve"]],
            "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def train(work: Path, name: str, recipe: str, overrides: list[str]) -> tuple[Path, float]:
    """Run the recipe end to end (up to stage 2) with zeda convert; returns the stage-2 folder and the seconds."""
    out = work / name.replace(" ", "-")
    began = time.perf_counter()
    run_convert(ConvertOptions(model=str(BUNDLED), out=out, recipe=recipe, overrides=overrides, last="stage2"),
                Output(quiet=True))  # fmt: skip
    return out / "stage2", round(time.perf_counter() - began, 1)


def interpolate(points: list[dict[str, Any]], flops: float, metric: str) -> float | None:
    pts = sorted((p["expert_flops_ratio"], p[metric]) for p in points if p.get(metric) is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / max(x1 - x0, 1e-12)
    return None


def on_grid(curves: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{method: {flops: {metric: value}}} at the GRID, interpolated on each method's measured curve."""
    return {method: {f"{f:.1f}": {m: interpolate(c["points"], f, m) for m in METRICS} for f in GRID}
            for method, c in curves.items()}  # fmt: skip


def goal(grid: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, Any]:
    """Per ZEDA model and FLOPs share <= 0.5: below every baseline's NLL rise and above its agreement?"""
    checks = []
    for method in (m for m in grid if m.startswith("ZEDA")):
        for flops in (f for f in grid[method] if float(f) <= 0.5):
            mine = grid[method][flops]
            rivals = {b: grid[b][flops] for b in BASELINES if b in grid}
            nll = all(_better(mine["nll_delta_pct"], r["nll_delta_pct"], lower=True) for r in rivals.values())
            gen = all(_better(mine["token_agreement"], r["token_agreement"], lower=False) for r in rivals.values())
            margin = min(
                (
                    r["nll_delta_pct"] - mine["nll_delta_pct"]
                    for r in rivals.values()
                    if r["nll_delta_pct"] is not None and mine["nll_delta_pct"] is not None
                ),
                default=None,
            )
            checks.append({"model": method, "flops": float(flops), "beats_on_nll": nll, "beats_on_generation": gen,
                           "nll_margin_points": margin, "met": nll and gen})  # fmt: skip
    return {"target": "at <= 0.5 expert FLOPs: NLL rise below and generation agreement above every baseline",
            "checks": checks, "met_at_0.5": any(c["met"] for c in checks if c["flops"] == 0.5)}  # fmt: skip


def _better(mine: float | None, theirs: float | None, lower: bool) -> bool:
    if mine is None:
        return False
    if theirs is None:
        return True
    return mine < theirs if lower else mine > theirs


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="zeda-quality-"))
    curves: dict[str, dict[str, Any]] = {}
    try:
        for method in BASELINES:
            curves[method] = curve(BUNDLED, args, baseline=method)
        for name, (recipe, overrides) in (QUICK_VARIANTS if args.quick else VARIANTS).items():
            if name in args.trained:  # converted beforehand with the same recipe: measure that folder
                folder, seconds = args.trained[name], None
            else:
                folder, seconds = train(work, name, recipe, overrides)
            curves[name] = curve(folder, args) | {"recipe": recipe, "overrides": overrides, "train_seconds": seconds,
                                                  "folder": str(folder)}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    grid = on_grid(curves)
    return {"schema": "zeda.bench.quality/2", "machine": machine(), "quick": args.quick,
            "settings": {"budgets": args.budgets, "grid": GRID, "eval_samples": args.eval_samples,
                         "max_length": args.max_length, "calibration_samples": args.calibration_samples,
                         "generation_prompts": args.gen_prompts, "new_tokens": args.new_tokens},
            "curves": curves, "grid": grid, "goal": goal(grid)}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for method, c in result["curves"].items():
        if method == "random":
            continue  # far worse than everything else; in the table
        style = {"marker": "*", "markersize": 10, "linewidth": 2.2} if method.startswith("ZEDA") else {"marker": "o"}
        pts = sorted(c["points"], key=lambda p: p["expert_flops_ratio"])
        for ax, metric in zip(axes, ("nll_delta_pct", "token_agreement"), strict=True):
            ax.plot([p["expert_flops_ratio"] for p in pts], [p[metric] for p in pts], label=method, **style)
    for ax, label in zip(axes, ("held-out NLL rise over the teacher (%)", "token agreement with the teacher's "
                                "greedy continuations"), strict=True):  # fmt: skip
        ax.set_xlabel("expert FLOPs per token (fraction of the static model)")
        ax.set_ylabel(label)
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("pystdlib-moe: quality vs expert FLOPs (curves; random dropping omitted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def show(result: dict[str, Any]) -> None:
    header = ["method", *(f"{f:.1f}: NLL +% / agree / line" for f in GRID)]
    rows = []
    for method, cells in result["grid"].items():
        rows.append((method, *(_cell(cells[f"{f:.1f}"]) for f in GRID)))
    print_table(f"Quality at equal expert FLOPs ({'quick' if result['quick'] else 'full'}, "
                f"{result['wall_seconds']} s)", header, rows)  # fmt: skip


def _cell(values: dict[str, float | None]) -> str:
    nll, agree, line = (values[m] for m in METRICS)
    return "-" if nll is None else f"{nll:+.2f} / {agree:.3f} / {line:.3f}" if agree is not None else f"{nll:+.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="calibration targets of each sweep")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out records (default: all 200)")
    parser.add_argument("--gen-prompts", type=int, default=None, help="agreement prompts (default: all 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per agreement prompt")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per held-out / calibration text")
    parser.add_argument("--calibration-samples", type=int, default=256, help="calibration prompts per bisection")
    parser.add_argument(
        "--trained",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help='a ZEDA variant already converted with its recipe, e.g. "ZEDA quality=runs/q/stage2"',
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.trained = {k: Path(v) for k, v in (t.split("=", 1) for t in args.trained)}
    # 0.25 (one slot per token) is the floor of top-p, NAEE and entropy-k: 0.26 gives the curves a point below 0.3
    args.budgets = args.budgets or ([0.4, 0.6] if args.quick else [0.26, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    if args.quick:  # structure and sanity, in minutes: short texts, few of them
        args.eval_samples, args.gen_prompts = args.eval_samples or 24, args.gen_prompts or 8
        args.max_length, args.calibration_samples, args.new_tokens = 128, 32, 16
    began = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    path = write_result("quality-quick" if args.quick else "quality", result, args.out)
    plot(result, path.with_suffix(".png"))
    show(result)
    print(f"goal met at 0.5 expert FLOPs: {result['goal']['met_at_0.5']}\nwrote {path} and {path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
