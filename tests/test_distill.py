"""Stages 1 and 2 end to end on a tiny model (single process): target share reached, KL to the teacher lowered."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import PAD, save_distill_teacher, write_prompts
from zeda_cli import load_model, load_tokenizer
from zeda_cli.console import Output
from zeda_cli.distill.data import sequence_batch
from zeda_cli.distill.generation import SamplingSettings
from zeda_cli.distill.generation.hf import sample_responses
from zeda_cli.distill.run import run_stage
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import ZeroExpertsSection, load_recipe
from zeda_cli.runs import read_manifest, verify_files
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder

TARGET = 0.5
COMMON = ["balance.aux_loss_coeff=2.0", f"balance.target_skip={TARGET}"]
STAGE1 = [*COMMON, "rollout.max_new_tokens=24", "rollout.batch_size=64", "stage1.global_batch_size=16",
          "stage1.micro_batch_size=16", "stage1.optim.lr=1e-3", "stage1.epochs=2"]  # fmt: skip
STAGE2 = [*COMMON, "stage2.steps=10", "stage2.max_new_tokens=16", "stage2.prompts_per_step=8",
          "stage2.micro_batch_size=16", "stage2.optim.lr=2e-4"]  # fmt: skip


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("distill")
    static = save_distill_teacher(root / "static")
    inject = inject_zero_experts(str(static), root / "inject", zero=ZeroExpertsSection()).out
    return SimpleNamespace(
        root=root,
        static=static,
        inject=inject,
        prompts=write_prompts(root / "prompts.jsonl", 256, seed=1),
        heldout=write_prompts(root / "heldout.jsonl", 32, seed=2),
    )


def _distill(stage: int, student: Path, out: Path, overrides: list[str], **kw) -> dict:
    return run_stage(stage, str(student), out, load_recipe(None, overrides), output=Output(quiet=True), **kw)


@pytest.fixture(scope="session")
def stage1(base) -> Path:
    _distill(1, base.inject, base.root / "stage1", [*STAGE1, f"data.prompts={base.prompts}"])
    return base.root / "stage1"


@pytest.fixture(scope="session")
def stage2(base, stage1) -> Path:
    _distill(2, stage1, base.root / "stage2", [*STAGE2, f"data.prompts={base.prompts}"])
    return base.root / "stage2"


def heldout_quality(folder: Path, base: SimpleNamespace) -> tuple[float, float]:
    """(KL(teacher || model) per response token, zero share) on teacher continuations of held-out prompts."""
    tok = load_tokenizer(base.inject)
    prompts = [tok(json.loads(line)["prompt"])["input_ids"] for line in base.heldout.read_text().splitlines()]
    teacher = load_model(base.static)
    responses = [r for r, _ in sample_responses(teacher, tok, prompts, SamplingSettings(24), seed=7)]
    batch = sequence_batch(prompts, responses, PAD)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    model = load_model(folder)
    with torch.no_grad():
        t = torch.log_softmax(teacher(**inputs).logits, -1)
        with RoutingRecorder(model) as rec:
            s = torch.log_softmax(model(**inputs).logits, -1)
    kl = ((t.exp() * (t - s)).sum(-1) * batch.response_mask).sum() / batch.response_mask.sum()
    n = model.config.zeda["router"]["num_experts"]
    mask = batch.attention_mask.flatten().bool()
    zero = sum(int((r[2][mask] >= n).sum()) for r in rec.records) / sum(r[2][mask].numel() for r in rec.records)
    return float(kl), zero


def _check_stage_folder(folder: Path, stage: int) -> None:
    manifest = read_manifest(folder)
    assert manifest.done and manifest.stage == f"stage{stage}" and verify_files(folder, manifest) == []
    assert not (folder / "checkpoints").exists() and not list(folder.glob(".model-partial"))
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, manifest.metrics["steps"] + 1))
    config = json.loads((folder / "config.json").read_text())
    assert config["use_zce_mask"] is False and stage in config["zeda"]["distilled_stages"]
    stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(stock).__name__ == "Qwen3MoePlusPlusForCausalLM"


def test_stage1_reaches_the_target_share_and_beats_the_untrained_model(base, stage1):
    _check_stage_folder(stage1, 1)
    kl_untrained, zero_untrained = heldout_quality(base.inject, base)
    kl, zero = heldout_quality(stage1, base)
    assert abs(zero - TARGET) <= 0.1, (zero_untrained, zero)
    assert kl < kl_untrained, (kl_untrained, kl)
    rollouts = [json.loads(line) for line in (stage1 / "rollouts.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rollouts) == list(range(256))


def test_stage2_reaches_the_target_share_and_beats_the_untrained_model(base, stage2):
    _check_stage_folder(stage2, 2)
    kl_untrained, _ = heldout_quality(base.inject, base)
    kl, zero = heldout_quality(stage2, base)
    assert abs(zero - TARGET) <= 0.1, zero
    assert kl < kl_untrained, (kl_untrained, kl)
    manifest = read_manifest(stage2)
    assert manifest.inputs["teacher"] == {"path": str(base.inject), "masked": True}


def test_stage2_exact_kl_option_runs(base, stage1, tmp_path):
    summary = _distill(2, stage1, tmp_path / "s2", [*COMMON, f"data.prompts={base.prompts}", "stage2.steps=2",
                                                     "stage2.max_new_tokens=8", "stage2.prompts_per_step=4",
                                                     "stage2.loss=full"])  # fmt: skip
    assert summary["steps"] == 2 and summary["final_kl"] is not None
    assert read_manifest(tmp_path / "s2").done


def test_eval_measures_a_distilled_stage_against_the_original(base, stage1):
    from zeda_cli.evaluate import run_eval
    from zeda_cli.recipes import EvalSection

    data = base.root / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in ["def f(x): return x + 1"] * 4))
    settings = EvalSection(data=data, record=False)
    static = run_eval(str(base.static), settings)
    distilled = run_eval(str(stage1), settings)
    assert "the original" in distilled["teacher"]
    assert distilled["teacher_nll"] == pytest.approx(static["heldout_nll"], abs=1e-5)


def test_stage1_dense_kl_with_a_router_learning_rate_beats_the_untrained_model(base, tmp_path):
    overrides = [*STAGE1, f"data.prompts={base.prompts}", "stage1.loss=kl", "stage1.kl_positions=all",
                 "stage1.trainable=full", "stage1.optim.lr=3e-4", "stage1.optim.router_lr=3e-3"]  # fmt: skip
    summary = _distill(1, base.inject, tmp_path / "s1", overrides)
    assert summary["final_kl"] is not None and summary["final_ce"] is None
    kl_untrained, _ = heldout_quality(base.inject, base)
    kl, zero = heldout_quality(tmp_path / "s1", base)
    assert kl < kl_untrained and abs(zero - TARGET) <= 0.15, (kl_untrained, kl, zero)


def test_stage1_dense_kl_on_response_tokens_with_the_router_view_teacher(base, tmp_path):
    """Router-only: the teacher is the student with its original router rows swapped in (no second model)."""
    overrides = [*STAGE1, f"data.prompts={base.prompts}", "stage1.loss=kl", "stage1.max_steps=2"]
    summary = _distill(1, base.inject, tmp_path / "s1", overrides)
    records = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(r["kl"] > 0 and "ce" not in r for r in records)


def test_router_rows_get_their_own_learning_rate_and_weight_decay(base):
    from zeda_cli.distill.engines import param_groups
    from zeda_cli.recipes import OptimSection
    from zeda_cli.runtime.zeda_dynamic_moe import routers

    model = load_model(base.inject)
    router_ids = {id(r.weight) for _, r in routers(model)}
    groups = param_groups(model, OptimSection(lr=1e-4, router_lr=1e-2, router_weight_decay=0.0))
    router_group = [g for g in groups if "lr" in g]
    assert len(router_group) == 1 and router_group[0]["lr"] == 1e-2 and router_group[0]["weight_decay"] == 0.0
    assert {id(p) for p in router_group[0]["params"]} == router_ids
    plain = param_groups(model, OptimSection(lr=1e-4))
    assert len(plain) == 2 and all("lr" not in g for g in plain)
    assert sum(len(g["params"]) for g in plain) == sum(len(g["params"]) for g in groups)
