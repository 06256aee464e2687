"""Scoring a model on token batches: held-out NLL, KL and top-1 agreement against a teacher, and the routing.

Metrics are sums over the predicted (non-padding) tokens of all batches:

* ``heldout_nll`` / ``perplexity``: mean token cross-entropy of the model on the texts;
* against the teacher: ``kl_to_teacher`` = mean KL(teacher || model) over the vocabulary per token,
  ``top1_agreement``, ``teacher_nll`` and ``nll_delta_pct`` = 100 * (heldout_nll - teacher_nll) / teacher_nll;
* ``zero_share``: share of the routed top-K slots skipped (zero experts, or dropped by a baseline), overall and per
  router; ``expert_flops_ratio`` = routed-expert FLOPs per token / the static top-K's (= 1 - zero_share). The
  always-on shared expert, if any, is reported on its own line and never enters the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from ..runtime.zeda_dynamic_moe import RoutingRecorder, RoutingTally
from .data import Batch
from .flops import ExpertFlops

TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scores:
    """Sums over predicted tokens; the teacher's are left at 0 when there is no teacher. ``records``: the same sums
    per evaluated sequence, ``[tokens, nll, teacher_nll]`` in batch order (for intervals over records)."""

    tokens: int = 0
    nll: float = 0.0
    teacher_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    records: list[list[float]] = field(default_factory=list)

    def add(self, logits: torch.Tensor, teacher: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor) -> None:
        valid = mask[:, 1:].bool()
        targets = ids[:, 1:][valid]
        student = logits[:, :-1][valid]
        if teacher is not None and teacher.shape[-1] != logits.shape[-1]:
            raise BadInputError(
                f"the teacher has {teacher.shape[-1]} logits per token, the model {logits.shape[-1]}",
                expected="a teacher with the model's tokenizer and vocabulary",
                fix="pass the original model of this one as --teacher",
            )
        reference = teacher[:, :-1][valid] if teacher is not None else None
        owner = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(valid)[valid].cpu()
        per_row = torch.zeros(ids.shape[0], 2, dtype=torch.float64)
        for start in range(0, targets.numel(), 2048):  # bounded memory for large vocabularies
            rows = slice(start, start + 2048)
            self._add_rows(student[rows], None if reference is None else reference[rows], targets[rows],
                           owner[rows], per_row)  # fmt: skip
        counts = valid.sum(dim=1).tolist()
        self.records += [[n, nll, t_nll] for n, (nll, t_nll) in zip(counts, per_row.tolist(), strict=True)]

    def _add_rows(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        targets: torch.Tensor,
        owner: torch.Tensor,
        per_row: torch.Tensor,
    ) -> None:
        logp = F.log_softmax(student.float(), dim=-1)
        self.tokens += targets.numel()
        token_logp = logp.gather(1, targets[:, None])
        self.nll -= float(token_logp.sum())
        per_row[:, 0].index_add_(0, owner, -token_logp[:, 0].double().cpu())
        if teacher is None:
            return
        logq = F.log_softmax(teacher.float(), dim=-1)
        teacher_logp = logq.gather(1, targets[:, None])
        self.teacher_nll -= float(teacher_logp.sum())
        per_row[:, 1].index_add_(0, owner, -teacher_logp[:, 0].double().cpu())
        self.kl += float(F.kl_div(logp, logq, reduction="sum", log_target=True))
        self.agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())


def evaluate_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    num_experts: int,
    teacher: TeacherFn | None = None,
    track: Callable[[Sequence[Batch]], Any] = iter,
) -> tuple[Scores, RoutingTally]:
    """Score ``model`` (in runtime form) on ``batches``; the teacher's forward passes are not recorded."""
    scores, tally = Scores(), RoutingTally(num_experts)
    device = next(model.parameters()).device
    with RoutingRecorder(model) as recorder, torch.no_grad():
        for ids, mask in track(batches):
            ids, mask = ids.to(device), mask.to(device)
            reference = teacher(ids, mask) if teacher is not None else None
            recorder.clear()
            logits = model(input_ids=ids, attention_mask=mask).logits
            tally.add(recorder.records, mask)
            scores.add(logits, reference, ids, mask)
            recorder.clear()
    return scores, tally


def summarize(
    scores: Scores, tally: RoutingTally, flops: ExpertFlops, has_teacher: bool, per_record: bool = False
) -> dict[str, Any]:
    """The metrics of one evaluation; ``per_record`` adds ``records`` (tokens, NLL and teacher NLL sums per
    sequence, in batch order) for intervals over records."""
    n = max(scores.tokens, 1)
    nll = scores.nll / n
    out: dict[str, Any] = {"tokens": scores.tokens, "heldout_nll": nll, "perplexity": math.exp(min(nll, 700.0))}
    if has_teacher:
        teacher_nll = scores.teacher_nll / n
        out |= {
            "teacher_nll": teacher_nll,
            "teacher_perplexity": math.exp(min(teacher_nll, 700.0)),
            "nll_delta_pct": 100.0 * (nll - teacher_nll) / teacher_nll if teacher_nll else None,
            "kl_to_teacher": scores.kl / n,
            "top1_agreement": scores.agree / n,
        }
    kept = 1.0 - tally.share
    out |= {
        "zero_share": tally.share,
        "zero_share_per_layer": tally.per_layer(),
        "expert_flops_per_token": kept * flops.static_per_token,
        "static_expert_flops_per_token": flops.static_per_token,
        "expert_flops_ratio": kept,
        "shared_expert_flops_per_token": flops.shared_per_token,
    }
    return out | ({"records": _columns(scores.records, has_teacher)} if per_record else {})


def _columns(records: list[list[float]], has_teacher: bool) -> dict[str, list[float]]:
    columns = {"tokens": [int(r[0]) for r in records], "nll": [r[1] for r in records]}
    return columns | ({"teacher_nll": [r[2] for r in records]} if has_teacher else {})
