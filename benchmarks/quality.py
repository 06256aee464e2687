"""Quality at equal routed-expert FLOPs on both bundled fixtures: ZEDA's curves (several seeds) vs the training-free
baselines' curves, with bootstrap intervals over the held-out records.

Fixtures: ``models/pystdlib-moe`` (Qwen3-MoE, softmax router, 16 experts top-4) and ``models/pystdlib-glm``
(GLM-4.7-Flash in miniature: sigmoid router with correction bias, 64 experts top-4, one shared expert, dense first
layer). Per fixture:

* each baseline (top-p, NAEE, threshold, static top-k, entropy-k, random) runs on the static model, its parameter
  calibrated on the fixture's calibration prompts (``data/prompts.jsonl``, never the held-out texts) to budgets
  0.26 ... 0.8 of the static routed-expert FLOPs;
* each ZEDA model is a finished ``zeda convert`` of a shipped recipe (tiny-demo / tiny-quality on pystdlib-moe,
  tiny-glm-demo / tiny-glm-quality on pystdlib-glm), one per seed (quality_runs.SEED_KEYS), swept along its runtime
  dial ``zero_expert_bias`` calibrated on the same prompts;
* every point is scored by ``zeda eval`` on the held-out records: NLL rise over the static teacher, and token
  agreement with the teacher's greedy continuations of the held-out prompts (``--tasks agreement``).

Curves are interpolated at equal *measured* held-out FLOPs 0.3 ... 0.7 (routed experts only: the GLM shared expert
and dense first layer run for every token in every method and are reported apart, under ``flops_accounting``).
Intervals and the pass criterion are described in quality_stats.py: at 0.50 routed FLOPs, the seed mean of ZEDA's
best recipe must be below every baseline's NLL rise on both fixtures, with the bootstrap interval of its
difference to the best baseline excluding zero.

    python benchmarks/quality.py                  # trains what runs/quality lacks (hours on CPU), then measures
    python benchmarks/quality.py --no-train --trained runs/q-moe-s0 ...   # measure finished zeda convert runs only
    python benchmarks/quality.py --quick          # demo recipe, one seed, few texts: the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, print_table, write_result
from provenance import provenance
from quality_runs import FIXTURES, SEED_KEYS, RunRefused, TrainedRun, identify, seed_overrides
from quality_stats import compare, draws, grid_cells, public
from zeda_cli.console import Output
from zeda_cli.evaluate import run_eval
from zeda_cli.pipeline.convert import ConvertOptions, run_convert
from zeda_cli.recipes import BASELINES, EvalSection

GRID = (0.3, 0.4, 0.5, 0.6, 0.7)  # routed-expert FLOPs shares the curves are compared at
RECIPES = {"pystdlib-moe": {"demo": "tiny-demo", "quality": "tiny-quality"},
           "pystdlib-glm": {"demo": "tiny-glm-demo", "quality": "tiny-glm-quality"}}  # fmt: skip
QUICK_OVERRIDES = ["data.max_prompts=64", "rollout.max_new_tokens=64", "stage2.steps=6", "stage2.prompts_per_step=4"]
REPLICATES = 2000


def point(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one curve point (per-record sums kept for the intervals, dropped from the JSON)."""
    agreement = (r.get("tasks") or {}).get("agreement", {})
    return {
        "expert_flops_ratio": r["expert_flops_ratio"], "zero_share": r["zero_share"], "heldout_nll": r["heldout_nll"],
        "nll_delta_pct": r.get("nll_delta_pct"), "kl_to_teacher": r.get("kl_to_teacher"),
        "top1_agreement": r.get("top1_agreement"), "token_agreement": agreement.get("token_agreement"),
        "prefix_tokens": agreement.get("prefix_tokens"), "next_line_exact": agreement.get("next_line_exact"),
        "param": (r.get("calibration") or {}).get("param"), "records": r.get("records"),
        "per_sample": agreement.get("per_sample"),
    }  # fmt: skip


def curve(model: Path, fixture: Path, args: argparse.Namespace, baseline: str | None = None) -> dict[str, Any]:
    """``zeda eval --sweep-bias --tasks agreement`` of a model (or a baseline on the static one)."""
    settings = EvalSection(data=fixture / "data" / "heldout.jsonl", calibration=fixture / "data" / "prompts.jsonl",
                           record=False, max_samples=args.eval_samples, max_length=args.max_length,
                           calibration_samples=args.calibration_samples, baseline=baseline, sweep_bias=True,
                           budgets=list(args.budgets), tasks=["agreement"], limit=args.gen_prompts,
                           max_new_tokens=args.new_tokens, batch_size=16)  # fmt: skip
    began = time.perf_counter()
    r = run_eval(str(model), settings, per_record=True)
    return {"as_evaluated": point(r), "points": [point(p) for p in r["curve"]], "teacher_nll": r.get("teacher_nll"),
            "records": r["samples"], "seconds": round(time.perf_counter() - began, 1)}  # fmt: skip


