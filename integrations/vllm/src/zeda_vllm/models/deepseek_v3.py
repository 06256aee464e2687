"""DeepseekV3PlusPlusForCausalLM: vLLM's DeepseekV3ForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

from ..families import DEEPSEEK_V3
from ..model import ZeroExpertCausalLM


class DeepseekV3PlusPlusForCausalLM(ZeroExpertCausalLM, DeepseekV3ForCausalLM):
    zeda_family = DEEPSEEK_V3
