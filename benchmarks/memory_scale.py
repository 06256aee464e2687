"""Memory you can trust: each distillation stage of a full-width slice of Qwen3-30B-A3B and of GLM-4.7-Flash (one
decoder layer at real width, the real vocabulary, random weights) on 2 CPU ranks, under every backend (DeepSpeed
ZeRO-3, FSDP2, FSDP2 + expert parallelism 2) and trainable scope; the peak resident memory of each rank measured
next to the estimate `zeda convert --dry-run` prints for the same slice and settings. Then the loss's memory at 1x
and 4x the sequence length with the same chunk size (one process).

What is cut, so that full-parameter training of a layer fits 24 GB across 2 ranks: only the number of routed experts
(Qwen3-30B-A3B 128 -> 32, GLM-4.7-Flash 64 -> 16; under DeepSpeed 8 and 4, the top-k of each: full-parameter ZeRO-3
of the 16-expert Qwen slice was killed for memory at 11.4 GB per rank, and the real vocabulary's embedding and head,
which are not cut, are most of the slice); every per-expert shape, the attention (MLA for GLM), the shared expert
and the vocabulary are the real ones, and the estimator runs on the same cut config. Stage 2 samples 32 new tokens
per prompt (generation under ZeRO-3 gathers the layer and the head for every token: minutes per step on CPU). A row
that fails (out of memory, a crash) is recorded with its error instead of ending the run.

    python benchmarks/memory_scale.py            # every row (~1 h on 2 cores), writes results/memory-scale.json
    python benchmarks/memory_scale.py --quick    # one model, one backend, small sequences (tests)
    python benchmarks/memory_scale.py --stages 2 --stage2-full-experts 8   # stage 2 only, a smaller cut where the
                                                                           # student and the teacher train together
    python benchmarks/memory_scale.py --precision mixed   # bf16 compute over fp32 master weights (the 30B recipes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import ROOT, machine, print_table, run_tree, write_result, zeda_child, zeda_json
from provenance import provenance
from zeda_cli.io.skeleton import QWEN3_30B_A3B

SLICES: dict[str, dict[str, Any]] = {
    "Qwen3-30B-A3B": {**QWEN3_30B_A3B, "num_hidden_layers": 1},
    "GLM-4.7-Flash": {"model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"],
                      "num_hidden_layers": 1, "mlp_layer_types": ["sparse"]},
}  # fmt: skip
EXPERT_KEY = {"Qwen3-30B-A3B": "num_experts", "GLM-4.7-Flash": "n_routed_experts"}
REAL_EXPERTS = {"Qwen3-30B-A3B": 128, "GLM-4.7-Flash": 64}
KEPT_EXPERTS = {"Qwen3-30B-A3B": 32, "GLM-4.7-Flash": 16}
DEEPSPEED_EXPERTS = {"Qwen3-30B-A3B": 8, "GLM-4.7-Flash": 4}  # why fewer: the module docstring (>= top-k)
BACKENDS = {
    "deepspeed": ["distributed.backend=deepspeed", f"distributed.deepspeed={ROOT / 'recipes/deepspeed/zero3.json'}"],
    "fsdp2": ["distributed.backend=fsdp2", "distributed.ep_size=1"],
    "fsdp2+ep2": ["distributed.backend=fsdp2", "distributed.ep_size=2"],
}
# Two optimizer steps: the second forward and backward run beside the Adam state the first step created (one step
# alone peaked 2 GB lower on the Qwen slice under FSDP2).
COMMON = ["runtime.device=cpu", "distributed.nproc=2", "balance.aux_loss_coeff=0.1",
          "stage1.global_batch_size=2", "stage1.micro_batch_size=1", "stage1.max_steps=2", "stage1.save_every=1000",
          "stage2.steps=2", "stage2.prompts_per_step=2", "stage2.samples_per_prompt=1", "stage2.micro_batch_size=1",
          "stage2.save_every=1000", "stage2.loss=sampled", "data.chat_template=false"]  # fmt: skip
# float32: every tensor fp32. mixed: bf16 compute over fp32 master weights, the 30B recipes' setting (FSDP2
# mixed_precision; DeepSpeed's bf16 section, in a copy of zero3.json); the teacher and gathered units are bf16 then.
PRECISIONS = ("float32", "mixed")
DEEPSPEED_BF16 = "zero3-bf16.json"  # written into the work folder by main()


def build_slice(config: dict[str, Any], folder: Path) -> Path:
    """The static slice as a model folder: real-width random weights (bf16 on disk), a tokenizer of the real size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf = AutoConfig.for_model(config["model_type"], **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "pystdlib-moe" / name, folder / name)  # ids stay below 4096 < vocabulary
    return folder


