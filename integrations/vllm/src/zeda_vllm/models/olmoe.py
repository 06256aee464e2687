"""OlmoePlusPlusForCausalLM: vLLM's OlmoeForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.olmoe import OlmoeForCausalLM

from ..families import OLMOE
from ..model import ZeroExpertCausalLM


class OlmoePlusPlusForCausalLM(ZeroExpertCausalLM, OlmoeForCausalLM):
    zeda_family = OLMOE
