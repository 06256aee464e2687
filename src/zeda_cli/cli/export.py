"""zeda export RUN_DIR --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import JsonOpt, OverwriteOpt, QuietOpt, examples, recipe_from_flags, reported

EPILOG = examples(
    "zeda export ./qwen3-zeda/stage2 --out ./qwen3-zeda/export",
    "zeda export ./run/stage2 --out ./release --dtype bfloat16 --max-shard-size 2GB --base-model Qwen/Qwen3-30B-A3B",
    "zeda export ./run/stage2 --out ./release-stock --format stock   # any engine loads it; saves no compute",
)


def export(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="A finished stage output (inject-zero-experts or distill).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="zeda: dynamic model + loading code (skips zero experts); stock: zero experts as all-zero experts "
            "of the original architecture (plain from_pretrained, no speed-up).",
        ),
    ] = "zeda",
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    dtype: Annotated[
        str, typer.Option(help="auto (as stored), bfloat16, float16 or float32: float tensors converted on the fly.")
    ] = "auto",
    base_model: Annotated[
        str | None,
        typer.Option(help="Hub id of the original model for the card, when the run started from a local folder."),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the final, publishable model: verified, streamed shards + index, config, loading code, model card.

    The run's manifest must say done and every file must match its checksum; the output appears only when complete.
    """
    out_ = Output(json_mode=json_out, quiet=quiet)
    with reported(out_):
        from ..export import export_run

        recipe = recipe_from_flags({
            "export.format": ("--format", format_),
            "export.max_shard_size": ("--max-shard-size", max_shard_size),
            "export.dtype": ("--dtype", dtype),
            "export.base_model": ("--base-model", base_model),
        })  # fmt: skip
        if Path(run_dir).is_dir():  # a bad path is one error line, nothing before it
            out_.log(f"Verifying {run_dir} (manifest and checksums) ...")
        with out_.progress() as progress:
            result = export_run(run_dir, out, settings=recipe.export, overwrite=overwrite, progress=progress)
        data = {
            "ok": True,
            "out": str(result.out),
            "format": result.format,
            "model_type": result.model_type,
            "num_experts": result.num_experts,
            "num_zero_experts": result.num_zero_experts,
            "base_model": result.base_model,
            "stages": result.stages,
            "shards": [f.name for f in result.files],
            "bytes": sum(f.size for f in result.files),
        }
        rows = [(k, v) for k, v in data.items() if k != "ok"]
        out_.result(data, key_value_table("zeda export", rows))
        if result.base_model is None:
            out_.warn("the card names no base_model (the run started from a local folder): pass --base-model org/name")
        out_.log(f"Next: zeda push {result.out} <org>/<name>")
