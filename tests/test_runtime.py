"""The dynamic runtime: exact semantics, real skipping, both loading paths, the zero-expert dial."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference_moe import reference_block
from tiny_models import FAMILIES, SIGMOID_VARIANTS, SOFTMAX_VARIANTS
from zeda_cli import load_model
from zeda_cli.evaluate.flops import MatmulFlopCounter
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, routers, set_zero_expert_bias

ALL = list(FAMILIES)


def _ids(vocab: int = 96, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zero_share(model, ids: torch.Tensor) -> float:
    n = model.config.zeda["router"]["num_experts"]
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=ids)
    zero = sum(int((r[2] >= n).sum()) for r in rec.records)
    return zero / sum(r[2].numel() for r in rec.records)


@pytest.mark.parametrize("name", ALL)
def test_masked_init_reproduces_the_static_model_exactly(name, tiny_static, tiny_dynamic):
    ids = _ids()
    static = AutoModelForCausalLM.from_pretrained(tiny_static(name)).eval()
    expected = _logits(static, ids)
    folder = tiny_dynamic(name, "masked")
    via_zeda = load_model(folder)
    via_stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(_logits(via_zeda, ids), expected)
    assert torch.equal(_logits(via_stock, ids), expected)
    assert _zero_share(via_zeda, ids) == 0.0


def _block_spec(model) -> dict:
    spec = dict(model.config.zeda["router"])
    spec["num_zero_experts"] = sum(model.config.zce_nums)
    return spec


def _shared_kind(block) -> str | None:
    if hasattr(block, "shared_expert_gate"):
        return "gated"
    return "ungated" if hasattr(block, "shared_experts") else None


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("name", SOFTMAX_VARIANTS + SIGMOID_VARIANTS)
def test_gaussian_init_matches_the_reference_implementation(name, impl, tiny_dynamic):
    model = load_model(tiny_dynamic(name), experts_implementation=impl)
    spec = _block_spec(model)
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    blocks = [m for m in model.modules() if type(m).__name__ == spec["block_class"]]
    assert blocks
    total_zero = 0
    for block in blocks:
        expected, zero_slots = reference_block(block, x, spec, _shared_kind(block))
        with torch.no_grad():
            got = block(x.unsqueeze(0)).squeeze(0)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        total_zero += zero_slots
    assert total_zero > 0, "gaussian zero experts should win some slots"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe_lite"])
def test_expert_flops_equal_the_non_zero_slots(name, impl, tiny_dynamic):
    model = load_model(tiny_dynamic(name), experts_implementation=impl)
    block = next(m for m in model.modules() if type(m).__name__ == model.config.zeda["router"]["block_class"])
    n = model.config.zeda["router"]["num_experts"]
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, weights, ids = block.gate(x)
        real_pairs = int((ids < n).sum())
        assert 0 < real_pairs < ids.numel()
        with MatmulFlopCounter() as counter:
            block.experts(x, ids, weights)
    h, i = model.config.hidden_size, block.experts.down_proj.shape[-1]
    assert counter.total == real_pairs * 2 * 3 * h * i


def test_all_zero_batch_costs_nothing_without_grad_and_keeps_the_graph_with_grad(tiny_dynamic):
    model = load_model(tiny_dynamic("qwen3_moe"))
    block = model.model.layers[0].mlp
    n = model.config.zeda["router"]["num_experts"]
    x = torch.randn(4, model.config.hidden_size)
    ids = torch.full((4, 2), n, dtype=torch.long)  # every slot on a zero expert
    weights = torch.full((4, 2), 0.5)
    with torch.no_grad(), MatmulFlopCounter() as counter:
        out = block.experts(x, ids, weights)
    assert counter.total == 0 and torch.count_nonzero(out) == 0
    out = block.experts(x.requires_grad_(), ids, weights)
    out.sum().backward()
    assert block.experts.gate_up_proj.grad is not None
    assert torch.count_nonzero(out) == 0


def test_both_loading_paths_agree_and_pick_grouped_mm(tiny_dynamic):
    folder = tiny_dynamic("glm4_moe_lite")
    ids = _ids()
    via_zeda = load_model(folder)
    via_stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert via_zeda.config._experts_implementation == "grouped_mm"
    assert via_stock.config._experts_implementation == "grouped_mm"
    assert torch.equal(_logits(via_zeda, ids), _logits(via_stock, ids))
    assert _zero_share(via_stock, ids) > 0


def test_save_pretrained_round_trip(tiny_dynamic, tmp_path):
    folder = tiny_dynamic("qwen3_moe")
    model = load_model(folder)
    model.save_pretrained(tmp_path / "again")
    for name in ("modeling_zeda.py", "zeda_dynamic_moe.py"):
        shutil.copy(folder / name, tmp_path / "again" / name)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe_plus_plus" and config["zce_nums"] == [4]
    ids = _ids()
    assert torch.equal(_logits(load_model(tmp_path / "again"), ids), _logits(model, ids))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    assert torch.equal(_logits(stock, ids), _logits(model, ids))


def test_zero_expert_bias_trades_zero_slots_for_quality(tiny_static, tiny_dynamic):
    folder = tiny_dynamic("qwen3_moe")
    ids = _ids(batch=4, length=24)
    shares = [_zero_share(load_model(folder, zero_expert_bias=b), ids) for b in (-2.0, 0.0, 2.0)]
    assert shares[0] < shares[1] < shares[2]
    model = load_model(folder)
    set_zero_expert_bias(model, -1e4)
    assert _zero_share(model, ids) == 0.0
    assert all(r.zero_expert_bias == -1e4 for _, r in routers(model))
    static = AutoModelForCausalLM.from_pretrained(tiny_static("qwen3_moe")).eval()
    masked = load_model(folder, use_zce_mask=True)
    assert torch.equal(_logits(masked, ids), _logits(static, ids))


def test_recorder_sees_every_moe_layer(tiny_dynamic):
    model = load_model(tiny_dynamic("qwen3_moe"))  # layer 1 is dense (mlp_only_layers=[1])
    with RoutingRecorder(model, keep_logits=True) as rec, torch.no_grad():
        model(input_ids=_ids())
    assert [r[0] for r in rec.records] == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert rec.records[0][1].shape == (24, 8 + 4)
