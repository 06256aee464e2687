"""zeda eval --tasks: the generation agreement with the teacher through lm-eval, offline on the bundled model; any
lm-eval task on local data; one clear line for bad task input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT
from zeda_cli.evaluate.tasks import agreement_scores
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ZeroExpertsSection
from zeda_cli.runtime.loading import load_tokenizer

pytest.importorskip("lm_eval")
runner = CliRunner()
BUNDLED = Path(__file__).resolve().parents[1] / "models" / "pystdlib-moe"
FAST = ["--max-samples", "4", "--max-length", "64", "--limit", "8", "--max-new-tokens", "16", "--no-record"]


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return {init: inject_zero_experts(str(BUNDLED), root / init, zero=ZeroExpertsSection(init=init)).out
            for init in ("gaussian", "masked")}  # fmt: skip


def _agreement(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--tasks", "agreement", *FAST, "--json", "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tasks"]["agreement"]


def test_agreement_scores_by_hand():
    tok = load_tokenizer(BUNDLED)
    same = agreement_scores("    return x\n", "    return x\n", tok)
    assert same == {"token_agreement": 1.0, "prefix_tokens": float(len(tok.encode("    return x\n"))),
                    "next_line_exact": 1.0, "exact_match": 1.0}  # fmt: skip
    other = agreement_scores("    return x\nfoo", "    return y\n", tok)
    assert 0 < other["token_agreement"] < 1 and other["next_line_exact"] == 0.0 and other["exact_match"] == 0.0


def test_the_static_model_against_itself_and_the_masked_injection_agree_fully(injected):
    for got in (_agreement(str(BUNDLED), "--teacher", str(BUNDLED)), _agreement(str(injected["masked"]))):
        assert got["samples"] == 8
        assert got["token_agreement"] == 1.0 and got["next_line_exact"] == 1.0 and got["exact_match"] == 1.0


def test_skipping_experts_moves_the_generations_away_from_the_teachers(injected):
    dynamic = _agreement(str(injected["gaussian"]))
    baseline = _agreement(str(BUNDLED), "--baseline", "top_p", "--budget", "0.4", "--calibration-samples", "16")
    for got in (dynamic, baseline):
        assert 0.0 < got["token_agreement"] < 1.0 and 0.0 <= got["next_line_exact"] <= 1.0


def test_a_built_in_task_on_local_data(tmp_path):
    """gsm8k-format rows (hand-written, not gsm8k data); the file is also the source of gsm8k's 5 few-shot examples."""
    rows = [
        {
            "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}",
        }
        for a in range(3)
        for b in range(3)
    ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # fmt: skip
    args = [
        "eval",
        str(BUNDLED),
        "--tasks",
        "gsm8k",
        "--task-data",
        f"gsm8k={data}",
        "--max-samples",
        "4",
        "--max-length",
        "64",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--no-record",
        "--json",
        "-q",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    gsm8k = json.loads(result.stdout)["tasks"]["gsm8k"]
    assert gsm8k["samples"] == 2 and "exact_match/strict-match" in gsm8k


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--tasks", "agreement"], "has none"),  # a static model without a teacher: nothing to agree with
        (["--tasks", "gsm8k", "--task-data", "gsm8k=missing.jsonl"], "--task-data 'gsm8k=missing.jsonl'"),
    ],
)
def test_bad_task_input(args, text):
    result = runner.invoke(app, ["eval", str(BUNDLED), *args, *FAST])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("Error:") and text in err, err