def train(fixture: str, recipe: str, seed: int, args: argparse.Namespace) -> TrainedRun:
    """``zeda convert <fixture> --recipe <recipe> [--set <seed keys>=seed] --to stage2`` into the work folder
    (resumable: a finished run is only checked), then identified from its records like any --trained folder."""
    out = args.work / fixture / f"{recipe}-s{seed}"
    overrides = [*seed_overrides(seed), *(QUICK_OVERRIDES if args.quick else [])]
    run_convert(ConvertOptions(model=str(FIXTURES[fixture].relative_to(ROOT)), out=out, recipe=recipe,
                               overrides=overrides, last="stage2"), Output(quiet=True))  # fmt: skip
    return identify(out)


def zeda_runs(fixture: str, args: argparse.Namespace) -> dict[str, list[TrainedRun]]:
    """Per ZEDA row: its runs (one per seed), from --trained folders or trained into the work folder."""
    rows: dict[str, list[TrainedRun]] = {}
    given = [r for r in args.trained_runs if r.fixture == fixture]
    for variant, recipe in RECIPES[fixture].items():
        if args.quick and variant != "demo":
            continue
        for seed in args.seeds:
            found = next((r for r in given if r.recipe == recipe and r.seed == seed and not r.overrides), None)
            if found is None and not args.no_train:
                found = train(fixture, recipe, seed, args)
            if found is not None:
                rows.setdefault(f"ZEDA {recipe}", []).append(found)
    for run in given:  # anything else given: its own row, named by what it is
        if not any(run in runs for runs in rows.values()):
            extra = f" +{len(run.overrides)} overrides" if run.overrides else ""
            rows.setdefault(f"ZEDA {run.recipe}{extra}", []).append(run)
    return rows


def measure(fixture: str, args: argparse.Namespace) -> dict[str, Any]:
    model = FIXTURES[fixture]
    curves = {b: [curve(model, model, args, baseline=b)] for b in BASELINES}
    runs = zeda_runs(fixture, args)
    for name, trained in runs.items():
        curves[name] = [curve(r.model, model, args) for r in trained]
    first = curves[BASELINES[0]][0]
    prompts = len(first["points"][0]["per_sample"]["token_agreement"])
    w = draws(len(first["points"][0]["records"]["nll"]), prompts, args.replicates, seed=0)
    cells = {name: grid_cells([c["points"] for c in cs], GRID, w) for name, cs in curves.items()}
    baselines = {b: cells[b] for b in BASELINES}
    verdicts = {name: {f"{f:.1f}": compare(cells[name], baselines, f"{f:.1f}") for f in GRID} for name in runs}
    return {"model": str(model.relative_to(ROOT)), "flops_accounting": flops_accounting(model),
            "teacher_nll": first["teacher_nll"], "heldout_records": first["records"], "agreement_prompts": prompts,
            "runs": {name: [r.describe() for r in rs] for name, rs in runs.items()},
            "curves": {name: [_strip(c) for c in cs] for name, cs in curves.items()},
            "grid": {name: public(c) for name, c in cells.items()}, "comparisons": verdicts}  # fmt: skip


def flops_accounting(model: Path) -> dict[str, Any]:
    """Per-token FLOPs of the fixture's MLPs, routed experts apart from what always runs (shared expert, dense)."""
    from zeda_cli.evaluate.flops import ExpertFlops
    from zeda_cli.model_ref import resolve_model

    rc = resolve_model(model).rc
    flops, hidden = ExpertFlops.of(rc), int(rc.hf.hidden_size)
    dense = [i for i in range(int(rc.hf.num_hidden_layers)) if i not in rc.moe_layers]
    return {"moe_layers": rc.moe_layers, "dense_layers": dense, "top_k": rc.top_k, "routed_experts": rc.num_experts,
            "routed_static_per_token": flops.static_per_token, "shared_expert_per_token": flops.shared_per_token,
            "dense_mlp_per_token": 2 * 3 * hidden * int(rc.hf.intermediate_size) * len(dense),
            "ratio_counts": "routed experts only (the shared expert, dense layers run for every token)"}  # fmt: skip


def _strip(c: dict[str, Any]) -> dict[str, Any]:
    def clean(p: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in p.items() if k not in ("records", "per_sample")}

    return c | {"as_evaluated": clean(c["as_evaluated"]), "points": [clean(p) for p in c["points"]]}


