"""`vllm serve` on a ZEDA folder: the OpenAI-compatible server starts with the plugin (engine in its own process, the
config class pickled across), answers /v1/completions, and says in its log that zeda-vllm serves the model; a bad
folder stops the server with the plugin's one-line error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import vllm_harness as vh

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")

VLLM_CLI = [str(vh.VLLM_PYTHON), str(vh.ROOT / "tests" / "vllm_cli.py")]  # `vllm`, see tests/vllm_cli.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder: Path, port: int, log: Path) -> subprocess.Popen:
    args = [*VLLM_CLI, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "256", "--enforce-eager"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: it and the engine process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    out = tmp_path_factory.mktemp("serve") / "model"
    inject_zero_experts(str(vh.ROOT / "models" / "pystdlib-moe"), out, zero=ZeroExpertsSection())
    return out


def test_vllm_serve_answers_completions_through_the_plugin(gaussian, tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    proc = _serve(gaussian, port, log)
    try:
        _wait_healthy(proc, port, log)
        body = json.dumps({"model": str(gaussian), "prompt": "def main():\n    ", "max_tokens": 8, "temperature": 0})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        _stop(proc)
    assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["text"], answer
    text = log.read_text()
    assert "zeda-vllm 0.1.0 plugin loaded" in text
    assert "zeda-vllm active: Qwen3MoePlusPlusForCausalLM (base qwen3_moe), 4 MoE layers, N=16 real + Z=8" in text


def test_vllm_serve_refuses_a_bad_folder_with_the_plugins_line(gaussian, tmp_path):
    bad = vh.edit_config(gaussian, tmp_path / "bad", zce_nums=[4])
    log = tmp_path / "serve.log"
    proc = _serve(bad, _free_port(), log)
    try:
        proc.wait(timeout=600)
    finally:
        _stop(proc)
    lines = {ln[ln.index("zeda-vllm:") :] for ln in log.read_text().splitlines() if "zeda-vllm:" in ln}
    assert proc.returncode != 0
    assert len(lines) == 1, lines  # the same single line, however often vLLM's logs repeat it
    assert "has shape [24, 160] (24 rows); expected N+Z = 16+4 = 20 rows" in lines.pop()
