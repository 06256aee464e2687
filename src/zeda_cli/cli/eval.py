"""zeda eval MODEL [--teacher ORIG] [--data FILE] [--baseline NAME --budget B]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..console import Output
from ..errors import EXIT_GATE_FAILED
from .options import JsonOpt, QuietOpt, examples, recipe_from_flags, reported

EPILOG = examples(
    "zeda eval models/pystdlib-moe                       # static model on its bundled held-out texts",
    "zeda eval runs/demo/stage2 --json                   # dynamic model vs its own masked (static) self",
    "zeda eval ./dyn --teacher ./orig --data heldout.jsonl --max-samples 200",
    "zeda eval models/pystdlib-moe --baseline naee --budget 0.5",
    "zeda eval ./orig --baseline top_p --budget 0.3 --calibration train.jsonl --data heldout.jsonl",
    "zeda eval ./dyn/export --sweep-bias --budgets 0.4,0.5,0.6 --json     # its own quality-vs-FLOPs curve",
    "zeda eval ./dyn/export --max-nll-rise 3% --min-zero-share 0.45       # a release gate: exit 7 if violated",
    "zeda eval ./dyn/export --tasks agreement                             # greedy continuations vs the teacher's",
    "zeda eval ./dyn/export --tasks gsm8k --task-data gsm8k=gsm8k-test.jsonl --limit 200",
)


def eval_model(
    model: Annotated[str, typer.Argument(help="Static or dynamic MoE folder (or Hub id).")],
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Reference model for KL / top-1 / NLL delta (default for a dynamic model: the same "
            "folder with zero experts masked = the original static model)."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help='JSONL, one {"text": ...} per line (default: data/heldout.jsonl of the model folder '
            "or of the folder it was made from)."
        ),
    ] = None,
    max_samples: Annotated[int | None, typer.Option(help="Use only the first N records.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (float32 on CPU), float32, bfloat16 or float16.")] = "auto",
    zero_expert_bias: Annotated[
        float | None, typer.Option(help="Runtime dial added to zero-expert logits (dynamic models).")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Evaluate a training-free baseline on the static model instead: top_p, naee, threshold, "
            "static_topk, entropy_k or random."
        ),
    ] = None,
    budget: Annotated[
        float, typer.Option(help="Baseline: share of the static top-K expert FLOPs to keep, in (0, 1].")
    ] = 0.5,
    renorm: Annotated[
        str, typer.Option(help="Baseline: kept (rescale kept weights to the top-K's sum) or none.")
    ] = "kept",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Baseline: JSONL texts to calibrate p / beta / tau on (default: data/calibration, "
            "prompts or train .jsonl of the model; never the evaluation texts)."
        ),
    ] = None,
    calibration_samples: Annotated[int, typer.Option(help="Baseline: calibration records used.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the random baseline.")] = 0,
    record: Annotated[bool, typer.Option(help="Write the result into the folder's zeda.json.")] = True,
    sweep_bias: Annotated[
        bool,
        typer.Option(
            "--sweep-bias",
            help="Also measure the quality-vs-FLOPs curve: at each of --budgets, calibrate zero_expert_bias (a "
            "baseline: its parameter) on the calibration texts, then score the evaluation texts.",
        ),
    ] = False,
    budgets: Annotated[
        str | None, typer.Option(help="Curve points: kept shares of the expert FLOPs (default 0.3,0.4,0.5,0.6,0.7).")
    ] = None,
    max_nll_rise: Annotated[
        str | None, typer.Option(help="Gate: fail (exit 7) when the NLL rise vs the teacher exceeds this, e.g. 3%.")
    ] = None,
    max_kl: Annotated[float | None, typer.Option(help="Gate: the largest KL(teacher || model) per token.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Gate: the lowest top-1 agreement with the teacher.")] = None,
    min_zero_share: Annotated[
        float | None, typer.Option(help="Gate: the lowest share of routing slots on zero experts, e.g. 0.45.")
    ] = None,
    max_expert_flops: Annotated[
        float | None, typer.Option(help="Gate: the largest routed-expert FLOPs ratio vs the static model.")
    ] = None,
    min_agreement: Annotated[
        float | None, typer.Option(help="Gate: the lowest token agreement of the agreement task with the teacher.")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="lm-eval tasks, comma-separated: agreement (greedy continuations vs the teacher's), a built-in task "
            "with --task-data, or a task of --include-path. Needs zeda[lmeval]."
        ),
    ] = None,
    task_data: Annotated[
        list[str] | None, typer.Option(help="Local data of a built-in task: NAME=FILE or NAME:SPLIT=FILE.")
    ] = None,
    include_path: Annotated[Path | None, typer.Option(help="A folder of your own lm-eval task YAMLs.")] = None,
    gen_prompts: Annotated[
        Path | None, typer.Option(help="Agreement prompts, JSONL (default: data/prompts-heldout.jsonl of the model).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Agreement: greedy tokens per prompt.")] = 32,
    limit: Annotated[int | None, typer.Option(help="At most this many samples per lm-eval task.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Held-out NLL / perplexity, KL and top-1 agreement with the teacher, zero-slot share, expert FLOPs."""
    out = Output(json_mode=json_out, quiet=quiet)
    with reported(out):
        from ..evaluate import run_eval

        given = {"data": data, "teacher": teacher, "max_samples": max_samples, "max_length": max_length,
                 "batch_size": batch_size, "device": device, "dtype": dtype, "zero_expert_bias": zero_expert_bias,
                 "baseline": baseline, "budget": budget, "renorm": renorm, "calibration": calibration,
                 "calibration_samples": calibration_samples, "seed": seed, "record": record,
                 "sweep_bias": sweep_bias, "budgets": budgets, "max_nll_rise": max_nll_rise, "max_kl": max_kl,
                 "min_top1": min_top1, "min_zero_share": min_zero_share, "max_expert_flops": max_expert_flops,
                 "min_agreement": min_agreement, "tasks": tasks, "task_data": task_data, "include_path": include_path,
                 "gen_prompts": gen_prompts, "max_new_tokens": max_new_tokens, "limit": limit}  # fmt: skip
        flags = {f"eval.{k}": ("--" + k.replace("_", "-"), v) for k, v in given.items()}
        settings = recipe_from_flags(flags).eval
        if settings.tasks:
            from .. import extras

            extras.require("lmeval", "zeda eval --tasks")  # before any model is loaded
        with out.progress() as progress:
            result = run_eval(model, settings, track=lambda items, what: progress.track(items, what), log=out.log)
        out.result(result, _table(result))
        if result.get("recorded_in"):
            out.log(f"Recorded in {result['recorded_in']}")
        _enforce_gates(result, out)


