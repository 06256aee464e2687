"""zeda-vllm without vLLM: its family table and router rule agree with zeda's adapters and runtime, the skipping
step hands exactly the real pairs to the kernel, and bad folders or serving setups get one clear line each."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm" / "src"))

from zeda_vllm import checks, compat, engine  # noqa: E402
from zeda_vllm.errors import ZedaVllmError  # noqa: E402
from zeda_vllm.families import BY_ARCHITECTURE  # noqa: E402
from zeda_vllm.families import FAMILIES as VLLM_FAMILIES  # noqa: E402
from zeda_vllm.routing import select_experts, zero_expert_shift  # noqa: E402
from zeda_vllm.skip import RoutingStats, skip_zero_experts  # noqa: E402
from zeda_vllm.spec import ZeroExpertSpec  # noqa: E402
from zeda_vllm.weights import RouterTensorCheck, expand_fused_experts  # noqa: E402

from tiny_models import FAMILIES, tiny_config  # noqa: E402
from zeda_cli.architectures import get_adapter  # noqa: E402
from zeda_cli.architectures.families import ALL_ADAPTERS  # noqa: E402
from zeda_cli.runtime.zeda_dynamic_moe import RouterSpec, ZeroExpertRouter  # noqa: E402

ROUTER_KEYS = ("num_experts", "top_k", "scoring", "normalize", "weights_in_logits_dtype", "routed_scaling_factor",
               "n_group", "topk_group")  # fmt: skip


def _dynamic_config(name: str, *, zeda_section: bool, **zce) -> SimpleNamespace:
    """A config object as vLLM hands it to the model: the family's fields plus the zero-expert keys."""
    config = tiny_config(name)
    adapter = get_adapter(config.model_type)
    fields = dict(config.to_dict(), zce_nums=[4], zce_types=["zero"], use_zce_mask=False) | zce
    fields[adapter.num_experts_attr] = adapter.num_experts(config)
    if zeda_section:
        fields["zeda"] = {"router": adapter.router_spec(config)}
    return SimpleNamespace(**fields)


def test_every_zeda_family_is_served_under_its_official_architecture():
    assert {a.dynamic_architecture for a in ALL_ADAPTERS} == set(BY_ARCHITECTURE)
    for adapter in ALL_ADAPTERS:
        family = BY_ARCHITECTURE[adapter.dynamic_architecture]
        assert (family.base_model_type, family.scoring) == (adapter.model_type, adapter.scoring)
        assert (family.num_experts_attr, family.normalize_attr) == (adapter.num_experts_attr, adapter.normalize_attr)
        assert family.weights_in_logits_dtype == adapter.weights_in_logits_dtype
        assert family.dynamic_model_type == adapter.dynamic_model_type
        assert family.config_class_name == adapter.dynamic_config_class


@pytest.mark.parametrize("name", list(FAMILIES))
def test_official_format_configs_get_the_router_rule_zeda_derives(name):
    # Official checkpoints carry no zeda section: the plugin derives the rule as zeda's adapter does.
    config = _dynamic_config(name, zeda_section=False)
    adapter = get_adapter(tiny_config(name).model_type)
    spec = ZeroExpertSpec.from_config(config, BY_ARCHITECTURE[adapter.dynamic_architecture])
    expected = adapter.router_spec(tiny_config(name))
    assert {k: getattr(spec, k) for k in ROUTER_KEYS} == {k: expected[k] for k in ROUTER_KEYS}
    assert spec.correction_bias == expected["correction_bias"] and spec.num_zero_experts == 4


