"""Stage 2: on-policy distillation. The student samples (temperature 1), the frozen teacher scores every sampled
token, and the student minimises the reverse KL (sampled official form, or exact over the vocabulary) + L_GA."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from ..recipes import Stage2Section
from ..runtime.zeda_dynamic_moe import RouterSpec, RoutingRecorder, RoutingTally
from .data import load_prompt_records, micro_batches
from .engines import Engine, EngineFactory
from .generation import Sampler, student_sampler
from .job import DistillJob
from .loop import StageLoop, StepCallback
from .losses import GroupBalance, full_reverse_kl_loss, position_weights, sampled_reverse_kl_loss, token_logprobs
from .rollout import tokenize_prompts
from .sampling import SamplingSettings, SequenceBatch, sequence_batch, special_ids
from .teachers import Teacher


def stage2_prompts(job: DistillJob, tokenizer: Any) -> list[list[int]]:
    prompts = [ids for _, ids in tokenize_prompts(load_prompt_records(job.recipe.data), tokenizer, job.recipe.data)]
    random.Random(job.recipe.stage2.seed).shuffle(prompts)
    return prompts


def run_stage2(
    job: DistillJob,
    model: Any,
    teacher: Teacher,
    tokenizer: Any,
    make_engine: EngineFactory,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    s2 = job.recipe.stage2
    prompts = stage2_prompts(job, tokenizer)
    loop = StageLoop.begin(job, make_engine(model, s2.steps), s2.steps, on_step)
    sampler = student_sampler(job, loop.engine, tokenizer, prompts)
    sampler.sync(loop.engine.module)  # the engine starts from the weights training starts (or resumes) from
    for step in loop.steps():
        began = time.perf_counter()
        chosen = [prompts[(step * s2.prompts_per_step + j) % len(prompts)] for j in range(s2.prompts_per_step)]
        rank, world = loop.engine.rank, loop.engine.world_size
        mine = [p for p in chosen[rank::world] for _ in range(s2.samples_per_prompt)]
        seed = s2.seed + step * 1000
        record = _opd_step(loop.engine, teacher, tokenizer, mine, job, loop.balance, loop.spec, sampler, seed)
        if step + 1 < loop.total:  # the next step samples from the updated weights
            record["sync_s"] = round(sampler.sync(loop.engine.module), 4)
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
    engine: Engine,
    teacher: Teacher,
    tokenizer: Any,
    prompts: list[list[int]],
    job: DistillJob,
    balance: GroupBalance,
    spec: RouterSpec,
    sampler: Sampler,
    seed: int,
) -> dict[str, Any]:
    s2 = job.recipe.stage2
    pad, _ = special_ids(tokenizer, engine.module)
    settings = SamplingSettings(s2.max_new_tokens, s2.temperature, 1.0)
    sampled = sampler.sample(prompts, settings, seed + engine.rank)
    responses = [r for r, _ in sampled]
    local_tokens = float(sum(len(r) for r in responses))
    # The step's totals as each rank counts them (ranks' gradients are averaged, not summed).
    tokens = max(engine.all_reduce_sum(local_tokens), 1.0) / engine.world_size
    samples = engine.all_reduce_sum(float(len(responses))) / engine.world_size
    stats = RoutingTally(spec.num_experts)
    totals = {"loss": 0.0, "kl": 0.0, "aux": 0.0}
    all_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    for idx in micro_batches(list(range(len(prompts))), s2.micro_batch_size):
        batch = sequence_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad).to(engine.device)
        token_mask = batch.attention_mask.flatten().bool()
        t_logits = teacher.logits(batch)
        with RoutingRecorder(engine.module, keep_logits=True) as rec:
            s_logits = engine.forward(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).logits
        kl_loss, kl_estimate = opd_loss(s_logits, t_logits, batch, s2, tokens, samples)
        share = float(token_mask.sum()) / max(all_tokens, 1)
        aux = balance.loss([r[1] for r in rec.records], [r[2] for r in rec.records], spec.scoring, token_mask) * share
        engine.backward(kl_loss + aux)
        stats.add(rec.records, token_mask)
        totals["kl"] += kl_estimate
        totals["loss"] += float(kl_loss.detach() + aux.detach())
        totals["aux"] += float(aux.detach())
    grad_norm = engine.step()
    zero = engine.all_reduce_sum(float(sum(stats.skipped.values())))
    slots = engine.all_reduce_sum(float(sum(stats.slots.values())))
    mean = {k: engine.all_reduce_sum(v) / engine.world_size for k, v in totals.items()}
    return {
        "loss": round(mean["loss"], 6),
        "kl": round(mean["kl"], 6),
        "aux": round(mean["aux"], 6),
        "zero_share": round(zero / max(slots, 1.0), 4),
        "zero_share_per_layer": {k: round(v, 4) for k, v in stats.per_layer().items()},
        "grad_norm": round(grad_norm, 4),
        "response_tokens": int(local_tokens),
        "step_tokens": int(all_tokens),
    }