def goal(fixtures: dict[str, Any]) -> dict[str, Any]:
    """The pass criterion at 0.50 routed FLOPs: each fixture's best-recipe ZEDA row (seed mean) below every baseline
    on NLL rise, the interval of the difference to the best baseline below zero."""
    checks = {}
    for name, result in fixtures.items():
        row = f"ZEDA {RECIPES[name]['quality']}"
        if row not in result["comparisons"]:
            checks[name] = {"row": row, "measured": False, "met": False}
            continue
        nll = result["comparisons"][row]["0.5"]["nll_delta_pct"]
        seeds = len(result["runs"][row])
        checks[name] = {"row": row, "seeds": seeds, **nll, "met": bool(nll.get("met")) and seeds >= 3}
    return {"target": "at 0.50 routed expert FLOPs, ZEDA (mean of >= 3 seeds) below every training-free baseline's "
                      "NLL rise, the 95% bootstrap interval of the difference to the best baseline excluding zero",
            "checks": checks, "met": bool(checks) and all(c["met"] for c in checks.values())}  # fmt: skip


def show(result: dict[str, Any]) -> None:
    header = ["method", *(f"{f:.1f}: NLL +% [95%] / agree" for f in GRID)]
    for name, fx in result["fixtures"].items():
        rows = [(m, *(_cell(cells[f"{f:.1f}"]) for f in GRID)) for m, cells in fx["grid"].items()]
        print_table(f"{name}: quality at equal routed-expert FLOPs", header, rows)


def _cell(values: dict[str, Any]) -> str:
    nll, agree = values["nll_delta_pct"], values["token_agreement"]
    if nll["value"] is None:
        return "-"
    span = nll.get("interval") or [float("nan")] * 2
    text = f"{nll['value']:+.2f} [{span[0]:+.2f}, {span[1]:+.2f}]"
    return text + (f" / {agree['value']:.3f}" if agree["value"] is not None else "")


def markdown(result: dict[str, Any]) -> str:
    """The README's tables from a results JSON: per fixture, NLL rise [95% interval] / token agreement per method at
    each grid point (ZEDA rows: seed mean ± seed std), then the pass check at 0.50."""
    out = []
    for name, fx in result["fixtures"].items():
        head = "| method | " + " | ".join(f"{f:.1f} FLOPs" for f in GRID) + " |"
        out += [f"**{name}** (teacher NLL {fx['teacher_nll']:.4f}, {fx['heldout_records']} held-out records, "
                f"{fx['agreement_prompts']} agreement prompts)", "", head, "|---" * (len(GRID) + 1) + "|"]  # fmt: skip
        for method, cells in fx["grid"].items():
            seeds = len(fx["runs"].get(method, [])) if method.startswith("ZEDA") else 0
            label = f"{method} ({seeds} seeds)" if seeds else method
            out.append(f"| {label} | " + " | ".join(_md(cells[f"{f:.1f}"]) for f in GRID) + " |")
        out.append("")
    out += [
        "| fixture | ZEDA at 0.50 | best baseline | difference [95%] | below every baseline | met |",
        "|---" * 6 + "|",
    ]
    for name, c in result["goal"]["checks"].items():
        if not c.get("measured", True) or "zeda" not in c:
            out.append(f"| {name} | not measured | | | | no |")
            continue
        span = c["difference_interval"] or [float("nan")] * 2
        out.append(f"| {name} | {c['row']} ({c['seeds']} seeds): {c['zeda']:+.2f}% | {c['best_baseline']}: "
                   f"{c['best_baseline_value']:+.2f}% | {c['difference']:+.2f} [{span[0]:+.2f}, {span[1]:+.2f}] | "
                   f"{'yes' if c['beats_every_baseline'] else 'no: ' + ', '.join(c['beaten_by'])} | "
                   f"{'**yes**' if c['met'] else 'no'} |")  # fmt: skip
    return "\n".join(out)


