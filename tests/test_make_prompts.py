"""The bundled prompt sets: scripts/make_prompts.py rebuilds them, and no item crosses the train / held-out split.

The overlap checks compare *decoded* texts (``json.loads`` of every line), never the raw JSONL: in the raw file a
newline is the two characters ``\\n``, so a prompt with a newline, a quote or a non-ASCII character could never be
found there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FIXTURES = ("pystdlib-moe", "pystdlib-glm")
TRAIN_PROMPT_FILES = ("prompts.jsonl", "prompts-train-4k.jsonl")


def data_dir(fixture: str) -> Path:
    folder = MODELS / fixture / "data"
    if not folder.is_dir():
        pytest.skip(f"models/{fixture} is not built yet (scripts/train_bundled_model.py trains it)")
    return folder


def read_jsonl(path: Path, key: str) -> list[str]:
    return [json.loads(line)[key] for line in path.read_text(encoding="utf-8").splitlines()]


def held_out_items(data: Path) -> list[str]:
    return read_jsonl(data / "heldout.jsonl", "text") + read_jsonl(data / "prompts-heldout.jsonl", "prompt")


def overlaps(fragments: list[str], texts: list[str]) -> list[str]:
    """The fragments that occur verbatim in one of the texts."""
    return [fragment for fragment in fragments if any(fragment in text for text in texts)]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    """(train file texts, held-out file texts) of the stdlib split the fixtures were built from."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_bundled_model as tbm

    files = tbm.collect_corpus(Path(sysconfig.get_paths()["stdlib"]), 0.05)
    heldout = [f for f in files if f.heldout]
    expected = json.loads((MODELS / "pystdlib-moe" / "training.json").read_text())["corpus"]["heldout_paths"]
    if sorted(f.path for f in heldout) != sorted(expected):
        pytest.skip("this interpreter's stdlib does not give the bundled split")
    return [f.text for f in files if not f.heldout], [f.text for f in heldout]


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize(
    ("count", "per_file", "bundled"), [(256, 2, "prompts.jsonl"), (4096, 16, "prompts-train-4k.jsonl")]
)
def test_bundled_prompt_sets_are_reproducible(tmp_path, fixture, count, per_file, bundled):
    data = data_dir(fixture)
    out = tmp_path / "prompts.jsonl"
    script = ROOT / "scripts" / "make_prompts.py"
    command = [sys.executable, script, "--count", str(count), "--max-per-file", str(per_file),
               "--model", MODELS / fixture, "--out", out]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    assert out.read_bytes() == (data / bundled).read_bytes()
    assert len(out.read_text().splitlines()) == count


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("name", TRAIN_PROMPT_FILES)
def test_train_prompts_never_occur_in_held_out_records_or_prompts(fixture, name):
    data = data_dir(fixture)
    assert overlaps(read_jsonl(data / name, "prompt"), held_out_items(data)) == []


@pytest.mark.parametrize("fixture", FIXTURES)
def test_no_item_occurs_in_a_file_of_the_other_split(corpus, fixture):
    data = data_dir(fixture)
    train_texts, heldout_texts = corpus
    for name in TRAIN_PROMPT_FILES:
        assert overlaps(read_jsonl(data / name, "prompt"), heldout_texts) == [], name
    assert overlaps(held_out_items(data), train_texts) == []


def test_the_overlap_check_catches_one_appended_held_out_line(tmp_path):
    """A broken copy of a prompts file, one line of held-out text appended, is caught (the old raw-text check
    found nothing: the appended text has newlines)."""
    data = data_dir("pystdlib-moe")
    record = read_jsonl(data / "heldout.jsonl", "text")[0]
    assert "\n" in record
    broken = tmp_path / "prompts.jsonl"
    line = json.dumps({"prompt": record[:200]}, ensure_ascii=False)
    broken.write_text((data / "prompts.jsonl").read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    assert overlaps(read_jsonl(broken, "prompt"), held_out_items(data)) == [record[:200]]
    raw = (data / "heldout.jsonl").read_text()
    assert record[:200] not in raw  # what the old test searched
