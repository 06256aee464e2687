"""A deliberately plain reference for a dynamic MoE block (docs/method.md): route token by token over N+Z experts, run
every chosen real expert with an explicit loop, give zero slots no contribution (their weight still counts in the
renormalisation), add the shared expert. Independent of zeda's runtime code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _route_softmax(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = torch.topk(probs, k)
    if normalize:
        weights = weights / weights.sum()
    return weights, ids


def _route_sigmoid(logits, bias, k, normalize, scale, n_group, topk_group):
    scores = torch.sigmoid(logits.double())
    choice = scores + bias.double()
    if n_group > 1:
        groups = choice.view(n_group, -1)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(n_group, dtype=torch.bool)
        keep[group_score.topk(topk_group).indices] = True
        choice = torch.where(keep[:, None].expand_as(groups).reshape(-1), choice, torch.tensor(float("-inf")))
    ids = torch.topk(choice, k).indices
    weights = scores[ids]
    if normalize:
        weights = weights / (weights.sum() + 1e-20)
    return weights * scale, ids


def _expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    inter = experts.down_proj.shape[-1]
    gate_w, up_w = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
    hidden = F.silu(x.double() @ gate_w.double().T) * (x.double() @ up_w.double().T)
    return hidden @ experts.down_proj[e].double().T


def reference_block(block, x: torch.Tensor, spec: dict, shared: str | None) -> tuple[torch.Tensor, int]:
    """Output of one dynamic MoE block for tokens ``x`` [T, H] and the number of zero slots chosen."""
    n, z, k = spec["num_experts"], spec["num_zero_experts"], spec["top_k"]
    weight = block.gate.weight
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    zero_slots = 0
    for t in range(x.shape[0]):
        logits = x[t].double() @ weight.double().T
        assert logits.shape[0] == n + z
        if spec["scoring"] == "softmax":
            weights, ids = _route_softmax(logits, k, spec["normalize"])
        else:
            weights, ids = _route_sigmoid(
                logits, block.gate.e_score_correction_bias, k, spec["normalize"], spec["routed_scaling_factor"],
                spec["n_group"], spec["topk_group"],
            )  # fmt: skip
        for w, e in zip(weights.tolist(), ids.tolist(), strict=True):
            if e >= n:
                zero_slots += 1
                continue
            out[t] += w * _expert(block.experts, e, x[t])
    if shared == "ungated":
        out += block.shared_experts(x).double()
    elif shared == "gated":
        out += torch.sigmoid(block.shared_expert_gate(x)).double() * block.shared_expert(x).double()
    return out, zero_slots
