"""The official objective exactly, each point pinned against a hand computation of the official formula:
L_GA counts for sigmoid routers, the stage-2 per-sample reduction, the sampling temperature, and the legacy config
keys older official loaders read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from zeda_cli.architectures import resolve_config
from zeda_cli.distill.data import sequence_batch
from zeda_cli.distill.losses import GroupBalance, position_weights, sampled_reverse_kl_loss
from zeda_cli.distill.stage2 import opd_loss
from zeda_cli.distill.teachers import TeacherScores
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import Stage2Section, ZeroExpertsSection


def test_sigmoid_group_loss_counts_the_unbiased_top_k_not_the_bias_steered_choice():
    n, z, k, w, alpha = 2, 2, 2, 1.0, 1.0
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0], [1.0, -2.0, 0.5, 0.0]])
    # The correction bias steered the choice to zero experts 2 and 3 on both tokens...
    chosen = torch.tensor([[2, 3], [2, 3]])
    # ...but the unbiased scores' top-2 is {0, 1} (token 0) and {0, 2} (token 1): 3 real slots of 4, f_Z = 1/4.
    s = torch.sigmoid(logits)
    p = s / s.sum(-1, keepdim=True)
    p_e, p_z = p[:, :n].sum(-1).mean().item(), p[:, n:].sum(-1).mean().item()
    expected = alpha * (n + w * z) * (0.75 * p_e / n + 0.25 * p_z / (w * z))
    got = GroupBalance(n, z, alpha, w).layer_loss(logits, chosen, "sigmoid")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    steered = alpha * (n + w * z) * (0.0 * p_e / n + 1.0 * p_z / (w * z))  # what counting the choice would give
    assert abs(got.item() - steered) > 0.1
    assert k == chosen.shape[1]


def test_softmax_group_loss_still_counts_the_choice():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    chosen = torch.tensor([[0, 2]])
    p = torch.softmax(logits, -1)
    expected = 0.1 * (2 + 2 * 2) * (0.5 * p[0, :2].sum() / 2 + 0.5 * p[0, 2:].sum() / 4)
    assert GroupBalance(2, 2, 0.1, 2.0).layer_loss(logits, chosen, "softmax").item() == pytest.approx(expected.item())


def _two_samples():
    """Two responses of 1 and 3 tokens after prompts of 2 tokens; logits for both models, fixed by a seed."""
    torch.manual_seed(0)
    batch = sequence_batch([[5, 6], [7, 8]], [[9], [10, 11, 12]], pad_id=0)
    vocab = 16
    s_logits = torch.randn(2, batch.input_ids.shape[1], vocab, requires_grad=True)
    t_logits = torch.randn(2, batch.input_ids.shape[1], vocab)
    return batch, s_logits, t_logits


def _opd(s_logits, t_logits, batch, s2: Stage2Section):
    """opd_loss with the logits as the student's "hidden states" under an identity head (the loss then sees exactly
    these logits, chunked as in training), the teacher scored as the stage would ask."""
    t_logp = torch.log_softmax(t_logits, -1)
    scores = (TeacherScores(tokens=t_logp.gather(-1, batch.targets[..., None]).squeeze(-1)) if s2.loss == "sampled"
              else TeacherScores(distribution=t_logp))  # fmt: skip
    return opd_loss(torch.nn.Identity(), s_logits, scores, batch, s2, tokens=4.0, samples=2.0)


def _per_position(batch, s_logits, t_logits, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """−A·log p_S at every response position, written out: A = log p_T(y) − log p_S(y) with p_S at T."""
    lp_s = torch.log_softmax(s_logits / temperature, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    lp_t = torch.log_softmax(t_logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    return -((lp_t - lp_s).detach() * lp_s), batch.response_mask


def test_stage2_reduces_per_sample_then_over_samples_by_default():
    batch, s_logits, t_logits = _two_samples()
    per_position, mask = _per_position(batch, s_logits, t_logits)
    sample_means = [(per_position[i] * mask[i]).sum() / mask[i].sum() for i in range(2)]
    expected = (sample_means[0] + sample_means[1]) / 2  # slime's default: each sample counts the same
    assert Stage2Section().reduction == "sample"
    loss, _ = _opd(s_logits, t_logits, batch, Stage2Section())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    by_token = (per_position * mask).sum() / 4  # the per-token option: the long response weighs 3x
    loss_token, _ = _opd(s_logits, t_logits, batch, Stage2Section(reduction="token"))
    assert loss_token.item() == pytest.approx(by_token.item(), rel=1e-6)
    assert abs(loss.item() - loss_token.item()) > 1e-3


def test_full_kl_uses_the_same_per_sample_reduction():
    batch, s_logits, t_logits = _two_samples()
    kl = (torch.softmax(s_logits, -1) * (torch.log_softmax(s_logits, -1) - torch.log_softmax(t_logits, -1))).sum(-1)
    mask = batch.response_mask
    expected = sum((kl[i] * mask[i]).sum() / mask[i].sum() for i in range(2)) / 2
    loss, _ = _opd(s_logits, t_logits, batch, Stage2Section(loss="full"))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_samples_drawn_at_temperature_t_are_scored_with_logits_over_t():
    batch, s_logits, t_logits = _two_samples()
    per_position, mask = _per_position(batch, s_logits, t_logits, temperature=0.5)
    expected = sum((per_position[i] * mask[i]).sum() / mask[i].sum() for i in range(2)) / 2
    loss, _ = _opd(s_logits, t_logits, batch, Stage2Section(temperature=0.5))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    at_one, _ = _opd(s_logits, t_logits, batch, Stage2Section(temperature=1.0))
    assert abs(loss.item() - at_one.item()) > 1e-3


def test_position_weights_sum_to_one_per_step_in_both_reductions():
    mask = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert position_weights(mask, "sample", tokens=4, samples=2).sum().item() == pytest.approx(1.0)
    assert position_weights(mask, "token", tokens=4, samples=2).sum().item() == pytest.approx(1.0)
    s_lp, t_lp = torch.zeros(2, 4), torch.ones(2, 4)
    assert sampled_reverse_kl_loss(s_lp, t_lp, mask, 4.0).item() == 0.0  # log p_S = 0: no signal


def test_exported_config_carries_the_keys_older_official_loaders_read(tiny_static, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_static("qwen3_moe"), source)
    config = json.loads((source / "config.json").read_text())
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1_000_000.0}
    for key in ("num_experts", "rope_theta", "rope_scaling"):
        config.pop(key, None)
    config.update(num_local_experts=8, rope_parameters=rope)
    (source / "config.json").write_text(json.dumps(config))
    out = inject_zero_experts(str(source), tmp_path / "dyn", zero=ZeroExpertsSection()).out
    written = json.loads((out / "config.json").read_text())
    # transformers 4.57's Qwen3MoeConfig knows num_experts / rope_theta / rope_scaling, not the 5.x names
    assert written["num_experts"] == 8 and written["rope_theta"] == 1_000_000.0
    assert written["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    resolved = resolve_config(written)  # and transformers 5 still reads the same model
    assert resolved.num_experts == 8 and resolved.num_zero_experts == 4
    assert resolved.hf.rope_parameters["rope_theta"] == 1_000_000.0
    assert resolved.hf.rope_parameters["rope_type"] == "yarn"


def test_default_rope_gives_no_legacy_scaling(tiny_dynamic):
    written = json.loads((tiny_dynamic("qwen3_moe") / "config.json").read_text())
    assert written["num_experts"] == 8 and written["rope_scaling"] is None and "rope_theta" in written


def test_the_card_of_a_sigmoid_router_says_the_official_mask_is_not_exact(tiny_dynamic, tmp_path):
    from zeda_cli.export import export_run
    from zeda_cli.recipes import ExportSection

    note = "adds `e_score_correction_bias` after the mask"
    for family, expected in (("glm4_moe_lite", True), ("qwen3_moe", False)):
        out = export_run(tiny_dynamic(family), tmp_path / family, settings=ExportSection()).out
        assert (note in (out / "README.md").read_text()) is expected, family
