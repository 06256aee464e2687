"""inject-zero-experts: surgery invariants, output layout, manifest, inspect on the result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tiny_models import FAMILIES
from zeda_cli.inject import expand_router_bias, expand_router_weight, inject_zero_experts
from zeda_cli.inspect_model import inspect_model
from zeda_cli.io.reader import open_checkpoint
from zeda_cli.recipes import ZeroExpertsSection
from zeda_cli.runs import read_manifest, verify_files


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(folder)
    tensors = {}
    for path in ckpt.files:
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_surgery_keeps_every_original_bit(name, tiny_static, tiny_dynamic):
    before, after = _all_tensors(tiny_static(name)), _all_tensors(tiny_dynamic(name))
    config = json.loads((tiny_dynamic(name) / "config.json").read_text())
    n, z = config["zeda"]["router"]["num_experts"], config["zce_nums"][0]
    assert z == n // 2
    assert set(before) == set(after)
    widened = [k for k in before if before[k].shape != after[k].shape]
    assert widened and all(k.endswith(("gate.weight", "gate.e_score_correction_bias")) for k in widened)
    for key in before:
        if key in widened:
            assert after[key].shape[0] == n + z and after[key].shape[1:] == before[key].shape[1:]
            assert torch.equal(_bits(after[key][:n]), _bits(before[key]))
            assert after[key].dtype == before[key].dtype
        else:
            assert torch.equal(_bits(after[key]), _bits(before[key])), key


def test_gaussian_rows_follow_the_original_statistics():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 16) * torch.linspace(0.1, 2.0, 16) + torch.linspace(-1, 1, 16)
    out = expand_router_weight(weight, 4096, g)
    new = out[64:]
    torch.testing.assert_close(new.mean(0), weight.mean(0), atol=0.1, rtol=0.0)
    torch.testing.assert_close(new.std(0), weight.std(0), atol=0.1, rtol=0.1)
    bias = torch.randn(64) * 0.3 + 2.0
    new_bias = expand_router_bias(bias, 4096, g)[64:]
    assert abs(new_bias.mean().item() - bias.mean().item()) < 0.05
    assert abs(new_bias.std().item() - bias.std().item()) < 0.05


def test_same_seed_same_rows_other_seed_other_rows(tiny_static, tmp_path):
    src = str(tiny_static("qwen3_moe"))
    a = inject_zero_experts(src, tmp_path / "a", zero=ZeroExpertsSection(seed=3)).out
    b = inject_zero_experts(src, tmp_path / "b", zero=ZeroExpertsSection(seed=3)).out
    c = inject_zero_experts(src, tmp_path / "c", zero=ZeroExpertsSection(seed=4)).out
    key = "model.layers.0.mlp.gate.weight"
    ta, tb, tc = (_all_tensors(f)[key] for f in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)


def test_output_layout_manifest_and_sharding(tiny_static, tiny_dynamic):
    folder = tiny_dynamic("glm4_moe_lite")
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors.index.json" in files and "zeda.json" in files
    assert {"modeling_zeda.py", "zeda_dynamic_moe.py", "config.json", "generation_config.json"} <= set(files)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in open_checkpoint(folder).tensors.values())
    manifest = read_manifest(folder)
    assert manifest.done and manifest.stage == "inject"
    assert set(shards) <= set(manifest.files)
    assert verify_files(folder, manifest) == []
    assert manifest.settings["num_zero_experts"] == 4 and manifest.settings["target_skip"] == 0.5
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeLitePlusPlusForCausalLM"]
    assert config["model_type"] == "glm4_moe_lite_plus_plus"
    assert config["zce_types"] == ["zero"] and config["use_zce_mask"] is False
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_zeda.Glm4MoeLitePlusPlusForCausalLM"
    assert not list(folder.parent.glob(".*zeda-partial*"))


@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe_lite", "mixtral"])
def test_inspect_reports_static_then_dynamic(name, tiny_static, tiny_dynamic):
    static = inspect_model(str(tiny_static(name)))
    dynamic = inspect_model(str(tiny_dynamic(name)))
    assert static.supported and not static.dynamic and static.num_zero_experts == 0
    assert dynamic.supported and dynamic.dynamic and dynamic.num_zero_experts == static.num_experts // 2
    assert dynamic.dynamic_format == "zeda" and dynamic.target_skip == 0.5
    assert static.moe_layers == dynamic.moe_layers
    assert static.params["routed_experts"] == dynamic.params["routed_experts"]
    assert dynamic.params["router"] * 2 == static.params["router"] * 3  # N -> N + N/2 rows (and bias entries)


def test_inspect_counts_match_the_model(tiny_static):
    from transformers import AutoModelForCausalLM

    report = inspect_model(str(tiny_static("qwen3_moe")))
    model = AutoModelForCausalLM.from_pretrained(tiny_static("qwen3_moe"))
    assert report.params["total"] == sum(p.numel() for p in model.parameters())
    assert report.moe_layers == [0, 2] and report.dense_layers == [1]
    h, i, k = 32, 16, 2
    assert report.expert_flops_per_token == 2 * 3 * h * i * k * 2


def test_official_format_is_recognised(tiny_dynamic, tmp_path):
    """A checkpoint in the official ZEDA format (no zeda section, no auto_map) is read as dynamic."""
    import shutil

    from zeda_cli import load_model

    src = tiny_dynamic("qwen3_moe")
    official = tmp_path / "official"
    shutil.copytree(src, official)
    config = json.loads((official / "config.json").read_text())
    for key in ("zeda", "auto_map", "zero_expert_bias"):
        config.pop(key)
    (official / "config.json").write_text(json.dumps(config))
    report = inspect_model(str(official))
    assert report.dynamic and report.dynamic_format == "official" and report.num_zero_experts == 4
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.equal(load_model(official)(ids).logits, load_model(src)(ids).logits)
