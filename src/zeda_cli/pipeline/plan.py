"""``zeda convert``: inspect -> inject -> rollout -> stage1 -> stage2 -> export (-> push), resumable.

Each stage writes its own subfolder of OUT with a manifest. ``OUT/convert.json`` records each stage's settings and
fingerprint (those settings chained to the upstream's, starting from the *resolved* source: a folder's real path
and content digests, a Hub repo's commit; never its spelling). Settings that only change how a stage runs
(``recipes.HARMLESS``: logging, checkpoint frequency, server URLs, ...) are not part of it. A rerun skips stages
done with the same fingerprint, resumes an interrupted one (``distill.resume`` then reconciles the rest), and
refuses to mix outputs made with other settings, naming each changed key, unless ``--overwrite`` redoes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..console import Output
from ..errors import BadInputError, StageFailedError, ZedaError
from ..recipes import HARMLESS, Recipe, describe_changes, dump_recipe, flat
from ..runs import Manifest, file_record, read_manifest, write_manifest

STAGES = ("inject", "rollout", "stage1", "stage2", "export", "push")
STATE_FILE = "convert.json"
_SECTIONS = {
    "inject": ("zero_experts", "balance"),
    "rollout": ("teacher", "data", "rollout", "runtime", "generation"),
    "stage1": ("teacher", "balance", "stage1", "runtime"),
    "stage2": ("teacher", "balance", "data", "stage2", "runtime", "generation"),
    "export": ("export",),
    "push": ("push",),
}
_NOT_OUTPUT = ("zero_experts.max_shard_size", "stage1.gradient_checkpointing", "stage2.gradient_checkpointing",
               "stage1.micro_batch_size", "stage2.micro_batch_size", "rollout.batch_size")  # fmt: skip


@dataclass
class PlanItem:
    stage: str
    folder: Path
    fingerprint: str
    status: str = "run"  # done | resume | run
    settings: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "status": self.status, "folder": str(self.folder), "seconds": self.seconds,
                "estimate": self.estimate, "result": self.result}  # fmt: skip


def selected_stages(first: str | None, last: str | None, push: bool) -> list[str]:
    stages = list(STAGES if push else STAGES[:-1])
    for name in (first, last):
        if name is not None and name not in stages:
            raise BadInputError(f"stage {name!r}", expected=f"one of {', '.join(stages)}", fix="fix --from / --to")
    start = stages.index(first) if first else 0
    end = stages.index(last) + 1 if last else len(stages)
    if start >= end:
        raise BadInputError(f"--from {first} comes after --to {last}", expected="--from before --to", fix="swap them")
    return stages[start:end]


def stage_settings(source: dict[str, Any], recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Each stage's settings that shape its output (dotted keys; how-it-runs keys left out), the source first."""
    data = recipe.model_dump(mode="json")
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        settings = flat({s: data.get(s) for s in _SECTIONS[stage]})
        out[stage] = {k: v for k, v in settings.items() if k not in HARMLESS and k not in _NOT_OUTPUT}
    out["inject"] = {**{f"source.{k}": v for k, v in source.items()}, **out["inject"]}
    return out


def fingerprints(settings: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each stage's settings, chained: a change upstream changes every later fingerprint."""
    previous, out = "", {}
    for stage in STAGES:
        payload = json.dumps({"up": previous, **settings[stage]}, sort_keys=True)
        previous = out[stage] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return out


def folder_of(out: Path, stage: str) -> Path:
    return out / ("rollouts" if stage == "rollout" else stage)


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / STATE_FILE)


def stage_done(out: Path, stage: str, state: dict[str, Any], fingerprint: str) -> bool:
    recorded = state["stages"].get(stage, {})
    if recorded.get("fingerprint") != fingerprint or not recorded.get("done"):
        return False
    if stage == "push":
        return True
    manifest = read_manifest(folder_of(out, stage))
    return bool(manifest and manifest.done)


