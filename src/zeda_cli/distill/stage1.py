"""Stage 1: supervised fine-tuning on teacher rollouts (token-level CE on response tokens) + L_GA."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..runtime.zeda_dynamic_moe import RouterSpec, RoutingRecorder, RoutingTally
from .data import collate_sft, micro_batches, read_rollouts, sft_examples, step_batches
from .engines import Engine, EngineFactory
from .job import DistillJob
from .loop import StageLoop, StepCallback
from .losses import GroupBalance, response_cross_entropy


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
    job: DistillJob, model: Any, tokenizer: Any, make_engine: EngineFactory, on_step: StepCallback | None = None
) -> dict[str, Any]:
    s1 = job.recipe.stage1
    examples, plan = plan_stage1(job)
    loop = StageLoop.begin(job, make_engine(model, len(plan)), len(plan), on_step)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for step in loop.steps():
        began = time.perf_counter()
        mine = [examples[i] for i in plan[step][loop.engine.rank :: loop.engine.world_size]]
        record = _train_step(loop.engine, mine, pad, s1.micro_batch_size, loop.balance, loop.spec)
        loop.end_step(step, record, began)
    return loop.finish()


def _train_step(
    engine: Engine, examples: list[Any], pad: int, micro: int, balance: GroupBalance, spec: RouterSpec
) -> dict[str, Any]:
    n_targets = sum(sum(t != -100 for t in e.labels[1:]) for e in examples)
    n_tokens = sum(len(e.input_ids) for e in examples)
    global_targets = engine.all_reduce_sum(float(n_targets))
    stats = RoutingTally(spec.num_experts)
    ce_total = aux_total = 0.0
    for chunk in micro_batches(examples, micro):
        batch = {k: v.to(engine.device) for k, v in collate_sft(chunk, pad).items()}
        token_mask = batch["attention_mask"].flatten().bool()
        with RoutingRecorder(engine.module, keep_logits=True) as rec:
            out = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        # Per-token CE over the global batch (x world size: ranks' gradients are averaged, not summed).
        ce = response_cross_entropy(out.logits, batch["labels"], global_targets / engine.world_size)
        share = float(token_mask.sum()) / n_tokens  # L_GA per micro-batch, weighted by its share of the tokens
        aux = balance.loss([r[1] for r in rec.records], [r[2] for r in rec.records], spec.scoring, token_mask) * share
        engine.backward(ce + aux)
        stats.add(rec.records, token_mask)
        ce_total += float(ce.detach())
        aux_total += float(aux.detach())
    grad_norm = engine.step()
    zero = engine.all_reduce_sum(float(sum(stats.skipped.values())))
    slots = engine.all_reduce_sum(float(sum(stats.slots.values())))
    ce_mean = engine.all_reduce_sum(ce_total) / engine.world_size  # each rank's value estimates the global mean
    aux_mean = engine.all_reduce_sum(aux_total) / engine.world_size
    return {
        "loss": round(ce_mean + aux_mean, 6),
        "ce": round(ce_mean, 6),
        "aux": round(aux_mean, 6),
        "zero_share": round(zero / max(slots, 1.0), 4),
        "zero_share_per_layer": {k: round(v, 4) for k, v in stats.per_layer().items()},
        "grad_norm": round(grad_norm, 4),
        "step_tokens": n_tokens,
    }