def _enforce_gates(result: dict[str, Any], out: Output) -> None:
    """Exit with EXIT_GATE_FAILED (one line naming every violated gate) when a quality gate failed."""
    gates = result.get("gates")
    if not gates or gates["passed"]:
        return
    from ..evaluate.gates import GateResult

    failed = [GateResult(**g).describe() for g in gates["checks"] if not g["passed"]]
    out.error("quality gate failed: " + "; ".join(failed))
    raise typer.Exit(EXIT_GATE_FAILED)


def _table(r: dict[str, Any]) -> Table:
    table = Table(
        title=f"zeda eval: {escape(r['model'])} ({escape(r['kind'])})", show_header=False, title_justify="left"
    )
    table.add_column("metric", style="bold")
    table.add_column("value")
    for key, value in _rows(r):
        table.add_row(escape(key), escape(value))
    return table


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("data", f"{r['data']} ({r['samples']} texts, {r['tokens']:,} predicted tokens)"),
        ("NLL / perplexity", f"{r['heldout_nll']:.4f} / {r['perplexity']:.3f}"),
    ]
    if r.get("teacher"):
        rows += [
            ("teacher", r["teacher"]),
            ("teacher NLL / perplexity", f"{r['teacher_nll']:.4f} / {r['teacher_perplexity']:.3f}"),
            ("NLL delta vs teacher", _pct(r["nll_delta_pct"])),
            ("KL(teacher || model) / token", f"{r['kl_to_teacher']:.5f}"),
            ("top-1 agreement", f"{100 * r['top1_agreement']:.2f}%"),
        ]
    rows += [
        ("zero-slot share", f"{100 * r['zero_share']:.2f}%"),
        ("  per MoE layer", " ".join(f"{100 * v:.1f}" for v in r["zero_share_per_layer"].values()) + " (%)"),
        (
            "expert FLOPs / token",
            f"{r['expert_flops_per_token']:,.0f} of {r['static_expert_flops_per_token']:,} "
            f"static = {100 * r['expert_flops_ratio']:.2f}%",
        ),
        (
            "shared-expert FLOPs / token",
            "none"
            if r["shared_expert_flops_per_token"] is None
            else f"{r['shared_expert_flops_per_token']:,} (always on, not in the ratio)",
        ),
    ]
    if r.get("baseline"):
        b = r["baseline"]
        rows.append(
            (
                "baseline",
                f"{b['method']} {b['param_name']}={b['param']:.5f} for budget {b['budget']} "
                f"(calibrated on {b['calibration_tokens']:,} tokens, kept "
                f"{100 * b['calibration_kept_share']:.2f}%; renorm {b['renorm']})",
            )
        )
    for point in r.get("curve") or []:
        cal = point["calibration"]
        rows.append(
            (
                f"curve @ {point['budget']:g}",
                f"{cal['param_name']}={cal['param']:.4f}: expert FLOPs "
                f"{point['expert_flops_ratio']:.3f}, NLL {point['heldout_nll']:.4f} "
                f"({_pct(point.get('nll_delta_pct'))}), KL {point.get('kl_to_teacher', float('nan')):.4f}",
            )
        )
    for task, metrics in (r.get("tasks") or {}).items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        rows.append((f"task {task}", f"{shown} ({metrics.get('samples')} samples)"))
    for gate in (r.get("gates") or {}).get("checks", []):
        rows.append((f"gate {gate['gate']} {gate['threshold']:g}", "passed" if gate["passed"] else "FAILED"))
    rows.append(("device / dtype / time", f"{r['device']} / {r['dtype']} / {r['seconds']} s"))
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"
