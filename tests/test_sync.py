"""The weight sync into a generation server, without vLLM: whole modules under checkpoint names, streamed in bounded
buckets; too little staging space is one line; a server that keeps stale weights, or serves another model, stops the
stage with exit 5 and one line; a teacher server must serve the teacher (tests/fake_server.py speaks the server's
protocol with a reload that does nothing)."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fake_server import StaleServer
from tiny_models import write_prompts
from zeda_cli import load_model
from zeda_cli.cli import app
from zeda_cli.distill.engines.local import module_state
from zeda_cli.distill.generation.sync import staging_dir, stream_module_states, sync_units, sync_weights
from zeda_cli.errors import EXIT_EXTERNAL, ExternalError
from zeda_cli.runtime.loading import open_weights

runner = CliRunner()


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe_lite", "deepseek_v3", "mixtral"])
def test_full_sync_sends_every_checkpoint_tensor_once_under_its_name(tiny_dynamic, family):
    folder = tiny_dynamic(family)
    model = load_model(folder, dtype=torch.float32)
    sent: dict[str, torch.Tensor] = {}
    for state in stream_module_states(model, sync_units(model, "full"), module_state, torch.bfloat16, rank=0):
        assert not set(state) & set(sent), "a tensor sent twice"
        sent.update(state)
    on_disk = open_weights(folder)
    assert set(sent) == set(on_disk.tensors)  # per-expert names, as the checkpoint holds them
    for name, tensor in sent.items():
        expected = on_disk.read_tensor(name)
        if name.endswith("e_score_correction_bias"):
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected)  # buffers keep their dtype
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected.bfloat16()), name


@pytest.mark.parametrize(("family", "names"), [("qwen3_moe", {"weight"}),
                                               ("glm4_moe_lite", {"weight", "e_score_correction_bias"})])  # fmt: skip
def test_router_only_sync_sends_whole_routers_only(tiny_dynamic, family, names):
    model = load_model(tiny_dynamic(family), dtype=torch.float32)
    sent = {k for state in stream_module_states(model, sync_units(model, "router"), module_state, torch.float32, 0)
            for k in state}  # fmt: skip
    routers = {name.rpartition(".")[0] for name in sent}
    assert routers and all(name.rpartition(".")[2] in names for name in sent)
    assert all({f"{r}.{n}" for n in names} <= sent for r in routers)  # the sigmoid router's bias travels with it


def test_buckets_hold_at_most_the_bucket_size_unless_one_module_is_larger(tiny_dynamic):
    model = load_model(tiny_dynamic("qwen3_moe"), dtype=torch.float32)
    Sent = namedtuple("Sent", "nbytes names")
    buckets: list[Sent] = []

    class Record:
        name = "record"

        def send(self, tensors):
            buckets.append(Sent(sum(t.numel() * t.element_size() for t in tensors.values()), set(tensors)))

    units = sync_units(model, "full")
    largest = max(sum(p.numel() * 4 for p in m.parameters()) for _, m in units)
    stats = sync_weights(model, units, module_state, torch.float32, 60_000, 0, Record())
    assert stats.buckets == len(buckets) > 2 and stats.bytes == sum(b.nbytes for b in buckets)
    assert all(b.nbytes <= max(60_000, largest) for b in buckets), [b.nbytes for b in buckets]


def test_too_little_room_to_stage_a_bucket_is_one_line_naming_the_key(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10, 10, 1024))
    with pytest.raises(ExternalError) as err:
        staging_dir(str(tmp_path), tmp_path, 512 * 2**20)
    assert "generation.sync_dir" in str(err.value) and "512 MB" in str(err.value)


def _the_external_error(result) -> str:
    """The one "Error:" line of a command that stopped with exit 5."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.exit_code == EXIT_EXTERNAL and len(lines) == 1, result.output
    return lines[0]