def _zeda_router(spec: ZeroExpertSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> ZeroExpertRouter:
    router_spec = RouterSpec(
        block_class="-",
        num_zero_experts=spec.num_zero_experts,
        correction_bias=spec.correction_bias,
        **{k: getattr(spec, k) for k in ROUTER_KEYS},
    )
    router = ZeroExpertRouter(weight.shape[1], router_spec, spec.zero_expert_bias, spec.mask, dtype=weight.dtype)
    with torch.no_grad():
        router.weight.copy_(weight)
        if bias is not None:
            router.e_score_correction_bias.copy_(bias)
    return router


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("mode", ["as_trained", "zero_expert_bias", "masked"])
def test_routing_is_bit_identical_to_zeda_runtime(name, mode):
    config = _dynamic_config(name, zeda_section=True, zero_expert_bias=1.5 if mode == "zero_expert_bias" else 0.0,
                             use_zce_mask=mode == "masked")  # fmt: skip
    family = BY_ARCHITECTURE[get_adapter(tiny_config(name).model_type).dynamic_architecture]
    spec = ZeroExpertSpec.from_config(config, family)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(spec.total_experts, 32, generator=g)
    bias = torch.rand(spec.total_experts, generator=g) * 0.1 if spec.correction_bias else None
    x = torch.randn(64, 32, generator=g)
    shift = zero_expert_shift(spec, torch.float32)
    # the same logits on both sides (each engine's GEMM computes them; a GEMM over the N real rows, as zeda's masked
    # router does, may round differently from one over N+Z): the routing rule on them is what must be identical
    rows = spec.num_experts if mode == "masked" else spec.total_experts
    logits = torch.nn.functional.linear(x, weight[:rows])
    weights, ids = select_experts(torch.cat([logits, logits.new_zeros(64, spec.total_experts - rows)], 1), shift,
                                  bias, spec)  # fmt: skip
    _, ref_weights, ref_ids = _zeda_router(spec, weight, bias)(x)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    zero_share = float((ids >= spec.num_experts).float().mean())
    assert zero_share == 0.0 if mode == "masked" else zero_share > 0.05


def test_skipping_hands_exactly_the_real_pairs_to_the_kernel():
    seen: list[torch.Tensor] = []

    def kernel(x, weights, ids):  # a dense reference kernel: sum_k w_k * E_{id_k}(x)
        seen.append(ids.clone())
        return (weights.unsqueeze(-1) * experts[ids.long()] * x.unsqueeze(1)).sum(1)

    g = torch.Generator().manual_seed(1)
    experts = torch.randn(4, 8, generator=g)  # expert e scales x by experts[e]
    x = torch.randn(6, 8, generator=g)
    ids = torch.tensor([[0, 5], [4, 1], [5, 4], [2, 3], [0, 0], [4, 5]])  # N=4, ids >= 4 are zero experts
    weights = torch.rand(6, 2, generator=g)
    stats = RoutingStats()
    out = skip_zero_experts(x, weights, ids, 4, kernel, stats)
    real = ids < 4
    expected = (torch.where(real, weights, 0).unsqueeze(-1) * experts[ids.clamp(max=3)] * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(out, expected)
    assert len(seen) == 1 and seen[0].shape == (int(real.sum()), 1) and bool((seen[0] < 4).all())
    assert stats.as_dict() == {"calls": 1, "tokens": 6, "slots": 12, "zero_slots": 6, "kernel_pairs": 6}
    # no zero slot: the stock call, unchanged; all zero: no kernel call at all
    skip_zero_experts(x, weights, ids.clamp(max=3), 4, kernel, stats)
    assert seen[-1].shape == (6, 2)
    assert torch.equal(skip_zero_experts(x, weights, ids.clamp(min=4), 4, kernel, stats), torch.zeros_like(x))
    assert len(seen) == 2 and stats.kernel_pairs == 6 + 12


def _error_line(fn, *args, **kwargs) -> str:
    with pytest.raises(ZedaVllmError) as info:
        fn(*args, **kwargs)
    line = str(info.value)
    assert "\n" not in line and "expected" in line and "fix:" in line, line
    return line


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (dict(zce_types=["copy"]), "zce_types ['copy']"),
        (dict(zce_types=None), "zce_types ['copy']"),  # absent: the official default is "copy"
        (dict(zce_nums=[0]), "zce_nums [0]"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
    ],
)
def test_bad_zero_expert_configs_get_one_clear_line(changes, needle):
    config = _dynamic_config("qwen3_moe", zeda_section=False)
    vars(config).update(changes)
    assert needle in _error_line(ZeroExpertSpec.from_config, config, BY_ARCHITECTURE["Qwen3MoePlusPlusForCausalLM"])


def test_group_limited_routing_needs_n_plus_z_divisible_by_n_group():
    config = _dynamic_config("deepseek_v3", zeda_section=False, zce_nums=[3])  # 8 + 3 rows, 2 groups
    line = _error_line(ZeroExpertSpec.from_config, config, BY_ARCHITECTURE["DeepseekV3PlusPlusForCausalLM"])
    assert "n_group=2" in line and "N+Z=11" in line


def test_tensor_parallelism_is_served_and_expert_data_pipeline_parallelism_are_refused_with_the_reason():
    base = dict(tensor=1, pipeline=1, data=1, expert=False, eplb=False)
    for tensor in (1, 2, 4):
        checks.check_parallelism(**base | {"tensor": tensor})
    for kwargs in (dict(data=2), dict(expert=True), dict(eplb=True)):
        line = _error_line(checks.check_parallelism, **base | kwargs)
        assert "outside vLLM's all-to-all dispatch" in line and "--tensor-parallel-size" in line, line
    line = _error_line(checks.check_parallelism, **base | {"pipeline": 2})
    assert "pipeline stages have not been run" in line, line


def test_cuda_graphs_are_refused_unless_split_at_the_skipping_op():
    checks.check_cuda_graphs("NONE", [])
    checks.check_cuda_graphs("PIECEWISE", ["vllm::unified_attention_with_output", "zeda_vllm::routed_experts"])
    for mode, ops in [("FULL_AND_PIECEWISE", []), ("PIECEWISE", ["vllm::unified_attention_with_output"]),
                      ("FULL", ["zeda_vllm::routed_experts"]), ("FULL_DECODE_ONLY", [])]:  # fmt: skip
        line = _error_line(checks.check_cuda_graphs, mode, ops)
        assert "--enforce-eager" in line and f"mode {mode}" in line, line
        why = "full CUDA graph captures the whole forward pass" if "FULL" in mode else "must be split at"
        assert why in line, line


def test_unset_cuda_graph_mode_becomes_piecewise_split_at_the_skipping_op():
    op = "zeda_vllm::routed_experts"
    # vLLM's default at -O2/-O3 (FULL_AND_PIECEWISE) becomes PIECEWISE; -O1 (PIECEWISE) and -O0 (NONE) stay
    assert checks.piecewise_defaults(None, None, "FULL_AND_PIECEWISE", False) == ("PIECEWISE", None)
    assert checks.piecewise_defaults(None, None, "PIECEWISE", False) == (None, None)
    assert checks.piecewise_defaults(None, None, "NONE", False) == (None, None)
    assert checks.piecewise_defaults(None, None, "FULL_AND_PIECEWISE", True) == (None, None)  # --enforce-eager
    # an explicit splitting list gets the op; an unset one is vLLM's to fill (the model appends the op when built)
    assert checks.piecewise_defaults("PIECEWISE", ["a::b"], "FULL_AND_PIECEWISE", False) == (None, ["a::b", op])
    assert checks.piecewise_defaults("PIECEWISE", ["a::b", op], "FULL_AND_PIECEWISE", False) == (None, None)
    assert checks.with_skipping_split("PIECEWISE", ["vllm::unified_attention_with_output"]) == [
        "vllm::unified_attention_with_output", op]  # fmt: skip
    assert checks.with_skipping_split("PIECEWISE", [op]) is None
    assert checks.with_skipping_split("NONE", []) is None


def test_mla_latents_vllm_cpu_cannot_decode_are_refused_with_one_line():
    checks.check_cpu_mla_latent("Glm4MoeLitePlusPlusForCausalLM", 512, 64, [576])
    line = _error_line(checks.check_cpu_mla_latent, "Glm4MoeLitePlusPlusForCausalLM", 16, 8, [576])
    assert "kv_lora_rank 16 + qk_rope_head_dim 8 = 24 on vLLM-CPU" in line and "[576]" in line, line


def test_fused_expert_tensors_become_per_expert_checkpoint_names():
    g = torch.Generator().manual_seed(0)
    gate_up, down, other = torch.randn(3, 8, 5, generator=g), torch.randn(3, 5, 4, generator=g), torch.randn(2)
    weights = [("model.layers.1.mlp.experts.gate_up_proj", gate_up), ("model.layers.1.mlp.experts.down_proj", down),
               ("model.layers.1.mlp.gate.weight", other)]  # fmt: skip
    out = dict(expand_fused_experts(weights, BY_ARCHITECTURE["Qwen3MoePlusPlusForCausalLM"]))
    assert len(out) == 3 * 3 + 1 and torch.equal(out["model.layers.1.mlp.gate.weight"], other)
    for e in range(3):
        assert torch.equal(out[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :4])
        assert torch.equal(out[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], gate_up[e, 4:])
        assert torch.equal(out[f"model.layers.1.mlp.experts.{e}.down_proj.weight"], down[e])
    # Mixtral: transformers 5 calls the block "mlp", checkpoints (and vLLM) "block_sparse_moe" with w1/w3/w2
    out = dict(expand_fused_experts(weights[:2], BY_ARCHITECTURE["MixtralPlusPlusForCausalLM"]))
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.2.w1.weight"], gate_up[2, :4])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.2.w3.weight"], gate_up[2, 4:])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.2.w2.weight"], down[2])
    # per-expert names and 2-D tensors pass through
    single = [("model.layers.1.mlp.experts.0.gate_proj.weight", gate_up[0])]
    assert list(expand_fused_experts(single, BY_ARCHITECTURE["Qwen3MoePlusPlusForCausalLM"])) == single


