"""Settings a stage inherits from the folder it starts from, said out loud.

A stage takes each of these settings from, in order: the flag or ``--set``; an explicit recipe value; the record of
the folder it starts from (its ``zeda.json``); the default. Each value taken from the record, and each explicit
value that overrides a different recorded one, is one line the command prints (as nanochat does)::

    target_skip 0.3 inherited from the inject record
    --target-skip 0.5 overrides 0.3 recorded at inject

Settings the folder fixes (its number of zero experts) cannot be overridden: a different explicit value is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInputError
from .model_ref import ModelRef
from .recipes import Recipe
from .runs import Manifest, TeacherSpec, lineage, original_teacher, read_manifest


@dataclass(frozen=True)
class Record:
    """What a folder's manifest recorded: dotted recipe key -> value, and the stage that recorded it."""

    stage: str
    values: dict[str, Any]
    teacher: TeacherSpec | None


def record_of(folder: Path, manifest: Manifest | None = None) -> Record | None:
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        return None
    settings = manifest.settings
    values: dict[str, Any] = {}
    if manifest.stage == "inject":
        values["balance.target_skip"] = settings.get("target_skip")
        values["zero_experts.num_zero_experts"] = settings.get("num_zero_experts")
    else:
        values["balance.target_skip"] = (settings.get("balance") or {}).get("target_skip")
        values["runtime.dtype"] = (settings.get("runtime") or {}).get("dtype")
    values = {k: v for k, v in values.items() if v is not None}
    return Record(manifest.stage, values, original_teacher(lineage(folder, manifest)))


def _shown(recipe: Recipe, key: str, value: Any) -> str:
    """How an explicit value is named in a line: as the flag carried it, or as its recipe key and file."""
    origin = recipe.origin(key) or "the recipe"
    if origin.startswith("--") and origin != "--set":
        return f"{origin} {value}"
    if origin == "--set":
        return f"--set {key}={value}"
    return f"{key} {value} ({origin})"


def inherit(recipe: Recipe, student: ModelRef) -> tuple[Recipe, list[str]]:
    """``recipe`` with the student folder's recorded settings filled in where nothing explicit set them, and the
    lines that say what was inherited or overridden."""
    record = record_of(student.folder)
    lines: list[str] = []
    fixed = student.rc.num_zero_experts
    z = recipe.zero_experts.num_zero_experts
    if recipe.origin("zero_experts.num_zero_experts") and z is not None and z != fixed:
        raise BadInputError(
            f"{_shown(recipe, 'zero_experts.num_zero_experts', z)}, but {student.folder} has {fixed} zero experts "
            "per layer",
            expected="the number of zero experts the folder was injected with (fixed from inject on)",
            fix="drop the setting, or inject again with the new number (zeda inject-zero-experts -z)",
        )
    if record is None:
        return recipe, lines
    updates: dict[str, Any] = {}
    for key, recorded in record.values.items():
        if key == "zero_experts.num_zero_experts":
            continue  # fixed by the folder itself (checked above)
        name = key.rpartition(".")[2]
        current = recipe.value(key)
        if recipe.origin(key):
            if current != recorded:
                lines.append(f"{_shown(recipe, key, current)} overrides {recorded} recorded at {record.stage}")
        elif current != recorded:
            updates[key] = recorded
            lines.append(f"{name} {recorded} inherited from the {record.stage} record")
    if recipe.teacher and record.teacher and Path(recipe.teacher).resolve() != Path(record.teacher.path).resolve():
        lines.append(f"{_shown(recipe, 'teacher', recipe.teacher)} overrides {record.teacher.path} recorded at "
                     f"{record.stage}")  # fmt: skip
    return (recipe.with_values(updates) if updates else recipe), lines
