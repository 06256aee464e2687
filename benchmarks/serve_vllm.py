#!/usr/bin/env python
"""Serving speed in vLLM, static against ZEDA dynamic with the same weights (runs in .venv-vllm: vLLM + zeda-vllm).

The model is a few-layer, full-width slice of Qwen3-30B-A3B (the shapes of ``zeda_cli.io.skeleton``, as
``benchmarks/speed_e2e.py`` uses), random weights written as real safetensors folders:

* ``static/``: a stock ``Qwen3MoeForCausalLM`` folder, served by stock vLLM;
* ``dynamic/``: the same weight files (symlinked) plus routers with Z = N/2 extra rows, served through zeda-vllm.
  Its zero-expert share is set to ~0.5 with the runtime dial ``zero_expert_bias`` (bisection on a calibration prompt).

Both engines live in this process (vLLM's in-process engine) and are timed alternately, S D then D S, per workload:
prefill of one 2048-token prompt, decode at batch 1 and batch 16 (decode time = time of prompt + N new tokens minus
time of prompt + 1 token, same prompts). Figures are medians; the speed-up is the median of the paired ratios.
Wall time and process CPU time are both kept (on a shared machine CPU time is far less disturbed).

    .venv-vllm/bin/python benchmarks/serve_vllm.py            # full run (bf16, torch.compile), ~15 min on 2 cores
                                                              # (needs ~18 GB RAM: both engines are loaded at once)
    .venv-vllm/bin/python benchmarks/serve_vllm.py --quick    # tiny shapes, eager, ~1-2 min (exercised by the tests)

On a CUDA GPU (scripts/gpu_check.sh) the same command runs with vLLM's defaults there: torch.compile and CUDA graphs,
which zeda-vllm captures piecewise around its skipping op; both engines share the GPU (``--gpu-memory-utilization``
0.4 each) and the JSON goes to benchmarks/results/serve-vllm-gpu.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: routing stats readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM-CPU serves with one compute thread per core but one (one on a 2-core machine: "Reducing Torch threads from 2
# to 1 for serving"), but its in-process engine leaves this process's pool at every core; on a shared machine each
# small parallel op then waits milliseconds for the second thread. Match the served default (recorded in the JSON).
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from zeda_cli.io.skeleton import QWEN3_30B_A3B as QWEN3  # noqa: E402  (the published config: the real shapes)

INIT_STD = 0.02  # as benchmarks/speed_block.py


@dataclass(frozen=True)
class Shape:
    layers: int = 4
    vocab: int = QWEN3["vocab_size"]
    hidden: int = QWEN3["hidden_size"]
    heads: int = QWEN3["num_attention_heads"]
    kv_heads: int = QWEN3["num_key_value_heads"]
    head_dim: int = QWEN3["head_dim"]
    intermediate: int = QWEN3["moe_intermediate_size"]
    num_experts: int = QWEN3["num_experts"]
    num_zero: int = QWEN3["num_experts"] // 2
    top_k: int = QWEN3["num_experts_per_tok"]

    def params(self) -> int:
        h, hd = self.hidden, self.head_dim
        attn = h * hd * (2 * self.heads + 2 * self.kv_heads)
        return self.layers * (attn + self.num_experts * (3 * h * self.intermediate + h)) + 2 * self.vocab * h


@dataclass(frozen=True)
class Workload:
    prefill: int = 2048  # one prompt of this many tokens
    decode_prompt: int = 32
    decode_steps: int = 32
    batch: int = 16


QUICK_SHAPE = Shape(layers=2, vocab=512, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=64,
                    num_experts=32, num_zero=16, top_k=8)  # fmt: skip
QUICK_WORKLOAD = Workload(prefill=256, decode_prompt=16, decode_steps=8, batch=4)


# --- the two folders --------------------------------------------------------------------------------------------
def _config(shape: Shape, dtype: str) -> dict[str, Any]:
    keys = ("rope_theta", "rms_norm_eps", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob")
    return {
        **{k: QWEN3[k] for k in keys},
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_act": "silu",
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": QWEN3["intermediate_size"],
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "moe_intermediate_size": shape.intermediate,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def _uniform(shape: tuple[int, ...], dtype: Any, gen: Any) -> Any:
    import torch

    bound = INIT_STD * math.sqrt(3.0)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1).mul_(bound).to(dtype)


def _layer_tensors(shape: Shape, layer: int, dtype: Any, gen: Any) -> dict[str, Any]:
    import torch

    p, h, hd = f"model.layers.{layer}", shape.hidden, shape.head_dim
    out = {
        f"{p}.input_layernorm.weight": torch.ones(h, dtype=dtype),
        f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        f"{p}.self_attn.q_norm.weight": torch.ones(hd, dtype=dtype),
        f"{p}.self_attn.k_norm.weight": torch.ones(hd, dtype=dtype),
        f"{p}.self_attn.q_proj.weight": _uniform((shape.heads * hd, h), dtype, gen),
        f"{p}.self_attn.k_proj.weight": _uniform((shape.kv_heads * hd, h), dtype, gen),
        f"{p}.self_attn.v_proj.weight": _uniform((shape.kv_heads * hd, h), dtype, gen),
        f"{p}.self_attn.o_proj.weight": _uniform((h, shape.heads * hd), dtype, gen),
    }
    for e in range(shape.num_experts):
        for name, dims in (("gate_proj", (shape.intermediate, h)), ("up_proj", (shape.intermediate, h)),
                           ("down_proj", (h, shape.intermediate))):  # fmt: skip
            out[f"{p}.mlp.experts.{e}.{name}.weight"] = _uniform(dims, dtype, gen)
    return out


def write_folders(shape: Shape, dtype_name: str, root: Path, seed: int) -> tuple[Path, Path]:
    """static/ and dynamic/ sharing every weight file but the routers'; reused when already written."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    static, dynamic = root / "static", root / "dynamic"
    stamp = root / "folders.json"
    key = {"shape": asdict(shape), "dtype": dtype_name, "seed": seed, "format": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return static, dynamic
    for folder in (static, dynamic):
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            f.unlink()
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, Any], name: str) -> None:
        save_file(tensors, static / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    save({"model.embed_tokens.weight": _uniform((shape.vocab, shape.hidden), dtype, gen),
          "lm_head.weight": _uniform((shape.vocab, shape.hidden), dtype, gen),
          "model.norm.weight": torch.ones(shape.hidden, dtype=dtype)}, "embeddings.safetensors")  # fmt: skip
    for layer in range(shape.layers):
        save(_layer_tensors(shape, layer, dtype, gen), f"layer-{layer:02d}.safetensors")
    real = {f"model.layers.{i}.mlp.gate.weight": _uniform((shape.num_experts, shape.hidden), dtype, gen)
            for i in range(shape.layers)}  # fmt: skip
    # zero-expert rows drawn like the real ones; the dial, not the rows, sets the share
    widened = {k: torch.cat([v, _uniform((shape.num_zero, shape.hidden), dtype, gen)]) for k, v in real.items()}
    save(real, "routers.safetensors")
    save_file(widened, dynamic / "routers.safetensors", metadata={"format": "pt"})
    for name in set(weight_map.values()) - {"routers.safetensors"}:
        (dynamic / name).symlink_to(static / name)
    index = {"metadata": {}, "weight_map": weight_map}
    config = _config(shape, dtype_name)
    for folder, cfg in ((static, config), (dynamic, _dynamic_config(config, shape))):
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    stamp.write_text(json.dumps(key))
    return static, dynamic


def _dynamic_config(config: dict[str, Any], shape: Shape) -> dict[str, Any]:
    router = {"block_class": "Qwen3MoeSparseMoeBlock", "num_experts": shape.num_experts, "top_k": shape.top_k,
              "scoring": "softmax", "normalize": True, "weights_in_logits_dtype": True,
              "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "correction_bias": False}  # fmt: skip
    return config | {
        "architectures": ["Qwen3MoePlusPlusForCausalLM"],
        "model_type": "qwen3_moe_plus_plus",
        "zce_nums": [shape.num_zero],
        "zce_types": ["zero"],
        "use_zce_mask": False,
        "zero_expert_bias": 0.0,
        "zeda": {"format_version": 1, "base_model_type": "qwen3_moe", "router": router},
    }


# --- engines and timing -----------------------------------------------------------------------------------------
def on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def make_engine(folder: Path, args: argparse.Namespace, max_len: int) -> Any:
    from vllm import LLM

    memory = {"gpu_memory_utilization": args.gpu_memory_utilization} if args.gpu_memory_utilization else {}
    return LLM(
        str(folder),
        dtype=args.dtype,
        worker_extension_cls="zeda_vllm.worker.ZedaWorkerExtension",  # reads the graph settings the worker uses
        **memory,
        skip_tokenizer_init=True,
        enforce_eager=args.enforce_eager,
        max_model_len=max_len,
        max_num_batched_tokens=max(max_len, 2048),  # the prefill runs as one chunk
        enable_prefix_caching=False,
        distributed_executor_backend="uni",
        seed=0,
    )


def generate(engine: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(wall s, process CPU s) of one generate call, greedy, EOS ignored."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    w0, c0 = time.perf_counter(), time.process_time()
    engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - w0, time.process_time() - c0


def zero_share(engine: Any, run: Callable[[], Any]) -> float:
    from zeda_vllm.model import reset_routing_stats, routing_stats

    engine.apply_model(reset_routing_stats)
    run()
    stats = engine.apply_model(routing_stats)[0]
    return sum(s["zero_slots"] for s in stats) / max(1, sum(s["slots"] for s in stats))


def calibrate(engine: Any, prompt: list[int], target: float, log: Callable[[str], None]) -> tuple[float, float]:
    """Bisect the runtime dial until the zero share of a prefill of ``prompt`` is ~``target``."""
    from zeda_vllm.model import set_zero_expert_bias

    lo, hi, best = -20.0, 20.0, (1.0, 0.0, 0.0)
    for _ in range(20):
        mid = (lo + hi) / 2
        engine.apply_model(functools.partial(set_zero_expert_bias, bias=mid))
        share = zero_share(engine, lambda: generate(engine, [prompt], 1))
        if abs(share - target) < best[0]:
            best = (abs(share - target), mid, share)
        if abs(share - target) < 0.005:
            break
        lo, hi = (mid, hi) if share < target else (lo, mid)
    engine.apply_model(functools.partial(set_zero_expert_bias, bias=best[1]))
    log(f"  zero_expert_bias = {best[1]:+.4f} -> calibration share {best[2]:.3f}")
    return best[1], best[2]


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def measure(engines: dict[str, Any], calls: dict[str, Callable[[Any], tuple[float, float]]], repeats: int,
            log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Per workload: S D / D S alternately; ratios paired within a round."""
    out: dict[str, Any] = {}
    for workload, call in calls.items():
        for engine in engines.values():  # warm-up: first-call costs (compilation of new shapes, allocator)
            call(engine)
        samples: dict[str, list[tuple[float, float]]] = {"static": [], "dynamic": []}
        for r in range(repeats):
            for name in ("static", "dynamic") if r % 2 == 0 else ("dynamic", "static"):
                samples[name].append(call(engines[name]))
        s_wall, d_wall = [s[0] for s in samples["static"]], [s[0] for s in samples["dynamic"]]
        s_cpu, d_cpu = [s[1] for s in samples["static"]], [s[1] for s in samples["dynamic"]]
        out[workload] = {
            "static_s": s_wall, "dynamic_s": d_wall, "static_cpu_s": s_cpu, "dynamic_cpu_s": d_cpu,
            "speedup": _median([a / b for a, b in zip(s_wall, d_wall, strict=True)]),
            "cpu_speedup": _median([a / b for a, b in zip(s_cpu, d_cpu, strict=True)]),
        }  # fmt: skip
        log(f"  {workload}: S {_median(s_wall):.3f} s, D {_median(d_wall):.3f} s, "
            f"speed-up {out[workload]['speedup']:.2f}x (CPU time {out[workload]['cpu_speedup']:.2f}x)")  # fmt: skip
    return out


def _decode_call(prompts: list[list[int]], steps: int) -> Callable[[Any], tuple[float, float]]:
    def call(engine: Any) -> tuple[float, float]:
        first = generate(engine, prompts, 1)
        full = generate(engine, prompts, 1 + steps)
        return full[0] - first[0], full[1] - first[1]

    return call


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import random

    shape, work = (QUICK_SHAPE, QUICK_WORKLOAD) if args.quick else (Shape(layers=args.layers), Workload())
    work = replace(work, batch=args.batch or work.batch)
    t0 = time.perf_counter()
    static_dir, dynamic_dir = write_folders(shape, args.dtype, Path(args.workdir), args.seed)
    log(f"folders: {shape.layers} layers of Qwen3-30B-A3B width ({shape.params() / 1e6:.1f} M params, {args.dtype}) "
        f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    rng = random.Random(args.seed)
    tokens = lambda n: [rng.randrange(shape.vocab) for _ in range(n)]  # noqa: E731
    prefill_prompt, calib_prompt = tokens(work.prefill), tokens(min(256, work.prefill))
    batch1 = [tokens(work.decode_prompt)]
    batch_n = [tokens(work.decode_prompt) for _ in range(work.batch)]
    max_len = max(work.prefill, work.decode_prompt + work.decode_steps) + 16
    engines = {}
    for name, folder in (("static", static_dir), ("dynamic", dynamic_dir)):
        t0 = time.perf_counter()
        engines[name] = make_engine(folder, args, max_len)
        log(f"{name} engine ready in {time.perf_counter() - t0:.0f} s")
    bias, calib_share = calibrate(engines["dynamic"], calib_prompt, args.share, log)
    calls = {
        "prefill": lambda e: generate(e, [prefill_prompt], 1),
        "decode_batch1": _decode_call(batch1, work.decode_steps),
        f"decode_batch{work.batch}": _decode_call(batch_n, work.decode_steps),
    }
    shares = {name: zero_share(engines["dynamic"], functools.partial(call, engines["dynamic"]))
              for name, call in calls.items()}  # fmt: skip
    log("realised zero share: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    timings = measure(engines, calls, args.repeats, log)
    tokens_per_run = {"prefill": work.prefill, "decode_batch1": work.decode_steps,
                      f"decode_batch{work.batch}": work.batch * work.decode_steps}  # fmt: skip
    for name, t in timings.items():
        t["tokens_per_run"] = tokens_per_run[name]
        t["static_tokens_per_s"] = tokens_per_run[name] / _median(t["static_s"])
        t["dynamic_tokens_per_s"] = tokens_per_run[name] / _median(t["dynamic_s"])
        t["zero_share"] = shares[name]
    graphs = engines["dynamic"].collective_rpc("zeda_compilation_info")[0]
    del engines
    gc.collect()
    return {
        "compilation": graphs,
        "shape": asdict(shape),
        "params": shape.params(),
        "workload": asdict(work),
        "zero_expert_bias": bias,
        "calibration_share": calib_share,
        "results": timings,
    }


def _goal(r: dict[str, Any], target: float) -> dict[str, Any]:
    # CPU time is the work done by this (single compute thread) process: far less disturbed than wall time by the
    # other jobs of a shared machine, so both are judged.
    return {"speedup_at_least": target, "met_wall": r["speedup"] >= target, "met_cpu_time": r["cpu_speedup"] >= target}


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import vllm

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "dtype": args.dtype,
        "compiled": not args.enforce_eager,
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "torch_threads": torch.get_num_threads(),
    }


def print_table(result: dict[str, Any]) -> None:
    print("\nvLLM serving, static vs ZEDA dynamic (same weights), Qwen3-30B-A3B slice:")
    print("| workload | static tokens/s | dynamic tokens/s | speed-up (wall) | speed-up (CPU time) | zero share |")
    print("|---|---|---|---|---|---|")
    for name, r in result["results"].items():
        print(f"| {name} | {r['static_tokens_per_s']:.1f} | {r['dynamic_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['cpu_speedup']:.2f}x | {r['zero_share']:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, eager, few repeats (the tests run it)")
    parser.add_argument("--out", type=Path,
                        help="JSON path (default benchmarks/results/serve-vllm-{cpu,gpu}[-quick].json)")  # fmt: skip
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="decode batch (default 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--share", type=float, default=0.5, help="target zero-expert share")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per workload (default 7, quick 2)")
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (default: vLLM's default)")
    parser.add_argument("--workdir", default="/tmp/zeda-serve-vllm", help="where the model folders are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="per engine (two share the device); default 0.4 on a GPU, vLLM's on CPU")  # fmt: skip
    args = parser.parse_args(argv)
    device = "gpu" if on_cuda() else "cpu"
    if device == "gpu" and args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.4
    if args.quick:
        args.enforce_eager = True
        args.workdir = args.workdir.rstrip("/") + "-quick"
    args.repeats = args.repeats or (2 if args.quick else 7)
    out = args.out or RESULTS / f"serve-vllm-{device}{'-quick' if args.quick else ''}.json"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    began = time.perf_counter()
    result = run(args, log)
    goals = {"prefill": 1.4, f"decode_batch{result['workload']['batch']}": 1.2}
    report = {
        "schema": "zeda.bench.serve_vllm/1",
        "quick": args.quick,
        "machine": machine(args),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
        "goals": {k: _goal(result["results"][k], v) for k, v in goals.items()},
        "seconds": time.perf_counter() - began,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
