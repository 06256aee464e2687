"""Streamed I/O of inject-zero-experts and export on a synthetic multi-GB sharded checkpoint.

The checkpoint has the real Qwen3-30B-A3B layer shapes and per-expert on-disk keys (as the released checkpoint),
with ``--layers`` decoder layers. Each step runs in its own process: a plain copy of the shard files, ``zeda
inject-zero-experts`` and ``zeda export`` of its output, twice in turn (the second round is reported, page cache
warm for all three). Reported: wall time, throughput relative to the plain copy, and peak RSS against the largest
shard (goal: peak RSS <= largest shard + 10%).

    python benchmarks/io.py                  # 2 layers, 1GB shards (~3.8 GB)
    python benchmarks/io.py --quick          # a tiny checkpoint, seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from common import gb, machine, print_table, python_child, run_child, write_result, zeda_child
from zeda_cli.io.skeleton import QWEN3_30B_A3B
from zeda_cli.io.writer import OutTensor, parse_size, tensor_out, write_sharded

CHUNK = 16 * 1024 * 1024


def per_expert_entries(config_dict: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor as the released checkpoint stores it (experts per expert, not fused)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", **{k: v for k, v in config_dict.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    entries = []
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            prefix, (e, two_i, h) = name.removesuffix("gate_up_proj"), t.shape
            for k in range(e):
                entries += [
                    (f"{prefix}{k}.gate_proj.weight", (two_i // 2, h)),
                    (f"{prefix}{k}.up_proj.weight", (two_i // 2, h)),
                ]
        elif name.endswith("experts.down_proj"):
            prefix, (e, h, i) = name.removesuffix("down_proj"), t.shape
            entries += [(f"{prefix}{k}.down_proj.weight", (h, i)) for k in range(e)]
        else:
            entries.append((name, tuple(t.shape)))
    return entries


def random_tensor(name: str, shape: tuple[int, ...], noise: torch.Tensor) -> OutTensor:
    """Routers get real normal values (their statistics are used); other tensors are raw bf16 bytes."""
    if name.endswith("mlp.gate.weight"):
        return tensor_out(name, (torch.randn(shape) * 0.02).to(torch.bfloat16))
    size = 2
    for d in shape:
        size *= d

    def chunks():
        left = size
        while left:
            n = min(left, CHUNK)
            yield memoryview(noise[:n].numpy())
            left -= n

    return OutTensor(name, "BF16", shape, chunks)


def build_checkpoint(folder: Path, config_dict: dict[str, Any], shard: str) -> int:
    from transformers import AutoConfig

    folder.mkdir(parents=True)
    AutoConfig.for_model("qwen3_moe", **{k: v for k, v in config_dict.items() if k != "model_type"}).save_pretrained(
        folder
    )
    noise = torch.randint(0, 256, (CHUNK,), dtype=torch.uint8)
    tensors = [random_tensor(n, s, noise) for n, s in per_expert_entries(config_dict)]
    files = write_sharded(folder, tensors, parse_size(shard))
    return max(f.size for f in files)


def copy_command(src: Path, dst: Path) -> list[str]:
    code = (
        f"import shutil, pathlib; d = pathlib.Path({str(dst)!r}); d.mkdir(exist_ok=True)\n"
        f"for p in sorted(pathlib.Path({str(src)!r}).glob('*.safetensors')):\n"
        "    shutil.copyfile(p, d / p.name)"
    )
    return python_child(code)


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
    if args.quick:
        config.update(
            hidden_size=256, moe_intermediate_size=128, num_experts=16, vocab_size=4096, intermediate_size=512
        )
    work = Path(tempfile.mkdtemp(prefix="zeda-io-", dir=args.workdir))
    try:
        src = work / "static"
        largest = build_checkpoint(src, config, args.shard_size)
        total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        baseline = run_child(python_child("import zeda_cli.inject, zeda_cli.export"))
        rounds = []
        for _ in range(2):
            for d in ("copy", "inject", "export"):
                shutil.rmtree(work / d, ignore_errors=True)
            steps = {
                "plain copy": run_child(copy_command(src, work / "copy")),
                "inject-zero-experts": run_child(
                    zeda_child(
                        "inject-zero-experts",
                        str(src),
                        "--out",
                        str(work / "inject"),
                        "--max-shard-size",
                        args.shard_size,
                        "-q",
                    )
                ),  # fmt: skip
                "export": run_child(
                    zeda_child(
                        "export",
                        str(work / "inject"),
                        "--out",
                        str(work / "export"),
                        "--max-shard-size",
                        args.shard_size,
                        "-q",
                    )
                ),  # fmt: skip
            }
            for name, r in steps.items():
                if r.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{r.output[-2000:]}")
            rounds.append({k: {"seconds": v.seconds, "peak_rss_bytes": v.peak_rss_bytes} for k, v in steps.items()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(config, total, largest, baseline.peak_rss_bytes, rounds, args)


def report(config, total, largest, baseline_rss, rounds, args) -> dict[str, Any]:
    last = rounds[-1]
    copy_s = last["plain copy"]["seconds"]
    rows = {
        name: {
            **v,
            "throughput_gb_s": gb(total) / v["seconds"],
            "time_vs_copy": v["seconds"] / copy_s,
            "rss_vs_largest_shard": v["peak_rss_bytes"] / largest,
            "meets_rss_goal": v["peak_rss_bytes"] <= 1.1 * largest,
        }
        for name, v in last.items()
    }
    return {
        "schema": "zeda.bench.io/1",
        "machine": machine(),
        "settings": {
            "layers": args.layers,
            "shard_size": args.shard_size,
            "quick": args.quick,
            "experts": config["num_experts"],
            "hidden": config["hidden_size"],
        },  # fmt: skip
        "checkpoint_bytes": total,
        "largest_shard_bytes": largest,
        "import_only_peak_rss_bytes": baseline_rss,
        "rounds": rounds,
        "result": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoint is written (default: /tmp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.shard_size = "20MB" if args.shard_size == "1GB" else args.shard_size
    result = run(args)
    rows = [(k, f"{v['seconds']:.2f}", f"{v['throughput_gb_s']:.2f}", f"{v['time_vs_copy']:.2f}",
             f"{gb(v['peak_rss_bytes']):.2f}", f"{v['rss_vs_largest_shard']:.2f}", v["meets_rss_goal"])
            for k, v in result["result"].items()]  # fmt: skip
    title = (
        f"Streamed I/O: {gb(result['checkpoint_bytes']):.2f} GB checkpoint, largest shard "
        f"{gb(result['largest_shard_bytes']):.2f} GB, "
        f"import-only RSS {gb(result['import_only_peak_rss_bytes']):.2f} GB"
    )
    print_table(
        title, ["step", "seconds", "GB/s", "time / copy", "peak RSS GB", "RSS / largest shard", "RSS goal"], rows
    )
    path = write_result("io-quick" if args.quick else "io", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
