"""zeda calibrate DIR --target-skip 0.5 --data FILE"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import JsonOpt, QuietOpt, examples, recipe_from_flags, reported

EPILOG = examples(
    "zeda calibrate ./dyn/export --target-skip 0.5 --data my-traffic.jsonl",
    "zeda calibrate ./dyn/export --target-skip 0.4 --data prompts.jsonl --max-samples 512 --json",
)


def calibrate(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A local dynamic model folder (e.g. zeda export's).")],
    target_skip: Annotated[float, typer.Option(help="Share of routing slots to send to zero experts, in (0, 1).")],
    data: Annotated[Path, typer.Option(help='Your own texts: JSONL with "text" (or "prompt") records.')],
    max_samples: Annotated[int | None, typer.Option(help="Use only the first N records.")] = 256,
    max_length: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Set zero_expert_bias so that the zero-expert share on your texts meets --target-skip (no retraining).

    Updates the folder in place: config.json, the card's dial line and the manifest (checksums, a calibration
    record), so that it stays valid for zeda push.
    """
    out = Output(json_mode=json_out, quiet=quiet)
    with reported(out):
        from ..calibrate import calibrate_folder

        given = {"data": data, "max_samples": max_samples, "max_length": max_length, "batch_size": batch_size,
                 "device": device}  # fmt: skip
        settings = recipe_from_flags({f"eval.{k}": ("--" + k.replace("_", "-"), v) for k, v in given.items()}).eval
        result = calibrate_folder(folder, target_skip=target_skip, settings=settings, log=out.log)
        rows = [(k, v) for k, v in result.items() if k != "ok"]
        out.result(result, key_value_table("zeda calibrate", rows))
        out.log("zeda eval results recorded before this calibration describe the old setting: re-run zeda eval")
