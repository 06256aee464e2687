"""MixtralPlusPlusForCausalLM: vLLM's MixtralForCausalLM with ZEDA zero experts."""

from vllm.model_executor.models.mixtral import MixtralForCausalLM

from ..families import MIXTRAL
from ..model import ZeroExpertCausalLM


class MixtralPlusPlusForCausalLM(ZeroExpertCausalLM, MixtralForCausalLM):
    zeda_family = MIXTRAL
