"""The streaming safetensors writer and checkpoint reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zeda_cli.errors import BadInputError, CheckpointError
from zeda_cli.io.reader import open_checkpoint
from zeda_cli.io.writer import OutTensor, parse_size, plan_shards, tensor_out, write_sharded
from zeda_cli.runs import sha256_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g),
        "b.weight": torch.randn(10, 3, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(7, dtype=torch.int64),
        "d.flag": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.big": torch.randn(300, 40, generator=g),
    }


def test_single_file_round_trip_is_exact(tmp_path):
    tensors = _tensors()
    written = write_sharded(tmp_path, [tensor_out(k, v) for k, v in tensors.items()], parse_size("1GB"))
    assert [f.name for f in written] == ["model.safetensors"] and not (
        tmp_path / "model.safetensors.index.json"
    ).exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert written[0].sha256 == sha256_file(tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_small_shard_limit_gives_several_shards_and_a_right_index(tmp_path):
    tensors = _tensors()
    written = write_sharded(tmp_path, [tensor_out(k, v) for k, v in tensors.items()], 5_000)
    assert len(written) > 2 and written[0].name == f"model-00001-of-{len(written):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert index["metadata"]["total_parameters"] == sum(v.numel() for v in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    ckpt = open_checkpoint(tmp_path)
    for name, shard in index["weight_map"].items():
        assert ckpt.tensors[name].file.name == shard
        assert torch.equal(ckpt.read_tensor(name), tensors[name])


def test_plan_is_greedy_and_oversized_tensors_stand_alone():
    def t(name, n):
        return OutTensor(name, "U8", (n,), lambda: [b"\0" * n])

    plan = plan_shards([t("a", 40), t("b", 40), t("c", 150), t("d", 10)], 100)
    assert [[x.name for x in shard] for shard in plan] == [["a", "b"], ["c"], ["d"]]


def test_streamed_chunks_must_add_up(tmp_path):
    bad = OutTensor("x", "F32", (4,), lambda: [b"\0" * 8])
    with pytest.raises(ValueError, match="wrote 8 bytes, expected 16"):
        write_sharded(tmp_path, [bad], 100)


def test_chunked_reads_reassemble_tensors(tmp_path):
    t = torch.randn(1000, 33)
    write_sharded(tmp_path, [tensor_out("t", t)], 10**9)
    ckpt = open_checkpoint(tmp_path)
    chunks = list(ckpt.read_chunks("t", chunk=1000))
    assert len(chunks) == (t.numel() * 4 + 999) // 1000
    assert torch.equal(torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.float32).view(1000, 33), t)


@pytest.mark.parametrize(("text", "value"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                             ("123", 123), (" 1.5 kb ", 1500), (4096, 4096)])  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInputError):
        parse_size(text)


def test_truncated_shard_is_caught(tmp_path):
    write_sharded(tmp_path, [tensor_out("t", torch.randn(100, 10))], 10**9)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="outside the file"):
        open_checkpoint(tmp_path)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path)
