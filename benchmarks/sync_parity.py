"""The student's vLLM server stays on the trainer's weights: three router-only, then three full-parameter steps, each
synced module by module in buckets smaller than one sync (the probe checks every sync); after each three, the
server's log-probs of its own samples are compared with the trainer's model (synced) and with the weights the server
started from (stale), fp32. Run by ``benchmarks/generation.py --parts parity`` and by tests/test_generation_vllm.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# (trainable, size of one step's change, bucket MB): buckets smaller than one sync, so every sync is several
# (a router-only sync of the bundled model is ~60 KB)
PHASES = (("router", 0.05, 0.004), ("full", 0.01, 0.25))
TOLERANCE = 1e-3  # fp32 engine vs trainer


def logprobs_of(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], -1)
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def served_samples(pool: Any, prompts: list[list[int]], tokens: int = 24) -> list[dict[str, Any]]:
    body = {"prompts": prompts, "max_tokens": tokens, "temperature": 1.0, "top_p": 1.0, "seed": 5}
    return [row[0] for row in pool.clients[0].call("/generate", body)["samples"]]


def max_difference(model: Any, prompts: list[list[int]], samples: list[dict[str, Any]]) -> float:
    return max(float((logprobs_of(model, p, s["token_ids"]) - torch.tensor(s["logprobs"])).abs().max())
               for p, s in zip(prompts, samples, strict=True))  # fmt: skip


def perturb(model: Any, generator: torch.Generator, scale: float) -> None:
    """An optimizer step's worth of change to every trainable tensor."""
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def local_sync_plan(model: Any, pool: Any, trainable: str, dtype: str, bucket_mb: float, staging: Path) -> Any:
    """The sync of ``model``'s ``trainable`` modules (unsharded, one process) into ``pool``'s server, probed after
    every sync."""
    from zeda_cli.distill.generation import vllm
    from zeda_cli.distill.generation.sync import FileTransport, sync_units
    from zeda_cli.distill.student import select_trainable

    select_trainable(model, trainable)
    return vllm.SyncPlan(sync_units(model, trainable), vllm._whole, dtype, int(bucket_mb * 2**20),
                         FileTransport(pool.load_weights, staging), check_every=1)  # fmt: skip


def sync_parity(folder: Path, prompts: list[list[int]], work: Path, gen: Any, steps: int = 3) -> list[dict[str, Any]]:
    """One row per phase of ``PHASES``: the synced and stale max |log-prob difference| and every sync's cost."""
    from zeda_cli import load_model
    from zeda_cli.distill.generation import vllm

    model = load_model(folder, dtype=torch.float32).eval()
    start = load_model(folder, dtype=torch.float32).eval()
    log = work / "parity-server.log"
    spec = vllm.ServerSpec(str(folder), "float32", 256, log, vllm.serving_overrides(str(folder)))
    generator = torch.Generator().manual_seed(0)
    rows, step = [], 0
    with vllm.running_servers([spec], gen) as pool:
        for trainable, scale, bucket_mb in PHASES:
            plan = local_sync_plan(model, pool, trainable, "float32", bucket_mb, work)
            sampler = vllm.VllmSampler(pool, prompts[0], TOLERANCE, None, plan, start=step)
            sampler.sync(model, step)  # the probe of the weights the server holds now
            syncs = []
            for _ in range(steps):
                perturb(model, generator, scale)
                step += 1
                sampler.sync(model, step)  # raises when the probe after it disagrees
                last = sampler.last
                syncs.append({"bytes": last.bytes, "buckets": last.buckets, "seconds": round(last.seconds, 4)})
            samples = served_samples(pool, prompts)
            rows.append({"trainable": trainable, "steps": steps,
                         "synced_max_abs": max_difference(model, prompts, samples),
                         "stale_max_abs": max_difference(start, prompts, samples), "tolerance": TOLERANCE,
                         "syncs": syncs})  # fmt: skip
    return rows
