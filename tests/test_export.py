"""``zeda export``: verified input, streamed shards + index, both formats load with the right logits, the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from zeda_cli import load_model
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_CHECKPOINT, EXIT_UNSUPPORTED
from zeda_cli.io.reader import Checkpoint
from zeda_cli.runs import file_record, read_manifest, write_manifest

runner = CliRunner()


def _export(run: Path, out: Path, *args: str):
    return runner.invoke(app, ["export", str(run), "--out", str(out), *args])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update({k: f.get_tensor(k) for k in f.keys()})
    return found


def _ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=_ids()).logits


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reseal(folder: Path, **changes) -> None:
    """Re-record every file's checksum after a deliberate edit (as the stage would have written it)."""
    manifest = read_manifest(folder)
    names = [p.name for p in sorted(folder.iterdir()) if p.is_file() and p.name != "zeda.json"]
    manifest.files = {name: file_record(folder / name) for name in names}
    for key, value in changes.items():
        setattr(manifest, key, value)
    write_manifest(folder, manifest)


def _assert_clean_failure(result, out: Path, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors == lines[-1:] and text in errors[0], result.stderr  # one error line, last (after log lines)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.zeda-partial*"))


# --- shards, index, bytes ----------------------------------------------------------------------------------------
def test_export_streams_bit_identical_tensors_into_several_shards(tiny_dynamic, tmp_path, monkeypatch):
    def whole_tensor_read(*args, **kwargs):
        raise AssertionError("export must stream chunks, not read whole tensors")

    run = tiny_dynamic("qwen3_moe")
    monkeypatch.setattr(Checkpoint, "read_tensor", whole_tensor_read)
    out = tmp_path / "export"
    data = json.loads(_ok(_export(run, out, "--max-shard-size", "30KB", "--json")).stdout)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and data["shards"] == [p.name for p in shards]
    assert all(p.stat().st_size < 30_000 + 4_096 for p in shards)  # the limit holds (+ header)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source, exported = _tensors(run), _tensors(out)
    assert set(index["weight_map"]) == set(source) == set(exported)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as f:
            assert name in f.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_dtype_conversion_on_the_fly(tiny_dynamic, tmp_path):
    run = tiny_dynamic("glm4_moe_lite")
    out = tmp_path / "bf16"
    _ok(_export(run, out, "--dtype", "bfloat16", "--max-shard-size", "40KB"))
    source, exported = _tensors(run), _tensors(out)
    for name, tensor in source.items():
        if name.endswith("e_score_correction_bias"):  # steers routing: kept at its stored precision
            assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor)
        else:
            assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16 and torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        (lambda f: _flip(sorted(f.glob("model-*.safetensors"))[1]), "fails checksum verification: model-00002-of-"),
        (lambda f: (f / "zeda.json").unlink(), "has no zeda.json"),
        (lambda f: _reseal(f, done=False), "did not finish"),
    ],
)
def test_broken_runs_are_refused_and_nothing_is_left_behind(tiny_dynamic, tmp_path, damage, text):
    run = _copy_run(tiny_dynamic("qwen3_moe"), tmp_path / "run")
    damage(run)
    out = tmp_path / "export"
    _assert_clean_failure(_export(run, out), out, EXIT_CHECKPOINT, text)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_bad_options_are_reported_together(tiny_dynamic, tmp_path):
    out = tmp_path / "export"
    result = _export(tiny_dynamic("qwen3_moe"), out, "--format", "gguf", "--dtype", "int8", "--max-shard-size", "x")
    _assert_clean_failure(result, out, EXIT_BAD_INPUT, "3 problems")
    assert "zeda or stock" in result.stderr and "auto, bfloat16, float16, float32" in result.stderr


def test_static_folders_and_existing_outputs_are_refused(tiny_static, tiny_dynamic, tmp_path):
    static = _copy_run(tiny_static("qwen3_moe"), tmp_path / "static")
    write_manifest(static, read_manifest(tiny_dynamic("qwen3_moe")).model_copy(update={"files": {}}))
    out = tmp_path / "export"
    _assert_clean_failure(_export(static, out), out, EXIT_UNSUPPORTED, "static qwen3_moe model")
    _ok(_export(tiny_dynamic("qwen3_moe"), out))
    again = _export(tiny_dynamic("qwen3_moe"), out)
    assert again.exit_code == EXIT_BAD_INPUT and "exists and is not empty" in again.stderr
    _ok(_export(tiny_dynamic("qwen3_moe"), out, "--overwrite", "--max-shard-size", "30KB"))
    assert len(list(out.glob("model-*.safetensors"))) > 2 and read_manifest(out).done


def test_an_output_that_would_replace_the_run_is_refused(tiny_dynamic, tmp_path):
    run = _copy_run(tiny_dynamic("qwen3_moe"), tmp_path / "runs" / "stage2")
    for out in (run, run.parent):
        result = _export(run, out, "--overwrite")
        assert result.exit_code == EXIT_BAD_INPUT and "would replace RUN_DIR" in result.stderr
    assert read_manifest(run).done and (run / "config.json").exists()


