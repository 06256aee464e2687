"""In-place weight loading into a live vLLM engine (zeda-vllm's loader, ``zeda_load_weights``) takes every tensor:
for a tiny model of every family in tests/tiny_models.py, the GLM-4.7-Flash-latent variant and the bundled model.

The weights are changed in the transformers model (``zeda_cli.load_model``, fp32) and written under checkpoint names
(transformers' ``revert_weight_conversion``, as zeda's trainer does), one file per step, loaded into the same engine
one after another:

1. ``router``: the routers only (sigmoid families: weight and e_score_correction_bias);
2. ``rest``: every tensor but the routed experts (embedding, attention incl. MLA, norms, routers, shared experts,
   dense MLPs, lm_head);
3. ``experts``: the routed experts, per-expert checkpoint names: now every tensor differs from the folder, loaded in
   two buckets (2 and 3), which must compose;
4. ``fused``: the routed experts again, as transformers-5 fused 3-D tensors (``...experts.gate_up_proj`` /
   ``down_proj``).

After each step the engine's log-probs of its own continuations (8 greedy and 8 sampled tokens per prompt, decode
steps) must equal the transformers model's with the same weights (fp32, 1e-3) and differ from the weights before the
step by more than that (and 100x more than from the loaded ones). The numbers are written to
.pytest_cache/vllm-weight-load.json.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

import vllm_harness as vh
from tiny_models import FAMILIES
from zeda_cli import load_model, load_tokenizer

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")

BUNDLED = vh.ROOT / "models" / "pystdlib-moe"
TOLERANCE = 1e-3  # max abs log-prob difference, fp32
# the weights before a step must be further away than the tolerance, and far beyond the loaded weights' difference
# (the tiny models have small random weights: their log-probs sit near log(1/vocab), changes move them little)
CHANGED = TOLERANCE
TINY_PROMPTS = [[5, 10, 20, 30, 42, 7, 9, 50, 20, 33, 61, 12], [17, 18, 19, 60, 3, 4, 44, 71], [80, 8, 8, 23, 36]]
CASES = [*FAMILIES, "bundled"]
MLA = ("glm4_moe_lite", "deepseek_v3")
ROUTER = re.compile(r"\.gate\.(weight|e_score_correction_bias)$")  # in-memory names of the zeda runtime's model
EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")  # transformers 5: two fused 3-D tensors per layer
STEPS = {  # name -> (which in-memory tensors change, relative scale, written fused)
    "router": (lambda n: bool(ROUTER.search(n)), 1.0, False),
    "rest": (lambda n: not EXPERTS.search(n), 0.1, False),
    "experts": (lambda n: bool(EXPERTS.search(n)), 0.2, False),
    "fused": (lambda n: bool(EXPERTS.search(n)), 0.2, True),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per case: the folder, its prompts, the step files and the transformers state after each step."""
    root = tmp_path_factory.mktemp("weight-load")
    tok = load_tokenizer(BUNDLED)
    lines = (BUNDLED / "data" / "prompts-heldout.jsonl").read_text().splitlines()[:2]
    bundled_prompts = [tok(json.loads(line)["prompt"])["input_ids"][:40] for line in lines]
    out = {}
    for i, case in enumerate(CASES):
        folder = vh.dynamic_tiny_or_bundled(case, root / "folders")
        model = load_model(folder, dtype=torch.float32).eval()
        ckpt = vh.checkpoint_keys(folder)
        generator = torch.Generator().manual_seed(100 + i)
        states = {"start": {k: v.clone() for k, v in model.state_dict().items()}}
        files = {}
        for step, (select, scale, fused) in STEPS.items():
            vh.perturb(model, select, scale, generator)
            files[step] = root / f"{case}-{step}.safetensors"
            vh.write_step(model, select, fused, ckpt, files[step])
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        prompts = bundled_prompts if case == "bundled" else TINY_PROMPTS
        out[case] = {"folder": folder, "prompts": prompts, "files": files, "states": states}
    return out


@pytest.fixture(scope="module")
def served(prepared, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    jobs = [
        vh.Job(
            name=case,
            model=str(p["folder"]),
            prompts=p["prompts"],
            max_tokens=8,
            custom_ops=vh.NATIVE_ROPE if case.startswith(MLA) else None,
            steps=[{"load": [str(p["files"][step])]} for step in STEPS],
        )  # fmt: skip
        for case, p in prepared.items()
    ]
    return vh.run_jobs(jobs, tmp_path_factory.mktemp("weight-load-run"))


def token_logprobs(model: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)
    return logprobs.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def max_diff(model: Any, prompts: list[list[int]], runs: list[dict[str, Any]]) -> float:
    diff = 0.0
    for run in runs:
        for prompt, tokens, got in zip(prompts, run["tokens"], run["token_logprobs"], strict=True):
            diff = max(diff, float((token_logprobs(model, prompt, tokens) - torch.tensor(got)).abs().max()))
    return diff


@pytest.fixture(scope="module")
def diffs(served, prepared) -> dict[str, dict[str, dict[str, float]]]:
    numbers: dict[str, dict[str, dict[str, float]]] = {}
    for case, p in prepared.items():
        result = served[case]
        assert "error" not in result, result.get("traceback")
        model = load_model(p["folder"], dtype=torch.float32).eval()
        before = "start"
        numbers[case] = {}
        for step, record in zip(STEPS, result["steps"], strict=True):
            runs = [record["greedy"], record["sampled"]]
            model.load_state_dict(p["states"][step])
            loaded = max_diff(model, p["prompts"], runs)
            model.load_state_dict(p["states"][before])
            stale = max_diff(model, p["prompts"], runs)
            numbers[case][step] = {"max_abs_logprob_diff": loaded, "diff_to_weights_before": stale,
                                   "tensors": record["tensors"][0], "load_s": round(record["load_s"], 3)}  # fmt: skip
            before = step
    (vh.ROOT / ".pytest_cache").mkdir(exist_ok=True)
    (vh.ROOT / ".pytest_cache" / "vllm-weight-load.json").write_text(json.dumps(numbers, indent=1))
    print(json.dumps(numbers, indent=1))
    return numbers


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("case", CASES)
def test_engine_serves_the_weights_loaded_in_place(case, step, diffs):
    d = diffs[case][step]
    assert d["max_abs_logprob_diff"] <= TOLERANCE, d
    assert d["diff_to_weights_before"] > max(CHANGED, 100 * d["max_abs_logprob_diff"]), d  # the load took effect


def test_two_partial_loads_compose_into_every_tensor_changed(diffs, prepared):
    """After ``rest`` then ``experts`` the engine serves the model whose every tensor changed (checked above);
    here: those two files together really hold every tensor of the checkpoint."""
    from safetensors import safe_open

    for case, p in prepared.items():
        sent: set[str] = set()
        for step in ("rest", "experts"):
            with safe_open(str(p["files"][step]), framework="pt") as f:
                sent |= set(f.keys())
        assert sent == vh.checkpoint_keys(p["folder"]), (case, sorted(sent ^ vh.checkpoint_keys(p["folder"]))[:5])
        assert diffs[case]["experts"]["max_abs_logprob_diff"] <= TOLERANCE