def test_in_place_loads_take_any_subset_of_router_tensors():
    family = BY_ARCHITECTURE["Glm4MoeLitePlusPlusForCausalLM"]
    spec = ZeroExpertSpec.from_config(_dynamic_config("glm4_moe_lite", zeda_section=False), family)
    rows = spec.total_experts
    weight_only = [("model.layers.1.mlp.gate.weight", torch.zeros(rows, 32))]
    both = weight_only + [("model.layers.2.mlp.gate.e_score_correction_bias", torch.zeros(rows))]
    for weights in (weight_only, both):
        check = RouterTensorCheck(family, spec, [1, 2], reloading=True)
        assert len(list(check.watch(weights))) == len(weights)
        check.finish()  # a subset of layers, a weight without its bias: the rest keeps its current values
    check = RouterTensorCheck(family, spec, [1, 2])  # loading a folder: every router and bias must be there
    list(check.watch(both))
    assert "no router weight" in _error_line(check.finish)
    check = RouterTensorCheck(family, spec, [1, 2], reloading=True)  # shapes are still checked
    assert "has shape [8, 32]" in _error_line(lambda: list(check.watch([("model.layers.1.mlp.gate.weight",
                                                                          torch.zeros(8, 32))])))  # fmt: skip


def test_the_engine_notices_a_dead_zombie_reused_or_lost_parent(tmp_path):
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        state, started = engine._proc_stat(child.pid)
        assert not engine.parent_gone(child.pid, started, was_parent=False)
        assert engine.parent_gone(child.pid, "1", was_parent=False)  # another process under the same pid
        child.kill()
        for _ in range(100):  # killed, not yet reaped: a zombie
            if engine._proc_stat(child.pid)[0] == "Z":
                break
            time.sleep(0.05)
        assert engine.parent_gone(child.pid, started, was_parent=False)
    finally:
        child.kill()
        child.wait()
    assert engine.parent_gone(child.pid, started, was_parent=False)  # reaped: no such process
    parent = os.getppid()
    assert not engine.parent_gone(parent, engine._proc_stat(parent)[1], was_parent=True)
    assert engine.parent_gone(os.getpid(), engine._proc_stat(os.getpid())[1], was_parent=True)  # not our parent


