#!/usr/bin/env python
"""Runtime speed of zeda's dynamic MoE (zero-expert slots skipped) against the static transformers MoE.

Two parts, both with random weights at real layer shapes, static and dynamic timed side by side in one run:

* ``block``: one MoE block built from the real transformers classes (``Qwen3MoeSparseMoeBlock`` at
  Qwen3-30B-A3B shapes, ``Glm4MoeLiteMoE`` at GLM-4.7-Flash shapes with its shared expert). The static block is the
  original one with N experts; the dynamic blocks are copies made dynamic by ``make_dynamic`` (zeda's runtime,
  N real + Z zero experts) that share the static block's expert weights. Each dynamic block routes an exact share
  of the K slots to zero experts (see ``_set_zero_share``) and the realised share is read back from the router.
  Workloads: prefill (one sequence of T tokens) and decode (T sequences of one token), for every experts
  implementation the runtime supports (eager, grouped_mm, batched_mm).
* ``e2e``: a few-layer, full-width slice of Qwen3-30B-A3B (``Qwen3MoeForCausalLM``); the dynamic model is the same
  model deep-copied with every weight tensor shared, made dynamic in memory by ``make_dynamic``, its zero-expert
  share set to ~50% with the runtime dial ``zero_expert_bias``. Prefill tokens/s (``logits_to_keep=1`` as in
  ``generate``), decode tokens/s with the KV cache, batch 1 and batched.

Timing: ``torch.no_grad``, warm-up first, then static and dynamic calls interleaved (S D S D ... S); each dynamic
sample is divided by the mean of the static samples just before and after it, and the figure is the median of
these ratios. Raw timings, the machine and the realised zero shares go to the JSON file.

    .venv/bin/python benchmarks/speed.py                 # full CPU run, ~10-15 min on 2 cores
    .venv/bin/python benchmarks/speed.py --quick         # tiny shapes, < 1 min (exercised by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "src" / "zeda_cli").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import transformers  # noqa: E402

from speed_block import FULL_SHAPES, IMPLS, QUICK_SHAPES, run_block_benchmark, run_gemm_scaling  # noqa: E402
from speed_e2e import E2E_QUICK, E2EShape, run_e2e_benchmark  # noqa: E402

SCHEMA = "zeda.bench.speed/1"
GOAL_BLOCK_RATIO = 0.55  # dynamic / static block time at 50% zero slots, prefill, CPU
GOAL_E2E_PREFILL = 1.3  # static / dynamic prefill time of the e2e slice at 50% zero slots


# ----------------------------------------------------------------------------------------------------------------
# Report
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def goals(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = [
        r
        for r in result.get("block", {}).get("rows", [])
        if r["workload"] == "prefill" and abs(r["requested_share"] - 0.5) < 1e-9
    ]
    if rows:
        measured = {f"{r['shape']} {r['impl']} T={r['tokens']}": r["ratio"] for r in rows}
        out["block_prefill_ratio_at_half_zero"] = {
            "goal": f"<= {GOAL_BLOCK_RATIO}",
            "measured": measured,
            "measured_cpu_time": {f"{r['shape']} {r['impl']} T={r['tokens']}": r["cpu_ratio"] for r in rows},
            "flop_ratio": {r["shape"]: r["flop_ratio"] for r in rows},
            "met": {k: v <= GOAL_BLOCK_RATIO for k, v in measured.items()},
        }
    e2e = result.get("e2e")
    if e2e:
        out["e2e_prefill_speedup"] = {
            "goal": f">= {GOAL_E2E_PREFILL}",
            "measured": e2e["prefill"]["speedup"],
            "measured_cpu_time": e2e["prefill"]["cpu_speedup"],
            "met": e2e["prefill"]["speedup"] >= GOAL_E2E_PREFILL,
        }
        for key in ("decode", "batch_prefill", "batch_decode"):
            out[f"e2e_{key}_speedup"] = {
                "goal": None,
                "measured": e2e[key]["speedup"],
                "measured_cpu_time": e2e[key]["cpu_speedup"],
            }
    return out


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    block = result.get("block")
    if block and block["rows"]:
        shares = sorted({r["requested_share"] for r in block["rows"]})
        table = Table(
            title="MoE block: dynamic / static time, median of interleaved ratios (lower is faster). "
            "Cells: wall ratio / CPU-time ratio",
        )
        for col in ("shape", "impl", "workload", "static ms"):
            table.add_column(col, justify="right" if col == "static ms" else "left")
        for sh in shares:
            table.add_column(f"zero {sh:g}", justify="right")
        table.add_column("oracle 0.5", justify="right")
        table.add_column("FLOPs 0.5", justify="right")
        groups: dict[tuple, list[dict]] = {}
        for r in block["rows"]:
            groups.setdefault((r["shape"], r["impl"], r["workload"], r["tokens"]), []).append(r)
        for (shape, impl, kind, tokens), rs in groups.items():
            by_share = {r["requested_share"]: r for r in rs}
            cells = [
                "-" if sh not in by_share else f"{by_share[sh]['ratio']:.3f} / {by_share[sh]['cpu_ratio']:.3f}"
                for sh in shares
            ]
            half = by_share.get(0.5, {})
            oracle = half.get("oracle")
            cells.append(f"{oracle['ratio']:.3f} / {oracle['cpu_ratio']:.3f}" if oracle else "-")
            cells.append(f"{half['flop_ratio']:.3f}" if half else "-")
            table.add_row(shape, impl, f"{kind} {tokens}", f"{rs[0]['static_median_s'] * 1e3:.1f}", *cells)
        console.print(table)
        realised = sorted({(r["requested_share"], round(r["realised_share"], 4)) for r in block["rows"]})
        console.print("realised zero shares (requested, realised): " + ", ".join(f"{a:g}->{b:g}" for a, b in realised))
        for sk in block["skipped"]:
            console.print(f"skipped {sk['shape']} {sk['impl']} {sk['workload']} {sk['tokens']}: {sk['reason']}")
    gemm = result.get("gemm_scaling")
    if gemm:
        table = Table(title="Per-expert GEMM CPU time against rows M; t(M/2) / t(M) bounds the block ratio at 50%")
        table.add_column("shape")
        rows_all = sorted({r["rows"] for g in gemm.values() for r in g["per_expert"]})
        for m in rows_all:
            table.add_column(f"M={m}", justify="right")
        for name, g in gemm.items():
            by = {r["rows"]: r for r in g["per_expert"]}
            table.add_row(name + " ms", *[f"{by[m]['cpu_s'] * 1e3:.2f}" if m in by else "-" for m in rows_all])
            table.add_row(
                name + " t(M/2)/t(M)",
                *[f"{g['half_rows_ratio'][str(m)]['cpu']:.3f}" if str(m) in g["half_rows_ratio"] else "-"
                  for m in rows_all],
            )  # fmt: skip
        console.print(table)
    e2e = result.get("e2e")
    if e2e:
        sh, rs = e2e["shape"], e2e["realised_share"]
        table = Table(
            title=f"End to end: Qwen3-30B-A3B slice ({sh['layers']} layers, vocab {sh['vocab']}, {e2e['impl']}); "
            f"zero share prefill {rs['prefill']:.2f}, decode {rs['decode']:.2f}, batch decode {rs['batch_decode']:.2f}"
        )
        for col in ("phase", "static tok/s", "dynamic tok/s", "speedup (wall)", "speedup (CPU)"):
            table.add_column(col, justify="left" if col == "phase" else "right")
        wl = e2e["workload"]
        labels = {
            "prefill": f"prefill 1 x {wl['prompt']}",
            "decode": f"decode 1 x {wl['decode_steps']} steps",
            "batch_prefill": f"prefill {wl['batch']} x {wl['batch_prompt']}",
            "batch_decode": f"decode {wl['batch']} x {wl['batch_decode_steps']} steps",
        }
        for key, label in labels.items():
            ph = e2e[key]
            table.add_row(label, f"{ph['static_tokens_per_s']:.1f}", f"{ph['dynamic_tokens_per_s']:.1f}",
                          f"{ph['speedup']:.3f}x", f"{ph['cpu_speedup']:.3f}x")  # fmt: skip
        console.print(table)
    for name, goal in result.get("goals", {}).items():
        met = goal.get("met")
        measured = goal["measured"]
        if isinstance(measured, dict):
            measured = ", ".join(f"{k}: {v:.3f}" for k, v in measured.items())
        else:
            measured = f"{measured:.3f} (CPU time {goal['measured_cpu_time']:.3f})"
        console.print(f"goal {name}: {goal['goal'] or 'none, reported'} -> {measured}"
                      + (f"; met: {met}" if met is not None else ""))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (< 60 s on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=None, help="experts implementations (default: all)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/speed-<device>.json)")
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds per block workload")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--parts", nargs="+", choices=("gemm", "block", "e2e"), default=["gemm", "block", "e2e"])
    p.add_argument("--shape", nargs="+", default=None, help="block shapes by name (default: all)")
    p.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--prefill", nargs="+", type=int, default=None, help="prefill token counts")
    p.add_argument("--decode", nargs="+", type=int, default=None, help="decode batch sizes (one token each)")
    p.add_argument("--min-sample-s", type=float, default=None, help="loop a call until one sample lasts this long")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="per block workload: fewer rounds (>= 3) where --repeats rounds would take longer",
    )
    p.add_argument(
        "--oracle-shares",
        nargs="*",
        type=float,
        default=[0.5],
        help="prefill: also time perfect skipping (static kernel on the real pairs only) at these shares",
    )
    p.add_argument("--gemm-rows", nargs="+", type=int, default=None, help="gemm part: rows per expert")
    p.add_argument("--gemm-repeats", type=int, default=3)
    p.add_argument(
        "--batched-mm-max-gb",
        type=float,
        default=1.5,
        help="CPU: skip batched_mm where its per-(token, slot) weight gather exceeds this many GB",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--e2e-layers", type=int, default=None)
    p.add_argument("--e2e-vocab", type=int, default=None)
    p.add_argument("--e2e-impl", choices=IMPLS, default="grouped_mm")
    p.add_argument("--e2e-share", type=float, default=0.5)
    p.add_argument("--e2e-prompt", type=int, default=None)
    p.add_argument("--e2e-steps", type=int, default=None)
    p.add_argument("--e2e-batch", type=int, default=None)
    p.add_argument("--e2e-batch-prompt", type=int, default=None)
    p.add_argument("--e2e-batch-steps", type=int, default=None)
    p.add_argument("--e2e-repeats", type=int, default=None)
    args = p.parse_args(argv)  # fmt: skip

    q = args.quick
    args.torch_dtype = getattr(torch, args.dtype)
    args.impl = args.impl or list(IMPLS)
    args.repeats = args.repeats or (3 if q else 5)
    args.gemm_rows = args.gemm_rows or ([4, 8, 16] if q else [4, 8, 16, 32, 64, 128, 256])
    args.prefill = args.prefill or ([64] if q else [512, 2048])
    args.decode = args.decode or ([1, 4] if q else [1, 8, 32])
    args.min_sample_s = args.min_sample_s if args.min_sample_s is not None else (0.005 if q else 0.2)
    if args.budget_s is None and not q:
        args.budget_s = 90.0
    if args.threads is None and q:
        args.threads = 1  # tiny shapes: one thread is faster and far less sensitive to a busy machine
    shapes = QUICK_SHAPES if q else FULL_SHAPES
    if args.shape:
        wanted = {s.lower() for s in args.shape}
        shapes = tuple(s for s in shapes if s.name.lower() in wanted or s.name.split("/")[0].lower() in wanted)
        if not shapes:
            p.error(f"--shape: none of {args.shape} in {[s.name for s in (QUICK_SHAPES if q else FULL_SHAPES)]}")
    args.shapes = shapes
    base = E2E_QUICK if q else E2EShape()
    args.e2e_shape = E2EShape(
        **{**asdict(base), "layers": args.e2e_layers or base.layers, "vocab": args.e2e_vocab or base.vocab}
    )
    args.e2e_prompt = args.e2e_prompt or (32 if q else 512)
    args.e2e_steps = args.e2e_steps or (4 if q else 32)
    args.e2e_batch = args.e2e_batch or (2 if q else 8)
    args.e2e_batch_prompt = args.e2e_batch_prompt or (8 if q else 64)
    args.e2e_batch_steps = args.e2e_batch_steps or (2 if q else 16)
    args.e2e_repeats = args.e2e_repeats or (2 if q else 3)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"speed-{args.device}{'-quick' if q else ''}.json"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "quick": args.quick,
        "machine": machine_info(device),
        "settings": {
            "dtype": args.dtype,
            "impls": args.impl,
            "shares": args.shares,
            "prefill_tokens": args.prefill,
            "decode_tokens": args.decode,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "min_sample_s": args.min_sample_s,
            "budget_s": args.budget_s,
            "oracle_shares": args.oracle_shares,
            "seed": args.seed,
            "block_shapes": [asdict(s) for s in args.shapes],
            "timing": "torch.no_grad; warm-up, then S D S D ... S interleaved; ratio = D / mean(neighbouring S); "
            "median over repeats",
        },
    }
    if "gemm" in args.parts:
        log("gemm scaling (per-expert up-projection time against rows)")
        result["gemm_scaling"] = run_gemm_scaling(args, device, log)
    if "block" in args.parts:
        log(f"block benchmark ({', '.join(s.name for s in args.shapes)}; impls {', '.join(args.impl)})")
        result["block"] = run_block_benchmark(args, device, log)
    if "e2e" in args.parts:
        result["e2e"] = run_e2e_benchmark(args, device, log)
    result["goals"] = goals(result)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print_tables(result)
    log(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
