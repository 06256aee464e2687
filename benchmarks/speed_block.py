"""Block part of the speed benchmark: one MoE block at real layer shapes, static against zeda's dynamic copies.

Block shapes, building the static block and its dynamic copies (shared expert weights, an exact zero-slot share),
the perfect-skipping oracle, the FLOP ratio, the block benchmark and the per-expert GEMM scaling. Imported by
``speed.py``, which sets the environment (offline hub, quiet transformers) and puts ``src`` on the path first.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from speed_timing import interleaved, median, time_call
from zeda_cli.architectures.families import GLM4_MOE_LITE, QWEN3_MOE
from zeda_cli.io.skeleton import QWEN3_30B_A3B as QWEN3  # the published config: one source of the real shapes
from zeda_cli.runtime.loading import dynamic_classes
from zeda_cli.runtime.packaging import dynamic_config
from zeda_cli.runtime.zeda_dynamic_moe import make_dynamic

IMPLS = ("eager", "grouped_mm", "batched_mm")
ADAPTERS = {"qwen3_moe": QWEN3_MOE, "glm4_moe_lite": GLM4_MOE_LITE}
INIT_STD = 0.02
ZERO_LOGIT = 30.0  # softmax blocks: logit of a forced zero expert (real logits are ~N(0, 0.9), see _block_input)
FORCE_BIAS = 10.0  # sigmoid blocks: correction bias of a forced zero expert (real choice scores lie in (0, 1.05))


@dataclass(frozen=True)
class BlockShape:
    name: str
    family: str  # key of ADAPTERS
    hidden: int
    intermediate: int  # per routed expert
    num_experts: int  # N real
    num_zero: int  # Z zero experts
    top_k: int
    shared_experts: int = 0  # GLM: n_shared_experts (shared width = shared_experts * intermediate)
    routed_scaling: float = 1.0

    def hf_config(self, impl: str) -> Any:
        if self.family == "qwen3_moe":
            from transformers import Qwen3MoeConfig

            return Qwen3MoeConfig(
                hidden_size=self.hidden,
                moe_intermediate_size=self.intermediate,
                num_experts=self.num_experts,
                num_experts_per_tok=self.top_k,
                norm_topk_prob=True,
                num_hidden_layers=1,
                experts_implementation=impl,
            )
        from transformers import Glm4MoeLiteConfig

        return Glm4MoeLiteConfig(
            hidden_size=self.hidden,
            moe_intermediate_size=self.intermediate,
            n_routed_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            n_shared_experts=self.shared_experts,
            routed_scaling_factor=self.routed_scaling,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            num_hidden_layers=1,
            experts_implementation=impl,
        )

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one routed expert's weights (gate, up, down)."""
        return 3 * self.hidden * self.intermediate * torch.tensor([], dtype=dtype).element_size()


FULL_SHAPES = (
    BlockShape(
        "Qwen3-30B-A3B",
        "qwen3_moe",
        hidden=QWEN3["hidden_size"],
        intermediate=QWEN3["moe_intermediate_size"],
        num_experts=QWEN3["num_experts"],
        num_zero=QWEN3["num_experts"] // 2,
        top_k=QWEN3["num_experts_per_tok"],
    ),
    BlockShape(
        "GLM-4.7-Flash",
        "glm4_moe_lite",
        hidden=2048,
        intermediate=1536,
        num_experts=64,
        num_zero=32,
        top_k=4,
        shared_experts=1,
        routed_scaling=1.8,
    ),
)
QUICK_SHAPES = (
    BlockShape("Qwen3-30B-A3B/tiny", "qwen3_moe", hidden=128, intermediate=64, num_experts=32, num_zero=16, top_k=8),
    BlockShape(
        "GLM-4.7-Flash/tiny",
        "glm4_moe_lite",
        hidden=128,
        intermediate=128,
        num_experts=16,
        num_zero=8,
        top_k=4,
        shared_experts=1,
        routed_scaling=1.8,
    ),
)


def init_uniform_(t: torch.Tensor, std: float = INIT_STD) -> None:
    """uniform with the given std: much faster than normal_ on CPU for GB-sized expert tensors."""
    bound = std * math.sqrt(3.0)
    t.uniform_(-bound, bound)


