"""Stage 1: supervised fine-tuning on teacher rollouts + L_GA: token-level CE on the sampled response tokens
(official), or the dense forward KL to the frozen teacher's next-token distributions (``stage1.loss: kl``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..runtime.zeda_dynamic_moe import RouterSpec, RoutingRecorder, RoutingTally
from .data import collate_sft, micro_batches, read_rollouts, sft_examples, step_batches
from .engines import Engine, EngineFactory
from .job import DistillJob
from .loop import StageLoop, StepCallback
from .losses import GroupBalance, forward_kl_loss, response_cross_entropy
from .sampling import SequenceBatch
from .teachers import Teacher


def plan_stage1(job: DistillJob) -> tuple[list[Any], list[list[int]]]:
    s1 = job.recipe.stage1
    rollouts = read_rollouts(Path(job.rollouts or ""))
    examples = sft_examples(rollouts, s1.max_seq_len)
    if not examples:
        from ..errors import BadInputError

        raise BadInputError(
            f"no trainable examples in {job.rollouts}", expected="rollouts with non-empty responses", fix="regenerate"
        )
    plan = step_batches(len(examples), s1.global_batch_size, s1.epochs, s1.seed)
    if _world_size() > 1:  # ranks must run equal micro-batch counts: drop a final partial batch
        plan = [b for b in plan if len(b) == s1.global_batch_size]
    return examples, plan[: s1.max_steps] if s1.max_steps else plan


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def run_stage1(
    job: DistillJob,
    model: Any,
    tokenizer: Any,
    make_engine: EngineFactory,
    on_step: StepCallback | None = None,
    teacher: Teacher | None = None,
) -> dict[str, Any]:
    """``teacher`` gives the frozen original's logits; ``stage1.loss: kl`` needs it, ``ce`` does not."""
    s1 = job.recipe.stage1
    target = Stage1Target(s1.loss, s1.kl_positions, s1.kl_chunk_size, teacher)
    examples, plan = plan_stage1(job)
    loop = StageLoop.begin(job, make_engine(model, len(plan)), len(plan), on_step)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for step in loop.steps():
        began = time.perf_counter()
        mine = [examples[i] for i in plan[step][loop.engine.rank :: loop.engine.world_size]]
        record = _train_step(loop.engine, mine, pad, s1.micro_batch_size, loop.balance, loop.spec, target)
        loop.end_step(step, record, began)
    return loop.finish()


class Stage1Target:
    """What stage 1 fits on one micro-batch: the sampled tokens (CE) or the teacher's distributions (KL)."""

    def __init__(self, loss: str, positions: str, chunk: int, teacher: Teacher | None):
        if loss == "kl" and teacher is None:
            raise ValueError("stage1.loss kl needs the frozen teacher")
        self.kind, self.every, self.chunk, self.teacher = loss, loss == "kl" and positions == "all", chunk, teacher

    def count(self, example: Any) -> int:
        """Trained positions of one example (a position predicts the next token)."""
        return len(example.input_ids) - 1 if self.every else sum(t != -100 for t in example.labels[1:])

    def weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, S] 1 where position t is trained: it has a next token (all), or that token is a response token."""
        mask = batch["attention_mask"]
        if self.every:
            return torch.cat([mask[:, 1:], mask.new_zeros(len(mask), 1)], 1).float()
        return (batch["labels"] != -100).float()

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Computed before the student's forward: a router-view teacher swaps rows in the student's own weights."""
        if self.teacher is None or self.kind == "ce":
            return None
        mask = batch["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        view = SequenceBatch(batch["input_ids"], mask, positions, batch["labels"], self.weights(batch))
        return self.teacher.logits(view)

    def loss(
        self, logits: torch.Tensor, teacher: torch.Tensor | None, batch: dict[str, torch.Tensor], normalizer: float
    ) -> torch.Tensor:
        if teacher is None:
            return response_cross_entropy(logits, batch["labels"], normalizer)
        return forward_kl_loss(logits, teacher, self.weights(batch), normalizer, self.chunk)


def _train_step(
    engine: Engine,
    examples: list[Any],
    pad: int,
    micro: int,
    balance: GroupBalance,
    spec: RouterSpec,
    target: Stage1Target,
) -> dict[str, Any]:
    n_targets = sum(target.count(e) for e in examples)
    n_tokens = sum(len(e.input_ids) for e in examples)
    global_targets = engine.all_reduce_sum(float(n_targets))
    stats = RoutingTally(spec.num_experts)
    fit_total = aux_total = 0.0
    for chunk in micro_batches(examples, micro):
        batch = {k: v.to(engine.device) for k, v in collate_sft(chunk, pad).items()}
        token_mask = batch["attention_mask"].flatten().bool()
        teacher = target.teacher_logits(batch)
        with RoutingRecorder(engine.module, keep_logits=True) as rec:
            out = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        # Per-position mean over the global batch (x world size: ranks' gradients are averaged, not summed).
        fit = target.loss(out.logits, teacher, batch, global_targets / engine.world_size)
        share = float(token_mask.sum()) / n_tokens  # L_GA per micro-batch, weighted by its share of the tokens
        aux = balance.loss([r[1] for r in rec.records], [r[2] for r in rec.records], spec.scoring, token_mask) * share
        engine.backward(fit + aux)
        stats.add(rec.records, token_mask)
        fit_total += float(fit.detach())
        aux_total += float(aux.detach())
    grad_norm = engine.step()
    zero = engine.all_reduce_sum(float(sum(stats.skipped.values())))
    slots = engine.all_reduce_sum(float(sum(stats.slots.values())))
    fit_mean = engine.all_reduce_sum(fit_total) / engine.world_size  # each rank's value estimates the global mean
    aux_mean = engine.all_reduce_sum(aux_total) / engine.world_size
    return {
        "loss": round(fit_mean + aux_mean, 6),
        target.kind: round(fit_mean, 6),  # "ce" or "kl"
        "aux": round(aux_mean, 6),
        "zero_share": round(zero / max(slots, 1.0), 4),
        "zero_share_per_layer": {k: round(v, 4) for k, v in stats.per_layer().items()},
        "grad_norm": round(grad_norm, 4),
        "step_tokens": n_tokens,
    }
