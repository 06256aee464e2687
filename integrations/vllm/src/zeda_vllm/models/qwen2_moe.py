"""Qwen2MoePlusPlusForCausalLM: vLLM's Qwen2MoeForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM

from ..families import QWEN2_MOE
from ..model import ZeroExpertCausalLM


class Qwen2MoePlusPlusForCausalLM(ZeroExpertCausalLM, Qwen2MoeForCausalLM):
    zeda_family = QWEN2_MOE