def build_static_block(shape: BlockShape, impl: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    adapter = ADAPTERS[shape.family]
    config = shape.hf_config(impl)
    module = importlib.import_module(f"transformers.models.{adapter.hf_module}.modeling_{adapter.hf_module}")
    block_cls = getattr(module, adapter.moe_block_class)
    with torch.device(device):
        block = block_cls(config).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            init_uniform_(p)
        if shape.family == "qwen3_moe":
            block.gate.weight[:, 0] = 0.0  # column 0 of the input is the constant "bias feature", see _block_input
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.uniform_(-0.05, 0.05)
    return block, config


def zeda_dynamic_config(adapter: Any, hf_config: Any, num_zero: int) -> Any:
    """zeda's dynamic config (the config.json zeda would write), as the family's dynamic config class."""
    raw = dynamic_config(hf_config.to_dict(), adapter, hf_config, num_zero, mask=False)
    config_cls, _ = dynamic_classes(adapter)
    return config_cls(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})


def shared_copy(module: torch.nn.Module, config: Any) -> torch.nn.Module:
    """A deep copy of the module tree whose parameters, buffers and config are the original objects."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    memo[id(config)] = config
    return copy.deepcopy(module, memo)


def make_dynamic_block(static: Any, shape: BlockShape, config: Any, share: float) -> Any:
    block = shared_copy(static, config)
    make_dynamic(block, zeda_dynamic_config(ADAPTERS[shape.family], config, shape.num_zero))
    _set_zero_share(block, static, shape, share)
    return block


def zero_slots(shape: BlockShape, share: float) -> int:
    return max(0, min(shape.top_k, round(share * shape.top_k)))


def _set_zero_share(block: Any, static: Any, shape: BlockShape, share: float) -> None:
    """Route exactly ``round(share * K)`` of every token's K slots to zero experts; the rest keeps the static top-K.

    softmax (Qwen3): the zero-expert rows read only input column 0, a constant 1 that the real rows ignore; m zero
    rows get +ZERO_LOGIT there (always in the top K), the others -ZERO_LOGIT (never).
    sigmoid (GLM): zero rows are 0 (score 0.5) and the correction bias, which steers the choice only, is
    +FORCE_BIAS on m zero experts and -FORCE_BIAS on the others.
    """
    n, m = shape.num_experts, zero_slots(shape, share)
    gate = block.gate
    with torch.no_grad():
        gate.weight[:n].copy_(static.gate.weight)
        gate.weight[n:].zero_()
        if shape.family == "qwen3_moe":
            gate.weight[n : n + m, 0] = ZERO_LOGIT
            gate.weight[n + m :, 0] = -ZERO_LOGIT
        else:
            gate.e_score_correction_bias[:n].copy_(static.gate.e_score_correction_bias)
            gate.e_score_correction_bias[n : n + m] = FORCE_BIAS
            gate.e_score_correction_bias[n + m :] = -FORCE_BIAS


def _block_input(shape: BlockShape, tokens: int, kind: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Unit-RMS hidden states like a post-norm MoE input; prefill (1, T, H), decode (T, 1, H)."""
    g = torch.Generator().manual_seed(seed * 7919 + tokens)
    x = torch.randn(tokens, shape.hidden, generator=g)
    if shape.family == "qwen3_moe":
        x[:, 0] = 1.0
    x = x.to(device=device, dtype=dtype)
    return x.view(1, tokens, shape.hidden) if kind == "prefill" else x.view(tokens, 1, shape.hidden)


def _realised_share(block: Any, x: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        _, _, ids = block.gate(x.reshape(-1, x.shape[-1]))
    return float((ids >= n).float().mean())


def _check_against_weight0(block: Any, static: Any, x: torch.Tensor, n: int) -> float:
    """Relative max error of the skipping experts vs the static experts computing the zero slots with weight 0."""
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])
        _, weights, ids = block.gate(flat)
        zero = ids >= n
        got = block.experts(flat, ids, weights)
        ref = static.experts(flat, ids.masked_fill(zero, 0), weights.masked_fill(zero, 0.0))
    scale = float(ref.abs().max()) or 1.0
    return float((got - ref).abs().max()) / scale


