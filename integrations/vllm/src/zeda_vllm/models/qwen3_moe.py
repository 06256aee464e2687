"""Qwen3MoePlusPlusForCausalLM: vLLM's Qwen3MoeForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from ..families import QWEN3_MOE
from ..model import ZeroExpertCausalLM


class Qwen3MoePlusPlusForCausalLM(ZeroExpertCausalLM, Qwen3MoeForCausalLM):
    zeda_family = QWEN3_MOE