def write_rollouts(path: Path, count: int, prompt: int, response: int) -> Path:
    g = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for i in range(count):
            ids = torch.randint(3, 4000, (prompt + response,), generator=g).tolist()
            f.write(json.dumps({"id": i, "prompt": "", "prompt_ids": ids[:prompt], "response": "",
                                "response_ids": ids[prompt:], "finished": False}) + "\n")  # fmt: skip
    return path


def write_prompts(path: Path, count: int) -> Path:
    words = "def class return import self value data model layer token expert".split()
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": " ".join(words[(i + j) % len(words)] for j in range(40))}) + "\n")
    return path


def kept_experts(model: str, backend: str, override: int | None = None) -> int:
    return override or (DEEPSPEED_EXPERTS[model] if backend == "deepspeed" else KEPT_EXPERTS[model])


def row_experts(model: str, backend: str, trainable: str, stage: int, a: argparse.Namespace) -> int:
    """The cut of one row: full-parameter stage 2 holds the student and a frozen teacher, so it may need fewer."""
    if trainable == "full" and stage == 2 and a.stage2_full_experts:
        return a.stage2_full_experts
    return kept_experts(model, backend, a.experts)


def sliced(model: str, experts: int) -> tuple[dict[str, Any], str]:
    """The slice's config with ``experts`` routed experts, and what was cut."""
    return {**SLICES[model], EXPERT_KEY[model]: experts}, f"experts {REAL_EXPERTS[model]} -> {experts}"


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def run(args: list[str]) -> dict[str, Any]:
    began = time.perf_counter()
    return {**zeda_json(*args), "seconds": round(time.perf_counter() - began, 1)}


def estimate(static: Path, stage: str, overrides: list[str], work: Path) -> dict[str, Any]:
    """What `zeda convert --dry-run` prints for this stage of the slice with the same settings: the measured
    `zeda distill` runs on zeda's defaults + ``overrides``, so the plan must not pick the family's 30B recipe."""
    defaults = work / "defaults.yaml"
    defaults.write_text("version: 1\nname: defaults\n")
    plan = run(["convert", str(static), "--out", str(work / "plan"), "--recipe", str(defaults), "--dry-run",
                *sets(overrides)])  # fmt: skip
    return next(s["estimate"] for s in plan["stages"] if s["stage"] == stage)


def precision_overrides(backend: str, precision: str, work: Path) -> list[str]:
    if precision == "float32":
        return ["runtime.dtype=float32"]
    if backend == "deepspeed":
        return ["runtime.dtype=bfloat16", f"distributed.deepspeed={work / DEEPSPEED_BF16}"]
    return ["runtime.dtype=bfloat16", "distributed.mixed_precision=true"]


def write_deepspeed_bf16(work: Path) -> Path:
    config = json.loads((ROOT / "recipes/deepspeed/zero3.json").read_text())
    path = work / DEEPSPEED_BF16
    path.write_text(json.dumps({**config, "bf16": {"enabled": True}}, indent=1))
    return path


def row_overrides(backend: str, trainable: str, stage: int, seq: int, prompts: Path, precision: str,
                  work: Path) -> list[str]:  # fmt: skip
    """The settings of one row: the measured ``zeda distill`` and the estimate's ``--dry-run`` take the same
    (``work``: the folder holding the bf16 DeepSpeed JSON, for ``precision`` mixed)."""
    return [*COMMON, *BACKENDS[backend], *precision_overrides(backend, precision, work),
            f"stage{stage}.trainable={trainable}", f"stage1.max_seq_len={seq}", "stage2.max_new_tokens=32",
            f"data.prompts={prompts}", f"rollout.max_new_tokens={seq // 2}"]  # fmt: skip


