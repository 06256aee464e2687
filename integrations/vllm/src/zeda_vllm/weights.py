"""Checkpoint tensors on their way into vLLM: one clear error for a folder whose routers do not have the N+Z rows its
config declares, or whose sigmoid routers lack their correction bias; and transformers-5 fused expert tensors turned
into the per-expert checkpoint names vLLM's MoE loaders take."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from .errors import ZedaVllmError
from .families import Family
from .spec import ZeroExpertSpec


class RouterTensorCheck:
    """Watches the router tensors of a load. ``reloading``: an in-place load of some modules into a live model, where
    any subset of layers may come (the others keep their weights) and a sigmoid router's ``weight`` and
    ``e_score_correction_bias`` may come together or apart; only shapes are checked then."""

    def __init__(self, family: Family, spec: ZeroExpertSpec, moe_layers: Iterable[int], reloading: bool = False):
        self.family, self.spec, self.reloading = family, spec, reloading
        self.layers = set(moe_layers)
        names = "|".join(re.escape(n) for n in family.block_names)
        self._pattern = re.compile(rf"(?:^|\.)layers\.(\d+)\.(?:{names})\.gate\.(weight|e_score_correction_bias)$")
        self.seen: dict[str, set[int]] = {"weight": set(), "e_score_correction_bias": set()}

    def watch(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            match = self._pattern.search(name)
            if match and int(match.group(1)) in self.layers:
                self._check(name, match.group(2), tensor)
                self.seen[match.group(2)].add(int(match.group(1)))
            yield name, tensor

    def _check(self, name: str, kind: str, tensor: torch.Tensor) -> None:
        spec = self.spec
        rows = int(tensor.shape[0]) if tensor.dim() else 0
        if rows == spec.total_experts and tensor.dim() == (2 if kind == "weight" else 1):
            return
        hint = (
            "it has the static model's N rows: add zero experts with zeda inject-zero-experts"
            if rows == spec.num_experts
            else f"make config.json zce_nums [{rows - spec.num_experts}] if the weights are right, or re-export with "
            "zeda export"
        )
        raise ZedaVllmError(
            f"router tensor {name} has shape {list(tensor.shape)} ({rows} rows)",
            expected=f"N+Z = {spec.num_experts}+{spec.num_zero_experts} = {spec.total_experts} rows "
            f"({self.family.num_experts_attr} + sum(zce_nums) in config.json)",
            fix=hint,
        )

    def finish(self) -> None:
        if self.reloading:
            return
        missing = sorted(self.layers - self.seen["weight"])
        if missing:
            raise ZedaVllmError(
                f"no router weight (.gate.weight) in the checkpoint for MoE layers {missing[:8]}",
                expected=f"a [{self.spec.total_experts}, hidden] router per MoE layer",
                fix="check that the folder holds every shard listed in model.safetensors.index.json",
            )
        missing = sorted(self.layers - self.seen["e_score_correction_bias"])
        if self.spec.correction_bias and missing:
            raise ZedaVllmError(
                f"{self.family.architecture} folder without e_score_correction_bias for the routers of MoE layers "
                f"{missing[:8]}",
                expected=f"a [{self.spec.total_experts}] correction bias per sigmoid router "
                "(model.layers.L.mlp.gate.e_score_correction_bias): it steers the choice of experts",
                fix="export the folder with zeda (it widens the bias with the router rows), or copy the static "
                f"model's bias and append {self.spec.num_zero_experts} entries",
            )


def fused_expert_pattern(family: Family) -> re.Pattern[str]:
    blocks = "|".join(re.escape(n) for n in family.block_names)
    return re.compile(rf"^(?P<layer>(?:.*\.)?layers\.\d+)\.(?:{blocks})\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def expand_fused_experts(
    weights: Iterable[tuple[str, torch.Tensor]], family: Family
) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5 keeps a layer's routed experts as two 3-D tensors, ``...experts.gate_up_proj`` [E, 2I, H]
    (gate rows first, then up) and ``...experts.down_proj`` [E, H, I]; checkpoints on disk (and what
    ``revert_weight_conversion`` gives) name every expert, ``...experts.E.gate_proj.weight`` [I, H] etc. (Mixtral:
    ``block_sparse_moe.experts.E.w1/w3/w2.weight``). The fused tensors are yielded under those per-expert names;
    everything else passes through unchanged."""
    pattern = fused_expert_pattern(family)
    gate, up, down = family.expert_weights
    block = family.block_names[0]
    for name, tensor in weights:
        match = pattern.match(name)
        if match is None or tensor.dim() != 3:
            yield name, tensor
            continue
        prefix = f"{match['layer']}.{block}.experts"
        if match["kind"] == "down_proj":
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{down}.weight", tensor[e]
            continue
        if tensor.shape[1] % 2:
            raise ZedaVllmError(
                f"fused expert tensor {name} has shape {list(tensor.shape)}",
                expected="[experts, 2 x intermediate, hidden] (gate rows, then up rows)",
                fix="send the per-expert checkpoint tensors (transformers' revert_weight_conversion)",
            )
        half = tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{gate}.weight", tensor[e, :half]
            yield f"{prefix}.{e}.{up}.weight", tensor[e, half:]
