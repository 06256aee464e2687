"""One exit code per kind of problem, everywhere: the table in errors.py is the README's, and every command maps
an already-dynamic model, a missing extra, bad input and an external failure to the same code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zeda_cli import extras
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_CODES, EXIT_EXTERNAL, EXIT_UNSUPPORTED

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _one_error(result, alone: bool = True) -> str:
    """The one error line; ``alone``: nothing else on stderr (an external failure may log its retries first)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and (len(lines) == 1 or not alone), result.output
    return errors[0]


def test_readme_exit_code_table_is_the_table_in_errors_py():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Exit codes") :]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section[: section.index("\n## ", 5)], re.M))
    assert {int(code): meaning for code, meaning in rows.items()} == EXIT_CODES


def test_an_already_dynamic_model_is_exit_3_in_every_command(tiny_dynamic, tmp_path):
    dynamic = tiny_dynamic("qwen3_moe")
    for args in (["inject-zero-experts", str(dynamic), "--out", str(tmp_path / "a")],
                 ["convert", str(dynamic), "--out", str(tmp_path / "b"), "--dry-run"]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_UNSUPPORTED and "already dynamic" in _one_error(result), args


@pytest.fixture
def no_train_extra(monkeypatch):
    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name in ("deepspeed", "lm_eval") else real(name))


def test_a_missing_extra_is_exit_2_naming_it_in_every_command(no_train_extra, tiny_dynamic, tiny_static, tmp_path):
    dynamic, static = str(tiny_dynamic("qwen3_moe")), str(tiny_static("qwen3_moe"))
    cases = {
        "train": [["distill", "--stage", "1", dynamic, "--out", str(tmp_path / "d")],
                  ["rollout", dynamic, "--out", str(tmp_path / "r.jsonl"), "--prompts", "p.jsonl"],
                  ["convert", static, "--out", str(tmp_path / "c"), "--recipe", "tiny-demo"]],
        "lmeval": [["eval", dynamic, "--tasks", "agreement"]],
    }  # fmt: skip
    for extra, commands in cases.items():
        for args in commands:
            result = runner.invoke(app, args)
            err = _one_error(result)
            assert result.exit_code == EXIT_BAD_INPUT and f"zeda[{extra}]" in err, (args, err)


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{missing}"],
        ["inject-zero-experts", "{missing}", "--out", "{out}"],
        ["rollout", "{missing}", "--out", "{out}/r.jsonl", "--prompts", "p.jsonl"],
        ["distill", "--stage", "1", "{missing}", "--out", "{out}"],
        ["eval", "{missing}"],
        ["calibrate", "{missing}", "--target-skip", "0.5", "--data", "x.jsonl"],
        ["export", "{missing}", "--out", "{out}"],
        ["push", "{missing}", "me/model"],
        ["convert", "{missing}", "--out", "{out}"],
    ],
)
def test_bad_input_is_exit_2_in_every_command(args, tmp_path):
    filled = [a.format(missing=str(tmp_path / "no-such-model"), out=str(tmp_path / "out")) for a in args]
    result = runner.invoke(app, filled)
    err = _one_error(result)
    assert result.exit_code == EXIT_BAD_INPUT and "no-such-model" in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_an_external_failure_is_exit_5_in_every_command_that_reaches_out(tiny_dynamic, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("zeda_cli.push.time.sleep", lambda s: None)
    from zeda_cli.export import export_run
    from zeda_cli.recipes import ExportSection

    exported = tmp_path / "export"
    export_run(tiny_dynamic("qwen3_moe"), exported, settings=ExportSection())
    server = ["--set", "generation.engine=vllm", "--set", "generation.student_url=http://127.0.0.1:9"]
    cases = [
        ["inspect", "someone/model-that-cannot-be-downloaded"],
        ["push", str(exported), "me/model"],
        ["distill", "--stage", "2", str(tiny_dynamic("qwen3_moe")), "--out", str(tmp_path / "s2"), "--prompts",
         str(ROOT / "models" / "pystdlib-moe" / "data" / "prompts.jsonl"), *server],
    ]  # fmt: skip
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_EXTERNAL, (args, result.output)
        _one_error(result, alone=False)