def measure_row(model: str, static: Path, inject: Path, backend: str, trainable: str, stage: int,
                data: dict[str, Path], work: Path, seq: int, precision: str) -> dict[str, Any]:  # fmt: skip
    overrides = row_overrides(backend, trainable, stage, seq, data["prompts"], precision, work)
    out = work / f"{model}-{backend}-{trainable}-s{stage}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--rollouts", str(data["rollouts"])] if stage == 1 else []
    tree = run_tree(zeda_child("distill", "--stage", str(stage), str(inject), "--out", str(out), *extra,
                               *sets(overrides), "-q"))  # fmt: skip
    ranks = tree.peaks_of("zeda_cli.distill.worker")
    anon = [round(r["peak_anon_bytes"] / 1024**3, 3) for r in ranks]
    est = estimate(static, f"stage{stage}", overrides, work)
    if tree.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {"model": model, "backend": backend, "trainable": trainable, "stage": stage, "precision": precision,
                "failed": True,
                "exit_code": tree.returncode, "output_tail": tree.output[-12000:], "measured_anon_gb_per_rank": anon,
                "estimate_gb_per_rank": round(est["per_process_gb"], 3), "components_gb": est.get("components"),
                "seconds": round(tree.seconds, 1)}  # fmt: skip
    rss = [round(r["peak_rss_bytes"] / 1024**3, 3) for r in ranks]
    row = {"model": model, "backend": backend, "trainable": trainable, "stage": stage, "precision": precision,
           "measured_anon_gb_per_rank": anon, "measured_rss_gb_per_rank": rss,
           "estimate_gb_per_rank": round(est["per_process_gb"], 3),
           "error": round(est["per_process_gb"] / max(anon) - 1.0, 3), "formula": est["formula"],
           "components_gb": est.get("components"), "seconds": round(tree.seconds, 1)}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return row


