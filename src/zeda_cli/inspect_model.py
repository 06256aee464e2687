"""``zeda inspect``: what an MoE checkpoint is, from config.json and safetensors headers only (no weights read).

Local folders are read from disk; Hub ids fetch config.json and read the shard headers through huggingface_hub's
``get_safetensors_metadata`` (HTTP range requests), so nothing large is downloaded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .architectures import ResolvedConfig, resolve_config, supported_model_types
from .errors import EXIT_OK, EXIT_UNSUPPORTED, ExternalError, UnsupportedModelError
from .evaluate.flops import ExpertFlops
from .io.reader import INDEX_FILE, SINGLE_FILE, nbytes_of, open_checkpoint
from .io.sources import Source, read_config_json, resolve_source
from .model_ref import ModelRef

Listing = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype code, shape)


@dataclass
class InspectReport:
    source: str
    model_type: str | None
    supported: bool
    verdict: str
    exit_code: int = EXIT_OK
    architecture: str | None = None
    scoring: str | None = None
    num_layers: int | None = None
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    hidden_size: int | None = None
    num_experts: int | None = None
    top_k: int | None = None
    expert_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float | None = None
    n_group: int | None = None
    topk_group: int | None = None
    shared_expert: dict[str, Any] | None = None
    dynamic: bool = False
    dynamic_format: str | None = None
    num_zero_experts: int = 0
    use_zce_mask: bool | None = None
    target_skip: float | None = None
    params: dict[str, int] = field(default_factory=dict)
    expert_flops_per_token: int | None = None  # routed experts at static top-K (multiply-add = 2 FLOPs)
    shared_expert_flops_per_token: int | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_model(spec: str, *, token: str | None = None) -> InspectReport:
    """The report for a folder or Hub id (only config.json and the safetensors headers are fetched)."""
    source = resolve_source(spec, allow_patterns=["config.json"], token=token)
    raw = read_config_json(source.folder)
    try:
        rc = resolve_config(raw)
    except UnsupportedModelError as err:
        return InspectReport(
            spec, raw.get("model_type"), False, err.one_line(), EXIT_UNSUPPORTED, architecture=_arch(raw)
        )
    return describe_model(ModelRef(source, rc), token=token)


def describe_model(model: ModelRef, *, token: str | None = None) -> InspectReport:
    """The report for a model already resolved (a supported MoE)."""
    report = _describe(model.source.spec, model.rc)
    listing = _listing(model.source, token)
    report.params = _param_counts(listing, model.rc)
    report.checkpoint = {
        "tensors": len(listing),
        "bytes": sum(nbytes_of(d, s) for d, s in listing.values()),
        "dtypes": dict(Counter(d for d, _ in listing.values())),
        "largest_tensor_bytes": max((nbytes_of(d, s) for d, s in listing.values()), default=0),
    }
    return report


def _arch(raw: dict[str, Any]) -> str | None:
    archs = raw.get("architectures") or [None]
    return archs[0]


def _describe(spec: str, rc: ResolvedConfig) -> InspectReport:
    adapter, hf = rc.adapter, rc.hf
    n_group, topk_group = adapter.groups(hf)
    moe = rc.moe_layers
    h, i, k = int(hf.hidden_size), adapter.expert_intermediate(hf), rc.top_k
    flops = ExpertFlops.of(rc)
    shared = None
    if adapter.shared_expert is not None:
        shared = {"intermediate_size": adapter.shared_expert.intermediate(hf), "gated": adapter.shared_expert.gated}
    zeda = rc.raw.get("zeda") or {}
    if rc.dynamic:
        verdict = f"dynamic MoE ({rc.dynamic_format} format): {rc.num_experts} experts + {rc.num_zero_experts} zero"
    else:
        verdict = f"static MoE, supported ({adapter.model_type}); ready for `zeda inject-zero-experts`"
    return InspectReport(
        source=spec,
        model_type=rc.raw.get("model_type"),
        supported=True,
        verdict=verdict,
        architecture=_arch(rc.raw),
        scoring=adapter.scoring,
        num_layers=int(hf.num_hidden_layers),
        moe_layers=moe,
        dense_layers=[j for j in range(hf.num_hidden_layers) if j not in moe],
        hidden_size=h,
        num_experts=rc.num_experts,
        top_k=k,
        expert_intermediate_size=i,
        norm_topk_prob=adapter.normalizes(hf),
        routed_scaling_factor=adapter.routed_scaling_factor(hf),
        n_group=n_group,
        topk_group=topk_group,
        shared_expert=shared,
        dynamic=rc.dynamic,
        dynamic_format=rc.dynamic_format,
        num_zero_experts=rc.num_zero_experts,
        use_zce_mask=rc.use_zce_mask if rc.dynamic else None,
        target_skip=zeda.get("target_skip"),
        expert_flops_per_token=flops.static_per_token,
        shared_expert_flops_per_token=flops.shared_per_token,
    )


def _listing(source: Source, token: str | None) -> Listing:
    if source.repo_id is None or any((source.folder / f).exists() for f in (INDEX_FILE, SINGLE_FILE)):
        ckpt = open_checkpoint(source.folder)
        return {name: (t.dtype, t.shape) for name, t in ckpt.tensors.items()}
    from huggingface_hub import HfApi

    try:
        meta = HfApi(token=token).get_safetensors_metadata(source.repo_id, revision=source.revision)
    except Exception as err:
        raise ExternalError(
            f"could not read the safetensors headers of {source.repo_id} ({type(err).__name__}: {err})",
            expected="a Hub model repo with safetensors weights",
            fix="check the connection and the repo id, or inspect a local download",
        ) from err
    return {
        name: (info.dtype, tuple(info.shape))
        for file_meta in meta.files_metadata.values()
        for name, info in file_meta.tensors.items()
    }


def _param_counts(listing: Listing, rc: ResolvedConfig) -> dict[str, int]:
    def pattern(suffix: str) -> re.Pattern[str]:
        alts = "|".join(re.escape(t).replace(re.escape("{layer}"), r"\d+") for t in rc.adapter.block_prefixes)
        return re.compile(f"^(?:{alts})\\.{suffix}")

    kinds = {"routed_experts": pattern(r"experts\."), "shared_experts": pattern("shared_expert"),
             "router": pattern(r"gate\.")}  # fmt: skip
    counts = dict.fromkeys([*kinds, "other"], 0)
    for name, (_, shape) in listing.items():
        kind = next((k for k, p in kinds.items() if p.match(name)), "other")
        counts[kind] += math.prod(shape)
    total = sum(counts.values())
    routed = counts["routed_experts"]
    counts["total"] = total
    counts["active_static_top_k"] = total - routed + routed * rc.top_k // max(rc.num_experts, 1)
    return counts


def supported_families_line() -> str:
    return ", ".join(supported_model_types())
