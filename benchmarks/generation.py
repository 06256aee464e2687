"""Generation for distillation: transformers' ``generate`` in the trainer (``generation.engine: hf``) against a vLLM
engine in its own environment (``vllm``: ``zeda_vllm.engine`` in .venv-vllm, driven over local HTTP).

1. **Rollouts** on a slice of Qwen3-30B-A3B (4 layers at full width: 128 experts, top-8, hidden 2048, vocab 151936;
   random bf16 weights in a real safetensors folder with the bundled tokenizer), batch 16, 128 new tokens, through
   zeda's teacher samplers, the code path of ``zeda rollout`` and of convert's rollout stage. Engine start-up (and a
   warm-up batch) is timed apart from the throughput.
2. **Stage-2 steps** on the bundled model (tiny-demo's router-only stage 2) by ``zeda distill --stage 2`` with each
   engine: median step time, and for vllm what the weight sync after each step costs.
3. **Parity after synced steps** (``--parts parity``): both bundled models, router-only then full-parameter steps
   synced into an fp32 server; its samples' log-probs against the trainer's model and the unsynced weights.

    python benchmarks/generation.py            # the full comparison (needs .venv-vllm: make install-vllm)
    python benchmarks/generation.py --quick    # a narrow 2-layer slice, 1 batch, 3 stage-2 steps: the CI smoke run
    python benchmarks/generation.py --parts quality  # the demo recipes end to end (zeda convert, then zeda eval):
                                               # hf, vllm, vllm with the teacher scored by its server, full-parameter
                                               # stage 2 on both bundled models: time per stage, zero share, NLL rise
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

from common import ROOT, machine, print_table, run_tree, write_result, zeda_child, zeda_json
from provenance import provenance
from speed_e2e import E2E_QUICK, E2EShape, build_e2e_models
from sync_parity import sync_parity
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


def env_sets(args: argparse.Namespace) -> list[str]:
    """The device and vLLM environment every zeda command of the run gets (a GPU machine: --device cuda and the
    CUDA build's Python)."""
    return [f"runtime.device={args.device}"] + ([f"generation.vllm_python={args.vllm_python}"] if args.vllm_python
                                                 else [])  # fmt: skip


def gen_section(args: argparse.Namespace, **values: Any) -> GenerationSection:
    return GenerationSection(**values, **({"vllm_python": str(args.vllm_python)} if args.vllm_python else {}))


def rollout_speed(folder: Path, engine: str, prompts: list[list[int]], args: argparse.Namespace, work: Path) -> dict:
    generation = gen_section(args, engine=engine, dtype="bfloat16", enforce_eager=args.quick)
    recipe = Recipe(runtime=RuntimeSection(dtype="bfloat16", device=args.device), generation=generation)
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
    sets = [
        f"stage2.steps={args.steps}",
        f"generation.engine={engine}",
        "generation.enforce_eager=true",
        *env_sets(args),
    ]
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


class PeakWatch:
    """Samples this process's anonymous memory and the largest file in a folder while active (a thread)."""

    def __init__(self, folder: Path, poll_s: float = 0.01):
        import threading

        self.folder, self.poll_s, self.stop = folder, poll_s, threading.Event()
        self.base = self.peak = _rss_anon()
        self.staged = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            sizes = [p.stat().st_size for p in self.folder.glob("zeda-sync-*.safetensors") if p.exists()]
            self.staged = max([self.staged, *sizes])
            time.sleep(self.poll_s)

    def __enter__(self) -> PeakWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def sync_cost(folder: Path, trainable: str, bucket_mb: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One sync of the trainable modules into a bf16 server after a step: bytes, seconds, buckets, and the extra
    memory it took on the trainer (anonymous memory above the level before) and in the staging folder."""
    import torch

    from zeda_cli import load_model
    from zeda_cli.distill.generation.sync import FileTransport, sync_units
    from zeda_cli.distill.generation.vllm import ServerSpec, SyncPlan, VllmSampler, _whole, running_servers
    from zeda_cli.distill.student import select_trainable

    model = load_model(folder, dtype=torch.float32).eval()
    select_trainable(model, trainable)
    staging = work / f"staging-{trainable}"
    staging.mkdir(parents=True, exist_ok=True)
    spec = ServerSpec(str(folder), "bfloat16", 256, work / f"sync-{trainable}.log")
    units = sync_units(model, trainable)
    largest = max(sum(p.numel() for p in m.parameters()) * 2 for _, m in units)
    with running_servers([spec], gen_section(args, engine="vllm", enforce_eager=True)) as pool:
        plan = SyncPlan(units, _whole, "bfloat16", bucket_mb * 2**20, FileTransport(pool.load_weights, staging), 10**6)
        sampler = VllmSampler(pool, [1, 2, 3, 4], 1.0, None, plan, start=0)
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                p.mul_(1.0001)
        with PeakWatch(staging) as watch:
            sampler.sync(model, 1)
    stats = sampler.last
    assert stats is not None
    return {"trainable": trainable, "bucket_mb": bucket_mb, "bytes": stats.bytes, "buckets": stats.buckets,
            "seconds": round(stats.seconds, 3), "extra_peak_mb": round((watch.peak - watch.base) / 2**20, 1),
            "staged_peak_mb": round(watch.staged / 2**20, 1), "largest_module_mb": round(largest / 2**20, 1),
            "bound_mb": round(bucket_mb + 2 * largest / 2**20, 1),
            "within_bound": (watch.peak - watch.base) <= bucket_mb * 2**20 + 2 * largest}  # fmt: skip


def stage2_variant(inject: Path, name: str, sets: list[str], args: argparse.Namespace, work: Path) -> dict:
    """``zeda distill --stage 2`` of the bundled model (tiny-demo, sampled loss) with ``sets``: the median step time,
    and the trainer process's peak memory (anonymous, sampled) — the launching process is the trainer here."""
    out = work / f"stage2-{name}"
    common = ["stage2.loss=sampled", f"stage2.steps={args.steps}", "generation.enforce_eager=true", *env_sets(args)]
    tree = run_tree(zeda_child("distill", "--stage", "2", str(inject), "--out", str(out), "--recipe", "tiny-demo",
                               "--overwrite", "-q", *(a for x in [*common, *sets] for a in ("--set", x))))  # fmt: skip
    if tree.returncode != 0:
        raise RuntimeError(f"stage 2 ({name}) failed: {tree.output[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_tokens"] / r["tokens_per_s"] for r in records[1:]]  # the first step also warms up
    [trainer] = tree.peaks_of("zeda_cli distill")
    return {"variant": name, "median_step_s": round(statistics.median(steps), 3), "steps": len(records),
            "trainer_peak_anon_gb": round(trainer["peak_anon_bytes"] / 2**30, 3),
            "final_kl": records[-1]["kl"]}  # fmt: skip


def batching(inject: Path, prompts: list[list[int]], new_tokens: int, work: Path, args: argparse.Namespace
             ) -> dict[str, Any]:  # fmt: skip
    """One server, the step's 16 sequences: two ranks each posting their half at once (the old per-rank requests,
    which the server serves one after the other) against one request with all of them (what rank 0 sends now)."""
    from concurrent.futures import ThreadPoolExecutor

    from zeda_cli.distill.generation.vllm import ServerSpec, running_servers

    batch = (prompts * 4)[:16]
    settings = SamplingSettings(new_tokens, temperature=1.0)
    spec = ServerSpec(str(inject), "float32", 512, work / "batching.log")
    times: dict[str, list[float]] = {"per_rank": [], "batched": []}
    with running_servers([spec], gen_section(args, engine="vllm", enforce_eager=True)) as pool:
        client = pool.clients[0]
        client.generate(batch[:2], SamplingSettings(4), seed=0)  # warm-up
        for round_ in range(3):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(2) as ex:
                list(ex.map(lambda half, r=round_: client.generate(half, settings, r), (batch[:8], batch[8:])))
            times["per_rank"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.generate(batch, settings, round_)
            times["batched"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"sequences": len(batch), "new_tokens": new_tokens, "per_rank_s": round(median["per_rank"], 3),
            "batched_s": round(median["batched"], 3),
            "speedup": round(median["per_rank"] / median["batched"], 2)}  # fmt: skip


GLM_BUNDLED = ROOT / "models" / "pystdlib-glm"
# End-to-end conversions measured by --parts quality: (name, model, recipe, --set values).
DEMOS: tuple[tuple[str, Path, str, tuple[str, ...]], ...] = (
    ("GLM fixture, hf", GLM_BUNDLED, "tiny-glm-demo", ("generation.engine=hf",)),
    ("GLM fixture, vllm", GLM_BUNDLED, "tiny-glm-demo", ("generation.engine=vllm",)),
    ("GLM fixture, vllm, full-parameter stage 2", GLM_BUNDLED, "tiny-glm-demo",
     ("generation.engine=vllm", "stage2.trainable=full")),
    ("hf", BUNDLED, "tiny-demo", ("generation.engine=hf",)),
    ("vllm", BUNDLED, "tiny-demo", ("generation.engine=vllm",)),
    ("vllm, sampled loss, teacher scored by its server", BUNDLED, "tiny-demo",
     ("generation.engine=vllm", "stage2.loss=sampled", "stage2.teacher_logprobs=engine")),
    ("vllm, full-parameter stage 2", BUNDLED, "tiny-demo", ("generation.engine=vllm", "stage2.trainable=full")),
)  # fmt: skip


def demo_quality(name: str, model: Path, recipe: str, sets: tuple[str, ...], work: Path, args: argparse.Namespace
                 ) -> dict[str, Any]:  # fmt: skip
    """``zeda convert`` of a bundled model with its demo recipe and ``sets`` (every stage, export included), then
    ``zeda eval`` of stage 2's model: time per stage, zero share, held-out NLL rise."""
    out = Path(tempfile.mkdtemp(prefix="demo-", dir=work)) / "run"
    began = time.perf_counter()
    flags = [a for x in [*sets, *env_sets(args)] for a in ("--set", x)]
    summary = zeda_json("convert", str(model), "--out", str(out), "--recipe", recipe, *flags)
    stages = {stage["stage"]: stage["seconds"] for stage in summary["stages"]}
    wall = time.perf_counter() - began
    ev = zeda_json("eval", str(out / "stage2"))
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"variant": name, "model": model.name, "recipe": recipe, "sets": list(sets), "convert_s": round(wall, 1),
            "stage_s": stages, "statuses": {s["stage"]: s["status"] for s in summary["stages"]},
            "zero_share": ev["zero_share"], "nll_delta_pct": ev["nll_delta_pct"],
            "expert_flops_ratio": ev["expert_flops_ratio"]}  # fmt: skip


def _recorded(demo: tuple, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One demo's row, or its failure as a row (the other demos still run and the JSON is still written)."""
    try:
        return demo_quality(*demo, work, args)
    except (RuntimeError, subprocess.CalledProcessError, json.JSONDecodeError) as exc:
        return {"variant": demo[0], "model": demo[1].name, "recipe": demo[2], "sets": list(demo[3]),
                "failed": str(exc)[-2000:]}  # fmt: skip


PARTS = ("rollouts", "stage2", "teacher", "engines", "batching", "sync", "parity", "quality")


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = replace(E2E_QUICK, vocab=4096) if args.quick else E2EShape(layers=args.layers)
    work = Path(tempfile.mkdtemp(prefix="zeda-generation-"))
    parts = set(args.parts)
    result: dict[str, Any] = {"schema": "zeda.bench.generation/2", "quick": args.quick,
                              "slice": asdict(shape) | {"params": shape.param_count()},
                              "settings": {"batch": args.batch, "batches": args.batches, "new_tokens": args.new_tokens,
                                           "stage2_steps": args.steps, "parts": sorted(parts)}}  # fmt: skip
    try:
        tok = load_tokenizer(BUNDLED)
        texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
        prompts = [tok(t)["input_ids"] for t in texts[: args.batch * args.batches]]
        inject = inject_zero_experts(str(BUNDLED), work / "inject", zero=ZeroExpertsSection()).out
        if parts & {"rollouts", "sync"}:
            folder = write_slice(shape, work / "slice")
            if "rollouts" in parts:
                result["rollout"] = {e: rollout_speed(folder, e, prompts, args, work / f"engine-{e}") for e in ENGINES}
                r = result["rollout"]
                result["rollout_speedup_vllm_over_hf"] = round(r["vllm"]["tokens_per_s"] / r["hf"]["tokens_per_s"], 2)
            if "sync" in parts:
                sliced = inject_zero_experts(str(folder), work / "slice-inject", zero=ZeroExpertsSection()).out
                result["sync"] = [
                    {"model": "bundled", **sync_cost(inject, t, 1, work, args)} for t in ("router", "full")
                ]
                result["sync"] += [{"model": "slice", **sync_cost(sliced, t, args.bucket_mb, work, args)}
                                   for t in ("router", "full")]  # fmt: skip
                shutil.rmtree(sliced, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
        if "stage2" in parts:
            result["stage2"] = {e: stage2_speed(inject, e, args, work) for e in ENGINES}
        vllm = ["generation.engine=vllm"]
        if "teacher" in parts:
            result["teacher"] = [stage2_variant(inject, "trainer teacher", [*vllm, "stage2.teacher_logprobs=trainer"],
                                                args, work),
                                 stage2_variant(inject, "engine teacher", [*vllm, "stage2.teacher_logprobs=engine"],
                                                args, work)]  # fmt: skip
        if "engines" in parts:
            result["engines"] = [stage2_variant(inject, f"{n} student server{'s' if n > 1 else ''}",
                                                [*vllm, f"generation.num_engines={n}"], args, work)
                                 for n in (1, 2)]  # fmt: skip
        if "batching" in parts:
            result["batching"] = batching(inject, prompts, args.new_tokens, work, args)
        if "parity" in parts:
            glm = inject_zero_experts(str(GLM_BUNDLED), work / "glm-inject", zero=ZeroExpertsSection()).out
            gen = gen_section(args, engine="vllm", enforce_eager=True)
            result["parity"] = [
                row
                for name, folder in (("pystdlib-moe", inject), ("pystdlib-glm", glm))
                for row in _parity_rows(name, folder, [p[:32] for p in prompts[:4]], work, gen)
            ]
        if "quality" in parts:
            result["demo_quality"] = [_recorded(demo, work, args) for demo in DEMOS]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _parity_rows(name: str, folder: Path, prompts: list[list[int]], work: Path, gen: Any) -> list[dict[str, Any]]:
    """One model's parity rows, or its failure as a row (a probe that disagrees stops that model, not the run)."""
    from zeda_cli.errors import ExternalError

    try:
        return [{"model": name, **row} for row in sync_parity(folder, prompts, work, gen)]
    except ExternalError as exc:
        return [{"model": name, "failed": str(exc)}]


def show(result: dict[str, Any]) -> None:
    cfg = result["settings"]
    if "rollout" in result:
        r = result["rollout"]
        columns = ("tokens_per_s", "tokens", "seconds", "startup_s")
        print_table(f"Rollouts: Qwen3-30B-A3B slice, {result['slice']['layers']} layers, batch {cfg['batch']} x "
                    f"{cfg['new_tokens']} new tokens, bf16", ["engine", "tokens/s", "tokens", "seconds", "start-up s"],
                    [(e, *(r[e][k] for k in columns)) for e in ENGINES])  # fmt: skip
    if "stage2" in result:
        s = result["stage2"]
        columns = ("median_step_s", "median_sync_s", "steps", "wall_s")
        print_table("Stage 2 on the bundled model (tiny-demo, router-only)",
                    ["engine", "median step s", "median sync s", "steps", "wall s (with start-up)"],
                    [(e, *(s[e][k] for k in columns)) for e in ENGINES])  # fmt: skip
    for key, title in (("teacher", "Stage 2, teacher in the trainer vs scored by its server (bundled model)"),
                       ("engines", "Stage 2, one student server vs two (bundled model)")):  # fmt: skip
        if key in result:
            print_table(title, ["variant", "median step s", "trainer peak GB", "final KL"],
                        [(v["variant"], v["median_step_s"], v["trainer_peak_anon_gb"], v["final_kl"])
                         for v in result[key]])  # fmt: skip
    if "batching" in result:
        b = result["batching"]
        print_table(f"One server, {b['sequences']} sequences x {b['new_tokens']} tokens",
                    ["two ranks' requests s", "one batched request s", "speed-up"],
                    [(b["per_rank_s"], b["batched_s"], b["speedup"])])  # fmt: skip
    if "sync" in result:
        print_table("Weight sync after a step (bf16 server)",
                    ["model", "trainable", "MB sent", "buckets", "s", "extra peak MB", "staged peak MB", "bound MB"],
                    [(x["model"], x["trainable"], round(x["bytes"] / 2**20, 1), x["buckets"], x["seconds"],
                      x["extra_peak_mb"], x["staged_peak_mb"], x["bound_mb"]) for x in result["sync"]])  # fmt: skip
    if "parity" in result:
        print_table("Server vs trainer after 3 synced steps (fp32, max |log-prob difference| of the server's samples)",
                    ["model", "trainable", "synced", "stale", "bytes per sync", "buckets", "s per sync"],
                    [(x["model"], x["trainable"], f"{x['synced_max_abs']:.1e}", f"{x['stale_max_abs']:.3f}",
                      x["syncs"][-1]["bytes"], x["syncs"][-1]["buckets"],
                      max(s["seconds"] for s in x["syncs"])) if "failed" not in x else
                     (x["model"], "-", "failed", x["failed"][:60], "-", "-", "-")
                     for x in result["parity"]])  # fmt: skip
    if result.get("demo_quality"):
        stages = ("rollout", "stage1", "stage2")
        print_table("Demo recipes end to end (zeda convert, then zeda eval of stage 2)",
                    ["variant", "model", "zero share", "NLL rise %", *(f"{x} s" for x in stages), "convert s"],
                    [(q["variant"], q["model"], q.get("zero_share", "failed"), q.get("nll_delta_pct"),
                      *(q.get("stage_s", {}).get(x) for x in stages), q.get("convert_s"))
                     for q in result["demo_quality"]])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", nargs="*", default=None, choices=PARTS, help="default: all but quality")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=None, help="timed rollout batches (default 2; quick 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128; quick 16")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 steps per engine (default 20; quick 3)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the full-width slice")
    parser.add_argument("--bucket-mb", type=int, default=512, help="sync bucket of the slice's full sync")
    parser.add_argument("--quality", action="store_true", help="same as adding quality to --parts")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="runtime.device of every run")
    parser.add_argument("--vllm-python", type=Path, default=None, help="generation.vllm_python (default .venv-vllm)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.batches = args.batches or (1 if args.quick else 2)
    args.new_tokens = args.new_tokens or (16 if args.quick else 128)
    args.steps = args.steps or (3 if args.quick else 20)
    args.parts = args.parts or [p for p in PARTS if p != "quality" or args.quality]
    result = run(args)
    inputs = {
        "bundled_model": BUNDLED,
        "prompts": PROMPTS,
        "tiny_demo": ROOT / "recipes" / "tiny-demo.yaml",
        "glm_model": GLM_BUNDLED,
        "tiny_glm_demo": ROOT / "recipes" / "tiny-glm-demo.yaml",
    }
    result.update(machine=machine(), **provenance(inputs=inputs))
    path = write_result("generation-quick" if args.quick else f"generation-{args.device}", result, args.out)
    show(result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
