"""Training-free baselines: each hits its expert-FLOPs budget on held-out tokens; dropped slots are not computed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import save_tiny_model
from zeda_cli import load_model
from zeda_cli.architectures import resolve_config
from zeda_cli.errors import BadInputError
from zeda_cli.evaluate.baselines import (
    METHODS,
    BaselineRouting,
    RoutingTally,
    calibrate,
    keep_entropy_k,
    keep_heaviest,
    keep_naee,
    keep_top_p,
    kept_share,
    renormalise,
    runtime_form,
)
from zeda_cli.evaluate.flops import ExpertFlops, measured_expert_flops
from zeda_cli.io.sources import read_config_json
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder

FAMILIES = ["qwen3_moe", "glm4_moe_lite"]  # a softmax and a sigmoid router (with correction bias, shared expert)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def top4(tmp_path_factory):
    """Tiny static models with top-4 of 8 experts, so that every budget in [0.25, 1] is reachable."""
    root = tmp_path_factory.mktemp("top4")
    return {name: save_tiny_model(name, root / name, num_experts_per_tok=4) for name in FAMILIES}


def _static(folder):
    rc = resolve_config(read_config_json(folder))
    model = load_model(folder)
    runtime_form(model, rc.adapter.router_spec(rc.hf), rc.hf.hidden_size)
    return model, rc


def _tokens(seed: int, batches: int = 4, batch: int = 8, length: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token data of one distribution (uniform ids); different seeds = disjoint calibration / held-out draws."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, 96, (batch, length), generator=g)
        out.append((ids, torch.ones_like(ids)))
    return out


CALIBRATION, HELDOUT = _tokens(seed=1), _tokens(seed=2)


def test_keep_rules_on_hand_made_weights():
    w = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert keep_top_p(w, 0.7).tolist() == [[False, True, False, True]]
    assert keep_top_p(w, 0.8).tolist() == [[False, True, False, True]]  # 0.5 + 0.3 reaches 0.8
    assert keep_top_p(w, 0.81).tolist() == [[False, True, True, True]]
    assert keep_top_p(w, 0.0).tolist() == [[False, True, False, False]]  # never fewer than one slot
    assert keep_naee(w, 0.5).tolist() == [[False, True, False, True]]  # drop w_i < 0.5 * 0.5
    keep = torch.tensor([[False, True, False, True]])
    assert renormalise(w, keep, "kept")[0].tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])
    assert renormalise(w, keep, "none")[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.3])
    assert renormalise(w, torch.zeros_like(keep), "kept").tolist() == [[0.0] * 4]


def test_static_and_entropy_k_rules_on_hand_made_weights():
    w = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert keep_heaviest(w, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    # exp(entropy) of the renormalised weights: 3.13 for row 0, exactly 4 for the uniform row 1
    effective = [torch.exp(-(r * r.log()).sum()).item() for r in w]
    assert effective[0] == pytest.approx(3.1334, abs=1e-3) and effective[1] == pytest.approx(4.0)
    assert keep_entropy_k(w, 0.5).sum(-1).tolist() == [2, 2]  # ceil(1.57) = 2, ceil(2.0) = 2
    assert keep_entropy_k(w, 0.7).sum(-1).tolist() == [3, 3]  # ceil(2.19) = 3, ceil(2.8) = 3
    assert keep_entropy_k(w, 0.0).sum(-1).tolist() == [1, 1] and keep_entropy_k(w, 9.0).sum(-1).tolist() == [4, 4]
    assert keep_entropy_k(w, 0.5)[0].tolist() == [False, True, False, True]  # the heaviest k


def test_static_topk_is_exactly_k_of_K_and_the_registry_matches_the_recipe_names(top4):
    from zeda_cli.recipes import BASELINES

    assert tuple(METHODS) == BASELINES
    model, rc = _static(top4["qwen3_moe"])
    with BaselineRouting(model, "static_topk", 1.0) as routing:
        calibration = calibrate(routing, 0.5, CALIBRATION, rc.num_experts)
        assert calibration.param == 2 and calibration.kept_share == 0.5
        assert kept_share(model, HELDOUT, rc.num_experts) == 0.5


@pytest.mark.parametrize("name", FAMILIES)
def test_runtime_form_routes_exactly_like_the_static_model(name, top4):
    ids = HELDOUT[0][0][:2]
    plain = AutoModelForCausalLM.from_pretrained(top4[name]).eval()
    model, _ = _static(top4[name])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert kept_share(model, HELDOUT[:1], 8) == 1.0


CASES = [(f, m, 0.5) for f in FAMILIES for m in ("top_p", "naee", "threshold", "static_topk", "entropy_k", "random")]
CASES += [("qwen3_moe", "top_p", 0.3), ("glm4_moe_lite", "naee", 0.7), ("qwen3_moe", "threshold", 0.3)]


@pytest.mark.parametrize(("name", "method", "budget"), CASES)
def test_calibrated_baseline_hits_its_budget_on_held_out_tokens(name, method, budget, top4):
    model, rc = _static(top4[name])
    with BaselineRouting(model, method, 1.0) as routing:
        calibration = calibrate(routing, budget, CALIBRATION, rc.num_experts)
        assert abs(calibration.kept_share - budget) <= 0.01
        assert abs(kept_share(model, HELDOUT, rc.num_experts) - budget) <= 0.03
    assert calibration.tokens == sum(int(m.sum()) for _, m in CALIBRATION)
    assert kept_share(model, HELDOUT[:1], rc.num_experts) == 1.0  # hooks removed: the static model again


@pytest.mark.parametrize(("name", "method"), [("qwen3_moe", "naee"), ("glm4_moe_lite", "random")])
def test_dropped_slots_are_not_computed(name, method, top4):
    model, rc = _static(top4[name])
    ids, mask = HELDOUT[0]
    flops = ExpertFlops.of(rc)
    with BaselineRouting(model, method, 0.5 if method == "random" else 0.3):
        with RoutingRecorder(model) as recorder:
            measured = measured_expert_flops(model, ids, mask)
        tally = RoutingTally(rc.num_experts)
        tally.add(recorder.records, mask)
    assert 0.2 < tally.share < 0.8
    kept_slots = sum(tally.slots.values()) - sum(tally.skipped.values())
    assert measured == kept_slots * flops.per_expert
    assert measured < flops.static_per_token * ids.numel()
    assert measured_expert_flops(model, ids, mask) == flops.static_per_token * ids.numel()


def test_baselines_change_the_output_and_renorm_matters(top4):
    model, rc = _static(top4["qwen3_moe"])
    ids = HELDOUT[0][0][:2]
    with torch.no_grad():
        static = model(input_ids=ids).logits
        with BaselineRouting(model, "naee", 0.3, renorm="kept"):
            kept = model(input_ids=ids).logits
        with BaselineRouting(model, "naee", 0.3, renorm="none") as routing:
            none = model(input_ids=ids).logits
            with routing.disabled():
                assert torch.equal(model(input_ids=ids).logits, static)
    assert not torch.allclose(kept, static) and not torch.allclose(kept, none)


def test_unreachable_budget_and_bad_names_are_refused(top4):
    model, rc = _static(top4["qwen3_moe"])
    with BaselineRouting(model, "naee", 1.0) as routing, pytest.raises(BadInputError, match="always keeps"):
        calibrate(routing, 0.1, CALIBRATION[:1], rc.num_experts)  # top-4: never below 1/4
    with pytest.raises(BadInputError, match="unknown baseline"):
        BaselineRouting(model, "topk", 1.0)
    with pytest.raises(BadInputError, match=r"outside \(0, 1\]"):
        calibrate(BaselineRouting(model, "naee", 1.0), 0.0, CALIBRATION, rc.num_experts)


def test_baseline_on_a_masked_dynamic_folder_equals_the_static_one(tiny_dynamic, tiny_static):
    ids = HELDOUT[0][0][:2]
    dynamic = load_model(tiny_dynamic("qwen3_moe"), use_zce_mask=True)
    static, _ = _static(tiny_static("qwen3_moe"))
    with torch.no_grad():
        with BaselineRouting(dynamic, "naee", 0.6):
            a = dynamic(input_ids=ids).logits
        with BaselineRouting(static, "naee", 0.6):
            b = static(input_ids=ids).logits
    assert torch.equal(a, b)
