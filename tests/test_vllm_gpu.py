"""zeda-vllm on a CUDA GPU (``pytest -m gpu``; scripts/gpu_check.sh runs it with ZEDA_VLLM_VENV pointing at a CUDA
build of vLLM): with no flags the engine compiles and captures CUDA graphs piecewise, split at the skipping op;
outputs match zeda's runtime (fp32 on the GPU against fp32 on the CPU: 1e-3) with identical greedy tokens, zero
slots are skipped, and an in-place load of every tensor reaches the captured graphs (the loader copies into the
tensors the graphs were captured with). Skipped where the vLLM environment is not a CUDA build."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vllm_harness as vh
from zeda_cli import load_model, load_tokenizer

BUNDLED = vh.ROOT / "models" / "pystdlib-moe"
TINY_PROMPTS = [[5, 10, 20, 30, 42, 7, 9, 50, 20, 33, 61, 12], [17, 18, 19, 60, 3, 4, 44, 71], [80, 8, 8, 23, 36]]
TOLERANCE = 1e-3
OP = "zeda_vllm::routed_experts"


@functools.cache
def cuda_skip_reason() -> str | None:
    if not Path("/dev/nvidia0").exists() and shutil.which("nvidia-smi") is None:
        return "needs a CUDA GPU"
    if reason := vh.vllm_skip_reason():
        return reason
    probe = "from vllm.platforms import current_platform as p; print(p.is_cuda_alike())"
    proc = subprocess.run([str(vh.VLLM_PYTHON), "-c", probe], capture_output=True, text=True, timeout=300)
    if proc.stdout.strip().splitlines()[-1:] != ["True"]:
        return f"{vh.VLLM_PYTHON} is not a CUDA build of vLLM on a GPU machine (scripts/gpu_check.sh builds one)"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cuda_skip_reason() is not None, reason=cuda_skip_reason() or "")]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("gpu")
    tok = load_tokenizer(BUNDLED)
    lines = (BUNDLED / "data" / "prompts-heldout.jsonl").read_text().splitlines()[:4]
    out = {}
    for i, name in enumerate(["bundled", "qwen2_moe"]):
        folder = vh.dynamic_tiny_or_bundled(name, root / "folders")
        model = load_model(folder, dtype=torch.float32).eval()
        vh.perturb(model, lambda n: True, 0.1, torch.Generator().manual_seed(i))
        update = root / f"{name}-all.safetensors"
        vh.write_step(model, lambda n: True, False, vh.checkpoint_keys(folder), update)
        prompts = (
            [tok(json.loads(x)["prompt"])["input_ids"][:40] for x in lines] if name == "bundled" else TINY_PROMPTS
        )
        out[name] = {"folder": folder, "prompts": prompts, "update": update,
                     "state": {k: v.clone() for k, v in model.state_dict().items()}}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def served(cases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    jobs = [vh.Job(name=name, model=str(c["folder"]), prompts=c["prompts"], enforce_eager=False,
                   steps=[{"load": [str(c["update"])]}]) for name, c in cases.items()]  # fmt: skip
    return vh.run_jobs(jobs, tmp_path_factory.mktemp("gpu-run"))


@pytest.mark.parametrize("case", ["bundled", "qwen2_moe"])
def test_default_settings_capture_piecewise_graphs_split_at_the_skipping_op(case, served):
    result = served[case]
    assert "error" not in result, result.get("traceback")
    info = result["compilation"]
    assert info["cudagraph_mode"] == "PIECEWISE" and OP in info["splitting_ops"], info


@pytest.mark.parametrize("case", ["bundled", "qwen2_moe"])
def test_graphs_match_zedas_runtime(case, served, cases):
    c, result = cases[case], served[case]
    p = vh.compare(result, vh.reference(c["folder"], c["prompts"], result["tokens"]))
    print(case, p)
    assert p["max_abs_prompt_logprob_diff"] <= TOLERANCE and p["max_abs_token_logprob_diff"] <= TOLERANCE, p
    assert p["greedy_identical"] and p["zero_share"] > 0.05, p
    # CUDA graphs pad a batch to a captured size: padding rows are routed too, so at least the real pairs
    assert all(k >= r for k, r in zip(p["kernel_pairs"], p["reference_real_pairs"], strict=True)), p


@pytest.mark.parametrize("case", ["bundled", "qwen2_moe"])
def test_in_place_load_reaches_the_captured_graphs(case, served, cases):
    c, result = cases[case], served[case]
    [step] = result["steps"]
    model = load_model(c["folder"], dtype=torch.float32).eval()
    model.load_state_dict(c["state"])
    diff = 0.0
    for run in (step["greedy"], step["sampled"]):
        for prompt, tokens, got in zip(c["prompts"], run["tokens"], run["token_logprobs"], strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1 :], -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            diff = max(diff, float((lp - torch.tensor(got)).abs().max()))
    print(f"{case} on the GPU, graphs captured, after an in-place load of every tensor: max diff {diff:.2e}")
    assert diff <= TOLERANCE, diff
