"""Runs inside .venv-vllm (vLLM + zeda-vllm), driven by tests/test_vllm_*.py: serves folders with vllm.LLM and writes
prompt log-probs, greedy continuations and zeda-vllm's per-layer routing counters as JSON.

    .venv-vllm/bin/python tests/vllm_runner.py JOBS.json OUT.json

JOBS.json: {"jobs": [{"name", "model", "prompts": [[token ids]], "max_tokens", "enforce_eager", "max_model_len",
"custom_ops", "dial", "tensor_parallel_size", "steps"}]}. Every job runs in this one process (engine core
in-process; the uni executor, or one worker process per rank with tensor_parallel_size > 1), one after another, so
vLLM is imported once. The routing counters and in-place loads go through zeda-vllm's worker extension
(``collective_rpc``), which works with both executors. ``steps``: after the first results, for each step load its
safetensors files in place (``zeda_load_weights``) and generate again, greedy and sampled. A job that fails records
its error line instead of results; the next job still runs.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _logprob_of(entry: dict[int, Any] | None, token: int) -> float | None:
    return None if entry is None else float(entry[token].logprob)


def _generate(llm: Any, job: dict[str, Any], temperature: float = 0.0, seed: int | None = None) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.collective_rpc("zeda_reset_routing_stats")  # start-up profiling and earlier runs don't count
    params = SamplingParams(temperature=temperature, max_tokens=job["max_tokens"], ignore_eos=True, prompt_logprobs=0,
                            logprobs=0, seed=seed)  # fmt: skip
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result: dict[str, Any] = {"prompt_logprobs": [], "tokens": [], "token_logprobs": []}
    for ids, out in zip(job["prompts"], outputs, strict=True):
        result["prompt_logprobs"].append(
            [_logprob_of(e, t) for e, t in zip(out.prompt_logprobs, ids, strict=True)][1:]
        )
        gen = out.outputs[0]
        result["tokens"].append(list(gen.token_ids))
        result["token_logprobs"].append([_logprob_of(e, t) for e, t in zip(gen.logprobs, gen.token_ids, strict=True)])
    ranks = llm.collective_rpc("zeda_routing_stats")
    result["stats"], result["stats_per_rank"] = ranks[0], ranks
    return result


def _is_mla(folder: str) -> bool:
    return bool(json.loads((Path(folder) / "config.json").read_text()).get("kv_lora_rank"))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM
    from vllm.platforms import current_platform
    from zeda_vllm.compat import cpu_mla_attention_backend

    tp = int(job.get("tensor_parallel_size") or 1)
    if tp > 1 and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":  # as zeda_vllm.engine does
        from zeda_vllm.engine import bind_cpu_threads

        bind_cpu_threads(tp)
    began = time.perf_counter()
    llm = LLM(
        job["model"],
        dtype="float32",
        enforce_eager=job["enforce_eager"],
        max_model_len=job["max_model_len"],
        tensor_parallel_size=tp,
        distributed_executor_backend="uni" if tp == 1 else "mp",
        worker_extension_cls="zeda_vllm.worker.ZedaWorkerExtension",
        enable_prefix_caching=False,  # every prompt token goes through the model: the pair counts are exact
        seed=0,
        compilation_config={"custom_ops": job["custom_ops"]} if job.get("custom_ops") else None,
        attention_backend=cpu_mla_attention_backend(current_platform.is_cpu(), _is_mla(job["model"]), "float32"),
    )
    try:
        started = time.perf_counter()
        result = _generate(llm, job)
        result["compilation"] = llm.collective_rpc("zeda_compilation_info")[0]
        result["run_s"] = time.perf_counter() - started
        result["startup_s"] = started - began
        if job.get("dial") is not None:  # the runtime dial, on the live (possibly compiled) model
            changed = llm.collective_rpc("zeda_set_zero_expert_bias", args=(job["dial"],))[0]
            result["dial"] = _generate(llm, job) | {"routers_changed": changed}
        result["steps"] = []
        for i, step in enumerate(job.get("steps") or []):
            loaded = time.perf_counter()
            tensors = llm.collective_rpc("zeda_load_weights", args=(step["load"],))
            llm.reset_prefix_cache()
            record = {"tensors": tensors, "load_s": time.perf_counter() - loaded, "greedy": _generate(llm, job)}
            record["sampled"] = _generate(llm, job, temperature=1.0, seed=1000 + i)
            result["steps"].append(record)
        return result
    finally:
        del llm


def _cleanup() -> None:
    """Tear down the finished engine before the next one starts: a failed engine lives on in its exception's frames,
    so this runs after the except clause (when they are gone), never inside it."""
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
