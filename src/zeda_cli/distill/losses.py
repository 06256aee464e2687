"""Distillation losses, as pure functions over tensors (pinned by tests against hand-computed references).

* Group auxiliary loss L_GA (docs/method.md): per MoE layer, f_E / f_Z = share of the T·K routing slots that went to
  real / zero experts (counts, no gradient), P_E / P_Z = mean router probability mass on each group (with
  gradient); L = α·(N + w·Z)·(f_E·P_E/N + f_Z·P_Z/(w·Z)). Layers are summed, as Megatron adds each layer's aux loss.
  Its equilibrium zero share is w·Z / (w·Z + N); a target share t gives w = t·N / (Z·(1 − t)). For sigmoid routers
  the counts come from the top-K of the *unbiased* normalised scores, as the official Megatron code computes them
  (``compute_routing_scores_for_aux_loss``), not from the choice the correction bias steered.
* Stage 1: token-level cross-entropy on response tokens.
* Stage 2: reverse KL to the teacher, either the official sampled form (advantage log p_T − log p_S on the student's
  own token, REINFORCE-style) or the exact per-position KL over the vocabulary, computed in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def zero_expert_weight(target_skip: float, num_experts: int, num_zero: int) -> float:
    """w such that the L_GA equilibrium zero share w·Z/(w·Z + N) equals ``target_skip``."""
    if not 0.0 < target_skip < 1.0:
        raise ValueError(f"target skip must be in (0, 1), got {target_skip}")
    return target_skip * num_experts / (num_zero * (1.0 - target_skip))


def router_probabilities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token probability over all N+Z experts: softmax, or sigmoid scores normalised to sum 1 (as official)."""
    if scoring == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    scores = torch.sigmoid(logits.float())
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


@dataclass(frozen=True)
class GroupBalance:
    num_experts: int  # N
    num_zero: int  # Z
    alpha: float = 0.1
    weight: float = 2.0  # w

    @classmethod
    def for_target(cls, num_experts: int, num_zero: int, target_skip: float, alpha: float) -> GroupBalance:
        return cls(num_experts, num_zero, alpha, zero_expert_weight(target_skip, num_experts, num_zero))

    def layer_loss(
        self, logits: torch.Tensor, top_k_ids: torch.Tensor, scoring: str, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_GA of one layer; ``logits`` [T, N+Z], ``top_k_ids`` [T, K] the router's choice, ``token_mask`` [T]
        (True = a real token). Softmax: f counts the choice (the top-K of these very probabilities); sigmoid: f
        counts the top-K of the unbiased scores, whatever the correction bias chose."""
        n, z, w = self.num_experts, self.num_zero, self.weight
        probs = router_probabilities(logits, scoring)
        ids = top_k_ids if scoring == "softmax" else probs.detach().topk(top_k_ids.shape[-1], dim=-1).indices
        if token_mask is not None:
            probs, ids = probs[token_mask], ids[token_mask]
        if probs.shape[0] == 0:
            return logits.sum() * 0.0
        with torch.no_grad():
            f_zero = (ids >= n).float().mean()
        f_real = 1.0 - f_zero
        p_real = probs[:, :n].sum(dim=-1).mean()
        p_zero = probs[:, n:].sum(dim=-1).mean()
        return self.alpha * (n + w * z) * (f_real * p_real / n + f_zero * p_zero / (w * z))

    def loss(
        self,
        logits: Sequence[torch.Tensor],
        top_k_ids: Sequence[torch.Tensor],
        scoring: str,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of the per-layer losses (one entry per MoE layer call)."""
        return torch.stack(
            [self.layer_loss(lg, ids, scoring, token_mask) for lg, ids in zip(logits, top_k_ids, strict=True)]
        ).sum()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token CE of ``logits`` [B, S, V] against ``labels`` [B, S] (-100: not trained): one chunk's part."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def forward_kl_sum(student_logits: torch.Tensor, teacher_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_positions weights · KL(p_T ‖ p_S), the teacher given as log-probabilities (one chunk's part)."""
    p_t = teacher_logp.float()
    p_s = torch.log_softmax(student_logits.float(), dim=-1)
    return ((p_t.exp() * (p_t - p_s)).sum(dim=-1) * weights).sum()


def reverse_kl_sum(student_logits: torch.Tensor, teacher_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_positions weights · KL(p_S ‖ p_T), the teacher given as log-probabilities (one chunk's part)."""
    p_s = torch.log_softmax(student_logits.float(), dim=-1)
    return ((p_s.exp() * (p_s - teacher_logp.float())).sum(dim=-1) * weights).sum()


def response_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Summed token CE over positions whose label != -100, divided by ``normalizer`` (tokens of the global batch).

    ``logits`` [B, S, V] predict ``labels`` [B, S] already shifted by one (labels[t] is the token after t).
    """
    return cross_entropy_sum(logits, labels) / normalizer


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, chunk: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """log p(tokens[b, t]) under ``logits`` / ``temperature`` ([B, S, V], same positions), in sequence chunks."""
    out = []
    for start in range(0, logits.shape[1], chunk):
        part = torch.log_softmax(logits[:, start : start + chunk].float() / temperature, dim=-1)
        out.append(part.gather(-1, tokens[:, start : start + chunk, None]).squeeze(-1))
    return torch.cat(out, dim=1)


def position_weights(response_mask: torch.Tensor, reduction: str, tokens: float, samples: float) -> torch.Tensor:
    """[B, S] weights that turn a per-position loss into the stage-2 mean: ``sample`` (official): each sample's mean
    over its response tokens, then the mean over ``samples``; ``token``: the mean over all ``tokens``. ``tokens``
    and ``samples`` are the step's totals as this rank should count them (global count / world size)."""
    if reduction == "token":
        return response_mask / max(tokens, 1.0)
    lengths = response_mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    return response_mask / lengths / max(samples, 1.0)


def sampled_reverse_kl_loss(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, normalizer: float
) -> torch.Tensor:
    """Official OPD objective on the student's own samples: −A·log p_S with A = log p_T − log p_S (no gradient),
    summed with per-position ``mask`` weights (a 0/1 mask, or :func:`position_weights`) over ``normalizer``.

    Its gradient is the single-sample estimate of ∇ KL(p_S ‖ p_T); the value itself is not the KL.
    """
    advantage = (teacher_logprobs - student_logprobs).detach()
    return -(advantage * student_logprobs * mask).sum() / normalizer


def full_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """Exact Σ_v p_S(v)·(log p_S(v) − log p_T(v)) per position of the model itself (no sampling temperature: nothing
    is estimated from samples here), weighted by ``mask`` and summed, over ``normalizer``."""
    return _chunks(reverse_kl_sum, student_logits, teacher_logits, mask, chunk) / normalizer


def forward_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """Dense stage-1 loss: Σ_v p_T(v)·(log p_T(v) − log p_S(v)) per position, weighted by ``mask`` and summed, over
    ``normalizer``: the teacher's whole next-token distribution as the target instead of its one sampled token."""
    return _chunks(forward_kl_sum, student_logits, teacher_logits, mask, chunk) / normalizer


def _chunks(fn, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` (one of the ``*_sum`` losses) over sequence chunks of full logits, summed."""
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.shape[1], chunk):
        part = slice(start, start + chunk)
        total = total + fn(student[:, part], torch.log_softmax(teacher[:, part].float(), -1), weights[:, part])
    return total
