"""Glm4MoeLitePlusPlusForCausalLM: vLLM's Glm4MoeLiteForCausalLM with ZEDA zero experts;
and the stock class with what it misses filled in (zeda_vllm.compat)."""

from vllm.model_executor.models.glm4_moe_lite import Glm4MoeLiteForCausalLM

from ..compat import StockCompatCausalLM
from ..families import GLM4_MOE_LITE
from ..model import ZeroExpertCausalLM


class Glm4MoeLitePlusPlusForCausalLM(ZeroExpertCausalLM, Glm4MoeLiteForCausalLM):
    zeda_family = GLM4_MOE_LITE


class CompatGlm4MoeLiteForCausalLM(StockCompatCausalLM, Glm4MoeLiteForCausalLM):
    """Registered under ``Glm4MoeLiteForCausalLM``: the stock model, as ``zeda_vllm.compat`` says."""

    zeda_family = GLM4_MOE_LITE
