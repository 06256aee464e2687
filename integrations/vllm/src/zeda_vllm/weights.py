"""Checks of the router tensors while vLLM streams a checkpoint in: one clear error for a folder whose routers do not
have the N+Z rows its config declares, or whose sigmoid routers lack their correction bias."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from .errors import ZedaVllmError
from .families import Family
from .spec import ZeroExpertSpec


class RouterTensorCheck:
    def __init__(self, family: Family, spec: ZeroExpertSpec, moe_layers: Iterable[int]):
        self.family, self.spec = family, spec
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
