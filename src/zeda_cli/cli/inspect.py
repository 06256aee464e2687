"""zeda inspect MODEL"""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import JsonOpt, QuietOpt, TokenOpt, examples, reported

EPILOG = examples(
    "zeda inspect Qwen/Qwen3-30B-A3B",
    "zeda inspect ./my-moe --json | jq .expert_flops_per_token",
    "zeda inspect zai-org/GLM-4.7-Flash@main",
)


def inspect(
    model: Annotated[str, typer.Argument(help="Local model folder or Hub id (org/name[@revision]).")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    token: TokenOpt = None,
) -> None:
    """Describe an MoE checkpoint from its config and safetensors headers (no weights are loaded).

    Exit code 0 for a supported MoE (static or dynamic), 3 for a dense or unsupported model.
    """
    out = Output(json_mode=json_out, quiet=quiet)
    with reported(out):
        from ..inspect_model import inspect_model

        report = inspect_model(model, token=token)
        out.result(report.to_dict(), _table(report))
        if not report.supported:
            out.error(report.verdict)
            raise typer.Exit(report.exit_code)


def _table(report) -> object:
    if not report.supported:
        return key_value_table(f"zeda inspect: {report.source}", [("model_type", report.model_type),
                                                                    ("verdict", report.verdict)])  # fmt: skip
    p = report.params
    rows = [
        ("verdict", report.verdict),
        ("architecture", report.architecture),
        ("model_type", report.model_type),
        (
            "router",
            f"{report.scoring}, top-{report.top_k} of {report.num_experts}"
            + (f" + {report.num_zero_experts} zero experts" if report.dynamic else ""),
        ),
        ("norm_topk_prob", report.norm_topk_prob),
        ("routed scaling", report.routed_scaling_factor),
        ("groups (n_group / topk_group)", f"{report.n_group} / {report.topk_group}"),
        ("layers", f"{report.num_layers} ({len(report.moe_layers)} MoE, {len(report.dense_layers)} dense)"),
        ("dense layers", report.dense_layers or "none"),
        ("shared expert", report.shared_expert or "none"),
        ("params total", _n(p.get("total"))),
        ("params routed experts", _n(p.get("routed_experts"))),
        ("params active (static top-K)", _n(p.get("active_static_top_k"))),
        ("expert FLOPs / token (routed)", _n(report.expert_flops_per_token)),
        ("shared-expert FLOPs / token", _n(report.shared_expert_flops_per_token)),
    ]
    if report.dynamic:
        rows += [("zero-expert mask", report.use_zce_mask), ("target skip", report.target_skip)]
    rows.append(
        (
            "checkpoint",
            f"{report.checkpoint.get('tensors')} tensors, "
            f"{report.checkpoint.get('bytes', 0) / 1e9:.3f} GB, {report.checkpoint.get('dtypes')}",
        )
    )
    return key_value_table(f"zeda inspect: {report.source}", rows)


def _n(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= div:
            return f"{value / div:.2f}{unit} ({value:,})"
    return f"{value:,}"
