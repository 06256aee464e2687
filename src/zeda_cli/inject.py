"""``zeda inject-zero-experts``: widen every MoE router from N to N+Z rows, streamed shard by shard.

Pure tensor functions (``expand_router_weight``, ``expand_router_bias``) implement the router initialisation of
docs/method.md; ``inject_zero_experts`` validates everything first, then copies every other tensor byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .architectures import ResolvedConfig
from .console import ProgressBar
from .errors import BadInputError, CheckpointError, UnsupportedModelError, ZedaError, raise_all
from .io.reader import DTYPES, Checkpoint, open_checkpoint
from .io.sources import copy_top_level_files
from .io.writer import OutTensor, WrittenFile, ensure_free_space, parse_size, tensor_out, write_sharded_with_progress
from .model_ref import ModelRef, as_model
from .recipes import ZeroExpertsSection
from .runs import FileRecord, Manifest, folder_records, sha256_file, staged_output, write_manifest
from .runtime.packaging import dynamic_config, write_loading_code

# Files never copied from the source folder: weights (rewritten), config (rewritten), its card (describes the
# static model), manifests and loading code of ours (rewritten).
_SKIP_FILES = re.compile(
    r"(\.safetensors|\.bin|\.pt|\.pth|\.h5|\.msgpack|\.gguf|\.index\.json)$|^(config\.json|README\.md|zeda\.json|"
    r"\.gitattributes|modeling_zeda\.py|zeda_dynamic_moe\.py)$"
)


# --- pure tensor functions ---------------------------------------------------------------------------------------
def expand_router_weight(weight: torch.Tensor, num_zero: int, generator: torch.Generator) -> torch.Tensor:
    """[N, H] -> [N+Z, H]: original rows kept bit for bit, new rows ~ Normal(mean, std) per hidden dimension."""
    w = weight.float()
    mean = w.mean(dim=0).expand(num_zero, -1)
    std = w.std(dim=0).expand(num_zero, -1)
    new = torch.normal(mean, std, generator=generator).to(weight.dtype)
    out = torch.cat([weight, new])
    _assert_prefix_identical(out, weight)
    return out


def expand_router_bias(bias: torch.Tensor, num_zero: int, generator: torch.Generator) -> torch.Tensor:
    """[N] -> [N+Z]: new entries ~ Normal(mean, std) of the original biases."""
    b = bias.float()
    new = torch.normal(b.mean().item(), b.std().item(), (num_zero,), generator=generator).to(bias.dtype)
    out = torch.cat([bias, new])
    _assert_prefix_identical(out, bias)
    return out


def _assert_prefix_identical(out: torch.Tensor, original: torch.Tensor) -> None:
    head = out[: original.shape[0]].contiguous()
    if not torch.equal(head.view(torch.uint8), original.contiguous().view(torch.uint8)):
        raise AssertionError("router expansion changed original rows")


# --- validation --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterTensors:
    weights: dict[str, int]  # router weight key -> layer index
    biases: dict[str, int] = field(default_factory=dict)


def find_router_tensors(ckpt: Checkpoint, rc: ResolvedConfig) -> RouterTensors:
    """Locate every router (and correction bias) in the checkpoint and check them against the config."""
    adapter, layers, n = rc.adapter, rc.moe_layers, rc.num_experts
    template = _block_template(ckpt, rc)
    found = _match_layers(ckpt, adapter.router_weight_key(template))
    problems: list[ZedaError] = []
    missing = sorted(set(layers) - set(found.values()))
    if missing:
        problems.append(_layout_error(f"router weights missing for MoE layers {missing}"))
    # Routers beyond the decoder stack (e.g. GLM-4.7-Flash's MTP layer) are widened too, as the official tool does.
    extra = sorted(i for i in found.values() if i not in layers and i < rc.hf.num_hidden_layers)
    if extra:
        problems.append(_layout_error(f"router weights at layers {extra}, which the config says are dense"))
    for key in found:
        shape = ckpt.tensors[key].shape
        if len(shape) != 2 or shape[0] != n:
            problems.append(_layout_error(f"{key} has shape {list(shape)}, expected [{n}, hidden]"))
    biases: dict[str, int] = {}
    if adapter.correction_bias:
        biases = _match_layers(ckpt, adapter.router_bias_key(template))
        if sorted(biases.values()) != sorted(found.values()):
            problems.append(_layout_error("e_score_correction_bias is missing for some MoE layers"))
    raise_all(problems)
    return RouterTensors(found, biases)


def _block_template(ckpt: Checkpoint, rc: ResolvedConfig) -> str:
    first = rc.moe_layers[0]
    for template in rc.adapter.block_prefixes:
        if rc.adapter.router_weight_key(template.format(layer=first)) in ckpt.tensors:
            return template
    keys = ", ".join(rc.adapter.router_weight_key(t.format(layer=first)) for t in rc.adapter.block_prefixes)
    raise _layout_error(f"no router weight for MoE layer {first} (looked for {keys})")


def _match_layers(ckpt: Checkpoint, key_template: str) -> dict[str, int]:
    pattern = re.compile("^" + re.escape(key_template).replace(re.escape("{layer}"), r"(\d+)") + "$")
    return {k: int(m.group(1)) for k in ckpt.tensors if (m := pattern.match(k))}


def _layout_error(what: str) -> CheckpointError:
    return CheckpointError(
        what, expected="the tensors the config describes", fix="check that config.json matches the weights"
    )


def check_groups(rc: ResolvedConfig, num_zero: int) -> None:
    n_group, _ = rc.adapter.groups(rc.hf)
    total = rc.num_experts + num_zero
    if n_group > 1 and total % n_group:
        raise BadInputError(
            f"N+Z = {rc.num_experts}+{num_zero} = {total} is not divisible by n_group={n_group}",
            expected="group-limited routing needs (N+Z) % n_group == 0",
            fix=f"pick --zero-experts as a multiple of {n_group} (e.g. {n_group * max(1, num_zero // n_group)})",
        )


# --- injection ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InjectResult:
    out: Path
    source: dict[str, Any]
    model_type: str
    num_experts: int
    num_zero_experts: int
    top_k: int
    moe_layers: list[int]
    routers_widened: int
    files: list[WrittenFile]


def check_static(model: ModelRef) -> None:
    if model.rc.dynamic:
        raise UnsupportedModelError(
            f"{model.source.spec} is already dynamic ({model.rc.num_zero_experts} zero experts per layer, "
            f"{model.rc.dynamic_format} format)",
            expected="a static MoE checkpoint",
            fix="pass the original static model, or continue with `zeda distill` on this one",
        )


def inject_zero_experts(
    model: ModelRef | str,
    out: Path,
    *,
    zero: ZeroExpertsSection,
    target_skip: float = 0.5,
    overwrite: bool = False,
    progress: ProgressBar | None = None,
) -> InjectResult:
    """Write ``model`` with Z zero experts per MoE router to ``out`` (validated first; the folder appears whole)."""
    model = as_model(model)
    check_static(model)
    rc = model.rc
    ckpt = open_checkpoint(model.folder)
    num_zero = zero.num_zero_experts or max(1, rc.num_experts // 2)
    check_groups(rc, num_zero)
    routers = find_router_tensors(ckpt, rc)
    tensors = _planned_tensors(ckpt, routers, num_zero, zero.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(out.parent, sum(t.nbytes for t in tensors))
    with staged_output(out, overwrite) as tmp:
        written = write_sharded_with_progress(
            tmp, tensors, parse_size(zero.max_shard_size), progress, "writing tensors"
        )
        copy_top_level_files(model.folder, tmp, _SKIP_FILES)
        extra = {"target_skip": target_skip, "init": zero.init, "seed": zero.seed}
        config = dynamic_config(rc.raw, rc.adapter, rc.hf, num_zero, mask=zero.init == "masked", extra=extra)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_loading_code(tmp, rc.adapter)
        known = {f.name: FileRecord(size=f.size, sha256=f.sha256) for f in written}
        write_manifest(tmp, _manifest(model, zero, target_skip, num_zero, folder_records(tmp, known)))
    return InjectResult(
        out, model.source.describe(), rc.adapter.model_type, rc.num_experts, num_zero, rc.top_k, rc.moe_layers,
        len(routers.weights), written,
    )  # fmt: skip


def _planned_tensors(ckpt: Checkpoint, routers: RouterTensors, num_zero: int, seed: int) -> list[OutTensor]:
    generator = torch.Generator().manual_seed(seed)
    planned = []
    for name, info in ckpt.tensors.items():  # header order: keeps shard grouping close to the source's
        if name in routers.weights:
            planned.append(tensor_out(name, expand_router_weight(ckpt.read_tensor(name), num_zero, generator)))
        elif name in routers.biases:
            planned.append(tensor_out(name, expand_router_bias(ckpt.read_tensor(name), num_zero, generator)))
        else:
            planned.append(OutTensor(name, info.dtype, info.shape, lambda name=name: ckpt.read_chunks(name)))
    if any(t.dtype not in DTYPES for t in planned):
        raise CheckpointError("unknown tensor dtype in checkpoint", fix="re-save the model with transformers")
    return planned


def _manifest(
    model: ModelRef, zero: ZeroExpertsSection, target_skip: float, num_zero: int, files: dict[str, FileRecord]
) -> Manifest:
    rc = model.rc
    return Manifest(
        stage="inject",
        done=True,
        inputs={
            "source": model.source.describe(),  # the static model: this run's origin
            "source_config_sha256": sha256_file(model.folder / "config.json"),
            "model_type": rc.adapter.model_type,
            "num_experts": rc.num_experts,
            "top_k": rc.top_k,
            "moe_layers": rc.moe_layers,
        },
        settings={
            "num_zero_experts": num_zero,
            "target_skip": target_skip,
            "init": zero.init,
            "seed": zero.seed,
            "max_shard_size": zero.max_shard_size,
        },
        files=files,
    )
