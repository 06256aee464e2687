"""Stage 2: on-policy distillation. The student samples (temperature 1), the frozen teacher scores every sampled
token, and the student minimises the reverse KL (sampled official form, or exact over the vocabulary) + L_GA."""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from torch import nn

from ..recipes import Stage2Section
from .data import (
    SequenceBatch,
    load_prompt_records,
    micro_batches,
    my_share,
    sequence_batch,
    special_ids,
    tokenize_prompts,
)
from .engines import Backend
from .generation import Sampler, SamplingSettings, Servers, generator
from .job import DistillJob
from .logits import Head, HeadFn, chunked_sum, token_logprobs
from .loop import MicroSteps, StageLoop, StepCallback
from .losses import position_weights, reverse_kl_sum, sampled_reverse_kl_loss
from .teachers import Need, Teacher, TeacherScores


def stage2_prompts(job: DistillJob, tokenizer: Any) -> list[list[int]]:
    prompts = [ids for _, ids in tokenize_prompts(load_prompt_records(job.recipe.data), tokenizer, job.recipe.data)]
    random.Random(job.recipe.stage2.seed).shuffle(prompts)
    return prompts


def run_stage2(
    job: DistillJob,
    model: Any,
    tokenizer: Any,
    backend: Backend,
    teacher: Teacher | None,
    servers: Servers,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    s2 = job.recipe.stage2
    prompts = stage2_prompts(job, tokenizer)
    loop = StageLoop.begin(job, backend.make_engine(model, s2.steps), s2.steps, on_step)
    if teacher is None:  # stage2.teacher_logprobs: engine
        teacher = generator(job.recipe).teacher_scorer(job, loop.engine, servers)
    sampler = generator(job.recipe).student_sampler(job, loop.engine, tokenizer, prompts, servers, backend, loop.start)
    sampler.sync(loop.engine.module, loop.start)  # the server starts from the weights training (re)starts from
    pad, _ = special_ids(tokenizer, loop.engine.module)
    for step in loop.steps():
        began = time.perf_counter()
        chosen = [prompts[(step * s2.prompts_per_step + j) % len(prompts)] for j in range(s2.prompts_per_step)]
        record = _opd_step(loop.micro_step(), teacher, pad, step_prompts(chosen, s2), s2, sampler, step_seed(s2, step))
        if step + 1 < loop.total:  # the next step samples from the updated weights
            record["sync_s"] = round(sampler.sync(loop.engine.module, step + 1), 4)
            if (stats := getattr(sampler, "last", None)) is not None:
                record.update(sync_bytes=stats.bytes, sync_buckets=stats.buckets)
        loop.end_step(step, record, began)
    return loop.finish()


def step_prompts(chosen: list[list[int]], s2: Stage2Section) -> list[list[int]]:
    """The step's sequences to sample, every prompt ``samples_per_prompt`` times, in one global order."""
    return [p for p in chosen for _ in range(s2.samples_per_prompt)]


def step_seed(s2: Stage2Section, step: int) -> int:
    return s2.seed + step * 1000


def teacher_need(s2: Stage2Section) -> Need:
    """The sampled loss needs the teacher's log-prob of each sampled token only; the exact KL its distribution."""
    return "tokens" if s2.loss == "sampled" else "distribution"


def opd_loss(
    head: Head | nn.Module,
    hidden: torch.Tensor,
    teacher: TeacherScores,
    batch: SequenceBatch,
    s2: Stage2Section,
    tokens: float,
    samples: float,
) -> tuple[torch.Tensor, float]:
    """One micro-batch's stage-2 loss (``s2.loss``, reduced by ``s2.reduction`` over the step's ``tokens`` /
    ``samples``) and its contribution to the logged per-token estimate of KL(student || teacher). The student's
    head runs chunk by chunk on ``hidden`` (``distill.logits``): no [B, S, V] tensor is kept for backward."""
    chunk = s2.kl_chunk_size
    weights = position_weights(batch.response_mask, s2.reduction, tokens, samples)
    if s2.loss == "sampled":
        # The student's log-probs at the temperature it sampled at (the teacher's at 1: it is the target).
        s_lp = token_logprobs(head, hidden, batch.targets, chunk, s2.temperature)
        t_lp = teacher.tokens
        assert t_lp is not None
        loss = sampled_reverse_kl_loss(s_lp, t_lp, weights, 1.0)
    else:
        assert teacher.distribution is not None
        loss = chunked_sum(head, hidden, chunk, reverse_kl_sum, teacher.distribution, weights)
        with torch.no_grad():
            s_lp = token_logprobs(head, hidden.detach(), batch.targets, chunk, s2.temperature)
            t_lp = teacher.distribution.float().gather(-1, batch.targets[..., None]).squeeze(-1)
    with torch.no_grad():
        estimate = float(((s_lp.detach() - t_lp) * batch.response_mask).sum()) / tokens
    return loss, estimate


def _head_loss(scores: TeacherScores, batch: SequenceBatch, s2: Stage2Section, tokens: float, samples: float
               ) -> tuple[HeadFn, list[float]]:  # fmt: skip
    """The stage-2 loss as the student's head computes it (``distill.logits``), and where its KL estimate lands."""
    estimate: list[float] = []

    def loss(hidden: torch.Tensor, head: Head) -> torch.Tensor:
        value, kl = opd_loss(head, hidden, scores, batch, s2, tokens, samples)
        estimate.append(kl)
        return value

    return loss, estimate


def _opd_step(
    micro: MicroSteps,
    teacher: Teacher,
    pad: int,
    prompts: list[list[int]],
    s2: Stage2Section,
    sampler: Sampler,
    seed: int,
) -> dict[str, Any]:
    engine = micro.engine
    settings = SamplingSettings(s2.max_new_tokens, s2.temperature, 1.0)
    # The whole step is sampled with one seed and split after: the samples do not depend on the number of ranks.
    sampled = sampler.sample(prompts, settings, seed)
    if hasattr(teacher, "prepare"):  # a teacher server scores the whole step's samples in one request
        teacher.prepare(prompts, [r for r, _ in sampled])
    offset = engine.rank * (len(prompts) // engine.world_size)
    prompts = my_share(prompts, engine.rank, engine.world_size)
    responses = [r for r, _ in my_share(sampled, engine.rank, engine.world_size)]
    local_tokens = float(sum(len(r) for r in responses))
    # The step's totals as each rank counts them (ranks' gradients are averaged, not summed).
    tokens = max(engine.all_reduce_sum(local_tokens), 1.0) / engine.world_size
    samples = engine.all_reduce_sum(float(len(responses))) / engine.world_size
    all_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    step_tokens = engine.all_reduce_sum(float(all_tokens)) / engine.world_size
    for idx in micro_batches(list(range(len(prompts))), s2.micro_batch_size):
        batch = sequence_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad).to(engine.device)
        token_mask = batch.attention_mask.flatten().bool()
        scores = teacher.score(batch, teacher_need(s2), s2.kl_chunk_size, rows=[offset + i for i in idx])
        head_loss, estimate = _head_loss(scores, batch, s2, tokens, samples)
        kl_loss, rec = micro.forward(head_loss, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids)  # fmt: skip
        kl_estimate = estimate[0]
        share = float(token_mask.sum()) / max(step_tokens, 1.0)
        micro.backward(kl_loss, rec, token_mask, share, {"kl": kl_estimate})
    return {**micro.record(engine.step()), "response_tokens": int(local_tokens), "step_tokens": int(all_tokens)}
