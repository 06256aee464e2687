"""The dynamic MoE block: the stock vLLM block's experts and shared experts, a router over N+Z experts, zero slots
skipped. Built from a constructed stock block, so weight names, the expert weights and their kernel stay vLLM's own.

Under tensor parallelism vLLM shards every expert (and the shared experts) along its intermediate dimension: each
rank routes the same tokens the same way (the router is replicated), computes its share of the same real pairs, and
the block all-reduces the sum of routed and shared output, as vLLM's own MoE runner does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear

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
        self.tp_size = int(runner.moe_config.tp_size)
        self.layer_name = runner.layer_name.removesuffix(".experts")
        dtype = vllm_config.model_config.dtype
        gate = ZeroExpertGate(runner.moe_config.hidden_dim, spec, dtype, prefix=f"{self.layer_name}.gate")
        for name, child in stock.named_children():
            setattr(self, name, gate if name == "gate" else child)
        if getattr(runner, "gate", None) is not None:
            runner.gate = self.gate  # one router object; the runner's own forward is never called
        self._shared = tuple(getattr(self, n) for n in family.shared_experts if getattr(self, n, None) is not None)
        if self.tp_size > 1:
            _check_shared_experts_are_partial(self._shared, family)
        redo_expert_processing_on_update(runner.routed_experts)
        self._checked_kernel = False
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
        out = torch.empty_like(x)
        torch.ops.zeda_vllm.routed_experts(x, weights, ids, out, self.layer_name)
        for shared in self._shared:
            out = out + shared(x)
        if self.tp_size > 1:  # every rank holds a 1/tp slice of each expert's (and shared expert's) intermediate dim
            out = tensor_model_parallel_all_reduce(out)
        return out.view(shape)

    def run_routed_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not self._checked_kernel:  # the kernel exists once weights are loaded; the op always runs eagerly
            kernel = self.experts.routed_experts.quant_method.moe_kernel
            if self.tp_size > 1 and kernel is not None and kernel.output_is_reduced():
                raise ZedaVllmError(
                    f"the MoE kernel {type(kernel.fused_experts).__name__} reduces its output across ranks",
                    expected="a kernel whose partial output the block all-reduces (no expert-parallel combine)",
                    fix="serve with tensor_parallel_size 1 or another --kernel-config.moe_backend",
                )
            self._checked_kernel = True
        return skip_zero_experts(x, weights, ids, self.spec.num_experts, self._kernel, self.stats)

    def _kernel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # the dtypes vLLM's own routers hand the kernels: fp32 weights, int32 ids
        out = self.experts.routed_experts.forward_modular(x=x, topk_weights=weights.float(), topk_ids=ids.int())
        assert isinstance(out, torch.Tensor), type(out)
        return out


def _check_shared_experts_are_partial(shared: tuple[nn.Module, ...], family: Family) -> None:
    """The block all-reduces routed + shared output once; a shared expert that reduced its own output would be
    counted tp times. vLLM 0.32 builds them with ``reduce_results=False`` for its runner, which reduces the sum."""
    for module in shared:
        for name, sub in module.named_modules():
            if isinstance(sub, RowParallelLinear) and sub.reduce_results:
                raise ZedaVllmError(
                    f"the shared expert {name or type(module).__name__} of {family.vllm_block} all-reduces its own "
                    "output under tensor parallelism",
                    expected="shared experts built with reduce_results=False (the stock vLLM 0.32 layout)",
                    fix="use the vLLM version zeda-vllm was tested with, or tensor_parallel_size 1",
                )


def redo_expert_processing_on_update(experts: Any) -> None:
    """vLLM 0.32 runs an expert kernel's own post-load processing only on the first load: on an in-place update
    (``moe_kernel`` already built) ``UnquantizedFusedMoEMethod._setup_kernel`` copies the new checkpoint-layout
    weights over the kernel-layout ones and skips ``fused_experts.process_weights_after_loading``. On CPU that step
    pads the intermediate dimension and repacks ``w13``/``w2`` for ``cpu_fused_moe``, so an update left the experts
    holding unpacked numbers in packed storage (log-probs off by up to ~11 after a full-parameter sync). Wrapped here:
    after an update the kernel's processing runs again on the freshly loaded checkpoint-layout weights, exactly as on
    the first load; vLLM's layerwise reload then copies the result into the live tensors."""
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.utils import is_weights_pre_processed

    method = experts.quant_method
    if not isinstance(method, UnquantizedFusedMoEMethod) or getattr(method, "_zeda_update_fix", False):
        return
    stock = method.process_weights_after_loading

    def process_weights_after_loading(layer: Any) -> None:
        updating = method.moe_kernel is not None
        stock(layer)
        kernel = method.moe_kernel
        if kernel is None:
            return
        skipped = (UnquantizedMoeBackend.TPU, UnquantizedMoeBackend.OOT)  # stock returns before _setup_kernel
        if updating and method.unquantized_backend not in skipped and not is_weights_pre_processed():
            kernel.fused_experts.process_weights_after_loading(layer)

    method.process_weights_after_loading = process_weights_after_loading
    method._zeda_update_fix = True


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
