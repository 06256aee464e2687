"""Glm4MoePlusPlusForCausalLM: vLLM's Glm4MoeForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM

from ..families import GLM4_MOE
from ..model import ZeroExpertCausalLM


class Glm4MoePlusPlusForCausalLM(ZeroExpertCausalLM, Glm4MoeForCausalLM):
    zeda_family = GLM4_MOE