def _impl_skip_reason(impl: str, shape: BlockShape, tokens: int, args: argparse.Namespace, device) -> str | None:
    if impl != "batched_mm" or device.type != "cpu":
        return None
    gathered = tokens * shape.top_k * shape.expert_bytes(args.torch_dtype)
    if gathered > args.batched_mm_max_gb * 1e9:
        return (
            f"batched_mm gathers one weight copy per (token, slot): {gathered / 1e9:.1f} GB here "
            f"> --batched-mm-max-gb {args.batched_mm_max_gb}; ~80x slower than grouped_mm on CPU"
        )
    return None


def flop_ratio(shape: BlockShape, share: float) -> float:
    """Matmul FLOPs per token of the dynamic block / the static block (router + routed experts + shared expert)."""
    expert = 6 * shape.hidden * shape.intermediate
    shared = shape.shared_experts * expert
    static = 2 * shape.hidden * shape.num_experts + shape.top_k * expert + shared
    m = zero_slots(shape, share)
    dynamic = 2 * shape.hidden * (shape.num_experts + shape.num_zero) + (shape.top_k - m) * expert + shared
    return dynamic / static


def _oracle(static: Any, dyn: Any, x: torch.Tensor, n: int) -> Callable[[], Any]:
    """Perfect skipping: the static block's own kernel on exactly the real (token, slot) pairs, no compaction.

    Possible here because every token has the same number of real slots; it is the floor for any skipping runtime
    that keeps the transformers kernel, so dynamic / oracle is the cost of zeda's compaction.
    """
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, weights, ids = dyn.gate(flat)
    real = ids < n
    rows = int(real.sum(1)[0])
    ids, weights = ids[real].view(-1, rows), weights[real].view(-1, rows)
    shared = getattr(static, "shared_experts", None)

    def run() -> Any:
        static.gate(flat)
        out = static.experts(flat, ids, weights)
        return out + shared(flat) if shared is not None else out

    return run


