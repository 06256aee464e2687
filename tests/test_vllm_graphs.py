"""CUDA graphs without flags: zeda-vllm's model config hook (``MODELS_CONFIG_MAP``, run at the start of
``VllmConfig.__post_init__``) turns vLLM's default ``FULL_AND_PIECEWISE`` into ``PIECEWISE`` and the model adds
``zeda_vllm::routed_experts`` to the splitting ops vLLM resolved, so graphs are captured piecewise around the
skipping; a full mode chosen explicitly is refused with one line. No GPU needed: vLLM's own ``CompilationConfig``
objects go through the hook, vLLM's optimization-level defaults and its ``set_splitting_ops_for_v1``, then the
model's step, in .venv-vllm."""

from __future__ import annotations

import json
import subprocess

import pytest

import vllm_harness as vh

pytestmark = pytest.mark.skipif(vh.vllm_skip_reason() is not None, reason=vh.vllm_skip_reason() or "")

SCRIPT = r"""
import json, sys
from types import SimpleNamespace
from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, OptimizationLevel
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
import zeda_vllm
from zeda_vllm.checks import check_cuda_graphs, with_skipping_split
from zeda_vllm.errors import ZedaVllmError
from zeda_vllm.families import FAMILIES
from zeda_vllm.hooks import ZeroExpertModelConfig, adjust_compilation_config

zeda_vllm.register()
out = {"registered": all(MODELS_CONFIG_MAP.get(f.architecture) is ZeroExpertModelConfig for f in FAMILIES),
       "attention_ops": list(CompilationConfig._attention_ops), "cases": {}}

def run(name, level=2, mode=None, ops=None, eager=False):
    comp = CompilationConfig(cudagraph_mode=None if mode is None else CUDAGraphMode[mode], splitting_ops=ops)
    level = OptimizationLevel(level)
    config = SimpleNamespace(compilation_config=comp, optimization_level=level,
                             model_config=SimpleNamespace(enforce_eager=eager))
    try:
        adjust_compilation_config(config, cuda_alike=True)  # the hook, before vLLM's defaults
    except ZedaVllmError as err:
        out["cases"][name] = {"error": str(err)}
        return
    hooked = None if comp.cudagraph_mode is None else comp.cudagraph_mode.name
    # what VllmConfig.__post_init__ does next: the level's defaults for unset fields, then the splitting ops
    if comp.cudagraph_mode is None:
        comp.cudagraph_mode = OPTIMIZATION_LEVEL_TO_CONFIG[level]["compilation_config"]["cudagraph_mode"]
    if eager:
        comp.cudagraph_mode = CUDAGraphMode.NONE
    comp.mode = CompilationMode.VLLM_COMPILE if level > 0 and not eager else CompilationMode.NONE
    comp.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter", data_parallel_size=1)
    # the model, when the worker builds it (zeda_vllm.checks.check_serving_setup)
    if (extra := with_skipping_split(comp.cudagraph_mode.name, comp.splitting_ops)) is not None:
        comp.splitting_ops = extra
    try:
        check_cuda_graphs(comp.cudagraph_mode.name, list(comp.splitting_ops or []))
        refused = None
    except ZedaVllmError as err:
        refused = str(err)
    out["cases"][name] = {"after_hook": hooked, "cudagraph_mode": comp.cudagraph_mode.name,
                          "splitting_ops": list(comp.splitting_ops or []), "refused": refused}

run("O2 default")
run("O3 default", level=3)
run("O1 default", level=1)
run("O0 default", level=0)
run("enforce eager", eager=True)
run("explicit piecewise, explicit ops", mode="PIECEWISE", ops=["vllm::unified_attention_with_output"])
run("explicit piecewise", mode="PIECEWISE")
run("explicit full and piecewise", mode="FULL_AND_PIECEWISE")
run("explicit full decode only", mode="FULL_DECODE_ONLY")
run("explicit full", mode="FULL")
print(json.dumps(out))
"""
OP = "zeda_vllm::routed_experts"


@pytest.fixture(scope="module")
def result() -> dict:
    proc = subprocess.run([str(vh.VLLM_PYTHON), "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                          cwd=vh.ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_hook_is_registered_for_every_dynamic_architecture(result):
    assert result["registered"]


@pytest.mark.parametrize("case", ["O2 default", "O3 default", "O1 default", "explicit piecewise"])
def test_graphs_are_captured_piecewise_split_at_attention_and_the_skipping_op(case, result):
    r = result["cases"][case]
    print(case, r)
    assert r["cudagraph_mode"] == "PIECEWISE" and r["refused"] is None, r
    assert r["splitting_ops"][-1] == OP and r["splitting_ops"].count(OP) == 1, r
    # vLLM's own attention splitting ops are all still there (its default for piecewise graphs)
    assert set(result["attention_ops"]) <= set(r["splitting_ops"]), r


def test_only_vllms_full_default_is_changed(result):
    assert result["cases"]["O2 default"]["after_hook"] == "PIECEWISE"  # vLLM's would be FULL_AND_PIECEWISE
    assert result["cases"]["O1 default"]["after_hook"] is None  # vLLM's own PIECEWISE
    for case in ("O0 default", "enforce eager"):
        r = result["cases"][case]
        assert r["cudagraph_mode"] == "NONE" and OP not in r["splitting_ops"] and r["refused"] is None, r


def test_an_explicit_splitting_list_keeps_its_ops_and_gets_the_skipping_op(result):
    r = result["cases"]["explicit piecewise, explicit ops"]
    assert r["splitting_ops"] == ["vllm::unified_attention_with_output", OP] and r["refused"] is None, r


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "FULL"])
def test_an_explicit_full_graph_mode_is_refused_with_one_line_saying_why(mode, result):
    name = {"FULL_AND_PIECEWISE": "explicit full and piecewise", "FULL_DECODE_ONLY": "explicit full decode only",
            "FULL": "explicit full"}[mode]  # fmt: skip
    line = result["cases"][name]["error"]
    assert line.startswith("zeda-vllm: ") and "\n" not in line, line
    assert f"CUDA graph mode {mode}" in line and "captures the whole forward pass" in line, line
    assert "leave -cc.cudagraph_mode unset" in line and "--enforce-eager" in line, line