def plan(out: Path, source: dict[str, Any], recipe: Recipe, stages: list[str], overwrite: bool) -> list[PlanItem]:
    state, settings = read_state(out), stage_settings(source, recipe)
    prints = fingerprints(settings)
    items = []
    for stage in stages:
        item = PlanItem(stage, folder_of(out, stage), prints[stage], settings=settings[stage])
        recorded = state["stages"].get(stage, {})
        if overwrite:
            item.status = "run"
        elif stage_done(out, stage, state, prints[stage]):
            item.status = "done"
        elif recorded.get("fingerprint") == prints[stage]:
            item.status = "resume"
        elif recorded or (stage != "push" and item.folder.exists() and any(item.folder.iterdir())):
            raise BadInputError(
                f"{item.folder} was made by a run with other settings or another model" + _what_changed(state, stage,
                                                                                                      settings),
                expected=f"the settings that produced it (stage {stage})",
                fix="pass --overwrite to redo this stage and the ones after it, or choose another --out",
            )  # fmt: skip
        items.append(item)
    for upstream in STAGES[: STAGES.index(stages[0])]:
        if upstream != "push" and not stage_done(out, upstream, state, prints[upstream]):
            raise BadInputError(
                f"--from {stages[0]} needs stage {upstream} done in {out}",
                expected="every earlier stage finished with the same settings",
                fix=f"run without --from (or --from {upstream})",
            )
    return items


def _what_changed(state: dict[str, Any], stage: str, settings: dict[str, dict[str, Any]]) -> str:
    """``: stage1.optim.lr 0.001 -> 0.002, ...``: the first stage (up to this one) whose recorded settings differ."""
    for name in STAGES[: STAGES.index(stage) + 1]:
        recorded = state["stages"].get(name, {}).get("settings")
        if recorded is None:
            continue
        changes = [(k, recorded.get(k), v) for k, v in settings[name].items() if recorded.get(k) != v]
        changes += [(k, v, None) for k, v in recorded.items() if k not in settings[name]]
        if changes:
            return f" ({name}: {describe_changes(changes)})"
    return ""


Runner = Callable[[PlanItem], dict[str, Any]]  # runs one stage into item.folder; returns its summary


def execute(items: list[PlanItem], out: Path, source: dict[str, Any], recipe: Recipe, runners: dict[str, Runner],
            output: Output) -> None:  # fmt: skip
    state = read_state(out)
    state.update(source=source, recipe_sha256=hashlib.sha256(dump_recipe(recipe).encode()).hexdigest())
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    for item in items:
        if item.status == "done":
            output.log(f"[{item.stage}] done earlier with the same settings; skipped")
            continue
        if item.status == "run" and item.stage != "push" and item.folder.exists():
            shutil.rmtree(item.folder)
        output.log(f"[{item.stage}] {'resuming' if item.status == 'resume' else 'running'} -> {item.folder}")
        state["stages"][item.stage] = {"fingerprint": item.fingerprint, "done": False, "settings": item.settings}
        write_state(out, state)
        began = time.perf_counter()
        try:
            item.result = runners[item.stage](item)
        except ZedaError:
            raise
        except Exception as err:  # a stage crashed: say which, keep what is resumable
            raise StageFailedError(
                f"stage {item.stage} failed ({type(err).__name__}: {err})",
                expected="the stage to complete",
                fix="fix the cause and rerun the same command: finished stages are kept, this one resumes",
            ) from err
        item.seconds = round(time.perf_counter() - began, 1)
        state["stages"][item.stage] = {"fingerprint": item.fingerprint, "done": True, "seconds": item.seconds,
                                       "settings": item.settings}  # fmt: skip
        write_state(out, state)


def write_rollout_manifest(folder: Path, summary: Any, settings: dict[str, Any]) -> None:
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix == ".jsonl"}
    metrics = {"prompts": summary.prompts, "finished_share": round(summary.finished_share, 4),
               "mean_response_tokens": round(summary.mean_response_tokens, 1)}  # fmt: skip
    write_manifest(folder, Manifest(stage="rollout", done=True, settings=settings, files=files, metrics=metrics))
