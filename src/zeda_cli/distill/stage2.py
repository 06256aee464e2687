"""Stage 2: on-policy distillation. The student samples (temperature 1), the frozen teacher scores every sampled
token, and the student minimises the reverse KL (sampled official form, or exact over the vocabulary) + L_GA."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..recipes import Stage2Section
from .data import SequenceBatch, load_prompt_records, micro_batches, sequence_batch, special_ids, tokenize_prompts
from .engines import EngineFactory
from .generation import Sampler, SamplingSettings, Servers, generator
from .job import DistillJob
from .loop import MicroSteps, StageLoop, StepCallback
from .losses import full_reverse_kl_loss, position_weights, sampled_reverse_kl_loss, token_logprobs
from .teachers import Teacher


def stage2_prompts(job: DistillJob, tokenizer: Any) -> list[list[int]]:
    prompts = [ids for _, ids in tokenize_prompts(load_prompt_records(job.recipe.data), tokenizer, job.recipe.data)]
    random.Random(job.recipe.stage2.seed).shuffle(prompts)
    return prompts


def run_stage2(
    job: DistillJob,
    model: Any,
    tokenizer: Any,
    make_engine: EngineFactory,
    teacher: Teacher | None,
    servers: Servers,
    on_step: StepCallback | None = None,
    world: int = 1,
) -> dict[str, Any]:
    s2 = job.recipe.stage2
    assert teacher is not None, "stage 2 scores its samples with the teacher"
    prompts = stage2_prompts(job, tokenizer)
    loop = StageLoop.begin(job, make_engine(model, s2.steps), s2.steps, on_step)
    sampler = generator(job.recipe).student_sampler(job, loop.engine, tokenizer, prompts, servers)
    sampler.sync(
        loop.engine.module, loop.start
    )  # the server starts from the weights training starts (or resumes) from
    pad, _ = special_ids(tokenizer, loop.engine.module)
    for step in loop.steps():
        began = time.perf_counter()
        chosen = [prompts[(step * s2.prompts_per_step + j) % len(prompts)] for j in range(s2.prompts_per_step)]
        rank, world = loop.engine.rank, loop.engine.world_size
        mine = [p for p in chosen[rank::world] for _ in range(s2.samples_per_prompt)]
        record = _opd_step(loop.micro_step(), teacher, pad, mine, s2, sampler, s2.seed + step * 1000)
        if step + 1 < loop.total:  # the next step samples from the updated weights
            record["sync_s"] = round(sampler.sync(loop.engine.module, step + 1), 4)
        loop.end_step(step, record, began)
    return loop.finish()


def opd_loss(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    batch: SequenceBatch,
    s2: Stage2Section,
    tokens: float,
    samples: float,
) -> tuple[torch.Tensor, float]:
    """One micro-batch's stage-2 loss (``s2.loss``, reduced by ``s2.reduction`` over the step's ``tokens`` /
    ``samples``) and its contribution to the logged per-token estimate of KL(student || teacher)."""
    # The student's log-probs at the temperature it sampled at (the teacher's at 1: it is the target).
    s_lp = token_logprobs(s_logits, batch.targets, s2.kl_chunk_size, s2.temperature)
    t_lp = token_logprobs(t_logits, batch.targets, s2.kl_chunk_size)
    weights = position_weights(batch.response_mask, s2.reduction, tokens, samples)
    if s2.loss == "sampled":
        loss = sampled_reverse_kl_loss(s_lp, t_lp, weights, 1.0)
    else:
        loss = full_reverse_kl_loss(s_logits, t_logits, weights, 1.0, s2.kl_chunk_size)
    with torch.no_grad():
        estimate = float(((s_lp - t_lp) * batch.response_mask).sum()) / tokens
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
    responses = [r for r, _ in sampler.sample(prompts, settings, seed + engine.rank)]
    local_tokens = float(sum(len(r) for r in responses))
    # The step's totals as each rank counts them (ranks' gradients are averaged, not summed).
    tokens = max(engine.all_reduce_sum(local_tokens), 1.0) / engine.world_size
    samples = engine.all_reduce_sum(float(len(responses))) / engine.world_size
    all_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    for idx in micro_batches(list(range(len(prompts))), s2.micro_batch_size):
        batch = sequence_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad).to(engine.device)
        token_mask = batch.attention_mask.flatten().bool()
        t_logits = teacher.logits(batch)
        out, rec = micro.forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids)  # fmt: skip
        kl_loss, kl_estimate = opd_loss(out.logits, t_logits, batch, s2, tokens, samples)
        share = float(token_mask.sum()) / max(all_tokens, 1)
        micro.backward(kl_loss, rec, token_mask, share, {"kl": kl_estimate})
    return {**micro.record(engine.step()), "response_tokens": int(local_tokens), "step_tokens": int(all_tokens)}
