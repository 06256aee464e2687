"""Glm4MoePlusPlusForCausalLM: vLLM's Glm4MoeForCausalLM with ZEDA zero experts;
and the stock class with what it misses filled in (zeda_vllm.compat)."""

from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM

from ..compat import StockCompatCausalLM
from ..families import GLM4_MOE
from ..model import ZeroExpertCausalLM


class Glm4MoePlusPlusForCausalLM(ZeroExpertCausalLM, Glm4MoeForCausalLM):
    zeda_family = GLM4_MOE


class CompatGlm4MoeForCausalLM(StockCompatCausalLM, Glm4MoeForCausalLM):
    """Registered under ``Glm4MoeForCausalLM``: the stock model, as ``zeda_vllm.compat`` says."""

    zeda_family = GLM4_MOE