def test_tensor_parallel_ranks_get_disjoint_cores(monkeypatch):
    # setenv (not delenv) first, so that teardown restores the variable's original state: bind_cpu_threads writes
    # os.environ itself, and a leaked binding to cores 2,3 killed every later TP=2 engine of the suite
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # more threads than a rank's cores: libgomp kills the worker
    engine.bind_cpu_threads(2)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3" and os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "7|8")
    engine.bind_cpu_threads(2)  # the user's binding is kept
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "7|8"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    with pytest.raises(engine.StartupError, match="needs at least 2 CPU cores"):
        engine.bind_cpu_threads(2)


def test_float16_deepseek_and_quantized_checkpoints_are_refused():
    checks.check_dtype(BY_ARCHITECTURE["DeepseekV3PlusPlusForCausalLM"], "bfloat16")
    checks.check_dtype(BY_ARCHITECTURE["Qwen3MoePlusPlusForCausalLM"], "float16")
    _error_line(checks.check_dtype, BY_ARCHITECTURE["DeepseekV3PlusPlusForCausalLM"], "float16")
    checks.check_quantization(None)
    _error_line(checks.check_quantization, "fp8")


def test_mla_families_on_cpu_warn_about_vllms_rotary_kernel():
    glm = BY_ARCHITECTURE["Glm4MoeLitePlusPlusForCausalLM"]
    assert "-rotary_embedding" in checks.cpu_mla_rope_warning(glm, True, [])
    assert checks.cpu_mla_rope_warning(glm, True, ["-rotary_embedding"]) is None
    assert checks.cpu_mla_rope_warning(glm, False, []) is None
    assert all(checks.cpu_mla_rope_warning(f, True, []) is None for f in VLLM_FAMILIES if not f.mla)


