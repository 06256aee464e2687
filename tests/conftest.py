"""Offline test set-up: no Hub, a private HF cache, quiet DeepSpeed; tiny checkpoints built once per session."""

from __future__ import annotations

import os
import tempfile

# Must be set before transformers / huggingface_hub are imported anywhere.
_HF_HOME = tempfile.mkdtemp(prefix="zeda-test-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import FAMILIES, save_tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU two OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_static(tmp_path_factory: pytest.TempPathFactory):
    """Factory: the saved static checkpoint folder of a tiny model of ``FAMILIES[name]`` (built once)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            assert name in FAMILIES, name
            cache[name] = save_tiny_model(name, tmp_path_factory.mktemp(f"static-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_dynamic(tiny_static, tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``inject-zero-experts`` output (Z = N/2) for a tiny family, per init mode (built once)."""
    from zeda_cli.inject import inject_zero_experts
    from zeda_cli.recipes import ZeroExpertsSection

    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, init: str = "gaussian") -> Path:
        if (name, init) not in cache:
            out = tmp_path_factory.mktemp(f"dyn-{name}-{init}") / "model"
            inject_zero_experts(str(tiny_static(name)), out, zero=ZeroExpertsSection(init=init, max_shard_size="40KB"))
            cache[(name, init)] = out
        return cache[(name, init)]

    return get