def _stage2(student: Path, out: Path, prompts: Path, url: str):
    sets = ["stage2.steps=3", "stage2.prompts_per_step=2", "stage2.max_new_tokens=4", "stage2.trainable=router",
            "stage2.optim.lr=0.05", "runtime.device=cpu", "generation.engine=vllm", f"generation.student_url={url}",
            "generation.check_every=1"]  # fmt: skip
    return runner.invoke(app, ["distill", "--stage", "2", str(student), "--out", str(out), "--prompts", str(prompts),
                               *[a for s in sets for a in ("--set", s)]])  # fmt: skip


def test_a_server_that_keeps_stale_weights_stops_the_stage_with_exit_5(tiny_dynamic, tmp_path):
    student = tiny_dynamic("qwen3_moe")
    prompts = write_prompts(tmp_path / "p.jsonl", 8, seed=2)
    with StaleServer(student) as server:
        result = _stage2(student, tmp_path / "s2", prompts, server.url)
    line = _the_external_error(result)
    assert "does not serve the weights synced after step 1" in line and "--resume" in line
    assert server.loads >= 1  # the sync was sent; the server took it and changed nothing
    assert not (tmp_path / "s2" / "zeda.json").exists() or not json.loads((tmp_path / "s2" / "zeda.json").read_text())[
        "done"]  # fmt: skip


def test_a_server_of_another_model_is_refused_before_any_step(tiny_dynamic, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 8, seed=2)
    with StaleServer(tiny_dynamic("qwen3_moe_nonorm")) as server:  # the same vocabulary, another config
        result = _stage2(tiny_dynamic("qwen3_moe"), tmp_path / "s2", prompts, server.url)
    line = _the_external_error(result)
    assert "serves another model than" in line and "generation.student_url" in line
    assert not (tmp_path / "s2" / "metrics.jsonl").exists()


def test_a_server_of_the_same_structure_with_other_weights_fails_the_first_probe(tiny_dynamic, tmp_path):
    """The checkpoint digests match (config, tensor names and shapes); only the probe sees other values."""
    import shutil

    from safetensors.torch import load_file

    student = tiny_dynamic("qwen3_moe")
    other = tmp_path / "other"
    shutil.copytree(student, other)
    for path in other.glob("*.safetensors"):  # new tensor bytes under the same header (names, shapes, offsets)
        tensors, size = load_file(path), int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8 : 8 + size])
        with path.open("r+b") as f:
            for name, value in tensors.items():
                f.seek(8 + size + header[name]["data_offsets"][0])
                f.write((value + 0.05 * torch.randn_like(value)).contiguous().view(torch.uint8).numpy().tobytes())
    prompts = write_prompts(tmp_path / "p.jsonl", 8, seed=2)
    with StaleServer(other) as server:
        result = _stage2(student, tmp_path / "s2", prompts, server.url)
    line = _the_external_error(result)
    assert "does not serve the weights it was started with" in line and "generation.student_url" in line


def test_a_teacher_url_that_serves_the_student_is_refused_before_any_rollout(tiny_dynamic, tmp_path):
    """Stage 1's rollouts must come from the static teacher: a server of the injected student is refused, naming
    generation.teacher_url."""
    student = tiny_dynamic("qwen3_moe")
    prompts = write_prompts(tmp_path / "p.jsonl", 4, seed=2)
    sets = ["stage1.max_steps=1", "rollout.max_new_tokens=4", "runtime.device=cpu", "generation.engine=vllm"]
    with StaleServer(student) as server:
        result = runner.invoke(app, ["distill", "--stage", "1", str(student), "--out", str(tmp_path / "s1"),
                                     "--prompts", str(prompts), "--set", f"generation.teacher_url={server.url}",
                                     *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    line = _the_external_error(result)
    assert "serves another model than" in line and "generation.teacher_url" in line, line
    assert not list((tmp_path / "s1").glob("rollouts*.jsonl")) or not (tmp_path / "s1" / "zeda.json").exists()
