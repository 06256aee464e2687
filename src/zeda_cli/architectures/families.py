"""The supported MoE families. Two router families cover them all:

* softmax: softmax over all experts -> top-K -> optional renormalisation (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE);
* sigmoid: sigmoid scores, choice by score + ``e_score_correction_bias``, optional group-limited routing,
  renormalised weights x ``routed_scaling_factor``, always-on shared experts (GLM-4.7-Flash, GLM-4.5, DeepSeek-V3).
"""

from __future__ import annotations

from .base import (
    MoEAdapter,
    SharedExpert,
    dense_prefix_for_vllm,
    every_layer,
    first_k_dense_layers,
    mlp_layer_types_layers,
    qwen_sparse_step_layers,
)


def _shared_from_n_shared(config) -> int:
    return int(config.moe_intermediate_size) * int(config.n_shared_experts)


UNGATED_SHARED = SharedExpert(intermediate=_shared_from_n_shared, gated=False)
# The DeepSeek-V3 router family (GLM-4.5/4.7 included): sigmoid scores, correction bias for the choice, fp32 weights.
_SIGMOID_ROUTER = dict(
    scoring="sigmoid",
    num_experts_attr="n_routed_experts",
    expert_intermediate_attr="moe_intermediate_size",
    weights_in_logits_dtype=False,
    correction_bias=True,
    shared_expert=UNGATED_SHARED,
)

QWEN3_MOE = MoEAdapter(
    model_type="qwen3_moe",
    class_prefix="Qwen3Moe",
    moe_block_class="Qwen3MoeSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_experts",
    expert_intermediate_attr="moe_intermediate_size",
    moe_layers=qwen_sparse_step_layers,
)

QWEN2_MOE = MoEAdapter(
    model_type="qwen2_moe",
    class_prefix="Qwen2Moe",
    moe_block_class="Qwen2MoeSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_experts",
    expert_intermediate_attr="moe_intermediate_size",
    moe_layers=qwen_sparse_step_layers,
    shared_expert=SharedExpert(intermediate=lambda c: int(c.shared_expert_intermediate_size), gated=True),
)

MIXTRAL = MoEAdapter(
    model_type="mixtral",
    class_prefix="Mixtral",
    moe_block_class="MixtralSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_local_experts",
    expert_intermediate_attr="intermediate_size",
    moe_layers=every_layer,
    normalize_attr=None,  # Mixtral always renormalises
    weights_in_logits_dtype=False,  # and keeps the top-k weights in fp32
    block_prefixes=("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp"),
)

OLMOE = MoEAdapter(
    model_type="olmoe",
    class_prefix="Olmoe",
    moe_block_class="OlmoeSparseMoeBlock",
    scoring="softmax",
    num_experts_attr="num_experts",
    expert_intermediate_attr="intermediate_size",
    moe_layers=every_layer,
)

GLM4_MOE_LITE = MoEAdapter(
    model_type="glm4_moe_lite",
    class_prefix="Glm4MoeLite",
    moe_block_class="Glm4MoeLiteMoE",
    moe_layers=mlp_layer_types_layers,
    serving_overrides=dense_prefix_for_vllm,
    **_SIGMOID_ROUTER,
)

GLM4_MOE = MoEAdapter(
    model_type="glm4_moe",
    class_prefix="Glm4Moe",
    moe_block_class="Glm4MoeMoE",
    moe_layers=first_k_dense_layers,
    **_SIGMOID_ROUTER,
)

DEEPSEEK_V3 = MoEAdapter(
    model_type="deepseek_v3",
    class_prefix="DeepseekV3",
    moe_block_class="DeepseekV3MoE",
    moe_layers=first_k_dense_layers,
    **_SIGMOID_ROUTER,
)

ALL_ADAPTERS: tuple[MoEAdapter, ...] = (QWEN3_MOE, GLM4_MOE_LITE, QWEN2_MOE, MIXTRAL, OLMOE, GLM4_MOE, DEEPSEEK_V3)
