"""scripts/make_prompts.py rebuilds the bundled prompt sets from the train split of the standard library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "models" / "pystdlib-moe" / "data"


@pytest.mark.parametrize(
    ("count", "per_file", "bundled"), [(256, 2, "prompts.jsonl"), (4096, 16, "prompts-train-4k.jsonl")]
)
def test_bundled_prompt_sets_are_reproducible_and_never_use_held_out_text(tmp_path, count, per_file, bundled):
    out = tmp_path / "prompts.jsonl"
    script = ROOT / "scripts" / "make_prompts.py"
    subprocess.run([sys.executable, script, "--count", str(count), "--max-per-file", str(per_file), "--out", out],
                   check=True, capture_output=True)  # fmt: skip
    assert out.read_bytes() == (DATA / bundled).read_bytes()
    heldout = (DATA / "heldout.jsonl").read_text()
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert len(prompts) == count and not [p for p in prompts if len(p) > 40 and p in heldout]
