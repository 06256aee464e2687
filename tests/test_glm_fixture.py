"""The product on the trained GLM fixture (models/pystdlib-glm: sigmoid router with a trained correction bias, one
shared expert, dense first layer, routed_scaling_factor 1.8): injection, the routing rule, eval's FLOPs accounting,
every baseline and calibrate, on the real weights (the random tiny GLM of other tests has a zero correction bias).
The end-to-end convert is slow; everything else takes seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeda_cli import load_model
from zeda_cli.evaluate import run_eval
from zeda_cli.inject import inject_zero_experts
from zeda_cli.recipes import BASELINES, EvalSection, ZeroExpertsSection
from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, routers

ROOT = Path(__file__).resolve().parents[1]
GLM = ROOT / "models" / "pystdlib-glm"
HELDOUT, PROMPTS = GLM / "data" / "heldout.jsonl", GLM / "data" / "prompts.jsonl"
HIDDEN, EXPERT, TOP_K, MOE_LAYERS = 160, 32, 4, 3  # config.json: hidden 160, moe_intermediate 32, layers 1-3 MoE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm-fixture")
    return {init: inject_zero_experts(str(GLM), root / init, zero=ZeroExpertsSection(init=init)).out
            for init in ("gaussian", "masked")}  # fmt: skip


def _records(n: int) -> list[torch.Tensor]:
    from zeda_cli import load_tokenizer

    tok = load_tokenizer(GLM)
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text().splitlines()[:n]]
    return [torch.tensor([tok(t)["input_ids"][:96]]) for t in texts]


def test_injection_keeps_the_trained_router_and_bias_and_adds_z_rows(injected):
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                out |= {k: f.get_tensor(k) for k in f.keys() if ".mlp.gate." in k}
        return out

    static, dynamic = tensors(GLM), tensors(injected["gaussian"])
    assert len(static) == 2 * MOE_LAYERS and static.keys() == dynamic.keys()  # no router in the dense layer 0
    for name, original in static.items():
        grown = dynamic[name]
        assert grown.shape[0] == 96 and torch.equal(grown[:64], original), name  # 64 -> 96 rows, originals bit-exact
        if name.endswith("e_score_correction_bias"):
            assert original.std() > 0.03  # the trained bias, not zeros
            assert abs(float(grown[64:].mean() - original.mean())) < 4 * float(original.std())  # N(mean, std) rows


def test_masked_injection_is_the_static_model_exactly(injected):
    from transformers import Glm4MoeLiteForCausalLM

    stock = Glm4MoeLiteForCausalLM.from_pretrained(GLM).eval()
    masked = load_model(injected["masked"], dtype=torch.float32)
    with torch.no_grad():
        for ids in _records(2):
            torch.testing.assert_close(masked(ids).logits, stock(ids).logits, rtol=0, atol=2e-5)


def test_the_choice_uses_the_trained_correction_bias_and_the_weights_do_not(injected):
    model = load_model(injected["gaussian"], dtype=torch.float32)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].reshape(-1, HIDDEN)))
             for n, r in routers(model)]  # fmt: skip
    try:
        with RoutingRecorder(model) as rec, torch.no_grad():
            model(_records(1)[0])
    finally:
        for h in hooks:
            h.remove()
    differs = 0
    for (name, router), (_, _, ids) in zip(routers(model), rec.records, strict=True):
        scores = torch.sigmoid(inputs[name].float() @ router.weight.float().T)
        biased = torch.topk(scores + router.e_score_correction_bias, TOP_K, dim=-1).indices
        assert torch.equal(ids.sort(-1).values, biased.sort(-1).values), name
        unbiased = torch.topk(scores, TOP_K, dim=-1).indices
        differs += int((biased.sort(-1).values != unbiased.sort(-1).values).any(-1).sum())
        _, weights, _ = router(inputs[name])
        chosen = scores.gather(1, ids)  # unbiased scores of the chosen, over their sum (zero slots included), x 1.8
        torch.testing.assert_close(weights, 1.8 * chosen / chosen.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert differs > 0  # non-vacuous: on the trained weights the bias changes the choice of some tokens


def test_eval_counts_routed_experts_only_and_reports_the_shared_expert_apart(injected):
    from zeda_cli.evaluate.flops import measured_expert_flops

    r = run_eval(str(injected["gaussian"]), EvalSection(data=HELDOUT, max_samples=8, max_length=128, record=False))
    assert r["static_expert_flops_per_token"] == 2 * 3 * HIDDEN * EXPERT * TOP_K * MOE_LAYERS
    assert r["shared_expert_flops_per_token"] == 2 * 3 * HIDDEN * EXPERT * 1 * MOE_LAYERS
    assert len(r["zero_share_per_layer"]) == MOE_LAYERS and 0.05 < r["zero_share"] < 0.95
    assert r["expert_flops_ratio"] == pytest.approx(1 - r["zero_share"])
    # the matmuls really executed inside the routed-expert modules: kept slots x one expert, the shared expert and
    # the dense layer-0 MLP not among them
    model = load_model(injected["gaussian"], dtype=torch.float32)
    ids = _records(1)[0]
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(ids)
    kept = sum(int((top < 64).sum()) for _, _, top in rec.records)
    assert measured_expert_flops(model, ids) == kept * 2 * 3 * HIDDEN * EXPERT


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_calibrates_to_its_budget_on_the_trained_glm(method):
    settings = EvalSection(data=HELDOUT, calibration=PROMPTS, calibration_samples=32, max_samples=8, max_length=128,
                           baseline=method, budget=0.5, record=False)  # fmt: skip
    r = run_eval(str(GLM), settings)
    assert r["baseline"]["calibration_kept_share"] == pytest.approx(0.5, abs=0.06), r["baseline"]
    assert 0.35 < r["expert_flops_ratio"] < 0.65 and r["nll_delta_pct"] > 0  # held-out texts: near the budget
    assert r["shared_expert_flops_per_token"] == 2 * 3 * HIDDEN * EXPERT * MOE_LAYERS


def test_calibrate_sets_the_zero_share_of_the_trained_glm(injected, tmp_path):
    import shutil

    from zeda_cli.calibrate import calibrate_folder

    folder = shutil.copytree(injected["gaussian"], tmp_path / "dyn")
    r = calibrate_folder(folder, target_skip=0.5, settings=EvalSection(data=PROMPTS, max_samples=32))
    assert r["zero_share"] == pytest.approx(0.5, abs=0.02) and r["zero_expert_bias"] != 0
    assert json.loads((folder / "config.json").read_text())["zero_expert_bias"] == pytest.approx(r["zero_expert_bias"])


# The demo recipe with small budgets: inject, rollouts, stage 1, stage 2, export, on the trained GLM.
SMALL = ["data.max_prompts=32", "rollout.max_new_tokens=48", "stage1.epochs=2", "stage2.steps=3",
         "stage2.prompts_per_step=4", "stage2.max_new_tokens=32"]  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("glm-convert") / "run"
    sets = [arg for item in SMALL for arg in ("--set", item)]
    cmd = [sys.executable, "-m", "zeda_cli", "convert", str(GLM), "--out", str(out), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stderr


@pytest.mark.slow
def test_convert_picks_the_glm_demo_recipe_and_runs_end_to_end(converted):
    out, log = converted
    assert "tiny-glm-demo.yaml (it names" in log
    export = out / "export"
    r = run_eval(str(export), EvalSection(data=HELDOUT, max_samples=16, max_length=128, record=False))
    assert 0.2 < r["zero_share"] < 0.8 and r["nll_delta_pct"] < 25, r
    assert r["teacher"] and "masked" not in r["teacher"]  # measured against the original from the run's manifests
    card = (export / "README.md").read_text()
    assert "shared expert" in card and "not counted above" in card


def _quality_runs():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality_runs

    return quality_runs


@pytest.mark.slow
def test_quality_identifies_a_finished_convert_and_refuses_tampered_copies(converted, tmp_path):
    import shutil

    qr = _quality_runs()
    out, _ = converted
    run = qr.identify(out)
    assert (run.fixture, run.recipe, run.seed) == ("pystdlib-glm", "tiny-glm-demo", 0)
    # stage1.epochs=2 is what the recipe says already: not an override
    assert set(run.overrides) == {"data.max_prompts", "rollout.max_new_tokens", "stage2.steps",
                                  "stage2.prompts_per_step", "stage2.max_new_tokens"}  # fmt: skip
    assert run.train_seconds > 0 and qr.identify(out / "stage2").folder == run.folder

    def tampered(name: str, edit) -> Path:
        copy = shutil.copytree(out, tmp_path / name)
        for stage in ("inject", "stage1", "stage2"):  # the copy's own lineage, as a convert into it would record
            _set(copy / stage / "zeda.json", parent=_moved(out, copy))
        _set(copy / "stage1" / "zeda.json", rollouts=str(copy / "rollouts" / "rollouts.jsonl"))
        assert qr.identify(copy).folder == copy.resolve()  # the faithful copy qualifies
        edit(copy)
        return copy

    cases = {
        "stage1 from elsewhere": (lambda c: _set(c / "stage2" / "zeda.json", parent=lambda _: str(out / "stage1")),
                                  "was trained from"),
        "rollouts elsewhere": (lambda c: _set(c / "stage1" / "zeda.json", rollouts=str(out / "rollouts" / "x.jsonl")),
                               "trained on"),
        "other settings": (lambda c: _stage(c, "stage1", fingerprint="0" * 16), "not made with the settings"),
        "unfinished": (lambda c: _stage(c, "stage2", done=False), "does not mark stage stage2 done"),
        "recipe edited": (lambda c: (c / "recipe.yaml").write_text((c / "recipe.yaml").read_text() + "\n"),
                          "sha256 differs"),
        "weights changed": (lambda c: _append(next((c / "stage2").glob("*.safetensors"))), "checksum"),
    }  # fmt: skip
    for name, (edit, needle) in cases.items():
        copy = tampered(name.replace(" ", "-"), edit)
        with pytest.raises(qr.RunRefused, match=needle):
            qr.identify(copy)
    with pytest.raises(qr.RunRefused, match="stage1 folder"):
        qr.identify(out / "stage1")


def _moved(old: Path, new: Path):
    return lambda parent: (parent or "").replace(str(old), str(new)) or None


def _set(manifest: Path, parent=None, rollouts: str | None = None) -> None:
    """Edit a zeda.json: ``parent`` (a function of the old one), stage 1's ``inputs.rollouts``."""
    data = json.loads(manifest.read_text())
    if parent is not None:
        data["parent"] = parent(data["parent"])
    if rollouts is not None:
        data["inputs"]["rollouts"] = rollouts
    manifest.write_text(json.dumps(data))


def _stage(run: Path, stage: str, **changes) -> None:
    state = json.loads((run / "convert.json").read_text())
    state["stages"][stage].update(changes)
    (run / "convert.json").write_text(json.dumps(state))


def _append(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"0")


def test_quality_refuses_a_folder_that_is_not_a_convert_run_in_one_line():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--no-train", "--trained", str(GLM)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks",
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a zeda convert output folder" in lines[0], proc.stderr
