"""Training throughput: a stage-1 step of the dynamic student vs the same step of the static model.

Static: transformers' Qwen3MoeForCausalLM, cross-entropy, AdamW. Dynamic: the injected model through zeda's own
stage-1 step (routing recorder, cross-entropy + L_GA, the local engine), at the zero share the untrained injection
gives, at 50% (zero_expert_bias calibrated) and at 0% (zero experts masked). Steps of all variants are interleaved in
one process (median over repeats); each variant's peak memory is measured in a separate child process.

    python benchmarks/training.py            # the bundled model, batch 16 x 256 tokens
    python benchmarks/training.py --quick    # tiny, for tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import ROOT, machine, print_table, python_child, run_child, write_result

BUNDLED = ROOT / "models" / "pystdlib-moe"
VARIANTS = ("static", "dynamic-masked", "dynamic-init", "dynamic-50")


def batch_texts(tokenizer: Any, batch: int, seq: int) -> torch.Tensor:
    lines = [json.loads(line)["text"] for line in (BUNDLED / "data" / "heldout.jsonl").read_text().splitlines()]
    ids = [i for t in lines for i in tokenizer(t)["input_ids"]]
    need = batch * seq
    ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return torch.tensor(ids).view(batch, seq)


class StaticStep:
    def __init__(self, model: Any, lr: float):
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def __call__(self, ids: torch.Tensor) -> None:
        logits = self.model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class DynamicStep:
    """zeda's stage-1 step (stage1._train_step) on the injected model."""

    def __init__(self, model: Any, lr: float):
        from zeda_cli.distill.engines.local import LocalEngine
        from zeda_cli.distill.losses import GroupBalance
        from zeda_cli.recipes import OptimSection
        from zeda_cli.runtime.zeda_dynamic_moe import RouterSpec

        self.engine = LocalEngine(model.train(), OptimSection(lr=lr), 10**6, torch.device("cpu"))
        self.spec = RouterSpec.from_config(model.config)
        self.balance = GroupBalance.for_target(self.spec.num_experts, self.spec.num_zero_experts, 0.5, 0.1)

    def __call__(self, ids: torch.Tensor) -> None:
        from zeda_cli.distill.data import SftExample
        from zeda_cli.distill.loop import MicroSteps
        from zeda_cli.distill.stage1 import Stage1Target, _train_step

        examples = [SftExample(row.tolist(), [-100] + row.tolist()[1:]) for row in ids]
        target = Stage1Target("ce", "response", 1024, None)  # the official CE loss
        micro = MicroSteps(self.engine, self.spec, self.balance)
        self.stats = _train_step(micro, examples, 0, len(examples), target)


def build(variant: str, injected: Path, bias: float) -> Any:
    from zeda_cli import load_model
    from zeda_cli.runtime.zeda_dynamic_moe import routers, set_zero_expert_bias

    if variant == "static":
        return StaticStep(load_model(BUNDLED, dtype=torch.float32), 1e-4)
    model = load_model(injected, dtype=torch.float32, use_zce_mask=variant == "dynamic-masked")
    if variant == "dynamic-50":
        set_zero_expert_bias(model, bias)
    for _, router in routers(model):
        router.float()
    return DynamicStep(model, 1e-4)


def calibrate_bias(injected: Path, ids: torch.Tensor, target: float = 0.5) -> float:
    """zero_expert_bias giving ``target`` share of zero slots on this batch (bisection)."""
    from zeda_cli import load_model
    from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, set_zero_expert_bias

    model = load_model(injected, dtype=torch.float32)
    n = model.config.zeda["router"]["num_experts"]
    low, high = -5.0, 10.0
    for _ in range(20):
        mid = (low + high) / 2
        set_zero_expert_bias(model, mid)
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(input_ids=ids[:4])
        share = sum(int((r[2] >= n).sum()) for r in rec.records) / sum(r[2].numel() for r in rec.records)
        low, high = (mid, high) if share < target else (low, mid)
    return (low + high) / 2


def time_interleaved(steps: dict[str, Any], ids: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step(ids)
    for _ in range(repeats):
        for name, step in steps.items():
            began = time.perf_counter()
            step(ids)
            times[name].append(time.perf_counter() - began)
    return times


def child_memory(variant: str, injected: Path, bias: float, batch: int, seq: int, steps: int) -> int:
    code = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import training as t\n"
            f"torch.set_num_threads({torch.get_num_threads()})\n"
            f"from zeda_cli import load_tokenizer\n"
            f"ids = t.batch_texts(load_tokenizer(t.BUNDLED), {batch}, {seq})\n"
            f"step = t.build({variant!r}, __import__('pathlib').Path({str(injected)!r}), {bias})\n"
            f"for _ in range({steps}): step(ids)")  # fmt: skip
    result = run_child(python_child(code))
    if result.returncode != 0:
        raise SystemExit(result.output[-2000:])
    return result.peak_rss_bytes


def run(args: argparse.Namespace) -> dict[str, Any]:
    from zeda_cli import load_tokenizer
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="zeda-train-bench-"))
    injected = inject_zero_experts(str(BUNDLED), work / "inject", zero=ZeroExpertsSection()).out
    ids = batch_texts(load_tokenizer(BUNDLED), args.batch, args.seq)
    bias = calibrate_bias(injected, ids)
    steps = {v: build(v, injected, bias) for v in VARIANTS}
    times = time_interleaved(steps, ids, args.repeats)
    shares = {v: steps[v].stats["zero_share"] for v in VARIANTS if v != "static"}
    memory = {v: child_memory(v, injected, bias, args.batch, args.seq, 2) for v in VARIANTS} if args.memory else {}
    tokens = args.batch * args.seq
    static = statistics.median(times["static"])
    rows = {
        v: {
            "median_step_s": statistics.median(t),
            "tokens_per_s": tokens / statistics.median(t),
            "throughput_vs_static": static / statistics.median(t),
            "zero_share": shares.get(v, 0.0),
            "peak_rss_bytes": memory.get(v),
            "step_s": t,
        }
        for v, t in times.items()
    }
    return {"schema": "zeda.bench.training/1", "machine": machine(), "threads": torch.get_num_threads(),
            "settings": vars(args) | {"zero_expert_bias_for_50": bias}, "result": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 64, 2
    result = run(args)
    rows = [(v, f"{r['median_step_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['throughput_vs_static']:.3f}",
             f"{r['zero_share']:.3f}", "-" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 1e9:.2f}")
            for v, r in result["result"].items()]  # fmt: skip
    print_table(f"Stage-1 training step, {args.batch} x {args.seq} tokens (bundled model, CPU)",
                ["variant", "step s", "tokens/s", "vs static", "zero share", "peak RSS GB"], rows)  # fmt: skip
    print(f"wrote {write_result('training-quick' if args.quick else 'training', result, args.out)}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
