"""zeda convert MODEL --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..console import Output
from .options import JsonOpt, OverwriteOpt, QuietOpt, RecipeOpt, SetOpt, TokenOpt, examples, reported

EPILOG = examples(
    "zeda convert Qwen/Qwen3-30B-A3B --out ./dyn                     # recipes/qwen3-30b-a3b.yaml picked",
    "zeda convert models/pystdlib-moe --out runs/demo --recipe tiny-demo",
    "zeda convert --recipe tiny-demo --out runs/demo                   # the model the recipe names",
    "zeda convert ./my-moe --out ./dyn --set stage2.steps=50 --to stage1",
    "zeda convert zai-org/GLM-4.7-Flash --out ./glm --dry-run          # plan + memory per stage",
    "zeda convert ./my-moe --out ./dyn --push-to my-org/my-moe-zeda --json",
)


def convert(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder; one subfolder per stage.")],
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="Static MoE: local folder or Hub id (org/name[@revision]); default: the recipe's model.",
        ),
    ] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="First stage to run (earlier ones must be done).")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
    push_to: Annotated[str | None, typer.Option(help="Push the export to this Hub repo at the end.")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan: memory per GPU, host RAM, tokens per stage; run nothing.")
    ] = False,
    gpu_memory_gb: Annotated[
        float | None, typer.Option(help="Plan for GPUs of this many GB (default: the visible GPU's).")
    ] = None,
    overwrite: OverwriteOpt = False,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Every stage in one resumable command: inspect, inject, rollout, stage 1, stage 2, export (, push).

    A rerun of the same command skips finished stages and resumes an interrupted one. Exit code 0 only when every
    stage succeeded.
    """
    output = Output(json_mode=json_out, quiet=quiet)
    with reported(output):
        from ..pipeline.convert import ConvertOptions, run_convert

        opts = ConvertOptions(model=model, out=out, recipe=recipe, overrides=list(set_ or []), first=from_, last=to,
                              push_to=push_to, dry_run=dry_run, overwrite=overwrite, token=token,
                              gpu_memory_gb=gpu_memory_gb)  # fmt: skip
        summary = run_convert(opts, output)
        output.result(summary, _table(summary))
        if dry_run and summary.get("placement") and not json_out:
            output.result(summary, _placement_table(summary["placement"]))


def _table(summary: dict) -> Table:
    title = (
        f"zeda convert {'plan' if summary['dry_run'] else 'summary'}: {summary['model']} (recipe {summary['recipe']})"
    )
    table = Table(title=title, title_justify="left")
    for column in ("stage", "status", "folder", "memory (GB/process)", "seconds", "result"):
        table.add_column(column)
    for s in summary["stages"]:
        est = s.get("estimate")
        memory = f"{est['per_process_gb']:.1f} x{est['processes']} ({est['device']})" if est else "-"
        result = ", ".join(f"{k}={_short(v)}" for k, v in (s.get("result") or {}).items())
        seconds = "-" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        table.add_row(s["stage"], s["status"], s["folder"], memory, seconds, result)
    return table


def _placement_table(placements: list[dict]) -> Table:
    table = Table(title="placement: what each GPU holds (GB), host RAM, tokens (upper bounds)", title_justify="left")
    for column in ("stage", "GPU", "runs there", "GB", "host GB", "tokens generated / trained"):
        table.add_column(column)
    for p in placements:
        tokens = " / ".join("?" if v is None else f"{v:,}" for v in (p["tokens"].get("generated"),
                                                                       p["tokens"].get("trained")))  # fmt: skip
        first = True
        for gpu, parts in p["gpus"].items():
            runs = "; ".join(f"{what} {gb:.1f}" for what, gb in parts)
            table.add_row(p["stage"] if first else "", gpu, runs, f"{sum(gb for _, gb in parts):.1f}",
                          f"{p['host_gb']:.0f}" if first else "", tokens if first else "")  # fmt: skip
            first = False
        for note in p["notes"]:
            table.add_row("", "", f"note: {note}", "", "", "")
    return table


def _short(value: object) -> str:
    if isinstance(value, list):
        return f"{len(value)} files"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