def loss_memory(static: Path, inject: Path, work: Path, seqs: tuple[int, int]) -> dict[str, Any]:
    """Stage 1 in one process at two sequence lengths, the same chunk: what the longer sequence adds, next to what
    the estimator says the extra tokens' activations are (its activations term at each length; the logits of one
    chunk are in both)."""
    rows = []
    for seq in seqs:
        rollouts = write_rollouts(work / f"r{seq}.jsonl", 2, 16, seq - 16)
        out = work / f"loss-{seq}"
        overrides = ["runtime.device=cpu", "runtime.dtype=float32", "stage1.global_batch_size=1",
                     "stage1.micro_batch_size=1", "stage1.max_steps=1", f"stage1.max_seq_len={seq}",
                     "stage1.trainable=router", "stage1.gradient_checkpointing=true",
                     "stage1.kl_chunk_size=256"]  # fmt: skip
        tree = run_tree(zeda_child("distill", "--stage", "1", str(inject), "--out", str(out), "--rollouts",
                                   str(rollouts), *sets(overrides), "-q"))  # fmt: skip
        if tree.returncode != 0:
            raise RuntimeError(f"loss memory at {seq} tokens failed: {tree.output[-3000:]}")
        [proc] = tree.peaks_of("zeda_cli distill")
        est = estimate(static, "stage1", overrides, work)
        rows.append({"seq_len": seq, "chunk": 256, "peak_anon_gb": round(proc["peak_anon_bytes"] / 1024**3, 3),
                     "estimated_activations_gb": est["components"]["activations (one micro-batch)"]})  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    short, long = rows
    added = round(long["peak_anon_gb"] - short["peak_anon_gb"], 3)
    extra = round(long["estimated_activations_gb"] - short["estimated_activations_gb"], 3)
    return {"rows": rows, "added_gb": added, "extra_token_activations_gb": extra, "within": added <= extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="*", default=list(SLICES))
    p.add_argument("--backends", nargs="*", default=list(BACKENDS))
    p.add_argument("--trainables", nargs="*", default=["full", "router"], choices=["full", "router"])
    p.add_argument("--stages", nargs="*", type=int, default=[1, 2], choices=[1, 2])
    p.add_argument("--no-loss-memory", action="store_true", help="skip the 1x / 4x sequence-length loss rows")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument(
        "--experts", type=int, default=None, help="routed experts kept in every row (default: per backend, see above)"
    )
    p.add_argument(
        "--stage2-full-experts",
        type=int,
        default=None,
        help="routed experts of the full-parameter stage-2 rows (student + teacher; default: as above)",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=PRECISIONS,
        help="float32, or mixed: bf16 compute over fp32 master weights (as the 30B recipes)",
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    models = a.models[:1] if a.quick else a.models
    backends = a.backends[:1] if a.quick else a.backends
    seq = 64 if a.quick else a.seq
    rows: list[dict[str, Any]] = []
    losses: dict[str, Any] = {"rows": []}
    with tempfile.TemporaryDirectory(prefix="zeda-memory-") as tmp:
        work = Path(tmp)
        data = {"rollouts": write_rollouts(work / "rollouts.jsonl", 4, seq // 4, seq - seq // 4),
                "prompts": write_prompts(work / "prompts.jsonl", 8)}  # fmt: skip
        write_deepspeed_bf16(work)
        for model in models:
            plan = [(b, t, s) for b in backends for t in a.trainables for s in a.stages]
            for experts in sorted({row_experts(model, *row, a) for row in plan}, reverse=True):
                config, cut = sliced(model, experts)
                static = build_slice(config, work / f"{model}-{experts}-static")
                inject = work / f"{model}-{experts}-inject"
                run(["inject-zero-experts", str(static), "--out", str(inject)])
                for backend, trainable, stage in (row for row in plan if row_experts(model, *row, a) == experts):
                    row = measure_row(model, static, inject, backend, trainable, stage, data, work, seq, a.precision)
                    rows.append({**row, "cut": cut})
                    print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
                if model == models[0] and not losses["rows"] and not a.no_loss_memory:
                    losses = loss_memory(static, inject, work, (seq, 4 * seq) if not a.quick else (64, 256))
                shutil.rmtree(static, ignore_errors=True)
                shutil.rmtree(inject, ignore_errors=True)
    header = ("model", "backend", "trainable", "stage", "measured GB/rank", "estimate GB/rank", "error")
    print_table("Peak memory per rank (anonymous: what the process allocated) on 2 CPU ranks vs zeda's estimate",
                header, [(r["model"], r["backend"], r["trainable"], r["stage"],
                          max(r["measured_anon_gb_per_rank"], default="-"), r.get("estimate_gb_per_rank", "-"),
                          "failed" if r.get("failed") else f"{r['error']:+.1%}") for r in rows])  # fmt: skip
    print_table(
        "Loss memory: one process, stage 1, chunk 256",
        ("seq_len", "peak anonymous GB", "estimated activations GB"),
        [(r["seq_len"], r["peak_anon_gb"], r["estimated_activations_gb"]) for r in losses["rows"]],
    )
    if losses["rows"]:
        print(f"4x the sequence adds {losses['added_gb']} GB; the extra tokens' activations: "
              f"{losses['extra_token_activations_gb']} GB")  # fmt: skip
    result = {"benchmark": "memory_scale", "machine": machine(),
              **provenance(inputs={"deepspeed_config": ROOT / "recipes/deepspeed/zero3.json"}),
              "settings": {"seq_len": seq, "common": COMMON, "precision": a.precision,
                           "backends": {b: BACKENDS[b] for b in backends},
                           "trainables": a.trainables, "stages": a.stages,
                           "slices": {m: {b: sliced(m, kept_experts(m, b, a.experts))[1] for b in backends}
                                      for m in models}, "stage2_full_experts": a.stage2_full_experts},
              "rows": rows, "loss_memory": losses, "failed_rows": sum(1 for r in rows if r.get("failed")),
              "worst_error": max((abs(r["error"]) for r in rows if "error" in r), default=None)}  # fmt: skip
    path = write_result("memory-scale-quick" if a.quick else "memory-scale", result, a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
