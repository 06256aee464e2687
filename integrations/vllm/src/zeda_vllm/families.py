"""The MoE families the plugin serves, as data: the names zeda and the official ZEDA release write, the stock vLLM
model each one extends, and the router rule of the family. No vLLM or torch import here (tests read it without them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Family:
    architecture: str  # ``architectures[0]`` of a dynamic folder (zeda's and the official release's)
    base_model_type: str  # transformers model_type of the static family
    config_class: str  # transformers config class of the static family
    vllm_module: str  # vllm.model_executor.models.<vllm_module>
    vllm_model: str  # the stock vLLM model class the dynamic one extends
    vllm_block: str  # the stock vLLM MoE block whose router and expert call become dynamic
    scoring: Literal["softmax", "sigmoid"]
    num_experts_attr: str  # config attribute holding N
    normalize_attr: str | None = "norm_topk_prob"  # None: the family always renormalises the top-k weights
    weights_in_logits_dtype: bool = True  # softmax routers cast the top-k weights back to the logits dtype
    shared_experts: tuple[str, ...] = ()  # children of the block whose output is added for every token
    # the block's attribute name in a decoder layer (checkpoint and vLLM); the first is the one checkpoints use
    block_names: tuple[str, ...] = ("mlp",)
    mla: bool = False  # multi-head latent attention (DeepSeek-style)
    # per-expert checkpoint names of the routed experts' (gate, up, down) projections: ``...experts.E.<name>.weight``
    expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # the stock vLLM model reads transformers-5.2x folders right; where not, the plugin registers its own
    # (zeda_vllm.compat: tied heads, GLM's dense prefix, float32 MLA on CPU)
    stock_compatible: bool = True

    @property
    def dynamic_model_type(self) -> str:
        return f"{self.base_model_type}_plus_plus"

    @property
    def config_class_name(self) -> str:
        return self.architecture.removesuffix("ForCausalLM") + "Config"

    @property
    def model_module(self) -> str:
        return f"zeda_vllm.models.{self.base_model_type}"

    @property
    def compat_class(self) -> str:
        """The plugin's stock model, registered under ``vllm_model`` where ``stock_compatible`` is False."""
        return f"Compat{self.vllm_model}"


_SIGMOID = dict(
    scoring="sigmoid",
    num_experts_attr="n_routed_experts",
    weights_in_logits_dtype=False,
    shared_experts=("shared_experts",),
)

QWEN3_MOE = Family(
    architecture="Qwen3MoePlusPlusForCausalLM",
    base_model_type="qwen3_moe",
    config_class="Qwen3MoeConfig",
    vllm_module="qwen3_moe",
    vllm_model="Qwen3MoeForCausalLM",
    vllm_block="Qwen3MoeSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_experts",
)
QWEN2_MOE = Family(
    architecture="Qwen2MoePlusPlusForCausalLM",
    base_model_type="qwen2_moe",
    config_class="Qwen2MoeConfig",
    vllm_module="qwen2_moe",
    vllm_model="Qwen2MoeForCausalLM",
    vllm_block="Qwen2MoeSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_experts",
    shared_experts=("shared_expert",),  # vLLM's Qwen2MoeMLP applies sigmoid(shared_expert_gate(x)) itself
)
MIXTRAL = Family(
    architecture="MixtralPlusPlusForCausalLM",
    base_model_type="mixtral",
    config_class="MixtralConfig",
    vllm_module="mixtral",
    vllm_model="MixtralForCausalLM",
    vllm_block="MixtralMoE",
    scoring="softmax",
    num_experts_attr="num_local_experts",
    normalize_attr=None,
    weights_in_logits_dtype=False,
    block_names=("block_sparse_moe", "mlp"),
    expert_weights=("w1", "w3", "w2"),
)
OLMOE = Family(
    architecture="OlmoePlusPlusForCausalLM",
    base_model_type="olmoe",
    config_class="OlmoeConfig",
    vllm_module="olmoe",
    vllm_model="OlmoeForCausalLM",
    vllm_block="OlmoeMoE",
    scoring="softmax",
    num_experts_attr="num_experts",
    stock_compatible=False,
)
GLM4_MOE_LITE = Family(
    architecture="Glm4MoeLitePlusPlusForCausalLM",
    base_model_type="glm4_moe_lite",
    config_class="Glm4MoeLiteConfig",
    vllm_module="glm4_moe_lite",
    vllm_model="Glm4MoeLiteForCausalLM",
    vllm_block="Glm4MoeLite",
    mla=True,
    **_SIGMOID,
    stock_compatible=False,
)
GLM4_MOE = Family(
    architecture="Glm4MoePlusPlusForCausalLM",
    base_model_type="glm4_moe",
    config_class="Glm4MoeConfig",
    vllm_module="glm4_moe",
    vllm_model="Glm4MoeForCausalLM",
    vllm_block="Glm4MoE",
    **_SIGMOID,
    stock_compatible=False,
)
DEEPSEEK_V3 = Family(
    architecture="DeepseekV3PlusPlusForCausalLM",
    base_model_type="deepseek_v3",
    config_class="DeepseekV3Config",
    vllm_module="deepseek_v2",
    vllm_model="DeepseekV3ForCausalLM",
    vllm_block="DeepseekV2MoE",
    mla=True,
    **_SIGMOID,
    stock_compatible=False,
)

FAMILIES: tuple[Family, ...] = (QWEN3_MOE, GLM4_MOE_LITE, QWEN2_MOE, MIXTRAL, OLMOE, GLM4_MOE, DEEPSEEK_V3)
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES}
