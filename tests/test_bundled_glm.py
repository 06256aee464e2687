"""models/pystdlib-glm is what its card says: GLM-4.7-Flash's structure in miniature, trained (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "pystdlib-glm"
QWEN = ROOT / "models" / "pystdlib-moe"

pytestmark = [
    pytest.mark.skipif(not BUNDLED.is_dir(), reason="models/pystdlib-glm is not built yet (scripts/ trains it)"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((BUNDLED / "training.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    from transformers import Glm4MoeLiteForCausalLM

    return Glm4MoeLiteForCausalLM.from_pretrained(BUNDLED).eval()


def test_the_config_has_glm_4_7_flash_structure(model, report):
    config = model.config
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM" and config.model_type == "glm4_moe_lite"
    assert (config.kv_lora_rank, config.qk_rope_head_dim) == (512, 64)  # the latent vLLM's CPU MLA kernel needs
    assert config.n_routed_experts >= 32 and config.num_experts_per_tok == 4
    assert config.n_shared_experts == 1 and config.norm_topk_prob and config.n_group == 1
    assert config.mlp_layer_types == ["dense"] + ["sparse"] * (config.num_hidden_layers - 1)
    assert config.routed_scaling_factor == report["architecture"]["routed_scaling_factor"] == 1.8
    for key, value in report["architecture"].items():  # the card's architecture table is rendered from these
        if key not in ("parameters", "active_parameters"):
            assert getattr(config, key) == value, key
    assert sum(p.numel() for p in model.parameters()) == report["architecture"]["parameters"]


def test_the_layers_are_dense_first_then_moe_with_one_shared_expert(model):
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == "Glm4MoeLiteMLP"
    for layer in layers[1:]:
        moe = layer.mlp
        assert type(moe).__name__ == "Glm4MoeLiteMoE"
        assert moe.experts.gate_up_proj.shape[0] == model.config.n_routed_experts
        assert moe.shared_experts.gate_proj.out_features == model.config.moe_intermediate_size


def test_the_correction_bias_was_trained(model, report):
    biases = [layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]]
    for bias, recorded in zip(biases, report["evaluation"]["correction_bias"], strict=True):
        assert bias.abs().max() > 0 and bias.std() > 0
        assert bias.tolist() == pytest.approx(recorded, abs=1e-6)


def test_the_tokenizer_is_pystdlib_moe_s_byte_for_byte():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (BUNDLED / name).read_bytes() == (QWEN / name).read_bytes(), name


def test_held_out_nll_is_far_below_the_unigram_baseline(model, report):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    lines = (BUNDLED / "data" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines[:: len(lines) // 6][:6]]
    nll = tokens = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    unigram = report["evaluation"]["records_unigram_nll"]
    assert tokens > 1000 and nll / tokens < unigram - 2.0


def test_the_folder_fits_the_repository_budget():
    assert sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file()) <= 25_000_000
