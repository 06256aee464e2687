"""Quality at matched expert FLOPs on the bundled model: ZEDA vs training-free baselines.

Rows: the static teacher; the injected, untrained model; ZEDA after stage 1 and after stages 1+2, training the full
model and the router only; top-p, NAEE, threshold and random slot dropping, each calibrated to expert-FLOPs budgets.
All rows are evaluated by ``zeda eval`` on the bundled held-out set against the static teacher. Output: a table, a
JSON and a Pareto PNG (held-out NLL vs expert FLOPs). The goal, checked in the JSON: at >= 50% fewer expert FLOPs,
ZEDA's NLL rises <= 3% over the teacher and is below every baseline at the same FLOPs (baselines interpolated).

    python benchmarks/quality.py            # the full comparison (CPU, see README for the runtime)
    python benchmarks/quality.py --quick    # smaller data and budgets: the CI smoke run (< 10 minutes)
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
from zeda_cli.distill.rollout import generate_rollouts
from zeda_cli.distill.run import run_stage
from zeda_cli.evaluate import run_eval
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import EvalSection, Recipe, ZeroExpertsSection, load_recipe
from zeda_cli.runs import TeacherSpec

BUNDLED = ROOT / "models" / "pystdlib-moe"
HELDOUT = BUNDLED / "data" / "heldout.jsonl"
BASELINES = ("top_p", "naee", "threshold", "random")
# ZEDA variants: recipe overrides on top of recipes/tiny-demo.yaml (shared rollouts, per-variant training).
VARIANTS = {
    "ZEDA router-only": [],  # the recipe as shipped
    "ZEDA full": ["stage1.trainable=full", "stage1.optim.lr=1e-4", "stage2.trainable=full", "stage2.optim.lr=3e-5"],
}  # fmt: skip
QUICK = ["data.max_prompts=64", "rollout.max_new_tokens=64", "stage2.steps=6", "stage2.prompts_per_step=4"]


def evaluate(folder: Path, settings: EvalSection, method: str, stage: str, budget: float | None = None) -> dict:
    began = time.perf_counter()
    r = run_eval(str(folder), settings)
    return {
        "method": method, "stage": stage, "budget": budget, "expert_flops_ratio": r["expert_flops_ratio"],
        "zero_share": r["zero_share"], "heldout_nll": r["heldout_nll"], "nll_delta_pct": r.get("nll_delta_pct"),
        "kl_to_teacher": r.get("kl_to_teacher"), "top1_agreement": r.get("top1_agreement"),
        "zero_share_per_layer": r["zero_share_per_layer"], "seconds": round(time.perf_counter() - began, 1),
        "baseline_param": (r.get("baseline") or {}).get("param"),
    }  # fmt: skip


def zeda_rows(work: Path, name: str, recipe: Recipe, rollouts: Path, settings: EvalSection) -> list[dict]:
    out = work / name.replace(" ", "-")
    quiet = Output(quiet=True)
    rows = []
    for stage, student in ((1, work / "inject"), (2, out / "stage1")):
        began = time.perf_counter()
        run_stage(stage, str(student), out / f"stage{stage}", recipe, output=quiet,
                  rollouts=str(rollouts) if stage == 1 else None)  # fmt: skip
        row = evaluate(out / f"stage{stage}", settings, name, "stage 1" if stage == 1 else "stage 1+2")
        rows.append(row | {"train_seconds": round(time.perf_counter() - began, 1)})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="zeda-quality-"))
    extra = QUICK if args.quick else []
    settings = EvalSection(data=HELDOUT, record=False, max_samples=args.eval_samples)
    try:
        inject_zero_experts(str(BUNDLED), work / "inject", zero=ZeroExpertsSection())
        base = load_recipe("tiny-demo", extra)
        rollouts = work / "rollouts" / "rollouts.jsonl"
        began = time.perf_counter()
        generate_rollouts(
            TeacherSpec(path=str(BUNDLED), masked=False), base.data, base.rollout, base.runtime, rollouts
        )
        rollout_seconds = round(time.perf_counter() - began, 1)
        rows = [evaluate(BUNDLED, settings, "teacher (static)", "-"),
                evaluate(work / "inject", settings, "injected, untrained", "-")]  # fmt: skip
        for name, overrides in VARIANTS.items():
            rows += zeda_rows(work, name, load_recipe("tiny-demo", [*overrides, *extra]), rollouts, settings)
        for method in BASELINES:
            for budget in args.budgets:
                b = EvalSection(data=HELDOUT, record=False, max_samples=args.eval_samples, baseline=method,
                                 budget=budget)  # fmt: skip
                rows.append(evaluate(BUNDLED, b, method, "training-free", budget))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"schema": "zeda.bench.quality/1", "machine": machine(), "quick": args.quick,
            "settings": {"variants": VARIANTS, "quick_overrides": extra, "budgets": args.budgets,
                         "eval_samples": args.eval_samples, "rollout_seconds": rollout_seconds},
            "rows": rows, "goal": goal(rows)}  # fmt: skip


def interpolate(rows: list[dict], method: str, flops: float) -> float | None:
    points = sorted((r["expert_flops_ratio"], r["heldout_nll"]) for r in rows if r["method"] == method)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / max(x1 - x0, 1e-12)
    return None


def goal(rows: list[dict]) -> dict[str, Any]:
    """Per ZEDA row: does it cut >= 50% of expert FLOPs, stay within +3%, and beat every baseline there?"""
    checks = []
    for r in rows:
        if not r["method"].startswith("ZEDA"):
            continue
        baselines = {m: interpolate(rows, m, r["expert_flops_ratio"]) for m in BASELINES}
        beaten = {m: v is not None and r["heldout_nll"] < v for m, v in baselines.items()}
        checks.append({
            "row": f"{r['method']} {r['stage']}", "expert_flops_ratio": r["expert_flops_ratio"],
            "nll_delta_pct": r["nll_delta_pct"], "baselines_nll_at_same_flops": baselines, "beats": beaten,
            "met": r["expert_flops_ratio"] <= 0.5 and (r["nll_delta_pct"] or 99) <= 3.0 and all(beaten.values()),
        })  # fmt: skip
    return {"target": "flops ratio <= 0.5, NLL +<= 3%, below every baseline", "checks": checks,
            "met_by_any": any(c["met"] for c in checks)}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method in BASELINES:
        pts = sorted((r["expert_flops_ratio"], r["heldout_nll"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method) if pts else None
    points = [
        r for r in rows if r["method"].startswith("ZEDA") or r["method"] in ("teacher (static)", "injected, untrained")
    ]
    colours = plt.get_cmap("Dark2")
    for i, r in enumerate(points):
        marker = "*" if r["method"].startswith("ZEDA") else "s"
        ax.scatter(r["expert_flops_ratio"], r["heldout_nll"], marker=marker, s=160, zorder=5, color=colours(i),
                   edgecolors="black", linewidths=0.5,
                   label=f"{r['method']} {r['stage'] if r['stage'] != '-' else ''}".strip())  # fmt: skip
    # Random dropping is far worse than everything else: clip the axis so the rest stays readable.
    shown = [r["heldout_nll"] for r in rows if r["method"] != "random"]
    if shown:
        ax.set_ylim(min(shown) - 0.02, max(shown) + 0.08)
        ax.text(0.01, 0.98, "random: above this range (see the table)", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("expert FLOPs per token (fraction of the static model)")
    ax.set_ylabel("held-out NLL (nats / token)")
    ax.set_title("pystdlib-moe: quality vs expert FLOPs (lower-left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def show(result: dict[str, Any], quick: bool) -> None:
    formats = [("expert_flops_ratio", ".3f"), ("zero_share", ".3f"), ("heldout_nll", ".4f"),
               ("nll_delta_pct", "+.2f"), ("kl_to_teacher", ".4f"), ("top1_agreement", ".3f")]  # fmt: skip
    rows = [(r["method"], r["stage"], r["budget"] or "-", *(_fmt(r[k], f) for k, f in formats))
            for r in result["rows"]]  # fmt: skip
    header = ["method", "stage", "budget", "expert FLOPs", "zero share", "NLL", "NLL delta %", "KL", "top-1"]
    print_table(f"Held-out quality vs expert FLOPs ({'quick' if quick else 'full'}, {result['wall_seconds']} s)",
                header, rows)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out records (default: all 200)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.budgets = args.budgets or ([0.5, 0.7] if args.quick else [0.3, 0.4, 0.5, 0.6, 0.7])
    if args.quick and args.eval_samples is None:
        args.eval_samples = 40
    began = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    name = "quality-quick" if args.quick else "quality"
    path = write_result(name, result, args.out)
    plot(result["rows"], path.with_suffix(".png"))
    show(result, args.quick)
    print(f"goal met by any ZEDA row: {result['goal']['met_by_any']}\nwrote {path} and {path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
