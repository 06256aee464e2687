"""zeda distill --stage {1,2} STUDENT --out DIR"""

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
    "zeda distill --stage 1 ./dyn/inject --out ./dyn/stage1 --prompts prompts.jsonl",
    "zeda distill --stage 2 ./dyn/stage1 --out ./dyn/stage2 --prompts prompts.jsonl --steps 321",
    "zeda distill --stage 1 ./dyn/inject --out ./dyn/stage1 --recipe qwen3-30b-a3b --trainable router",
    "zeda distill --stage 1 ./dyn/inject --out ./dyn/stage1 --deepspeed recipes/deepspeed/zero3.json --nproc 8",
    "zeda distill --stage 1 ./dyn/inject --out ./dyn/stage1 --resume       # after an interruption",
)


def distill(
    student: Annotated[
        str, typer.Argument(help="Dynamic model: inject output (stage 1) or stage-1 output (stage 2).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Stage output folder.")],
    stage: Annotated[int, typer.Option("--stage", min=1, max=2, help="1: SFT on teacher rollouts; 2: on-policy.")],
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    prompts: PromptsOpt = None,
    rollouts: Annotated[
        str | None,
        typer.Option(help="Stage 1: rollouts you have (file or Hub dataset; zeda's, prompt/response or messages)."),
    ] = None,
    teacher: Annotated[str | None, typer.Option(help="Frozen teacher (default: the original, via the run).")] = None,
    target_skip: Annotated[
        float | None, typer.Option(help="Target share of slots on zero experts (default: the student's record).")
    ] = None,
    trainable: Annotated[str | None, typer.Option(help="full (every weight) or router (router rows only).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (stage 2; stage 1: cap via max_steps).")] = None,
    opd_loss: Annotated[str | None, typer.Option(help="Stage 2: sampled (official) or full (exact KL).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (for --resume).")] = None,
    deepspeed: Annotated[str | None, typer.Option(help="DeepSpeed JSON config: run under the launcher.")] = None,
    nproc: Annotated[int | None, typer.Option(help="Processes (GPUs) for the DeepSpeed launcher.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Self-distil the dynamic student from the frozen original (stage 1: SFT; stage 2: on-policy reverse KL)."""
    output = Output(json_mode=json_out, quiet=quiet)
    with reported(output):
        from .. import extras

        extras.require("train", "zeda distill")
        from ..distill.run import run_stage

        section = f"stage{stage}"
        r = recipe_from_flags({
            "data.prompts": ("--prompts", prompts),
            "teacher": ("--teacher", teacher),
            "data.rollouts": ("--rollouts", rollouts),
            "balance.target_skip": ("--target-skip", target_skip),
            f"{section}.trainable": ("--trainable", trainable),
            f"{section}.optim.lr": ("--lr", lr),
            f"{section}.save_every": ("--save-every", save_every),
            ("stage2.steps" if stage == 2 else "stage1.max_steps"): ("--steps", steps),
            "stage2.loss": ("--opd-loss", opd_loss if stage == 2 else None),
            "distributed.deepspeed": ("--deepspeed", deepspeed),
            "distributed.nproc": ("--nproc", nproc),
        }, recipe, set_)  # fmt: skip
        summary = run_stage(1 if stage == 1 else 2, student, out, r, output=output, resume=resume,
                            overwrite=overwrite)  # fmt: skip
        rows = [(k, v) for k, v in summary.items() if k not in ("ok", "zero_share_per_layer")]
        output.result(summary, key_value_table(f"zeda distill --stage {stage}", rows))
