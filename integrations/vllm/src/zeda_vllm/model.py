"""The mixin that turns a stock vLLM MoE ``...ForCausalLM`` into its ZEDA dynamic counterpart."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform

from .checks import check_serving_setup, cpu_mla_rope_warning
from .compat import prepare_config, tie_head_to_embedding
from .families import Family
from .moe import ZeroExpertMoE, make_dynamic
from .spec import ZeroExpertSpec
from .weights import RouterTensorCheck, expand_fused_experts

# A child of vLLM's logger, so the lines appear with vLLM's own (the "vllm" logger holds the handler).
logger = init_logger("vllm.zeda_vllm")


class ZeroExpertCausalLM:
    """Put in front of a stock vLLM model class: validates the folder and the serving setup, builds the stock model,
    then makes every MoE block dynamic (:class:`~zeda_vllm.moe.ZeroExpertMoE`) before any weight is loaded."""

    zeda_family: ClassVar[Family]

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any):
        family = self.zeda_family
        spec = ZeroExpertSpec.from_config(vllm_config.model_config.hf_config, family)
        check_serving_setup(vllm_config, family, current_platform.is_cpu())
        prepare_config(vllm_config, family.mla, current_platform.is_cpu())
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        tie_head_to_embedding(self, vllm_config.model_config.hf_config)  # a no-op where the stock class ties
        self.zeda_spec = spec
        self.zeda_blocks: list[ZeroExpertMoE] = make_dynamic(self, family, spec, vllm_config)
        kernel = type(self.zeda_blocks[0].experts.routed_experts.quant_method).__name__
        logger.info(
            "zeda-vllm active: %s (base %s), %d MoE layers, %s; zero-expert slots are skipped before the fused-MoE "
            "kernel (%s)",
            family.architecture,
            family.base_model_type,
            len(self.zeda_blocks),
            spec.describe(),
            kernel,
        )
        custom_ops = list(vllm_config.compilation_config.custom_ops or [])
        if warning := cpu_mla_rope_warning(family, current_platform.is_cpu(), custom_ops):
            logger.warning(warning)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading of checkpoint-named tensors (also what its in-place reload calls, then with the layers'
        tensors on the meta device: any subset of modules may come), with the router tensors checked and
        transformers-5 fused expert tensors (``...experts.gate_up_proj`` / ``down_proj``) taken as well."""
        reloading = self.zeda_blocks[0].gate.weight.is_meta
        layers = (b.layer_index for b in self.zeda_blocks)
        check = RouterTensorCheck(self.zeda_family, self.zeda_spec, layers, reloading=reloading)
        loaded = super().load_weights(check.watch(expand_fused_experts(weights, self.zeda_family)))
        check.finish()
        return loaded


def routing_stats(model: Any) -> list[dict[str, Any]]:
    """Per-layer routing counters of a dynamic model (e.g. through ``LLM.apply_model(routing_stats)``)."""
    return [{"layer": b.layer_name, **b.stats.as_dict()} for b in getattr(model, "zeda_blocks", [])]


def set_zero_expert_bias(model: Any, bias: float) -> int:
    """Runtime speed/quality dial, as in zeda's runtime: shift every zero-expert logit by ``bias`` (0 = as trained;
    ignored while ``use_zce_mask`` is on). E.g. ``llm.apply_model(functools.partial(set_zero_expert_bias, bias=-1))``.
    Returns the number of routers changed."""
    blocks = getattr(model, "zeda_blocks", [])
    for block in blocks:
        block.gate.set_zero_expert_bias(bias)
    return len(blocks)


def reset_routing_stats(model: Any) -> int:
    """Zero the per-layer counters (e.g. after vLLM's start-up warm-up runs); returns the number of layers."""
    blocks = getattr(model, "zeda_blocks", [])
    for block in blocks:
        block.stats.reset()
    return len(blocks)
