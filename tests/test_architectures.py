"""Adapters: registry, config rules cross-checked against the real transformers model classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import FAMILIES, tiny_config
from zeda_cli.architectures import REGISTRY, get_adapter, resolve_config, supported_model_types
from zeda_cli.errors import UnsupportedModelError


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_layer_rule_matches_transformers(name):
    config = tiny_config(name)
    adapter = get_adapter(config.model_type)
    model = _meta_model(config)
    built = [i for i, layer in enumerate(model.model.layers) if type(layer.mlp).__name__ == adapter.moe_block_class]
    assert adapter.moe_layers(config) == built and built
    assert type(model).__name__ == adapter.causal_lm_class
    block = model.model.layers[built[0]].mlp
    assert block.experts.num_experts == adapter.num_experts(config)
    assert block.gate.weight.shape[0] == adapter.num_experts(config)
    assert hasattr(block.gate, "e_score_correction_bias") == adapter.correction_bias
    assert block.experts.down_proj.shape[-1] == adapter.expert_intermediate(config)


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []}, [1]),
        ("qwen3_moe", {"mlp_only_layers": [0, 2], "num_hidden_layers": 4}, [1, 3]),
        ("glm4_moe_lite", {"mlp_layer_types": ["sparse", "dense", "sparse"]}, [0, 2]),
        ("glm4_moe", {"first_k_dense_replace": 2}, [2]),
    ],
)
def test_moe_layers_follow_the_config(name, overrides, expected):
    config = tiny_config(name, **overrides)
    adapter = get_adapter(config.model_type)
    assert adapter.moe_layers(config) == expected
    built = [i for i, layer in enumerate(_meta_model(config).model.layers) if hasattr(layer.mlp, "experts")]
    assert built == expected


def test_every_supported_family_is_exercised():
    assert {FAMILIES[n][0] for n in FAMILIES} == set(REGISTRY)
    assert supported_model_types() == sorted(REGISTRY)


def test_unknown_family_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="qwen3_moe") as err:
        get_adapter("llama")
    assert "glm4_moe_lite" in str(err.value)


def test_dynamic_model_types_resolve_to_their_family():
    assert get_adapter("qwen3_moe_plus_plus") is get_adapter("qwen3_moe")
    assert get_adapter("glm4_moe_lite_plus_plus").dynamic_architecture == "Glm4MoeLitePlusPlusForCausalLM"


def test_official_copy_experts_are_refused():
    raw = tiny_config("qwen3_moe").to_dict()
    raw.update(model_type="qwen3_moe_plus_plus", zce_nums=[4], zce_types=["copy"])
    with pytest.raises(UnsupportedModelError, match="copy"):
        resolve_config(raw)


def test_official_default_mask_is_on_when_absent():
    raw = tiny_config("qwen3_moe").to_dict()
    raw.update(model_type="qwen3_moe_plus_plus", zce_nums=[4], zce_types=["zero"])
    rc = resolve_config(raw)
    assert rc.dynamic and rc.dynamic_format == "official" and rc.use_zce_mask and rc.num_zero_experts == 4


def test_router_specs_carry_each_familys_semantics():
    spec = get_adapter("mixtral").router_spec(tiny_config("mixtral"))
    assert spec["normalize"] is True and spec["weights_in_logits_dtype"] is False and spec["scoring"] == "softmax"
    spec = get_adapter("glm4_moe_lite").router_spec(tiny_config("glm4_moe_lite"))
    assert spec["scoring"] == "sigmoid" and spec["routed_scaling_factor"] == 1.8 and spec["correction_bias"]
    spec = get_adapter("deepseek_v3").router_spec(tiny_config("deepseek_v3"))
    assert (spec["n_group"], spec["topk_group"]) == (2, 1)
    spec = get_adapter("qwen3_moe").router_spec(tiny_config("qwen3_moe_nonorm"))
    assert spec["normalize"] is False and spec["routed_scaling_factor"] == 1.0


def test_vllm_servers_get_back_the_dense_prefix_key_transformers_no_longer_writes(tmp_path):
    """vLLM 0.32 reads first_k_dense_replace for GLM-4.7-Flash; a folder saved by transformers >= 5.2x has only
    mlp_layer_types (the bundled GLM fixture does), so the server spec passes the key as hf_overrides."""
    from zeda_cli.architectures.base import dense_prefix_for_vllm
    from zeda_cli.distill.generation.vllm import server_spec, serving_overrides
    from zeda_cli.recipes import load_recipe

    root = Path(__file__).resolve().parents[1]
    assert serving_overrides(str(root / "models" / "pystdlib-glm")) == {"first_k_dense_replace": 1}
    assert serving_overrides(str(root / "models" / "pystdlib-moe")) == {}
    assert dense_prefix_for_vllm({"mlp_layer_types": ["dense", "dense", "sparse"]}) == {"first_k_dense_replace": 2}
    assert dense_prefix_for_vllm({"mlp_layer_types": ["dense", "sparse"], "first_k_dense_replace": 1}) == {}
    assert dense_prefix_for_vllm({"mlp_layer_types": ["sparse", "dense", "sparse"]}) == {}  # not a dense prefix
    spec = server_spec(str(root / "models" / "pystdlib-glm"), load_recipe("tiny-glm-demo"), lambda: [[1, 2]], 8,
                       tmp_path / "log", hf_overrides={"use_zce_mask": True})  # fmt: skip
    assert spec.hf_overrides == {"first_k_dense_replace": 1, "use_zce_mask": True}
