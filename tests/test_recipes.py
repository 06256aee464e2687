"""Shipped recipes validate; typos and bad values name the key and what is allowed; recipe choice by model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zeda_cli.errors import ZedaError
from zeda_cli.pipeline.convert import pick_recipe
from zeda_cli.recipes import Recipe, load_recipe, recipes_dir

SHIPPED = sorted(recipes_dir().glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"qwen3-30b-a3b", "glm-4.7-flash", "tiny-demo"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.name == path.stem
    if recipe.distributed.deepspeed:
        config = json.loads(open(recipe.distributed.deepspeed).read())
        assert config["zero_optimization"]["stage"] == 3 and Path(recipe.distributed.deepspeed).exists()


@pytest.mark.parametrize("path", sorted(recipes_dir().glob("deepspeed/*.json")), ids=lambda p: p.stem)
def test_deepspeed_configs_are_valid_json(path):
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 3


def test_official_hyperparameters():
    qwen, glm = load_recipe("qwen3-30b-a3b"), load_recipe("glm-4.7-flash")
    for r in (qwen, glm):
        assert (r.stage1.optim.lr, r.stage1.optim.schedule, r.stage1.optim.warmup_ratio) == (2e-5, "cosine", 0.1)
        assert r.stage1.optim.betas == (0.9, 0.98) and r.stage1.optim.weight_decay == 0.1
        assert (r.stage1.global_batch_size, r.stage1.epochs) == (128, 1)
        assert (r.stage2.steps, r.stage2.prompts_per_step, r.stage2.samples_per_prompt) == (321, 16, 2)
        assert (r.balance.target_skip, r.balance.aux_loss_coeff) == (0.5, 0.1)
    assert qwen.stage2.optim.lr == 5e-6 and glm.stage2.optim.lr == 1e-6
    assert qwen.zero_experts.num_zero_experts == 64 and glm.zero_experts.num_zero_experts == 32


def _error(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ZedaError) as err:
        load_recipe(path, list(overrides))
    return str(err.value)


def test_typo_key_names_the_key_and_the_allowed_ones(tmp_path):
    message = _error(tmp_path, "stage1:\n  optim:\n    lrate: 1.0e-5\n")
    assert "stage1.optim.lrate" in message and "lr" in message and "warmup_ratio" in message


def test_bad_value_names_the_key_and_the_allowed_values(tmp_path):
    message = _error(tmp_path, "stage2:\n  loss: forward\n")
    assert "stage2.loss" in message and "'sampled' or 'full'" in message
    message = _error(tmp_path, "balance:\n  target_skip: 1.5\n")
    assert "balance.target_skip" in message and "1.5" in message


def test_all_problems_at_once(tmp_path):
    message = _error(tmp_path, "balanse: {}\nstage1: {epochs: 0}\n", ["stage2.steps=-1"])
    assert "3 problems" in message and "balanse" in message and "stage1.epochs" in message


def test_set_override_typo(tmp_path):
    message = _error(tmp_path, "version: 1\n", ["stage1.optim.lrr=1"])
    assert "'lrr'" in message and "stage1.optim" in message


def test_set_overrides_keep_section_defaults():
    r = load_recipe("qwen3-30b-a3b", ["stage1.optim.lr=1e-5"])
    assert r.stage1.optim.lr == 1e-5 and r.stage1.optim.warmup_ratio == 0.1


def test_recipe_choice():
    path, why = pick_recipe("Qwen/Qwen3-30B-A3B", "qwen3_moe")
    assert path.stem == "qwen3-30b-a3b" and "names" in why
    path, why = pick_recipe("someone/Other-Qwen3-MoE", "qwen3_moe")
    assert path.stem == "qwen3-30b-a3b" and "family" in why
    assert pick_recipe("zai-org/GLM-4.7-Flash", "glm4_moe_lite")[0].stem == "glm-4.7-flash"
    assert pick_recipe("models/pystdlib-moe", "qwen3_moe")[0].stem == "tiny-demo"
    path, why = pick_recipe("mistralai/Mixtral-8x7B-v0.1", "mixtral")
    assert path is None and "defaults" in why
