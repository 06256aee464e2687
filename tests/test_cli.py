"""The command line: --help everywhere, --json output, and bad input -> one line, exit code != 0, no output."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_CHECKPOINT, EXIT_UNSUPPORTED

runner = CliRunner()


def _commands() -> list[str]:
    return [c.name for c in app.registered_commands]


def test_top_level_help_lists_every_command_with_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in _commands():
        assert name in result.stdout
    assert "Examples:" in result.stdout


@pytest.mark.parametrize("command", ["inspect", "inject-zero-experts"])
def test_command_help(command):
    assert command in _commands()
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout and f"zeda {command}" in result.stdout


def test_every_registered_command_has_help_with_an_example():
    for command in _commands():
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and f"zeda {command}" in result.stdout, command


def test_inspect_json_is_machine_readable(tiny_static):
    result = runner.invoke(app, ["inspect", str(tiny_static("glm4_moe_lite")), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_type"] == "glm4_moe_lite" and data["num_experts"] == 8 and data["top_k"] == 2
    assert data["dense_layers"] == [0] and data["shared_expert"] == {"intermediate_size": 16, "gated": False}


def test_inspect_table_goes_to_stdout(tiny_static):
    result = runner.invoke(app, ["inspect", str(tiny_static("qwen3_moe"))])
    assert result.exit_code == 0
    assert "static MoE, supported" in result.stdout and "top-2 of 8" in result.stdout


def _write_config(folder, **config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ({"model_type": "llama", "hidden_size": 8}, "dense model"),
        ({"model_type": "gpt_oss", "num_local_experts": 4}, "MoE family zeda does not support"),
    ],
)
def test_inspect_verdict_for_unsupported_models(tmp_path, config, expect):
    folder = _write_config(tmp_path / "m", **config)
    result = runner.invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == EXIT_UNSUPPORTED
    data = json.loads(result.stdout)
    assert data["supported"] is False and expect in data["verdict"] and "qwen3_moe" in data["verdict"]


def _corrupt_header(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))


def _truncate_length(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 10**9)
    shard.write_bytes(bytes(data))


def _delete_shard(folder):
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()


BROKEN_CHECKPOINTS = {
    "missing shard": (_delete_shard, EXIT_CHECKPOINT, "listed in model.safetensors.index.json but missing"),
    "corrupted header": (_corrupt_header, EXIT_CHECKPOINT, "corrupted"),
    "header length": (_truncate_length, EXIT_CHECKPOINT, "corrupted"),
}


def _assert_clean_failure(result, out, code: int, text: str):
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err, err
    assert text in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.zeda-partial*"))


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_inject_refuses_broken_checkpoints(case, tiny_static, tmp_path):
    damage, code, text = BROKEN_CHECKPOINTS[case]
    src = tmp_path / "src"
    shutil.copytree(tiny_static("qwen3_moe"), src)
    damage(src)
    out = tmp_path / "out"
    result = runner.invoke(app, ["inject-zero-experts", str(src), "--out", str(out)])
    _assert_clean_failure(result, out, code, text)


@pytest.mark.parametrize(
    ("make_source", "args", "code", "text"),
    [
        (lambda s, t: _write_config(t / "dense", model_type="llama", hidden_size=8), [], EXIT_UNSUPPORTED, "dense"),
        (
            lambda s, t: _write_config(t / "oss", model_type="gpt_oss", num_local_experts=4),
            [],
            EXIT_UNSUPPORTED,
            "does not support",
        ),
        (lambda s, t: t / "does-not-exist", [], EXIT_BAD_INPUT, "does not exist"),
        (lambda s, t: s("qwen3_moe"), ["--zero-experts", "0"], EXIT_BAD_INPUT, "expected Z > 0"),
        (lambda s, t: s("qwen3_moe"), ["--zero-experts", "-3"], EXIT_BAD_INPUT, "expected Z > 0"),
        (lambda s, t: s("qwen3_moe"), ["--target-skip", "1.5"], EXIT_BAD_INPUT, "(0, 1)"),
        (lambda s, t: s("qwen3_moe"), ["--init", "zeros"], EXIT_BAD_INPUT, "gaussian or masked"),
        (lambda s, t: s("qwen3_moe"), ["--max-shard-size", "huge"], EXIT_BAD_INPUT, "size 'huge'"),
        (lambda s, t: s("deepseek_v3"), ["--zero-experts", "3"], EXIT_BAD_INPUT, "not divisible by n_group=2"),
    ],
    ids=[
        "dense",
        "unsupported",
        "missing-path",
        "zero-z",
        "negative-z",
        "target-skip",
        "init",
        "shard-size",
        "n-group",
    ],  # fmt: skip
)
def test_inject_bad_input(make_source, args, code, text, tiny_static, tmp_path):
    src = make_source(tiny_static, tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["inject-zero-experts", str(src), "--out", str(out), *args])
    _assert_clean_failure(result, out, code, text)


def test_inject_refuses_an_already_dynamic_model(tiny_dynamic, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["inject-zero-experts", str(tiny_dynamic("qwen3_moe")), "--out", str(out)])
    _assert_clean_failure(result, out, EXIT_UNSUPPORTED, "already dynamic")


def test_inject_reports_several_problems_at_once(tiny_static, tmp_path):
    out = tmp_path / "out"
    args = ["inject-zero-experts", str(tiny_static("qwen3_moe")), "--out", str(out), "-z", "0", "--target-skip", "0"]
    result = runner.invoke(app, args)
    _assert_clean_failure(result, out, EXIT_BAD_INPUT, "2 problems")


def test_inject_output_must_be_new_unless_overwrite(tiny_static, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = str(tiny_static("qwen3_moe"))
    result = runner.invoke(app, ["inject-zero-experts", src, "--out", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = runner.invoke(app, ["inject-zero-experts", src, "--out", str(out), "--overwrite", "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["num_zero_experts"] == 4 and not (out / "keep.txt").exists()


def test_json_error_object_on_stdout(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope"), "--json"])
    assert result.exit_code == EXIT_BAD_INPUT
    data = json.loads(result.stdout)
    assert data == {"ok": False, "error": data["error"], "kind": "BadInputError", "exit_code": EXIT_BAD_INPUT}
    assert "org/name[@revision]" in data["error"] and "org/name[@revision]" in result.stderr


def test_tables_in_a_log_are_not_cut_to_80_columns(tiny_static, monkeypatch):
    """Piped into a CI log (not a terminal), inspect's verdict row stays on one line, uncut."""
    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["inspect", str(tiny_static("qwen3_moe"))])
    assert result.exit_code == 0, result.output
    verdict = next(line for line in result.output.splitlines() if "verdict" in line)
    assert "ready for `zeda inject-zero-experts`" in verdict and len(verdict) > 80
