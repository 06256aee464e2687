"""The run folder: manifests with format_version and parent, one lineage walker, migration of old manifests, and
default data found only through the lineage (never in the working directory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ZeroExpertsSection
from zeda_cli.runs import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    Manifest,
    TeacherSpec,
    file_record,
    find_file,
    lineage,
    origin_of,
    original_teacher,
    read_manifest,
    write_manifest,
)

runner = CliRunner()
TEXTS = "".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(4))


def _stage(parent: Path, folder: Path, stage: str, **inputs) -> Path:
    """A training stage's output as `zeda distill` writes it: the parent's weights, a manifest naming the parent."""
    shutil.copytree(parent, folder)
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST_FILE}
    write_manifest(folder, Manifest(stage=stage, done=True, parent=str(parent.resolve()), inputs=inputs, files=files))
    return folder


def _chain(tiny_static, tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    static = tmp_path / "static"
    shutil.copytree(tiny_static("qwen3_moe"), static)
    (static / "data").mkdir()
    (static / "data" / "heldout.jsonl").write_text(TEXTS)
    inject = inject_zero_experts(str(static), tmp_path / "inject", zero=ZeroExpertsSection()).out
    teacher = {"path": str(inject), "masked": True}
    stage1 = _stage(inject, tmp_path / "stage1", "stage1", student=str(inject), teacher=teacher)
    stage2 = _stage(stage1, tmp_path / "stage2", "stage2", student=str(stage1), teacher=teacher)
    return static, inject, stage1, stage2


def test_manifests_carry_format_version_and_parent(tiny_static, tmp_path):
    static, inject, stage1, stage2 = _chain(tiny_static, tmp_path)
    assert read_manifest(inject).format_version == FORMAT_VERSION and read_manifest(inject).parent is None
    assert read_manifest(stage2).parent == str(stage1.resolve())
    chain = lineage(stage2)
    assert [m.stage for _, m in chain] == ["stage2", "stage1", "inject"]
    assert origin_of(chain)["folder"] == str(static.resolve())
    assert original_teacher(chain) == TeacherSpec(path=str(inject), masked=True)


def test_round_1_manifests_are_migrated_on_read(tiny_static, tmp_path):
    _, inject, stage1, _ = _chain(tiny_static, tmp_path)
    raw = json.loads((stage1 / MANIFEST_FILE).read_text())
    for key in ("format_version", "parent"):
        raw.pop(key)
    (stage1 / MANIFEST_FILE).write_text(json.dumps(raw))
    manifest = read_manifest(stage1)
    assert manifest.format_version == FORMAT_VERSION and manifest.parent == str(inject.resolve())
    assert [m.stage for _, m in lineage(stage1)] == ["stage1", "inject"]


def test_lineage_ends_where_a_parent_is_gone(tiny_static, tmp_path):
    _, inject, stage1, stage2 = _chain(tiny_static, tmp_path)
    shutil.rmtree(stage1)
    assert [m.stage for _, m in lineage(stage2)] == ["stage2"]
    assert find_file(stage2, ["data/heldout.jsonl"]) is None


def test_eval_of_a_distilled_stage_finds_the_originals_data_not_the_working_directorys(
    tiny_static, tmp_path, monkeypatch
):
    static, _, _, stage2 = _chain(tiny_static, tmp_path)
    decoy = tmp_path / "cwd"
    (decoy / "data").mkdir(parents=True)
    (decoy / "data" / "heldout.jsonl").write_text('{"text": "the decoy"}\n')
    monkeypatch.chdir(decoy)
    result = runner.invoke(app, ["eval", str(stage2), "--no-record", "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"] == str(static.resolve() / "data" / "heldout.jsonl")


def test_eval_without_data_anywhere_in_the_lineage_asks_for_it(tiny_static, tmp_path, monkeypatch):
    static, _, _, stage2 = _chain(tiny_static, tmp_path)
    shutil.rmtree(static / "data")
    decoy = tmp_path / "cwd"
    (decoy / "data").mkdir(parents=True)
    (decoy / "data" / "heldout.jsonl").write_text('{"text": "the decoy"}\n')
    monkeypatch.chdir(decoy)
    result = runner.invoke(app, ["eval", str(stage2), "--no-record"])
    assert result.exit_code == EXIT_BAD_INPUT and "pass --data FILE" in result.stderr, result.output
