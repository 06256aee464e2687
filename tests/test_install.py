"""The light install: `pip install zeda` (no extras) inspects, injects and loads models; training commands name the
extra they need. Built in a fresh virtual environment from this checkout (packages come from pip's cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zeda_cli.errors import EXIT_BAD_INPUT

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "pystdlib-moe"


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(ROOT)], check=True, timeout=900)
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "zeda"), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_a_plain_install_has_no_training_stack(light):
    names = ("deepspeed", "accelerate", "datasets", "matplotlib")
    probe = f"import importlib.util as u; print([m for m in {names!r} if u.find_spec(m)])"
    found = subprocess.run([str(light / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_plain_install_inspects_injects_and_loads(light, tmp_path):
    result = _run(light, "inspect", str(BUNDLED), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_type"] == "qwen3_moe"
    out = tmp_path / "dyn"
    result = _run(light, "inject-zero-experts", str(BUNDLED), "--out", str(out), "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_zero_experts"] == 8
    load = f"import zeda_cli; m = zeda_cli.load_model({str(out)!r}); print(type(m).__name__)"
    loaded = subprocess.run([str(light / "python"), "-c", load], capture_output=True, text=True, timeout=600)
    assert loaded.stdout.strip() == "Qwen3MoePlusPlusForCausalLM", loaded.stderr


@pytest.mark.slow
def test_training_commands_name_the_extra_they_need(light, tmp_path):
    args = ["distill", "--stage", "1", str(tmp_path / "any"), "--out", str(tmp_path / "s1"), "--prompts", "p.jsonl"]
    result = _run(light, *args)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    err = result.stderr.strip()
    assert "\n" not in err and "needs the 'train' extra" in err and "pip install 'zeda[train]'" in err, err
    assert not (tmp_path / "s1").exists()
