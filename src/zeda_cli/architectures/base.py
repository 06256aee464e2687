"""The adapter contract: everything zeda knows about one transformers MoE family, as data.

Adapters are the only place with architecture knowledge. Other modules ask an adapter for key names, router
semantics and which layers are MoE; they never test ``model_type`` themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

MoELayerRule = Callable[[Any], list[int]]


@dataclass(frozen=True)
class SharedExpert:
    """An always-on expert beside the routed ones (reported separately, never counted as skippable)."""

    intermediate: Callable[[Any], int]  # intermediate size of the shared MLP, from the config
    gated: bool  # True: scaled by sigmoid(shared_expert_gate(x)) (qwen2_moe); False: plain sum (GLM, DeepSeek)


@dataclass(frozen=True)
class MoEAdapter:
    model_type: str  # config.model_type of the static family, e.g. "qwen3_moe" (= its transformers module)
    class_prefix: str  # transformers' class-name prefix, e.g. "Qwen3Moe" (Qwen3MoeConfig, Qwen3MoeForCausalLM)
    moe_block_class: str  # e.g. "Qwen3MoeSparseMoeBlock": the module whose gate/experts become dynamic
    scoring: Literal["softmax", "sigmoid"]
    num_experts_attr: str  # config attribute holding N
    expert_intermediate_attr: str  # config attribute holding each routed expert's intermediate size
    moe_layers: MoELayerRule  # which decoder layers hold an MoE block, read from the config
    normalize_attr: str | None = "norm_topk_prob"  # None: the family always renormalises the top-k weights
    weights_in_logits_dtype: bool = True
    correction_bias: bool = False
    shared_expert: SharedExpert | None = None
    # On-disk prefix of layer L's MoE block; the first template found in a checkpoint wins.
    block_prefixes: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    # Child of the MoE block holding the routed experts. On disk either per expert ("experts.{e}.<name>", e.g.
    # Mixtral's w1/w2/w3) or fused ("experts.gate_up_proj" / "experts.down_proj", experts stacked along dim 0).
    experts_name: str = "experts"
    # config.json keys a vLLM server needs that this transformers no longer writes (passed as hf_overrides)
    serving_overrides: Callable[[dict[str, Any]], dict[str, Any]] = lambda raw: {}

    # --- names (transformers' and the official ZEDA release's conventions) ----------------------------------------
    @property
    def hf_module(self) -> str:  # transformers.models.<hf_module>
        return self.model_type

    @property
    def config_class(self) -> str:
        return f"{self.class_prefix}Config"

    @property
    def causal_lm_class(self) -> str:
        return f"{self.class_prefix}ForCausalLM"

    @property
    def dynamic_architecture(self) -> str:  # the official ZEDA name, e.g. "Qwen3MoePlusPlusForCausalLM"
        return f"{self.class_prefix}PlusPlusForCausalLM"

    @property
    def dynamic_model_type(self) -> str:
        return f"{self.model_type}_plus_plus"

    @property
    def dynamic_config_class(self) -> str:
        return self.dynamic_architecture.removesuffix("ForCausalLM") + "Config"

    @staticmethod
    def router_weight_key(block_prefix: str) -> str:
        return f"{block_prefix}.gate.weight"

    @staticmethod
    def router_bias_key(block_prefix: str) -> str:
        return f"{block_prefix}.gate.e_score_correction_bias"

    def experts_prefix(self, block_prefix: str) -> str:
        return f"{block_prefix}.{self.experts_name}."

    def moe_block_prefixes(self, tensor_names: Iterable[str]) -> list[str]:
        """Prefixes of every MoE block holding a router in a checkpoint (layers past the decoder, e.g. MTP, too)."""
        found: dict[str, int] = {}
        for template in self.block_prefixes:
            key = re.escape(self.router_weight_key(template)).replace(re.escape("{layer}"), r"(\d+)")
            pattern = re.compile(f"^{key}$")
            for name in tensor_names:
                if match := pattern.match(name):
                    found[template.format(layer=match.group(1))] = int(match.group(1))
        return sorted(found, key=found.__getitem__)

    # --- config reading ----------------------------------------------------------------------------------------
    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_attr, 0) or 0)

    def top_k(self, config: Any) -> int:
        return int(config.num_experts_per_tok)

    def expert_intermediate(self, config: Any) -> int:
        return int(getattr(config, self.expert_intermediate_attr))

    def normalizes(self, config: Any) -> bool:
        return True if self.normalize_attr is None else bool(getattr(config, self.normalize_attr, False))

    def routed_scaling_factor(self, config: Any) -> float:
        return float(getattr(config, "routed_scaling_factor", 1.0) or 1.0) if self.scoring == "sigmoid" else 1.0

    def groups(self, config: Any) -> tuple[int, int]:
        if self.scoring != "sigmoid":
            return 1, 1
        return int(getattr(config, "n_group", 1) or 1), int(getattr(config, "topk_group", 1) or 1)

    def router_spec(self, config: Any) -> dict[str, Any]:
        """The runtime's ``config.zeda['router']`` (see runtime.zeda_dynamic_moe.RouterSpec)."""
        n_group, topk_group = self.groups(config)
        return {
            "block_class": self.moe_block_class,
            "num_experts": self.num_experts(config),
            "top_k": self.top_k(config),
            "scoring": self.scoring,
            "normalize": self.normalizes(config),
            "weights_in_logits_dtype": self.weights_in_logits_dtype,
            "routed_scaling_factor": self.routed_scaling_factor(config),
            "n_group": n_group,
            "topk_group": topk_group,
            "correction_bias": self.correction_bias,
        }


# --- MoE-layer rules, shared by families that decide the same way ------------------------------------------------
def every_layer(config: Any) -> list[int]:
    return list(range(config.num_hidden_layers))


def qwen_sparse_step_layers(config: Any) -> list[int]:
    """Qwen2/3-MoE: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    if int(getattr(config, "num_experts", 0) or 0) <= 0:
        return []
    return [i for i in range(config.num_hidden_layers) if i not in mlp_only and (i + 1) % step == 0]


def first_k_dense_layers(config: Any) -> list[int]:
    """DeepSeek-V3 / GLM-4.5: the first ``first_k_dense_replace`` layers are dense."""
    first = int(getattr(config, "first_k_dense_replace", 0) or 0)
    return list(range(first, config.num_hidden_layers))


def dense_prefix_for_vllm(raw: dict[str, Any]) -> dict[str, Any]:
    """vLLM 0.32 (built on transformers 5.19) reads ``first_k_dense_replace``; transformers >= 5.2x writes
    ``mlp_layer_types`` instead (GLM-4.7-Flash), so a folder saved by it needs the key back for serving."""
    types = list(raw.get("mlp_layer_types") or [])
    if raw.get("first_k_dense_replace") is not None or "sparse" not in types:
        return {}
    first = types.index("sparse")
    return {"first_k_dense_replace": first} if all(t == "sparse" for t in types[first:]) else {}


def mlp_layer_types_layers(config: Any) -> list[int]:
    """GLM-4.7-Flash: ``mlp_layer_types[i] == "sparse"``."""
    types = list(config.mlp_layer_types)
    return [i for i in range(config.num_hidden_layers) if types[i] == "sparse"]
