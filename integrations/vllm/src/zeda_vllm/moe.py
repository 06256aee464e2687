"""The dynamic MoE block: the stock vLLM block's experts and shared experts, a router over N+Z experts, zero slots
skipped. Built from a constructed stock block, so weight names, the expert weights and their kernel stay vLLM's own.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import ReplicatedLinear

from .checks import check_experts_kernel
from .errors import ZedaVllmError
from .families import Family
from .routing import select_experts, zero_expert_shift
from .skip import RoutingStats, skip_zero_experts
from .spec import ZeroExpertSpec

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ZeroExpertGate(ReplicatedLinear):
    """The router: vLLM's replicated linear layer (its weight loading and CPU/GPU GEMM dispatch) with N+Z outputs,
    ``weight`` [N+Z, H] and, for sigmoid families, ``e_score_correction_bias`` [N+Z], named as on disk; plus the
    ``zero_expert_shift`` buffer holding the runtime dial ``zero_expert_bias`` (read at run time, also when compiled,
    so :func:`~zeda_vllm.model.set_zero_expert_bias` takes effect without a restart)."""

    def __init__(self, hidden_size: int, spec: ZeroExpertSpec, dtype: torch.dtype, prefix: str):
        # Sigmoid routers score in fp32 (as transformers keeps them); softmax routers in the model dtype.
        logits_dtype = torch.float32 if spec.scoring == "sigmoid" else dtype
        super().__init__(hidden_size, spec.total_experts, bias=False, params_dtype=logits_dtype, prefix=prefix)
        self.spec = spec
        self.e_score_correction_bias = None
        if spec.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.total_experts, dtype=torch.float32), False)
        self.register_buffer("zero_expert_shift", zero_expert_shift(spec, logits_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits, _ = super().forward(x.float() if self.spec.scoring == "sigmoid" else x)
        return select_experts(logits, self.zero_expert_shift, self.e_score_correction_bias, self.spec)

    def set_zero_expert_bias(self, bias: float) -> None:
        self.zero_expert_shift[self.spec.num_experts :] = bias

    def extra_repr(self) -> str:
        return self.spec.describe()


class ZeroExpertMoE(nn.Module):
    """Takes over a stock block's children (same names and order, so checkpoint names and vLLM's weight loading are
    unchanged), with ``gate`` replaced by a :class:`ZeroExpertGate`. The stock runner (``experts``) keeps its weights
    and kernel; only its routed-expert call is used, on the real (token, slot) pairs."""

    def __init__(self, stock: nn.Module, family: Family, spec: ZeroExpertSpec, vllm_config: Any):
        super().__init__()
        runner = stock.experts
        check_experts_kernel(runner, family)
        if list(stock.parameters(recurse=False)) or getattr(stock, "is_fused_shared_expert_enabled", False):
            raise ZedaVllmError(
                f"{type(stock).__name__} holds parameters outside its gate/experts/shared-expert children",
                expected=f"the stock vLLM {family.vllm_block} layout (vLLM 0.32)",
                fix="use the vLLM version zeda-vllm was tested with, or report the vLLM version to zeda",
            )
        self.spec = spec
        self.stats = RoutingStats()
        self.layer_name = runner.layer_name.removesuffix(".experts")
        dtype = vllm_config.model_config.dtype
        gate = ZeroExpertGate(runner.moe_config.hidden_dim, spec, dtype, prefix=f"{self.layer_name}.gate")
        for name, child in stock.named_children():
            setattr(self, name, gate if name == "gate" else child)
        if getattr(runner, "gate", None) is not None:
            runner.gate = self.gate  # one router object; the runner's own forward is never called
        self._shared = tuple(getattr(self, n) for n in family.shared_experts if getattr(self, n, None) is not None)
        registry = vllm_config.compilation_config.static_forward_context
        if self.layer_name in registry:
            raise ValueError(f"duplicate layer name {self.layer_name}")
        registry[self.layer_name] = self

    @property
    def layer_index(self) -> int:
        match = _LAYER_INDEX.search(self.layer_name + ".")
        return int(match.group(1)) if match else -1

    def forward(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        out = torch.ops.zeda_vllm.routed_experts(x, weights, ids, self.layer_name)
        for shared in self._shared:
            out = out + shared(x)
        return out.view(shape)

    def run_routed_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return skip_zero_experts(x, weights, ids, self.spec.num_experts, self._kernel, self.stats)

    def _kernel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # the dtypes vLLM's own routers hand the kernels: fp32 weights, int32 ids
        out = self.experts.routed_experts.forward_modular(x=x, topk_weights=weights.float(), topk_ids=ids.int())
        assert isinstance(out, torch.Tensor), type(out)
        return out


def make_dynamic(model: nn.Module, family: Family, spec: ZeroExpertSpec, vllm_config: Any) -> list[ZeroExpertMoE]:
    """Replace every stock MoE block of ``model`` in place; returns the dynamic blocks in layer order."""
    import importlib

    block_cls = getattr(importlib.import_module(f"vllm.model_executor.models.{family.vllm_module}"), family.vllm_block)
    blocks = []
    for name, module in list(model.named_modules()):
        if isinstance(module, block_cls):
            parent, _, attr = name.rpartition(".")
            dynamic = ZeroExpertMoE(module, family, spec, vllm_config)
            setattr(model.get_submodule(parent), attr, dynamic)
            blocks.append(dynamic)
    if not blocks:
        raise ZedaVllmError(
            f"no {family.vllm_block} block in the vLLM {family.vllm_model} built from this config",
            expected="at least one MoE layer",
            fix="check the folder's config.json (num experts, dense-layer settings) against the original model",
        )
    return blocks
