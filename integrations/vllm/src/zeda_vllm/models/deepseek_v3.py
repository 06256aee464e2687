"""DeepseekV3PlusPlusForCausalLM: vLLM's DeepseekV3ForCausalLM with ZEDA zero experts;
and the stock class with what it misses filled in (zeda_vllm.compat)."""

from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

from ..compat import StockCompatCausalLM
from ..families import DEEPSEEK_V3
from ..model import ZeroExpertCausalLM


class DeepseekV3PlusPlusForCausalLM(ZeroExpertCausalLM, DeepseekV3ForCausalLM):
    zeda_family = DEEPSEEK_V3


class CompatDeepseekV3ForCausalLM(StockCompatCausalLM, DeepseekV3ForCausalLM):
    """Registered under ``DeepseekV3ForCausalLM``: the stock model, as ``zeda_vllm.compat`` says."""

    zeda_family = DEEPSEEK_V3
