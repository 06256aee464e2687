"""Glm4MoeLitePlusPlusForCausalLM: vLLM's Glm4MoeLiteForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.glm4_moe_lite import Glm4MoeLiteForCausalLM

from ..families import GLM4_MOE_LITE
from ..model import ZeroExpertCausalLM


class Glm4MoeLitePlusPlusForCausalLM(ZeroExpertCausalLM, Glm4MoeLiteForCausalLM):
    zeda_family = GLM4_MOE_LITE
