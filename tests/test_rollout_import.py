"""Rollouts a user already has (data.rollouts / --rollouts) instead of teacher generation: zeda's own records, text
prompt + response records and chat messages are checked and imported; a bad record is one line with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tiny_models import EOS
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT
from zeda_cli.runs import read_manifest

runner = CliRunner()
FAST = ["stage1.global_batch_size=2", "stage1.micro_batch_size=2", "stage1.max_steps=1", "runtime.device=cpu",
        "data.chat_template=false"]  # fmt: skip


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


def _stage1(student: Path, out: Path, rollouts: Path):
    sets = [a for s in FAST for a in ("--set", s)]
    return runner.invoke(app, ["distill", "--stage", "1", str(student), "--out", str(out), "--rollouts",
                               str(rollouts), *sets])  # fmt: skip


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9, EOS], "finished": True}] * 2,
        [{"prompt": "def f(x):", "response": " return x", "finished": True}] * 2,
        [{"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "content": "x + y"}]}] * 2,
    ],
    ids=["zeda", "text", "messages"],
)
def test_each_record_format_is_imported_and_trained_on(tiny_dynamic, tmp_path, rows):
    rollouts = _write(tmp_path / "given.jsonl", rows)
    result = _stage1(tiny_dynamic("qwen3_moe"), tmp_path / "s1", rollouts)
    assert result.exit_code == 0, result.output
    imported = [json.loads(line) for line in (tmp_path / "s1" / "rollouts.jsonl").read_text().splitlines()]
    assert len(imported) == 2 and all(r["response_ids"] and r["prompt_ids"] for r in imported)
    assert all(r["response_ids"][-1] == EOS and r["finished"] for r in imported)  # finished responses end with EOS
    meta = json.loads((tmp_path / "s1" / "rollouts.meta.json").read_text())
    assert meta["imported_from"] == str(rollouts) and meta["records"] == 2
    assert read_manifest(tmp_path / "s1").done


@pytest.mark.parametrize(
    ("rows", "text"),
    [
        ([{"prompt_ids": [1], "response_ids": [2, EOS]}, "{not json"], "line 2 is not valid JSON"),
        ([{"prompt_ids": [1], "response_ids": [2]}, {"prompt_ids": [1], "response_ids": [10**6]}],
         "line 2 has prompt_ids / response_ids that are not lists of token ids"),
        ([{"question": "x"}], "line 1 has neither prompt_ids/response_ids, prompt/response nor messages"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "line 1 has messages whose last turn is not"),
        ([{"prompt_ids": [1], "response_ids": []}], "line 1 has an empty response"),
    ],
    ids=["json", "ids", "keys", "messages", "empty"],
)  # fmt: skip
def test_a_bad_record_is_one_line_naming_it(tiny_dynamic, tmp_path, rows, text):
    rollouts = _write(tmp_path / "given.jsonl", rows)
    result = _stage1(tiny_dynamic("qwen3_moe"), tmp_path / "s1", rollouts)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT and len(lines) == 1 and text in lines[0], result.output
    assert "given.jsonl" in lines[0]
    assert not (tmp_path / "s1" / "zeda.json").exists()


def test_convert_imports_the_rollouts_instead_of_generating(tiny_static, tmp_path):
    rollouts = _write(tmp_path / "given.jsonl", [{"prompt": "a b", "response": " c d", "finished": False}] * 4)
    sets = [a for s in [*FAST, f"data.rollouts={rollouts}"] for a in ("--set", s)]
    result = runner.invoke(app, ["convert", str(tiny_static("qwen3_moe")), "--out", str(tmp_path / "run"), "--to",
                                 "stage1", "--recipe", "tiny-demo", *sets, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    imported = (tmp_path / "run" / "rollouts" / "rollouts.jsonl").read_text().splitlines()
    assert len(imported) == 4 and not json.loads(imported[0])["finished"]
    assert read_manifest(tmp_path / "run" / "rollouts").done and read_manifest(tmp_path / "run" / "stage1").done
