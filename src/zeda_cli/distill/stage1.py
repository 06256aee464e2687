"""Stage 1: supervised fine-tuning on teacher rollouts + L_GA: token-level CE on the sampled response tokens
(official), or the dense forward KL to the frozen teacher's next-token distributions (``stage1.loss: kl``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from .data import SequenceBatch, collate_sft, micro_batches, my_share, read_rollouts, sft_examples, step_batches
from .engines import Backend
from .generation import Servers
from .job import DistillJob
from .logits import Head, HeadFn, chunked_sum
from .loop import MicroSteps, StageLoop, StepCallback
from .losses import cross_entropy_sum, forward_kl_sum
from .teachers import Teacher, TeacherScores


def plan_stage1(job: DistillJob, world: int) -> tuple[list[Any], list[list[int]]]:
    s1 = job.recipe.stage1
    rollouts = read_rollouts(Path(job.rollouts or ""))
    examples = sft_examples(rollouts, s1.max_seq_len)
    if not examples:
        raise BadInputError(
            f"no trainable examples in {job.rollouts}", expected="rollouts with non-empty responses", fix="regenerate"
        )
    plan = step_batches(len(examples), s1.global_batch_size, s1.epochs, s1.seed)
    if world > 1:  # ranks must run equal micro-batch counts: drop a final partial batch
        plan = [b for b in plan if len(b) == s1.global_batch_size]
    return examples, plan[: s1.max_steps] if s1.max_steps else plan


def run_stage1(
    job: DistillJob,
    model: Any,
    tokenizer: Any,
    backend: Backend,
    teacher: Teacher | None,
    servers: Servers,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """``teacher`` gives the frozen original's logits; ``stage1.loss: kl`` needs it, ``ce`` does not."""
    s1 = job.recipe.stage1
    target = Stage1Target(s1.loss, s1.kl_positions, s1.kl_chunk_size, teacher)
    examples, plan = plan_stage1(job, backend.world_size)
    loop = StageLoop.begin(job, backend.make_engine(model, len(plan)), len(plan), on_step)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for step in loop.steps():
        began = time.perf_counter()
        mine = [examples[i] for i in my_share(plan[step], loop.engine.rank, loop.engine.world_size)]
        record = _train_step(loop.micro_step(), mine, pad, s1.micro_batch_size, target)
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

    def teacher_scores(self, batch: dict[str, torch.Tensor]) -> TeacherScores | None:
        """Computed before the student's forward (a router-view teacher routes through the student's own weights)."""
        if self.teacher is None or self.kind == "ce":
            return None
        mask = batch["attention_mask"]
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        view = SequenceBatch(batch["input_ids"], mask, positions, batch["labels"], self.weights(batch))
        return self.teacher.score(view, "distribution", self.chunk)

    def loss(self, teacher: TeacherScores | None, batch: dict[str, torch.Tensor], normalizer: float) -> HeadFn:
        """The micro-batch's CE or KL over ``normalizer`` positions, computed by the head chunk by chunk."""

        def fit(hidden: torch.Tensor, head: Head) -> torch.Tensor:
            if teacher is None:
                return chunked_sum(head, hidden, self.chunk, cross_entropy_sum, batch["labels"]) / normalizer
            total = chunked_sum(head, hidden, self.chunk, forward_kl_sum, teacher.distribution, self.weights(batch))
            return total / normalizer

        return fit


def _train_step(micro: MicroSteps, examples: list[Any], pad: int, size: int, target: Stage1Target) -> dict[str, Any]:
    engine = micro.engine
    n_tokens = sum(len(e.input_ids) for e in examples)
    # The step's token count as each rank should weigh its micro-batches' L_GA (ranks' gradients are averaged).
    step_tokens = engine.all_reduce_sum(float(n_tokens)) / engine.world_size
    global_targets = engine.all_reduce_sum(float(sum(target.count(e) for e in examples)))
    for chunk in micro_batches(examples, size):
        batch = {k: v.to(engine.device) for k, v in collate_sft(chunk, pad).items()}
        token_mask = batch["attention_mask"].flatten().bool()
        teacher = target.teacher_scores(batch)
        # Per-position mean over the global batch (x world size: ranks' gradients are averaged, not summed).
        loss = target.loss(teacher, batch, global_targets / engine.world_size)
        fit, rec = micro.forward(loss, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        share = float(token_mask.sum()) / step_tokens  # L_GA per micro-batch, weighted by its share of the tokens
        micro.backward(fit, rec, token_mask, share, {target.kind: float(fit.detach())})  # "ce" or "kl"
    return {**micro.record(engine.step()), "step_tokens": n_tokens}
