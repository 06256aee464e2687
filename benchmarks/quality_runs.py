"""The ZEDA models benchmarks/quality.py measures: finished ``zeda convert`` runs of a shipped recipe, identified from
their own records, never taken on trust.

A run folder (``zeda convert ... --out DIR``) qualifies when its records show a finished conversion of a shipped
recipe on one of the bundled fixtures, every training stage made in that folder by that run:

* ``DIR/convert.json`` marks inject, rollout, stage1 and stage2 done, and each stage's fingerprint equals the one
  recomputed from ``DIR/recipe.yaml`` and the recorded source (so no stage was made with other settings);
* ``DIR/recipe.yaml`` is the recipe convert recorded (its sha256 is ``convert.json``'s ``recipe_sha256``) and names a
  shipped recipe; how it differs from that recipe file is recorded (seeds, and any other override);
* the source is a bundled fixture as committed (convert's identity of it: real path, config and weight-header digests);
* every stage folder's ``zeda.json`` is done and its files match their checksums; stage2's parent is DIR/stage1,
  stage1's is DIR/inject, and stage 1 trained on DIR/rollouts (nothing from another run).

Anything else is refused with one line naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common import ROOT
from zeda_cli.errors import ZedaError
from zeda_cli.model_ref import resolve_model
from zeda_cli.pipeline.plan import STATE_FILE, fingerprints, folder_of, stage_settings
from zeda_cli.recipes import flat, load_recipe, recipes_dir, validate_recipe
from zeda_cli.runs import Manifest, read_manifest, verified_manifest

FIXTURES = {"pystdlib-moe": ROOT / "models" / "pystdlib-moe", "pystdlib-glm": ROOT / "models" / "pystdlib-glm"}
TRAINED = ("inject", "rollout", "stage1", "stage2")
# What one ZEDA seed varies: the zero-expert rows' init, the teacher's rollouts, both stages' data order / sampling
# and the prompt shuffle. Seed s sets them all to s; seed 0 is the recipe as shipped (every one of them 0).
SEED_KEYS = ("zero_experts.seed", "rollout.seed", "stage1.seed", "stage2.seed", "data.shuffle_seed")
_PATHS = ("model", "teacher", "data.prompts", "data.rollouts", "distributed.deepspeed")


class RunRefused(Exception):
    """A folder that is not a finished ``zeda convert`` of a shipped recipe (the message is one line)."""


@dataclass(frozen=True)
class TrainedRun:
    folder: Path  # the convert output folder
    fixture: str
    recipe: str  # the shipped recipe's name
    seed: int | None  # the seed every SEED_KEY is set to, None when they differ
    seeds: dict[str, Any]
    overrides: dict[str, Any]  # keys that differ from the shipped recipe other than the seeds: {key: [shipped, run]}
    train_seconds: float | None  # inject .. stage2, as convert recorded them
    stage_seconds: dict[str, float | None]
    weights_sha256: dict[str, str]  # stage2's weight files, as its zeda.json records (and verified) them

    @property
    def model(self) -> Path:
        return self.folder / "stage2"

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "fixture": self.fixture, "recipe": self.recipe, "seed": self.seed,
                "seeds": self.seeds, "overrides": self.overrides, "train_seconds": self.train_seconds,
                "stage_seconds": self.stage_seconds, "weights_sha256": self.weights_sha256}  # fmt: skip


def seed_overrides(seed: int) -> list[str]:
    """``--set`` values of one seed (none for seed 0: the recipe exactly as shipped)."""
    return [] if seed == 0 else [f"{key}={seed}" for key in SEED_KEYS]


def identify(folder: Path) -> TrainedRun:
    """What a run folder is, from its records; raises RunRefused (one line) when it does not qualify."""
    out = folder
    if (folder / "zeda.json").is_file():  # a stage folder: only stage2 (what is measured), inside its run
        manifest = read_manifest(folder)
        if manifest is None or manifest.stage != "stage2" or not (folder.parent / STATE_FILE).is_file():
            raise RunRefused(f"{folder}: a {manifest and manifest.stage} folder; pass a zeda convert output folder "
                             "(or its stage2)")  # fmt: skip
        out = folder.parent
    state, raw = _records(out)
    recipe_name = raw.get("name")
    shipped = recipes_dir() / f"{recipe_name}.yaml"
    if not recipe_name or not shipped.is_file():
        raise RunRefused(f"{out}: recipe.yaml names {recipe_name!r}, not a shipped recipe (recipes/*.yaml)")
    try:
        recipe = validate_recipe(raw, str(out / "recipe.yaml"))
    except ZedaError as err:
        raise RunRefused(f"{out}: recipe.yaml is not a valid recipe ({err})") from err
    fixture = _fixture(out, state.get("source") or {})
    expected = fingerprints(stage_settings(state["source"], recipe))
    for stage in TRAINED:
        recorded = state.get("stages", {}).get(stage) or {}
        if not recorded.get("done"):
            raise RunRefused(f"{out}: convert.json does not mark stage {stage} done (run zeda convert to stage2)")
        if recorded.get("fingerprint") != expected[stage]:
            raise RunRefused(f"{out}: stage {stage} was not made with the settings of {out / 'recipe.yaml'}")
    stage2 = _check_stage_folders(out)
    diff = _diff(flat(load_recipe(shipped).model_dump(mode="json")), flat(recipe.model_dump(mode="json")))
    seeds = {key: flat(recipe.model_dump(mode="json"))[key] for key in SEED_KEYS}
    values = set(seeds.values())
    seconds = {s: (state["stages"].get(s) or {}).get("seconds") for s in TRAINED}
    total = round(sum(seconds.values()), 1) if all(isinstance(v, int | float) for v in seconds.values()) else None
    return TrainedRun(out.resolve(), fixture, recipe_name, values.pop() if len(values) == 1 else None, seeds,
                      {k: v for k, v in diff.items() if k not in SEED_KEYS}, total, seconds,
                      {n: f.sha256 for n, f in stage2.files.items() if n.endswith(".safetensors")})  # fmt: skip


def _records(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state_path, recipe_path = out / STATE_FILE, out / "recipe.yaml"
    if not state_path.is_file() or not recipe_path.is_file():
        raise RunRefused(f"{out}: no {STATE_FILE} and recipe.yaml, so not a zeda convert output folder")
    state = json.loads(state_path.read_text())
    text = recipe_path.read_text()
    if hashlib.sha256(text.encode()).hexdigest() != state.get("recipe_sha256"):
        raise RunRefused(f"{out}: recipe.yaml is not the recipe {STATE_FILE} recorded (sha256 differs)")
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise RunRefused(f"{out}: recipe.yaml is not a mapping")
    return state, raw


def _fixture(out: Path, source: dict[str, Any]) -> str:
    for name, path in FIXTURES.items():
        if source == resolve_model(str(path), allow_patterns=["config.json"]).source.identity():
            return name
    raise RunRefused(f"{out}: converted {source.get('folder') or source.get('spec')!r}, not a bundled fixture "
                     f"({', '.join(FIXTURES)}) as committed")  # fmt: skip


def _check_stage_folders(out: Path) -> Manifest:
    """Every stage folder finished, intact and made from the one before it in this run; stage2's manifest."""
    root = out.resolve()
    try:
        manifests = {s: verified_manifest(folder_of(out, s), f"stage {s}") for s in ("inject", "stage1", "stage2")}
    except ZedaError as err:
        raise RunRefused(f"{out}: {str(err).splitlines()[0]}") from err
    rollouts = read_manifest(folder_of(out, "rollout"))
    if rollouts is None or not rollouts.done:
        raise RunRefused(f"{out}: {folder_of(out, 'rollout')} has no finished zeda.json")
    for stage, parent in (("stage2", "stage1"), ("stage1", "inject")):
        if Path(manifests[stage].parent or "") != folder_of(root, parent):
            made_from = manifests[stage].parent
            raise RunRefused(f"{out}: {stage} was trained from {made_from}, not {folder_of(root, parent)}")
    used = Path(str(manifests["stage1"].inputs.get("rollouts") or "")).resolve()
    if used.parent != folder_of(root, "rollout"):
        raise RunRefused(f"{out}: stage 1 trained on {used}, not on this run's rollouts")
    return manifests["stage2"]


def _diff(shipped: dict[str, Any], run: dict[str, Any]) -> dict[str, list[Any]]:
    def norm(key: str, value: Any) -> Any:
        if key not in _PATHS or not isinstance(value, str):
            return value
        path = Path(value) if Path(value).is_absolute() else ROOT / value
        return str(path.resolve()) if path.exists() else value

    keys = sorted(set(shipped) | set(run))
    return {k: [shipped.get(k), run.get(k)] for k in keys if norm(k, shipped.get(k)) != norm(k, run.get(k))}