def run_block_benchmark(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    workloads = [("prefill", t) for t in args.prefill] + [("decode", t) for t in args.decode]
    for shape in args.shapes:
        torch.manual_seed(args.seed)
        static, config = build_static_block(shape, args.impl[0], device, args.torch_dtype)
        dyn = {s: make_dynamic_block(static, shape, config, s) for s in args.shares}
        for impl in args.impl:
            config._experts_implementation = impl  # one config object, shared by the static and dynamic blocks
            checked = False
            for kind, tokens in workloads:
                reason = _impl_skip_reason(impl, shape, tokens, args, device)
                if reason:
                    skipped.append({"shape": shape.name, "impl": impl, "workload": kind, "tokens": tokens,
                                    "reason": reason})  # fmt: skip
                    continue
                x = _block_input(shape, tokens, kind, device, args.torch_dtype, args.seed)
                shares = {f"{s:g}": _realised_share(dyn[s], x, shape.num_experts) for s in args.shares}
                errors: dict[str, float] = {}
                if not checked:
                    errors = {
                        f"{s:g}": _check_against_weight0(dyn[s], static, x, shape.num_experts) for s in args.shares
                    }
                    checked = True
                fns = {f"{s:g}": (lambda b=dyn[s], x=x: b(x)) for s in args.shares}
                oracle_shares = [s for s in args.oracle_shares if s in dyn and kind == "prefill" and 0 < s < 1]
                for s in oracle_shares:
                    fns[f"oracle {s:g}"] = _oracle(static, dyn[s], x, shape.num_experts)
                t0 = time.perf_counter()
                with torch.no_grad():
                    timing = interleaved(lambda x=x, b=static: b(x), fns, device, args.repeats, args.warmup,
                                         args.min_sample_s, args.budget_s)  # fmt: skip
                med_static, med_static_cpu = median(timing["static_s"]), median(timing["static_cpu_s"])
                for s in args.shares:
                    key = f"{s:g}"
                    row = {
                        "shape": shape.name,
                        "impl": impl,
                        "workload": kind,
                        "tokens": tokens,
                        "requested_share": s,
                        "zero_slots_per_token": zero_slots(shape, s),
                        "realised_share": shares[key],
                        "ratio": median(timing["ratios"][key]),
                        "cpu_ratio": median(timing["cpu_ratios"][key]),
                        "ratio_of_medians": median(timing["dynamic_s"][key]) / med_static,
                        "flop_ratio": flop_ratio(shape, s),
                        "static_median_s": med_static,
                        "dynamic_median_s": median(timing["dynamic_s"][key]),
                        "static_median_cpu_s": med_static_cpu,
                        "dynamic_median_cpu_s": median(timing["dynamic_cpu_s"][key]),
                        "repeats": timing["repeats"],
                        "inner_loops": timing["inner_loops"],
                        "ratios": timing["ratios"][key],
                        "cpu_ratios": timing["cpu_ratios"][key],
                        "static_s": timing["static_s"],
                        "dynamic_s": timing["dynamic_s"][key],
                        "static_cpu_s": timing["static_cpu_s"],
                        "dynamic_cpu_s": timing["dynamic_cpu_s"][key],
                        "rel_err_vs_weight0_reference": errors.get(key),
                    }
                    okey = f"oracle {s:g}"
                    if okey in timing["ratios"]:
                        row["oracle"] = {
                            "what": "static kernel on exactly the real pairs (perfect skipping, no compaction)",
                            "ratio": median(timing["ratios"][okey]),
                            "cpu_ratio": median(timing["cpu_ratios"][okey]),
                            "ratios": timing["ratios"][okey],
                            "cpu_ratios": timing["cpu_ratios"][okey],
                            "oracle_s": timing["dynamic_s"][okey],
                            "oracle_cpu_s": timing["dynamic_cpu_s"][okey],
                        }
                    rows.append(row)
                log(
                    f"  {shape.name:<20} {impl:<10} {kind:<7} T={tokens:<5} static {med_static * 1e3:9.2f} ms  "
                    + "  ".join(
                        f"{k}:{median(v):.3f}/{median(timing['cpu_ratios'][k]):.3f}"
                        for k, v in timing["ratios"].items()
                    )  # fmt: skip
                    + f"  (x{timing['repeats']}, {time.perf_counter() - t0:.0f} s)"
                )
        del static, dyn
        gc.collect()
    return {"rows": rows, "skipped": skipped}


def run_gemm_scaling(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    """Per-expert GEMM time against its row count at each shape's (hidden, 2 x intermediate) up-projection.

    Skipping halves the rows each expert gets, not the number of experts; where a GEMM's time is not
    proportional to its rows (small M: weight traffic and blocking overheads), the block ratio cannot reach the
    FLOP ratio. t(M/2) / t(M) is the floor for the expert part at M rows per expert.
    """
    out: dict[str, Any] = {}
    experts = 8
    for shape in args.shapes:
        g = torch.Generator().manual_seed(args.seed)
        w = torch.empty(experts, 2 * shape.intermediate, shape.hidden).uniform_(-0.03, 0.03, generator=g)
        w = w.to(device=device, dtype=args.torch_dtype)
        table = []
        for m in args.gemm_rows:
            x = torch.randn(m, shape.hidden, generator=g).to(device=device, dtype=args.torch_dtype)
            for e in range(experts):
                x @ w[e].T
            best_wall, best_cpu = math.inf, math.inf
            for _ in range(args.gemm_repeats):
                wall, cpu = time_call(lambda x=x, w=w: [x @ w[e].T for e in range(experts)], device)
                best_wall, best_cpu = min(best_wall, wall / experts), min(best_cpu, cpu / experts)
            table.append({"rows": m, "wall_s": best_wall, "cpu_s": best_cpu})
        by_rows = {r["rows"]: r for r in table}
        halves = {
            str(m): {"wall": by_rows[m // 2]["wall_s"] / by_rows[m]["wall_s"],
                     "cpu": by_rows[m // 2]["cpu_s"] / by_rows[m]["cpu_s"]}
            for m in by_rows if m // 2 in by_rows
        }  # fmt: skip
        out[shape.name] = {"gemm": f"({shape.hidden} -> {2 * shape.intermediate})", "per_expert": table,
                           "half_rows_ratio": halves}  # fmt: skip
        log(f"  gemm {shape.name}: " + ", ".join(f"M={r['rows']} {r['cpu_s'] * 1e3:.2f} ms" for r in table))
        del w
    return out