def _md(cell: dict[str, Any]) -> str:
    nll, agree = cell["nll_delta_pct"], cell["token_agreement"]
    if nll["value"] is None:
        return "-"
    span = nll.get("interval") or [float("nan")] * 2
    spread = f" ±{nll['seed_std']:.2f}" if "seed_std" in nll else ""
    text = f"{nll['value']:+.2f}%{spread} [{span[0]:+.2f}, {span[1]:+.2f}]"
    return text + (f" / {agree['value']:.3f}" if agree["value"] is not None else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fixtures", nargs="+", choices=list(FIXTURES), default=list(FIXTURES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ZEDA seeds per recipe")
    parser.add_argument(
        "--trained",
        type=Path,
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a finished `zeda convert` folder to measure (identified from its records)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="where missing runs are trained")
    parser.add_argument("--no-train", action="store_true", help="measure only --trained / finished work runs")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="calibration targets of each sweep")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out records (default: all)")
    parser.add_argument("--gen-prompts", type=int, default=None, help="agreement prompts (default: all)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per agreement prompt")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per held-out / calibration text")
    parser.add_argument("--calibration-samples", type=int, default=256, help="calibration prompts per bisection")
    parser.add_argument("--replicates", type=int, default=REPLICATES, help="bootstrap replicates")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the README tables of a results JSON and exit (measures nothing)",
    )
    args = parser.parse_args(argv)
    # 0.25 (one slot per token) is the floor of top-p, NAEE and entropy-k: 0.26 gives the curves a point below 0.3
    args.budgets = args.budgets or ([0.4, 0.6] if args.quick else [0.26, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    if args.quick:  # structure and sanity, in minutes: short texts, few of them, one seed, a scratch work folder
        args.eval_samples, args.gen_prompts = args.eval_samples or 24, args.gen_prompts or 8
        args.max_length, args.calibration_samples, args.new_tokens = 128, 32, 16
        args.seeds, args.replicates = args.seeds[:1], min(args.replicates, 200)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return {}
    os.chdir(ROOT)  # recipes' relative paths then read as `zeda convert` run from the repository root reads them
    try:
        args.trained_runs = [identify(folder.resolve()) for folder in args.trained]
    except RunRefused as err:
        print(f"quality.py: refused --trained {err}", file=sys.stderr)
        raise SystemExit(2) from None
    scratch = tempfile.TemporaryDirectory(prefix="zeda-quality-") if args.quick else None
    if scratch is not None:
        args.work = Path(scratch.name)
    try:
        fixtures = {name: measure(name, args) for name in args.fixtures}
    finally:
        if scratch is not None:
            scratch.cleanup()
    seeds = {"zeda_seeds": args.seeds, "seed_keys": list(SEED_KEYS), "bootstrap_seed": 0, "baseline_random_seed": 0}
    inputs = {
        **{f"model:{n}": FIXTURES[n] for n in args.fixtures},
        **{f"recipe:{r}": ROOT / "recipes" / f"{r}.yaml" for n in args.fixtures for r in RECIPES[n].values()},
    }
    result = {"schema": "zeda.bench.quality/3", "quick": args.quick,
              "settings": {"budgets": args.budgets, "grid": GRID, "eval_samples": args.eval_samples,
                           "max_length": args.max_length, "calibration_samples": args.calibration_samples,
                           "generation_prompts": args.gen_prompts, "new_tokens": args.new_tokens,
                           "bootstrap_replicates": args.replicates, "interval": "95% percentile, paired over records"},
              "fixtures": fixtures}  # fmt: skip
    result["goal"] = goal(fixtures)
    result |= provenance(inputs=inputs, seeds=seeds)
    path = write_result("quality-quick" if args.quick else "quality", result, args.out)
    plot(result, path.with_suffix(".png"))
    show(result)
    print(f"goal met at 0.50 routed FLOPs on every fixture: {result['goal']['met']}\nwrote {path}")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["fixtures"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 5 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for method, cells in result["fixtures"][name]["grid"].items():
            if method == "random":
                continue  # far worse than everything else; in the table
            zeda = method.startswith("ZEDA")
            style = {"marker": "*", "markersize": 10, "linewidth": 2.2} if zeda else {"marker": "o"}
            for ax, metric in zip(row, ("nll_delta_pct", "token_agreement"), strict=True):
                xs = [float(f) for f in cells if cells[f][metric]["value"] is not None]
                ys = [cells[f"{x:.1f}"][metric]["value"] for x in xs]
                spans = [cells[f"{x:.1f}"][metric].get("interval") or [y, y] for x, y in zip(xs, ys, strict=True)]
                err = np.array([[y - s[0] for y, s in zip(ys, spans, strict=True)],
                                [s[1] - y for y, s in zip(ys, spans, strict=True)]])  # fmt: skip
                ax.errorbar(xs, ys, yerr=err, label=method, capsize=3, **style)
        for ax, label in zip(row, ("held-out NLL rise over the teacher (%)", "token agreement with the teacher's "
                                   "greedy continuations"), strict=True):  # fmt: skip
            ax.set_xlabel("routed-expert FLOPs per token (fraction of the static model)")
            ax.set_ylabel(label)
            ax.set_title(name)
            ax.axvline(0.5, color="grey", linewidth=0.8, linestyle="--")
            ax.grid(alpha=0.3)
        row[0].set_ylim(bottom=0)
        row[0].legend(fontsize=8)
    fig.suptitle("Quality vs routed-expert FLOPs (seed means, 95% bootstrap intervals; random dropping omitted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
