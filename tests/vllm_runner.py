"""Runs inside .venv-vllm (vLLM + zeda-vllm), driven by tests/test_vllm_*.py: serves folders with vllm.LLM and writes
prompt log-probs, greedy continuations and zeda-vllm's per-layer routing counters as JSON.

    .venv-vllm/bin/python tests/vllm_runner.py JOBS.json OUT.json

JOBS.json: {"jobs": [{"name", "model", "prompts": [[token ids]], "max_tokens", "enforce_eager", "dtype",
"max_model_len"}]}. Every job runs in this one process (engine in-process, uni executor), one after another, so
vLLM is imported once. A job that fails records its error line instead of results; the next job still runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _logprob_of(entry: dict[int, Any] | None, token: int) -> float | None:
    return None if entry is None else float(entry[token].logprob)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from zeda_vllm.model import reset_routing_stats, routing_stats

    began = time.perf_counter()
    llm = LLM(
        job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=job.get("enforce_eager", True),
        max_model_len=job.get("max_model_len", 512),
        distributed_executor_backend="uni",
        enable_prefix_caching=False,  # every prompt token goes through the model: the pair counts are exact
        seed=0,
    )
    started = time.perf_counter()
    try:
        reset_routing_stats_result = llm.apply_model(reset_routing_stats)  # start-up profiling runs don't count
        params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8), prompt_logprobs=0, logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result: dict[str, Any] = {"prompt_logprobs": [], "tokens": [], "token_logprobs": []}
        for ids, out in zip(job["prompts"], outputs, strict=True):
            result["prompt_logprobs"].append([_logprob_of(e, t) for e, t in zip(out.prompt_logprobs, ids)][1:])
            gen = out.outputs[0]
            result["tokens"].append(list(gen.token_ids))
            result["token_logprobs"].append([_logprob_of(e, t) for e, t in zip(gen.logprobs, gen.token_ids)])
        result["stats"] = llm.apply_model(routing_stats)[0]
        result["dynamic_blocks"] = reset_routing_stats_result[0]
        result["startup_s"] = started - began
        result["run_s"] = time.perf_counter() - started
        return result
    finally:
        del llm
        _cleanup()


def _cleanup() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def main(jobs_path: str, out_path: str) -> None:
    jobs = json.loads(open(jobs_path).read())["jobs"]
    results = {}
    for job in jobs:
        try:
            results[job["name"]] = run_job(job)
        except Exception as err:  # recorded for the test, which asserts on the message
            results[job["name"]] = {
                "error": str(err),
                "error_type": type(err).__name__,
                "traceback": traceback.format_exc()[-3000:],
            }
            _cleanup()
        print(f"[vllm_runner] {job['name']}: {'error' if 'error' in results[job['name']] else 'ok'}", flush=True)
        with open(out_path, "w") as f:  # written after every job: a crash still leaves the finished ones
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
