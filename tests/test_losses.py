"""Loss functions pinned against hand-computed references; L_GA's gradient drives the zero share to its target."""

from __future__ import annotations

import math

import pytest
import torch

from zeda_cli.distill.losses import (
    GroupBalance,
    forward_kl_loss,
    full_reverse_kl_loss,
    response_cross_entropy,
    sampled_reverse_kl_loss,
    token_logprobs,
    zero_expert_weight,
)
from zeda_cli.runtime.zeda_dynamic_moe import RouterSpec, ZeroExpertRouter


def test_zero_expert_weight_matches_the_official_setting():
    assert zero_expert_weight(0.5, 128, 64) == pytest.approx(2.0)  # Qwen3-30B-A3B: w = 2 gives half
    assert zero_expert_weight(0.5, 64, 32) == pytest.approx(2.0)  # GLM-4.7-Flash
    w = zero_expert_weight(0.3, 16, 8)
    assert w * 8 / (w * 8 + 16) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        zero_expert_weight(1.0, 16, 8)


def test_group_loss_equals_a_hand_computed_value():
    n, z, w, alpha = 2, 2, 2.0, 0.1
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 3.0]])
    ids = torch.tensor([[0, 2], [3, 1]])  # slots: real, zero, zero, real -> f_E = f_Z = 0.5
    p = torch.softmax(logits, -1)
    p_e = (p[:, :2].sum(-1)).mean().item()
    p_z = (p[:, 2:].sum(-1)).mean().item()
    expected = alpha * (n + w * z) * (0.5 * p_e / n + 0.5 * p_z / (w * z))
    got = GroupBalance(n, z, alpha, w).layer_loss(logits, ids, "softmax")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.1056635, abs=1e-6)  # the same value written out


def test_group_loss_sigmoid_normalises_scores_and_respects_the_token_mask():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, -5.0, 5.0, 5.0]])
    ids = torch.tensor([[0, 1], [2, 3]])
    balance = GroupBalance(2, 2, 1.0, 1.0)
    only_first = balance.layer_loss(logits, ids, "sigmoid", torch.tensor([True, False]))
    # token 0: uniform scores -> P_E = P_Z = 0.5; both slots real -> f_E = 1
    assert only_first.item() == pytest.approx((2 + 2) * (1.0 * 0.5 / 2 + 0.0), rel=1e-6)
    summed = balance.loss([logits, logits], [ids, ids], "sigmoid")
    assert summed.item() == pytest.approx(2 * balance.layer_loss(logits, ids, "sigmoid").item())


def test_group_loss_carries_no_gradient_through_the_counts():
    logits = torch.randn(6, 6, requires_grad=True)
    ids = torch.randint(0, 6, (6, 2))
    GroupBalance(4, 2).layer_loss(logits, ids, "softmax").backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _share_after_training(start_bias: float, target: float, steps: int = 150) -> tuple[float, float]:
    torch.manual_seed(0)
    n, z, k, h = 8, 4, 2, 16
    spec = RouterSpec("Block", n, z, k, "softmax", True)
    router = ZeroExpertRouter(h, spec, zero_expert_bias=start_bias)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    x = torch.randn(512, h)
    balance = GroupBalance.for_target(n, z, target, alpha=1.0)
    optimizer = torch.optim.Adam([router.weight], lr=0.02)

    def share() -> float:
        with torch.no_grad():
            return float((router(x)[2] >= n).float().mean())

    before = share()
    for _ in range(steps):
        logits, _, ids = router(x)
        optimizer.zero_grad()
        balance.layer_loss(logits, ids, "softmax").backward()
        optimizer.step()
    return before, share()


@pytest.mark.parametrize("start_bias", [-3.0, 3.0], ids=["from-below", "from-above"])
def test_group_loss_gradient_moves_the_zero_share_to_the_target(start_bias):
    target = 0.5
    before, after = _share_after_training(start_bias, target)
    assert abs(after - target) < abs(before - target) - 0.2, (before, after)
    assert abs(after - target) < 0.1, (before, after)


def test_cross_entropy_counts_only_labelled_tokens():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    got = response_cross_entropy(logits, labels, normalizer=3.0)
    lp = torch.log_softmax(logits, -1)
    expected = -(lp[0, 0, 1] + lp[0, 2, 2] + lp[1, 2, 4]) / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_full_reverse_kl_matches_the_definition_in_any_chunking():
    s, t = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.float)
    ps, lps, lpt = torch.softmax(s, -1), torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    expected = ((ps * (lps - lpt)).sum(-1) * mask).sum() / 4.0
    for chunk in (1, 3, 100):
        assert full_reverse_kl_loss(s, t, mask, 4.0, chunk).item() == pytest.approx(expected.item(), rel=1e-5)


def test_forward_kl_matches_the_definition_in_any_chunking():
    s, t = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.float)
    pt, lps, lpt = torch.softmax(t, -1), torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    expected = ((pt * (lpt - lps)).sum(-1) * mask).sum() / 4.0
    for chunk in (1, 3, 100):
        assert forward_kl_loss(s, t, mask, 4.0, chunk).item() == pytest.approx(expected.item(), rel=1e-5)
    assert forward_kl_loss(t, t, mask, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_loss_is_an_unbiased_reverse_kl_gradient():
    """E_{y~p_S}[grad of −A·log p_S(y)] equals grad KL(p_S || p_T): enumerate y instead of sampling."""
    torch.manual_seed(0)
    student = torch.randn(1, 1, 6, requires_grad=True)
    teacher = torch.randn(1, 1, 6)
    p = torch.softmax(student.detach(), -1)[0, 0]
    expected_grad = torch.zeros_like(student)
    for y in range(6):
        tokens = torch.tensor([[y]])
        s_lp = token_logprobs(student, tokens)
        t_lp = token_logprobs(teacher, tokens)
        (grad,) = torch.autograd.grad(sampled_reverse_kl_loss(s_lp, t_lp, torch.ones(1, 1), 1.0), student)
        expected_grad += p[y] * grad
    kl = full_reverse_kl_loss(student, teacher, torch.ones(1, 1), 1.0)
    (kl_grad,) = torch.autograd.grad(kl, student)
    torch.testing.assert_close(expected_grad, kl_grad, rtol=1e-5, atol=1e-6)
    assert not math.isnan(kl.item())


def test_token_logprobs_in_chunks():
    logits, tokens = torch.randn(2, 9, 13), torch.randint(0, 13, (2, 9))
    full = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk=4), full)
