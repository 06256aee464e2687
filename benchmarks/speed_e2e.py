"""End-to-end part of the speed benchmark: a few-layer, full-width Qwen3-30B-A3B slice, static against dynamic.

The dynamic model shares every weight tensor with the static one; its zero-expert share is set with the runtime
dial ``zero_expert_bias``. Prefill and decode (KV cache) timings, batch 1 and batched. Imported by ``speed.py``,
which sets the environment (offline hub, quiet transformers) and puts ``src`` on the path first.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from speed_block import init_uniform_, shared_copy, zeda_dynamic_config
from speed_timing import median, sync
from zeda_cli.architectures.families import QWEN3_MOE
from zeda_cli.io.skeleton import QWEN3_30B_A3B as QWEN3  # the published config: one source of the real shapes
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, make_dynamic, routers


@dataclass(frozen=True)
class E2EShape:
    """A slice of the Qwen3-30B-A3B architecture (48 layers, vocab 151936 in the real model)."""

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

    def param_count(self) -> int:
        h = self.hidden
        attn = h * self.heads * self.head_dim * 2 + h * self.kv_heads * self.head_dim * 2
        moe = self.num_experts * 3 * h * self.intermediate + self.num_experts * h
        return self.layers * (attn + moe) + 2 * self.vocab * h


E2E_QUICK = E2EShape(layers=2, vocab=512, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=64,
                     num_experts=32, num_zero=16, top_k=8)  # fmt: skip


def _e2e_config(shape: E2EShape, impl: str) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=QWEN3["intermediate_size"],
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        moe_intermediate_size=shape.intermediate,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        experts_implementation=impl,
        attn_implementation="sdpa",
    )


def build_e2e_models(shape: E2EShape, impl: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen3MoeForCausalLM
    from transformers.initialization import no_init_weights

    config = _e2e_config(shape, impl)
    torch.manual_seed(seed)
    with no_init_weights(), torch.device(device):
        static = Qwen3MoeForCausalLM(config)
    static.to(dtype).eval()
    with torch.no_grad():
        for module in static.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.fill_(1.0)
                continue
            for p in module.parameters(recurse=False):
                init_uniform_(p)
    dynamic = shared_copy(static, config)
    make_dynamic(dynamic, zeda_dynamic_config(QWEN3_MOE, config, shape.num_zero))
    n = shape.num_experts
    static_gates = [m.gate for m in static.modules() if type(m).__name__ == QWEN3_MOE.moe_block_class]
    with torch.no_grad():
        for (_, router), gate in zip(routers(dynamic), static_gates, strict=True):
            router.weight[:n].copy_(gate.weight)
            init_uniform_(router.weight[n:])  # zero-expert rows: random like the real ones; the dial sets the share
    return static, dynamic, config


def _zero_share(model: Any, n: int, fn: Callable[[], Any]) -> tuple[float, list[float]]:
    with RoutingRecorder(model) as rec, torch.no_grad():
        fn()
    per_layer = [float((r[2] >= n).float().mean()) for r in rec.records]
    total = sum(int((r[2] >= n).sum()) for r in rec.records) / max(1, sum(r[2].numel() for r in rec.records))
    return total, per_layer


def _set_bias(model: Any, bias: float) -> None:
    for _, router in routers(model):
        router.zero_expert_bias = float(bias)


def calibrate_zero_bias(model: Any, ids: torch.Tensor, n: int, target: float, log: Callable[[str], None]) -> float:
    """Bisect the runtime dial ``zero_expert_bias`` until the realised zero share on ``ids`` is ~``target``."""
    lo, hi = -20.0, 20.0
    best = (1.0, 0.0)
    for _ in range(24):
        mid = (lo + hi) / 2
        _set_bias(model, mid)
        share, _ = _zero_share(model, n, lambda: model(input_ids=ids, logits_to_keep=1))
        if abs(share - target) < best[0]:
            best = (abs(share - target), mid)
        if abs(share - target) < 0.004:
            break
        lo, hi = (mid, hi) if share < target else (lo, mid)
    _set_bias(model, best[1])
    log(f"  zero_expert_bias = {best[1]:+.4f} (calibration share error {best[0]:.4f})")
    return best[1]


def _session(model: Any, prompt: torch.Tensor, steps: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Prefill the prompt (KV cache, last-token logits) then decode ``steps`` one token at a time; wall and CPU s."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    sync(device)
    w1, c1 = time.perf_counter(), time.process_time()
    cache = out.past_key_values
    for i in range(steps.shape[1]):
        out = model(input_ids=steps[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    sync(device)
    w2, c2 = time.perf_counter(), time.process_time()
    return {"prefill": w1 - w0, "prefill_cpu": c1 - c0, "decode": w2 - w1, "decode_cpu": c2 - c1}


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_e2e_benchmark(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    shape: E2EShape = args.e2e_shape
    notes: list[str] = []
    bytes_per = torch.tensor([], dtype=args.torch_dtype).element_size()
    avail = _mem_available() if device.type == "cpu" else None
    while avail is not None and shape.layers > 1 and shape.param_count() * bytes_per * 1.15 + 2e9 > avail:
        notes.append(f"{shape.layers} layers do not fit in {avail / 1e9:.1f} GB available RAM: one layer fewer")
        shape = E2EShape(**{**asdict(shape), "layers": shape.layers - 1})
    log(
        f"e2e: Qwen3-30B-A3B slice, {shape.layers} layers, vocab {shape.vocab}, "
        f"{shape.param_count() / 1e9:.2f} B params"
    )
    t_build = time.perf_counter()
    static, dynamic, config = build_e2e_models(shape, args.e2e_impl, device, args.torch_dtype, args.seed)
    log(f"  built in {time.perf_counter() - t_build:.0f} s")
    n = shape.num_experts
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, shape.vocab, (1, args.e2e_prompt), generator=g).to(device)
    steps = torch.randint(0, shape.vocab, (1, args.e2e_steps), generator=g).to(device)
    b_prompt = torch.randint(0, shape.vocab, (args.e2e_batch, args.e2e_batch_prompt), generator=g).to(device)
    b_steps = torch.randint(0, shape.vocab, (args.e2e_batch, args.e2e_batch_steps), generator=g).to(device)
    with torch.no_grad():
        calib = prompt[:, : min(args.e2e_prompt, 128)]
        bias = calibrate_zero_bias(dynamic, calib, n, args.e2e_share, log)
        models = {"static": static, "dynamic": dynamic}
        phases = ("prefill", "decode", "batch_prefill", "batch_decode")
        raw = {k: {f"{ph}{c}": [] for ph in phases for c in ("_s", "_cpu_s")} for k in models}
        for _ in range(args.warmup):  # short sessions: first-call costs, allocator, caches
            for model in models.values():
                _session(model, prompt[:, :32], steps[:, :2], device)
                _session(model, b_prompt[:, :8], b_steps[:, :2], device)
        records: dict[str, list] = {}
        for r in range(args.e2e_repeats):
            for name in ["static", "dynamic"] if r % 2 == 0 else ["dynamic", "static"]:
                # first repeat: the dynamic model's routing is recorded (a list append per layer call) to report
                # the realised zero share of exactly the timed inputs
                recording = r == 0 and name == "dynamic"
                for prefix, (p_ids, s_ids) in (("", (prompt, steps)), ("batch_", (b_prompt, b_steps))):
                    if recording:
                        with RoutingRecorder(dynamic) as rec:
                            times = _session(models[name], p_ids, s_ids, device)
                        records[prefix] = list(rec.records)
                    else:
                        times = _session(models[name], p_ids, s_ids, device)
                    for ph in ("prefill", "decode"):
                        raw[name][f"{prefix}{ph}_s"].append(times[ph])
                        raw[name][f"{prefix}{ph}_cpu_s"].append(times[f"{ph}_cpu"])
            log(f"  repeat {r + 1}: prefill S {raw['static']['prefill_s'][-1]:.2f} s "
                f"D {raw['dynamic']['prefill_s'][-1]:.2f} s; decode S {raw['static']['decode_s'][-1]:.2f} s "
                f"D {raw['dynamic']['decode_s'][-1]:.2f} s; "
                f"batch decode S {raw['static']['batch_decode_s'][-1]:.2f} s "
                f"D {raw['dynamic']['batch_decode_s'][-1]:.2f} s")  # fmt: skip

    layers = len(routers(dynamic))

    def share(recs: list) -> float:
        return sum(int((r[2] >= n).sum()) for r in recs) / max(1, sum(r[2].numel() for r in recs))

    realised = {
        "prefill": share(records[""][:layers]),
        "decode": share(records[""][layers:]),
        "batch_prefill": share(records["batch_"][:layers]),
        "batch_decode": share(records["batch_"][layers:]),
        "prefill_per_layer": [float((r[2] >= n).float().mean()) for r in records[""][:layers]],
        "decode_per_step": [
            share(records[""][layers + i * layers : layers + (i + 1) * layers]) for i in range(args.e2e_steps)
        ],
    }
    log(f"  realised zero share: prefill {realised['prefill']:.3f}, decode {realised['decode']:.3f}, "
        f"batch decode {realised['batch_decode']:.3f}")  # fmt: skip

    def phase(key: str, tokens: int) -> dict[str, Any]:
        s, d = raw["static"][f"{key}_s"], raw["dynamic"][f"{key}_s"]
        sc, dc = raw["static"][f"{key}_cpu_s"], raw["dynamic"][f"{key}_cpu_s"]
        speedups = [a / b for a, b in zip(s, d, strict=True)]
        cpu_speedups = [a / b for a, b in zip(sc, dc, strict=True)]
        return {
            "tokens_per_run": tokens,
            "static_tokens_per_s": tokens / median(s),
            "dynamic_tokens_per_s": tokens / median(d),
            "speedup": median(speedups),
            "cpu_speedup": median(cpu_speedups),
            "speedups": speedups,
            "cpu_speedups": cpu_speedups,
            "static_s": s,
            "dynamic_s": d,
            "static_cpu_s": sc,
            "dynamic_cpu_s": dc,
        }

    result = {
        "model": "Qwen3MoeForCausalLM (Qwen3-30B-A3B layer shapes, random weights)",
        "shape": asdict(shape),
        "params": shape.param_count(),
        "impl": args.e2e_impl,
        "requested_share": args.e2e_share,
        "zero_expert_bias": bias,
        "realised_share": realised,
        "notes": notes,
        "prefill": phase("prefill", args.e2e_prompt),
        "decode": phase("decode", args.e2e_steps),
        "batch_prefill": phase("batch_prefill", args.e2e_batch * args.e2e_batch_prompt),
        "batch_decode": phase("batch_decode", args.e2e_batch * args.e2e_batch_steps),
        "workload": {
            "prompt": args.e2e_prompt,
            "decode_steps": args.e2e_steps,
            "batch": args.e2e_batch,
            "batch_prompt": args.e2e_batch_prompt,
            "batch_decode_steps": args.e2e_batch_steps,
        },
    }
    del static, dynamic, models
    gc.collect()
    return result