# --- loading the zeda format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe_lite"])
def test_zeda_export_loads_everywhere_with_the_stage_logits(name, tiny_dynamic, tmp_path):
    run = tiny_dynamic(name)
    out = tmp_path / "export"
    _ok(_export(run, out, "--max-shard-size", "40KB"))
    expected = _logits(load_model(run))
    assert torch.equal(_logits(load_model(out)), expected)
    stock_tf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(stock_tf).__name__.endswith("PlusPlusForCausalLM")
    assert torch.equal(_logits(stock_tf), expected)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"].endswith("_plus_plus") and config["zce_types"] == ["zero"]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_zeda.")
    manifest = read_manifest(out)
    assert manifest.stage == "export" and manifest.done
    assert set(manifest.files) == {p.name for p in out.iterdir()} - {"zeda.json"}
    assert {"README.md", "config.json", "modeling_zeda.py", "zeda_dynamic_moe.py"} <= set(manifest.files)


# --- the stock format --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("qwen3_moe", "Qwen3MoeForCausalLM"),
        ("glm4_moe_lite", "Glm4MoeLiteForCausalLM"),
        ("mixtral", "MixtralForCausalLM"),
    ],
)
def test_stock_export_loads_in_the_original_class_with_the_dynamic_logits(name, cls, tiny_dynamic, tmp_path):
    run = tiny_dynamic(name)
    out = tmp_path / "stock"
    _ok(_export(run, out, "--format", "stock", "--max-shard-size", "40KB"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [cls] and not set(config) & {"zce_nums", "zeda", "auto_map", "zero_expert_bias"}
    assert not (out / "modeling_zeda.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert type(model).__name__ == cls and model.config.num_local_experts == 12  # N + Z = 8 + 4
    torch.testing.assert_close(_logits(model), _logits(load_model(run)), rtol=1e-5, atol=1e-5)
    tensors, source = _tensors(out), _tensors(run)
    zero_experts = [k for k in tensors if any(f".experts.{e}." in k for e in range(8, 12))]
    assert zero_experts and all(not tensors[k].any() for k in zero_experts)
    assert len(tensors) == len(source) + len(zero_experts)
    assert all(torch.equal(tensors[k], t) for k, t in source.items())
    card = (out / "README.md").read_text()
    assert "saves no compute" in card and "vllm" not in card.lower()  # stock vLLM serves it as the base model


def test_stock_export_widens_fused_expert_tensors(tiny_dynamic, tmp_path):
    """A run saved with fused experts (experts.gate_up_proj / down_proj, experts along dim 0) gets zero rows."""
    from safetensors.torch import save_file

    run = _copy_run(tiny_dynamic("qwen3_moe"), tmp_path / "fused-run")
    state = {k: v.contiguous() for k, v in load_model(run).state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    for path in [*run.glob("model*.safetensors"), run / "model.safetensors.index.json"]:
        path.unlink()
    save_file(state, run / "model.safetensors", metadata={"format": "pt"})
    _reseal(run)
    out = tmp_path / "stock"
    _ok(_export(run, out, "--format", "stock"))
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (12, 32, 32)
    assert not tensors["model.layers.0.mlp.experts.down_proj"][8:].any()
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(out)), _logits(load_model(run)), rtol=1e-5, atol=1e-5
    )


def test_stock_refuses_masked_and_biased_runs(tiny_dynamic, tmp_path):
    out = tmp_path / "stock"
    masked = _export(tiny_dynamic("qwen3_moe", "masked"), out, "--format", "stock")
    _assert_clean_failure(masked, out, EXIT_UNSUPPORTED, "use_zce_mask: true")
    biased = _copy_run(tiny_dynamic("glm4_moe_lite"), tmp_path / "biased")
    config = json.loads((biased / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**config, "zero_expert_bias": -1.0}))
    _reseal(biased)
    _assert_clean_failure(_export(biased, out, "--format", "stock"), out, EXIT_UNSUPPORTED, "zero_expert_bias: -1.0")
    _ok(_export(biased, out))  # the zeda format keeps the dial
    assert json.loads((out / "config.json").read_text())["zero_expert_bias"] == -1.0


# --- a distilled run: lineage, copied files, the card ------------------------------------------------------------
METRICS = {
    "zero_share": 0.41,
    "zero_share_per_layer": {"model.layers.2.mlp.gate": 0.44, "model.layers.10.mlp.gate": 0.38},
    "steps": 321,
    "eval": {
        "tokens": 4096,
        "nll": 2.5,
        "teacher_nll": 2.4,
        "nll_delta_pct": 4.17,
        "kl": 0.031,
        "top1_agreement": 0.93,
        "zero_share": 0.49,
        "zero_share_per_layer": {"model.layers.2.mlp.gate": 0.5, "model.layers.10.mlp.gate": 0.48},
        "expert_flops_ratio": 0.51,
    },
}
AUX_FILES = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 128}',
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "recipe.yaml": "name: tiny\nstage2:\n  steps: 321\n",
}


