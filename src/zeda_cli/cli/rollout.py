"""zeda rollout TEACHER --prompts FILE --out FILE"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import (
    JsonOpt,
    OverwriteOpt,
    PromptsOpt,
    QuietOpt,
    RecipeOpt,
    SetOpt,
    examples,
    recipe_from_flags,
    reported,
)

EPILOG = examples(
    "zeda rollout ./dyn/inject --prompts prompts.jsonl --out rollouts.jsonl",
    "zeda rollout Qwen/Qwen3-30B-A3B --prompts TsinghuaC3I/ZEDA --out rollouts.jsonl --max-new-tokens 4096",
)


def rollout(
    teacher: Annotated[str, typer.Argument(help="Teacher: the original model, or an injected folder (masked).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Rollout JSONL to write (resumed if it exists).")],
    prompts: PromptsOpt = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest response.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (0 = greedy).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generate() call.")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sample one teacher response per prompt (stage-1 data); resumable, refuses mixing settings."""
    output = Output(json_mode=json_out, quiet=quiet)
    with reported(output):
        from .. import extras

        extras.require("train", "zeda rollout")
        from ..distill.rollout import generate_rollouts
        from ..errors import BadInputError
        from ..runs import TeacherSpec

        r = recipe_from_flags({
            "data.prompts": ("--prompts", prompts),
            "rollout.max_new_tokens": ("--max-new-tokens", max_new_tokens),
            "rollout.temperature": ("--temperature", temperature),
            "rollout.batch_size": ("--batch-size", batch_size),
        }, recipe, set_)  # fmt: skip
        if not r.data.prompts:
            raise BadInputError("no prompt set given", expected="--prompts FILE", fix="pass --prompts")
        spec = TeacherSpec(path=teacher, masked=True)
        with output.progress() as progress:
            summary = generate_rollouts(spec, r, out, overwrite=overwrite, progress=progress)
        data = {
            "ok": True,
            "out": str(summary.path),
            "prompts": summary.prompts,
            "generated_now": summary.generated_now,
            "finished_share": round(summary.finished_share, 4),
            "mean_response_tokens": round(summary.mean_response_tokens, 1),
        }
        output.result(data, key_value_table("zeda rollout", [(k, v) for k, v in data.items() if k != "ok"]))
