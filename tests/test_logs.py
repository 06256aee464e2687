"""Logs a CI job can read: progress lines on a non-terminal at least every interval, every error one line."""

from __future__ import annotations

import io
import re
import time

from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.console import LogProgress, Output, make_console
from zeda_cli.errors import EXIT_EXTERNAL, ExternalError

runner = CliRunner()


def _log_output() -> tuple[Output, io.StringIO]:
    sink = io.StringIO()
    return Output(stderr=make_console(sink)), sink


def test_a_non_terminal_gets_plain_progress_lines_with_numbers_and_eta():
    out, sink = _log_output()
    bar = LogProgress(out, interval=0.05)
    task = bar.task("training", total=4)
    for step in range(4):
        time.sleep(0.06)
        bar.advance(task, info=f"loss {1.0 / (step + 1):.3f} zero 0.48 900 tok/s")
    bar.stop()
    lines = sink.getvalue().splitlines()
    assert lines[0].startswith("training: 0/4") and lines[-1].startswith("training: 4/4")
    assert any(
        re.search(r"training: 2/4 loss 0\.500 zero 0\.48 900 tok/s \| 0m0\ds elapsed, ETA 0m0\ds", x) for x in lines
    )


def test_a_long_step_still_gets_a_line_every_interval():
    out, sink = _log_output()
    bar = LogProgress(out, interval=0.1)
    task = bar.task("stage 2", total=3)
    bar.advance(task, info="kl 0.1")
    time.sleep(0.6)  # one slow step: the heartbeat repeats the latest numbers meanwhile
    bar.stop()
    repeated = [x for x in sink.getvalue().splitlines() if x.startswith("stage 2: 1/3 kl 0.1")]
    assert len(repeated) >= 3


def test_the_command_line_uses_log_lines_when_not_a_terminal(tiny_static, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEDA_LOG_INTERVAL", "0")
    out = tmp_path / "dyn"
    result = runner.invoke(app, ["inject-zero-experts", str(tiny_static("qwen3_moe")), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"writing tensors: \d+/\d+ .* elapsed", result.stderr), result.stderr


def test_a_multi_line_third_party_message_becomes_one_line(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("connection refused\n  while fetching config.json\n\tretry later")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    result = runner.invoke(app, ["inspect", "some-org/some-model"])
    assert result.exit_code == EXIT_EXTERNAL, result.output
    err = result.stderr.strip()
    assert err.startswith("Error: could not download some-org/some-model") and "\n" not in err, err
    assert "connection refused while fetching config.json retry later" in err
    assert "\n" not in ExternalError("a\nb", expected="c\n d").one_line()
