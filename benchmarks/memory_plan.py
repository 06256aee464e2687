"""Memory plan for Qwen3-30B-A3B and GLM-4.7-Flash: zeda's per-stage estimates (what `zeda convert --dry-run`
prints) for the ways to run them, per training process, per GPU and per node's host RAM.

Estimates come from header-only (sparse) skeletons of the real checkpoints: nothing is trained. The estimator is
measured against real runs by ``benchmarks/memory_scale.py`` (full-width slices, every backend, 2 CPU ranks).

    python benchmarks/memory_plan.py           # every plan of both models (~1 min)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from common import machine, print_table, write_result, zeda_json
from provenance import provenance
from zeda_cli.architectures import resolve_config
from zeda_cli.inspect_model import inspect_model
from zeda_cli.io.skeleton import GLM_4_7_FLASH, QWEN3_30B_A3B, write_skeleton
from zeda_cli.io.sources import read_config_json
from zeda_cli.pipeline.memory import ModelShape

EIGHT_K = ["stage1.max_seq_len=8192", "stage2.max_new_tokens=8192", "rollout.max_new_tokens=8192"]
NO_OFFLOAD = ["distributed.cpu_offload=false"]
PLANS = {
    "the recipe: FSDP2 + EP 8 + offload, vLLM servers beside it, 1 node x 8": [],
    "FSDP2 + EP 8, no offload, vLLM servers, 1 node x 8": NO_OFFLOAD,
    "FSDP2 + EP 8, no offload, vLLM servers, 8k caps, 1 node x 8": [*NO_OFFLOAD, *EIGHT_K],
    "FSDP2 + EP 8, no offload, vLLM servers (0.2 of a GPU), 8k caps, 2 nodes x 8": [
        *NO_OFFLOAD, *EIGHT_K, "distributed.nnodes=2", "distributed.master_addr=10.0.0.1",
        "distributed.master_port=29500", "generation.gpu_memory_utilization=0.2"],
    "router-only on GPU 0, student server on GPUs 1-2, teacher server on 3-4 (TP 2), 8k caps": [
        "stage1.trainable=router", "stage2.trainable=router", "distributed.backend=none", "distributed.nproc=1",
        "generation.tensor_parallel_size=2", "generation.devices=[1,2,3,4]", "generation.gpu_memory_utilization=0.9",
        *EIGHT_K],
    "full, ZeRO-3 + CPU offload, 8 GPUs, HF generate (the old recipe)": [
        "distributed.backend=deepspeed", "distributed.deepspeed=deepspeed/zero3-offload.json",
        "generation.engine=hf", "stage2.teacher_logprobs=trainer"],
}  # fmt: skip
MODELS = {"Qwen3-30B-A3B": (QWEN3_30B_A3B, "qwen3-30b-a3b"), "GLM-4.7-Flash": (GLM_4_7_FLASH, "glm-4.7-flash")}
GPU_GB = 80


def shape_of(folder: Path) -> ModelShape:
    return ModelShape.from_report(inspect_model(str(folder)), resolve_config(read_config_json(folder)).hf)


def dry_run(folder: Path, recipe: str, overrides: list[str], work: Path) -> dict[str, Any]:
    """`zeda convert --dry-run --json` of a skeleton on 80 GB GPUs: the stages' estimates and the placement."""
    sets = [a for o in overrides for a in ("--set", o.replace("deepspeed/", str(_recipes() / "deepspeed") + "/"))]
    return zeda_json("convert", str(folder), "--out", str(work / "plan"), "--recipe", recipe, "--dry-run",
                     "--gpu-memory-gb", str(GPU_GB), *sets)  # fmt: skip


def estimates(work: Path) -> list[dict[str, Any]]:
    """Per model, plan and GPU stage: the training process's estimate, the busiest GPU (trainer + servers), the
    host RAM of a node, and whether every GPU fits (the placement's notes otherwise)."""
    rows = []
    for model, (config, recipe_name) in MODELS.items():
        folder = write_skeleton(config, work / model)
        for plan, overrides in PLANS.items():
            summary = dry_run(folder, recipe_name, overrides, work)
            placed = {p["stage"]: p for p in summary["placement"]}
            for stage in (s for s in summary["stages"] if s["stage"] in placed):
                p = placed[stage["stage"]]
                gpus = {g: round(sum(gb for _, gb in held), 1) for g, held in p["gpus"].items()}
                busiest = max(gpus, key=gpus.__getitem__)
                problems = [n for n in p["notes"] if "collective timeout" not in n]
                rows.append({"model": model, "plan": plan, "overrides": overrides, **stage["estimate"],
                             "busiest_gpu_gb": gpus[busiest], "runs_on_busiest_gpu": p["gpus"][busiest],
                             "node_host_gb": p["host_gb"], "fits": not problems, "problems": problems})  # fmt: skip
    return rows


def _recipes() -> Path:
    from zeda_cli.recipes import recipes_dir

    return recipes_dir()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same plans, written as memory-plan-quick (tests)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="zeda-memplan-"))
    try:
        rows = estimates(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(f"zeda convert --dry-run on {GPU_GB} GB GPUs: a training process, the busiest GPU, a node's host RAM",
                ["model", "plan", "stage", "GB / process", "processes", "busiest GPU GB", "host GB", "fits"],
                [(r["model"], r["plan"], r["stage"], f"{r['per_process_gb']:.1f}", r["processes"],
                  r["busiest_gpu_gb"], f"{r['node_host_gb']:.0f}", "yes" if r["fits"] else r["problems"][0][:50])
                 for r in rows])  # fmt: skip
    inputs = {name: _recipes() / f"{name}.yaml" for _, name in MODELS.values()}
    result = {"schema": "zeda.bench.memory_plan/2", "machine": machine(), "gpu_gb": GPU_GB, "estimates": rows,
              **provenance(inputs=inputs)}  # fmt: skip
    print(f"wrote {write_result('memory-plan-quick' if args.quick else 'memory-plan', result, args.out)}")
    return result


if __name__ == "__main__":
    main()
