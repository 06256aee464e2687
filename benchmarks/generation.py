"""Generation for distillation: transformers' ``generate`` in the trainer (``generation.engine: hf``) against a vLLM
engine in its own environment (``vllm``: ``zeda_vllm.engine`` in .venv-vllm, driven over local HTTP).

1. **Rollouts** on a slice of Qwen3-30B-A3B (4 layers at full width: 128 experts, top-8, hidden 2048, vocab 151936;
   random bf16 weights in a real safetensors folder with the bundled tokenizer), batch 16, 128 new tokens, through
   zeda's teacher samplers, the code path of ``zeda rollout`` and of convert's rollout stage. Engine start-up (and a
   warm-up batch) is timed apart from the throughput.
2. **Stage-2 steps** on the bundled model (tiny-demo's router-only stage 2) by ``zeda distill --stage 2`` with each
   engine: median step time, and for vllm what the weight sync after each step costs.

    python benchmarks/generation.py            # the full comparison (needs .venv-vllm: make install-vllm)
    python benchmarks/generation.py --quick    # a narrow 2-layer slice, 1 batch, 3 stage-2 steps: the CI smoke run
    python benchmarks/generation.py --quality  # also: the demo recipe end to end with each engine (zeda convert,
                                               # then zeda eval): time per stage, zero share and held-out NLL rise
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from common import ROOT, machine, print_table, write_result, zeda_child
from speed_e2e import E2E_QUICK, E2EShape, build_e2e_models
from zeda_cli.distill.generation import SamplingSettings, generator
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import GenerationSection, Recipe, RuntimeSection, ZeroExpertsSection
from zeda_cli.runs import TeacherSpec
from zeda_cli.runtime.loading import load_tokenizer

BUNDLED = ROOT / "models" / "pystdlib-moe"
PROMPTS = BUNDLED / "data" / "prompts.jsonl"
ENGINES = ("hf", "vllm")


def write_slice(shape: E2EShape, folder: Path) -> Path:
    """The static slice as a model folder a user would have: safetensors, config, the bundled tokenizer."""
    static, _, _ = build_e2e_models(shape, "grouped_mm", torch.device("cpu"), torch.bfloat16, seed=0)
    static.config.eos_token_id = static.config.pad_token_id = 0
    static.save_pretrained(folder)
    del static
    gc.collect()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(BUNDLED / name, folder / name)
    return folder


def rollout_speed(folder: Path, engine: str, prompts: list[list[int]], args: argparse.Namespace, work: Path) -> dict:
    generation = GenerationSection(engine=engine, dtype="bfloat16", enforce_eager=args.quick)
    recipe = Recipe(runtime=RuntimeSection(dtype="bfloat16", device="cpu"), generation=generation)
    settings = SamplingSettings(args.new_tokens, temperature=1.0)
    began = time.perf_counter()
    teacher = TeacherSpec(path=str(folder), masked=False)
    with generator(recipe).teacher_sampler(teacher, recipe, prompts, args.new_tokens, work) as s:
        s.sample(prompts[: args.batch], SamplingSettings(4), seed=99)  # warm-up: compilation, first allocations
        ready = time.perf_counter() - began
        tokens, seconds = 0, 0.0
        for b in range(args.batches):
            batch = prompts[b * args.batch : (b + 1) * args.batch]
            t0 = time.perf_counter()
            samples = s.sample(batch, settings, seed=b)
            seconds += time.perf_counter() - t0
            tokens += sum(len(r) for r, _ in samples)
    return {"engine": engine, "startup_s": round(ready, 1), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def zeda(*args: str) -> str:
    """Run a zeda command in a child process; its stdout, or the end of its stderr in the error."""
    proc = subprocess.run(zeda_child(*args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"zeda {' '.join(args[:3])} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def stage2_speed(inject: Path, engine: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"stage2-{engine}"
    sets = [f"stage2.steps={args.steps}", f"generation.engine={engine}", "generation.enforce_eager=true"]
    began = time.perf_counter()
    zeda("distill", "--stage", "2", str(inject), "--out", str(out), "--recipe", "tiny-demo", "--overwrite", "-q",
         *(a for s in sets for a in ("--set", s)))  # fmt: skip
    wall = time.perf_counter() - began
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_tokens"] / r["tokens_per_s"] for r in records]
    sync = [r["sync_s"] for r in records if "sync_s" in r]
    return {"engine": engine, "steps": len(records), "wall_s": round(wall, 1),
            "median_step_s": round(statistics.median(step_s), 3),
            "median_sync_s": round(statistics.median(sync), 4) if sync else 0.0,
            "final_kl": records[-1]["kl"], "zero_share": records[-1]["zero_share"]}  # fmt: skip


def demo_quality(engine: str, work: Path) -> dict[str, Any]:
    """``zeda convert`` of the bundled model with the demo recipe up to stage 2, then ``zeda eval`` of stage 2."""
    out = work / f"demo-{engine}"
    began = time.perf_counter()
    summary = json.loads(zeda("convert", str(BUNDLED), "--out", str(out), "--recipe", "tiny-demo", "--to", "stage2",
                              "--set", f"generation.engine={engine}", "--json", "-q"))  # fmt: skip
    stages = {stage["stage"]: stage["seconds"] for stage in summary["stages"]}
    wall = time.perf_counter() - began
    ev = json.loads(zeda("eval", str(out / "stage2"), "--json", "-q"))
    return {"engine": engine, "convert_s": round(wall, 1), "stage_s": stages, "zero_share": ev["zero_share"],
            "nll_delta_pct": ev["nll_delta_pct"], "expert_flops_ratio": ev["expert_flops_ratio"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = replace(E2E_QUICK, vocab=4096) if args.quick else E2EShape()
    work = Path(tempfile.mkdtemp(prefix="zeda-generation-"))
    try:
        tok = load_tokenizer(BUNDLED)
        texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
        prompts = [tok(t)["input_ids"] for t in texts[: args.batch * args.batches]]
        folder = write_slice(shape, work / "slice")
        rollouts = {e: rollout_speed(folder, e, prompts, args, work / f"engine-{e}") for e in ENGINES}
        shutil.rmtree(folder)
        inject = inject_zero_experts(str(BUNDLED), work / "inject", zero=ZeroExpertsSection()).out
        stage2 = {e: stage2_speed(inject, e, args, work) for e in ENGINES}
        quality = {e: demo_quality(e, work) for e in ENGINES} if args.quality else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = rollouts["vllm"]["tokens_per_s"] / rollouts["hf"]["tokens_per_s"]
    return {"schema": "zeda.bench.generation/1", "machine": machine(), "quick": args.quick,
            "slice": asdict(shape) | {"params": shape.param_count()},
            "settings": {"batch": args.batch, "batches": args.batches, "new_tokens": args.new_tokens,
                         "stage2_steps": args.steps},
            "rollout": rollouts, "stage2": stage2, "demo_quality": quality,
            "rollout_speedup_vllm_over_hf": round(speedup, 2),
            "goal": {"target": "vllm >= 3x hf rollout tokens/s", "met": speedup >= 3.0}}  # fmt: skip


def show(result: dict[str, Any]) -> None:
    r, s, cfg = result["rollout"], result["stage2"], result["settings"]
    columns = ("tokens_per_s", "tokens", "seconds", "startup_s")
    print_table(f"Rollouts: Qwen3-30B-A3B slice, {result['slice']['layers']} layers, batch {cfg['batch']} x "
                f"{cfg['new_tokens']} new tokens, bf16", ["engine", "tokens/s", "tokens", "seconds", "start-up s"],
                [(e, *(r[e][k] for k in columns)) for e in ENGINES])  # fmt: skip
    columns = ("median_step_s", "median_sync_s", "steps", "wall_s")
    print_table("Stage 2 on the bundled model (tiny-demo, router-only)",
                ["engine", "median step s", "median sync s", "steps", "wall s (with start-up)"],
                [(e, *(s[e][k] for k in columns)) for e in ENGINES])  # fmt: skip
    if result["demo_quality"]:
        q = result["demo_quality"]
        stages = ("rollout", "stage1", "stage2")
        print_table("The demo recipe end to end (zeda convert --to stage2, then zeda eval)",
                    ["engine", "zero share", "NLL rise %", *(f"{x} s" for x in stages), "convert s"],
                    [(e, q[e]["zero_share"], q[e]["nll_delta_pct"], *(q[e]["stage_s"].get(x) for x in stages),
                      q[e]["convert_s"]) for e in ENGINES])  # fmt: skip
    print(f"vllm / hf rollout throughput: {result['rollout_speedup_vllm_over_hf']}x "
          f"(goal >= 3x: {'met' if result['goal']['met'] else 'not met'})")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=None, help="timed rollout batches (default 2; quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; quick 16")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 steps per engine (default 20; quick 3)")
    parser.add_argument("--quality", action="store_true", help="also convert + eval the demo recipe per engine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batches = args.batches or (1 if args.quick else 2)
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.steps = args.steps or (3 if args.quick else 20)
    began = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = round(time.perf_counter() - began, 1)
    path = write_result("generation-quick" if args.quick else "generation-cpu", result, args.out)
    show(result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