@pytest.fixture
def distilled(tiny_dynamic, tmp_path) -> Path:
    """inject -> stage2 as the distill stages lay it out: inputs.student names the inject folder, metrics, extras."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the original model\n")
    inject = _copy_run(tiny_dynamic("glm4_moe_lite"), tmp_path / "inject")
    manifest = read_manifest(inject)
    manifest.inputs["source"].update(repo_id="zai-org/GLM-4.7-Flash", folder=str(source))
    write_manifest(inject, manifest)
    stage2 = _copy_run(inject, tmp_path / "stage2")
    for name, text in {**AUX_FILES, "rollouts.jsonl": "{}\n", "teacher_router.pt": "x"}.items():
        (stage2 / name).write_text(text)
    inputs = {"student": str(inject), "teacher": {"path": str(inject)}}
    _reseal(stage2, stage="stage2", parent=str(inject.resolve()), inputs=inputs, metrics=METRICS)
    return stage2


def test_card_front_matter_and_body(distilled, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    data = json.loads(_ok(_export(distilled, out, "--json")).stdout)
    assert data["base_model"] == "zai-org/GLM-4.7-Flash" and data["stages"] == ["inject", "stage2"]
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "zai-org/GLM-4.7-Flash" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) == {"moe", "zeda", "dynamic-moe", "glm4_moe_lite"}
    text = card.text
    for expected in (
        "8 routed experts -> 12 router outputs",  # N -> N+Z
        "**Top-K unchanged:** 2 slots",
        "**Target skip ratio:** 50.0%",
        "inject -> stage2",
        "**49.0%** (measured on held-out data by `zeda eval`)",  # eval numbers win over training ones
        "Routed-expert FLOPs saved per token: **49.0%** (routed-expert FLOPs at 51.0% of the original)",
        "shared expert (intermediate size 16) runs for every token and is not counted above",
        "| `model.layers.2.mlp.gate` | 50.0% |\n| `model.layers.10.mlp.gate` | 48.0% |",  # natural layer order
        "| held-out NLL (this model) | 2.5000 |",
        "| NLL change | +4.17% |",
        "| KL(original, this model) per token | 0.0310 |",
        "held-out data, 4,096 tokens",
        "| top-1 agreement with the original model | 93.0% |",
        "trust_remote_code=True",
        "zeda_cli.load_model(path)",
        "zero_expert_bias",
        "## Serving with vLLM",  # the zeda-vllm plugin, as in zeda's README
        "pip install vllm ./integrations/vllm",
        "vllm serve path/or/hub-id-of-this-model\n",
        "/v1/completions",
        'LLM(model="path/or/hub-id-of-this-model")',
        "zeda-vllm active",
        "arXiv 2605.18643",
        "Post-Trained MoE Can Skip Half Experts via Self-Distillation",
        "Lv, Xingtai",
    ):
        assert expected in text, expected
    assert "Not distilled yet" not in text and "saves no compute" not in text


def test_export_copies_tokenizer_template_and_recipe_and_carries_metrics(distilled, tmp_path):
    out = tmp_path / "export"
    _ok(_export(distilled, out))
    for name, text in AUX_FILES.items():
        assert (out / name).read_text() == text, name
    assert not (out / "rollouts.jsonl").exists() and not (out / "teacher_router.pt").exists()
    assert (out / "generation_config.json").exists()
    manifest = read_manifest(out)
    assert manifest.metrics == METRICS
    assert (
        manifest.inputs["run"]["stage"] == "stage2"
        and manifest.inputs["base_model"]["repo_id"] == "zai-org/GLM-4.7-Flash"
    )
    assert [s["stage"] for s in manifest.inputs["lineage"]] == ["stage2", "inject"]
    assert set(AUX_FILES) <= set(manifest.files)
    from zeda_cli.runs import verified_manifest

    assert verified_manifest(out).stage == "export"  # what push will check


def test_card_of_an_undistilled_local_run(tiny_dynamic, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    result = _ok(_export(tiny_dynamic("qwen3_moe"), out))
    assert "pass --base-model org/name" in result.stderr
    card = ModelCard.load(out / "README.md")
    assert "base_model" not in card.data.to_dict() and "license" not in card.data.to_dict()
    assert (
        "**Not distilled yet:**" in card.text and "**not measured**" in card.text and "Not evaluated yet" in card.text
    )
    assert "shared expert" not in card.text
    named = tmp_path / "named"
    _ok(_export(tiny_dynamic("qwen3_moe"), named, "--base-model", "Qwen/Qwen3-30B-A3B"))
    assert ModelCard.load(named / "README.md").data.base_model == "Qwen/Qwen3-30B-A3B"


def test_export_help_has_examples():
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.stdout and "zeda export" in result.stdout
