"""zeda inject-zero-experts MODEL --out DIR"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import JsonOpt, OverwriteOpt, QuietOpt, examples, recipe_from_flags, reported

EPILOG = examples(
    "zeda inject-zero-experts Qwen/Qwen3-30B-A3B --out ./qwen3-zeda/inject",
    "zeda inject-zero-experts ./my-moe --out ./dyn --zero-experts 32 --target-skip 0.5",
    "zeda inject-zero-experts ./my-moe --out ./sanity --init masked   # output identical to the original",
)


def inject_zero_experts(
    model: Annotated[str, typer.Argument(help="Static MoE: local folder or Hub id (org/name[@revision]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist unless --overwrite).")],
    zero_experts: Annotated[
        int | None, typer.Option("--zero-experts", "-z", help="Zero experts Z per MoE layer (default: N/2).")
    ] = None,
    target_skip: Annotated[
        float, typer.Option(help="Target share of routing slots on zero experts; distill inherits it (and says so).")
    ] = 0.5,
    init: Annotated[
        str,
        typer.Option(
            help="gaussian: new router rows ~ N(mean, std) of the old ones; masked: zero experts "
            "masked, output identical to the original."
        ),  # fmt: skip
    ] = "gaussian",
    seed: Annotated[int, typer.Option(help="Seed of the router initialisation.")] = 0,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add parameter-free zero-output experts to every MoE router (streamed; other tensors copied bit for bit)."""
    out_ = Output(json_mode=json_out, quiet=quiet)
    with reported(out_):
        from ..inject import inject_zero_experts as inject

        recipe = recipe_from_flags({
            "zero_experts.num_zero_experts": ("--zero-experts", zero_experts),
            "balance.target_skip": ("--target-skip", target_skip),
            "zero_experts.init": ("--init", init),
            "zero_experts.seed": ("--seed", seed),
            "zero_experts.max_shard_size": ("--max-shard-size", max_shard_size),
        })  # fmt: skip
        with out_.progress() as progress:
            result = inject(model, out, zero=recipe.zero_experts, target_skip=recipe.balance.target_skip,
                            overwrite=overwrite, progress=progress)  # fmt: skip
        data = {
            "ok": True,
            "out": str(result.out),
            "model_type": result.model_type,
            "num_experts": result.num_experts,
            "num_zero_experts": result.num_zero_experts,
            "top_k": result.top_k,
            "moe_layers": len(result.moe_layers),
            "routers_widened": result.routers_widened,
            "shards": [f.name for f in result.files],
        }
        rows = [(k, v) for k, v in data.items() if k != "ok"]
        out_.result(data, key_value_table("zeda inject-zero-experts", rows))
        out_.log(f"Next: zeda distill --stage 1 {result.out} --out <dir>")
