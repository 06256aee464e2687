"""The ``zeda_vllm.engine`` HTTP protocol zeda's trainer drives (a real server in .venv-vllm on the bundled model):
``/health``, ``/score`` (vLLM's prompt log-probs = transformers' log_softmax), ``/load_weights`` with one file or
several, calls that compose, the weights version; start-up refusals as one last log line with exit code 3 before
any ready file; and an engine that exits when its parent dies while it is still loading."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import vllm_harness as vh
from tiny_models import save_tiny_model
from zeda_cli import load_model, load_tokenizer

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")

BUNDLED = vh.ROOT / "models" / "pystdlib-moe"
MAX_LEN = 256


class Client:
    def __init__(self, url: str):
        self.url = url

    def call(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def ok(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, answer = self.call(path, body)
        assert status == 200, answer
        return answer


def engine_command(model: Path, ready: Path, *extra: str, max_len: int = MAX_LEN) -> list[str]:
    return [str(vh.VLLM_PYTHON), "-m", "zeda_vllm.engine", "--model", str(model), "--dtype", "float32",
            "--max-model-len", str(max_len), "--ready-file", str(ready), "--enforce-eager", *extra]  # fmt: skip


@contextlib.contextmanager
def running(model: Path, work: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[Client]:
    ready, log = work / "engine.ready.json", work / "engine.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log.open("w") as f:
        proc = subprocess.Popen(engine_command(model, ready, *extra), stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not ready.exists():
            assert proc.poll() is None, f"engine exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        yield Client(json.loads(ready.read_text())["url"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def failed_start(model: Path, work: Path, env: dict[str, str] | None = None, max_len: int = MAX_LEN,
                 ) -> tuple[int, list[str], bool]:  # fmt: skip
    """(exit code, log lines, whether a ready file appeared) of an engine that should refuse to start."""
    ready, log = work / "engine.ready.json", work / "engine.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log.open("w") as f:
        command = engine_command(model, ready, max_len=max_len)
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return proc.returncode, lines, ready.exists()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    out = tmp_path_factory.mktemp("engine") / "gaussian"
    return inject_zero_experts(str(BUNDLED), out, zero=ZeroExpertsSection(init="gaussian")).out


@pytest.fixture(scope="module")
def engine(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, dict[str, Any]]]:
    with running(folder, tmp_path_factory.mktemp("engine-run")) as client:
        yield client, client.ok("/health")  # before any test loaded weights


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    tok = load_tokenizer(BUNDLED)
    lines = (BUNDLED / "data" / "prompts-heldout.jsonl").read_text().splitlines()[:4]
    return [tok(json.loads(line)["prompt"])["input_ids"][:40] for line in lines]


def reference_logprobs(model: Any, sequences: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
    out = []
    for seq, start in zip(sequences, starts, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)  # position t-1 predicts token t
        out.append(torch.stack([logprobs[t - 1, seq[t]] for t in range(start, len(seq))]))
    return out


def score_diff(client: Client, model: Any, sequences: list[list[int]], starts: list[int]) -> float:
    answer = client.ok("/score", {"sequences": sequences, "starts": starts})
    ref = reference_logprobs(model, sequences, starts)
    assert [len(x) for x in answer["logprobs"]] == [len(s) - st for s, st in zip(sequences, starts, strict=True)]
    return max(float((torch.tensor(got) - exp).abs().max()) for got, exp in zip(answer["logprobs"], ref, strict=True))


def test_health_reports_what_the_engine_serves(engine, folder):
    _, health = engine
    from zeda_cli.io.sources import checkpoint_digests

    checkpoint = health.pop("checkpoint")
    assert health == {"ok": True, "model": str(folder), "dynamic": True, "dtype": "float32",
                      "tensor_parallel_size": 1, "max_model_len": MAX_LEN, "weights_version": 0}  # fmt: skip
    # the same digests zeda computes of the folder it expects a server to serve
    assert checkpoint == {**checkpoint_digests(folder), "hf_overrides": checkpoint["hf_overrides"]}


def test_score_is_transformers_log_softmax_of_the_raw_logits(engine, folder, sequences):
    """vLLM-CPU's prompt log-probs skip the sampling processors and, with the default logprobs_mode raw_logprobs, are
    log_softmax of the model's logits: equal to zeda's runtime to 1e-4 (fp32) at every scored position."""
    client, _ = engine
    starts = [1, 5, 20, 39]
    model = load_model(folder, dtype=torch.float32)
    diff = score_diff(client, model, sequences, starts)
    print(f"/score vs transformers log_softmax, bundled model: max abs diff {diff:.2e}")
    assert diff <= 1e-4, diff
    # non-vacuous: the static model (the same folder without zero experts) scores differently
    assert score_diff(client, load_model(BUNDLED, dtype=torch.float32), sequences, starts) > 1e-2
    # a sequence scored from its last token only; the sampled tokens' log-probs of /generate are the same raw ones
    sample = client.ok("/generate", {"prompts": [sequences[0]], "max_tokens": 6, "temperature": 0.7, "seed": 3})
    tokens = sample["samples"][0][0]["token_ids"]
    scored = client.ok("/score", {"sequences": [sequences[0] + tokens], "starts": [len(sequences[0])]})
    assert (
        max(abs(a - b) for a, b in zip(scored["logprobs"][0], sample["samples"][0][0]["logprobs"], strict=True)) < 1e-4
    )


def test_bad_requests_get_one_line_and_the_engine_keeps_serving(engine):
    client, _ = engine
    for path, body, needle in [("/score", {"sequences": [[1, 2, 3]], "starts": [0]}, "need 1 <= start <= len"),
                               ("/score", {"sequences": [[1, 2]], "starts": [1, 1]}, "2 starts for 1 sequences"),
                               ("/load_weights", {"path": "/nonexistent.safetensors"}, "is not a file"),
                               ("/load_weights", {}, "no weights")]:  # fmt: skip
        status, answer = client.call(path, body)
        assert status == 500 and needle in answer["error"] and "\n" not in answer["error"], answer
    assert client.ok("/health")["ok"]


def test_load_weights_one_file_or_several_composes_and_counts_versions(engine, folder, sequences, tmp_path):
    """Bucket A (attention, embedding, norms) then bucket B (routers, experts) as two calls: after A the engine
    serves A's new tensors with B's old ones, after B every tensor is new; then both original buckets in one call
    (``paths``) restore the start. ``weights_version`` counts the calls."""
    client, _ = engine
    model = load_model(folder, dtype=torch.float32).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = vh.checkpoint_keys(folder)
    in_mlp = lambda n: ".mlp." in n  # noqa: E731  (bundled: routers and experts live in mlp)
    generator = torch.Generator().manual_seed(7)
    files = {}
    for bucket, select in (("a", lambda n: not in_mlp(n)), ("b", in_mlp)):
        vh.write_step(model, select, False, ckpt, tmp_path / f"orig-{bucket}.safetensors")
        vh.perturb(model, select, 0.2, generator)
        files[bucket] = tmp_path / f"{bucket}.safetensors"
        vh.write_step(model, select, False, ckpt, files[bucket])
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    hybrid = {k: (start[k] if in_mlp(k) else changed[k]) for k in start}
    starts = [1] * len(sequences)
    version = client.ok("/health")["weights_version"]
    report = {}
    originals = [str(tmp_path / "orig-a.safetensors"), str(tmp_path / "orig-b.safetensors")]
    for name, body, state in [("bucket a", {"path": str(files["a"])}, hybrid),
                              ("bucket b", {"paths": [str(files["b"])]}, changed),
                              ("both originals", {"paths": originals}, start)]:  # fmt: skip
        answer = client.ok("/load_weights", body)
        version += 1
        assert answer["ok"] and answer["weights_version"] == version and answer["seconds"] > 0, answer
        assert client.ok("/health")["weights_version"] == version
        model.load_state_dict(state)
        report[name] = score_diff(client, model, sequences, starts)
    print("after each /load_weights, /score vs transformers with the same weights:", report)
    assert all(d <= 1e-3 for d in report.values()), report
    model.load_state_dict(start)
    assert score_diff(client, model, sequences, starts) <= 1e-3


def test_a_glm_latent_vllm_cpu_cannot_decode_is_refused_at_start_with_one_line(tmp_path):
    """The tiny GLM-4.7-Flash of tests/tiny_models.py has an MLA latent of 16 + 8: vLLM-CPU builds it but fails at
    the first request. The engine refuses it before writing the ready file: static and dynamic alike."""
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    static = save_tiny_model("glm4_moe_lite", tmp_path / "static")
    dynamic = inject_zero_experts(str(static), tmp_path / "dynamic", zero=ZeroExpertsSection()).out
    for model in (static, dynamic):
        work = tmp_path / f"run-{model.name}"
        work.mkdir()
        code, lines, ready = failed_start(model, work)
        assert code == 3 and not ready, (code, lines[-5:])
        assert lines[-1].startswith(f"zeda-vllm engine: cannot serve {model}: zeda-vllm: "), lines[-5:]
        assert "kv_lora_rank 16 + qk_rope_head_dim 8 = 24 on vLLM-CPU" in lines[-1] and "[576]" in lines[-1]


def test_the_warm_up_turns_a_first_request_failure_into_the_start_up_line(tmp_path):
    """Without the static check (ZEDA_VLLM_NO_STATIC_CHECKS=1) the same stock model starts in vLLM and fails in the
    two-token warm-up generation: that failure is the line, still before any ready file."""
    # vLLM 0.32 (transformers 5.19) reads first_k_dense_replace, which newer transformers dropped
    static = save_tiny_model("glm4_moe_lite", tmp_path / "static", first_k_dense_replace=1)
    env = {"ZEDA_VLLM_NO_STATIC_CHECKS": "1"}
    code, lines, ready = failed_start(static, tmp_path, env=env, max_len=128)  # the tiny model's positions
    print("warm-up failure line:", lines[-1])
    assert code == 3 and not ready, (code, lines[-8:])
    assert lines[-1].startswith(f"zeda-vllm engine: cannot serve {static}: "), lines[-8:]
    assert "not supported by MLA" in lines[-1] or "block size" in lines[-1], lines[-1]


def test_an_engine_exits_when_its_parent_dies_even_while_loading(folder, tmp_path):
    parent_code = (
        "import subprocess, sys, time, os\n"
        f"p = subprocess.Popen({engine_command(folder, tmp_path / 'r.json')!r} + ['--parent-pid', str(os.getpid())],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    engine_pid = int(parent.stdout.readline())
    state = ""
    try:
        time.sleep(3)  # the engine is importing vLLM / building the model
        assert Path(f"/proc/{engine_pid}").exists()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{engine_pid}").exists():
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{engine_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            if state == "Z":  # exited; its new parent reaps it
                break
            time.sleep(0.2)
        assert not Path(f"/proc/{engine_pid}").exists() or state == "Z", "the engine outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine_pid, signal.SIGKILL)


def test_an_mla_model_on_cpu_scores_like_transformers_without_flags(tmp_path):
    """GLM-4.7-Flash's latent at tiny width: the engine picks vLLM's native rotary embedding on CPU by itself (its
    kernel drifts by ~2e-3 on MLA), so /score equals transformers to 1e-4 with no --compilation-config."""
    folder = vh.dynamic_tiny_or_bundled("glm4_moe_lite_flash", tmp_path / "folders")
    sequences = [[5, 10, 20, 30, 42, 7, 9, 50, 20, 33, 61, 12], [17, 18, 19, 60, 3, 4, 44, 71]]
    with running(folder, tmp_path) as client:
        diff = score_diff(client, load_model(folder, dtype=torch.float32), sequences, [1, 3])
    print(f"/score vs transformers, tiny GLM-4.7-Flash (MLA 512 + 64) on CPU: max abs diff {diff:.2e}")
    assert diff <= 1e-4, diff