def test_tensor_parallelism_without_enough_shared_memory_is_one_line_before_any_worker():
    # vLLM's own sizes (measured under a 200 MiB /dev/shm: broadcast 160 MiB passed, then each worker asked 240 MiB)
    assert checks.shared_memory_needed_mib(2, 16) == 640
    checks.check_shared_memory(tensor=2, free_mib=640, chunk_mib=16)
    checks.check_shared_memory(tensor=1, free_mib=0, chunk_mib=16)  # one process: no queues
    with pytest.raises(ZedaVllmError, match=r"192 MiB free.*at least 640 MiB.*--shm-size"):
        checks.check_shared_memory(tensor=2, free_mib=192, chunk_mib=16)


def test_glm_dense_prefix_comes_from_mlp_layer_types_and_an_interleaved_one_is_one_line():
    config = SimpleNamespace(mlp_layer_types=["dense", "sparse", "sparse"])
    compat.fill_dense_prefix(config)
    assert config.first_k_dense_replace == 1
    given = SimpleNamespace(mlp_layer_types=["dense", "sparse"], first_k_dense_replace=0)
    compat.fill_dense_prefix(given)
    assert given.first_k_dense_replace == 0  # a folder that says it keeps its own value
    assert compat.dense_prefix(["sparse", "sparse"]) == 0
    with pytest.raises(ZedaVllmError, match="dense layers first"):
        compat.dense_prefix(["dense", "sparse", "dense"])


def test_float32_mla_on_cpu_asks_for_the_reference_backend_and_is_refused_on_amx_without_it():
    assert compat.cpu_mla_attention_backend(True, True, "float32") == "CPU_MLA"
    assert compat.cpu_mla_attention_backend(True, True, "bfloat16") is None  # AMX MLA serves 16-bit weights
    assert compat.cpu_mla_attention_backend(False, True, "float32") is None
    assert compat.cpu_mla_attention_backend(True, False, "float32") is None
    checks.check_cpu_mla_backend("Glm4MoeLiteForCausalLM", "float32", amx=True, backend="CPU_MLA")
    checks.check_cpu_mla_backend("Glm4MoeLiteForCausalLM", "bfloat16", amx=True, backend=None)
    checks.check_cpu_mla_backend("Glm4MoeLiteForCausalLM", "float32", amx=False, backend=None)
    with pytest.raises(ZedaVllmError, match="--attention-backend CPU_MLA") as err:
        checks.check_cpu_mla_backend("Glm4MoeLiteForCausalLM", "float32", amx=True, backend=None)
    assert "\n" not in str(err.value)
