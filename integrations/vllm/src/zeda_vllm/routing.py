"""ZEDA routing over N real + Z zero experts, as zeda's runtime computes it (``zeda_dynamic_moe.ZeroExpertRouter``).

Same operations in the same order and dtypes, so that a folder routes identically under vLLM and under zeda (the
logits themselves come from vLLM's linear layer, the same product as zeda's ``F.linear`` up to GEMM rounding):

* softmax families: logits in the router's dtype, fp32 softmax over the N+Z logits, top-K, optional division by the
  sum of the K chosen weights (zero slots included), weights cast back to the logits dtype where the family does so;
* sigmoid families: fp32 logits, sigmoid scores, choice by score + ``e_score_correction_bias`` (optionally limited
  to the best ``topk_group`` of ``n_group`` groups, the rest filled with -inf), weights = the *unbiased* scores of the
  chosen, divided by their sum + 1e-20 (zero slots included), times ``routed_scaling_factor``.

``zero_expert_bias`` is added to the zero-expert logits through a shift vector (0 on the N real rows), which adds
exact zeros where zeda adds nothing; with ``mask`` only the N real columns are used (exactly the static router).
Ids >= N are zero experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import ZeroExpertSpec


def zero_expert_shift(spec: ZeroExpertSpec, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """[N+Z] vector added to the logits: 0 on real experts, ``zero_expert_bias`` on zero experts."""
    shift = torch.zeros(spec.total_experts, dtype=dtype, device=device)
    shift[spec.num_experts :] = spec.zero_expert_bias
    return shift


def softmax_topk(logits: torch.Tensor, spec: ZeroExpertSpec) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.weights_in_logits_dtype:
        weights = weights.to(logits.dtype)
    return weights, ids


def sigmoid_topk(
    logits: torch.Tensor, correction_bias: torch.Tensor, spec: ZeroExpertSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits.shape[-1]
    scores = logits.sigmoid()
    choice = scores + correction_bias[:rows]
    if spec.n_group > 1:
        grouped = choice.view(-1, spec.n_group, rows // spec.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, rows)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=spec.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if spec.normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


def select_experts(
    logits: torch.Tensor, shift: torch.Tensor, correction_bias: torch.Tensor | None, spec: ZeroExpertSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-K weights, top-K ids) from the router logits [T, N+Z] (softmax families: in the router's dtype; sigmoid
    families: fp32); ids >= N are zero experts. Masked, only the N real columns are used."""
    rows = spec.num_experts if spec.mask else spec.total_experts
    logits = logits[:, :rows] + shift[:rows]
    if spec.scoring == "softmax":
        return softmax_topk(logits, spec)
    assert correction_bias is not None
    return sigmoid_topk(logits, correction_bias, spec)
