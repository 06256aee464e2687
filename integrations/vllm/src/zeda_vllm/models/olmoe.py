"""OlmoePlusPlusForCausalLM: vLLM's OlmoeForCausalLM with ZEDA zero experts;
and the stock class with what it misses filled in (zeda_vllm.compat)."""

from vllm.model_executor.models.olmoe import OlmoeForCausalLM

from ..compat import StockCompatCausalLM
from ..families import OLMOE
from ..model import ZeroExpertCausalLM


class OlmoePlusPlusForCausalLM(ZeroExpertCausalLM, OlmoeForCausalLM):
    zeda_family = OLMOE


class CompatOlmoeForCausalLM(StockCompatCausalLM, OlmoeForCausalLM):
    """Registered under ``OlmoeForCausalLM``: the stock model, as ``zeda_vllm.compat`` says."""

    zeda_family = OLMOE
