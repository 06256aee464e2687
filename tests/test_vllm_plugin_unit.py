"""zeda-vllm without vLLM: its family table and router rule agree with zeda's adapters and runtime, the skipping
step hands exactly the real pairs to the kernel, and bad folders or serving setups get one clear line each."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "vllm" / "src"))

from zeda_vllm import checks  # noqa: E402
from zeda_vllm.errors import ZedaVllmError  # noqa: E402
from zeda_vllm.families import BY_ARCHITECTURE  # noqa: E402
from zeda_vllm.families import FAMILIES as VLLM_FAMILIES  # noqa: E402
from zeda_vllm.routing import select_experts, zero_expert_shift  # noqa: E402
from zeda_vllm.skip import RoutingStats, skip_zero_experts  # noqa: E402
from zeda_vllm.spec import ZeroExpertSpec  # noqa: E402

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
    weights, ids = select_experts(torch.nn.functional.linear(x, weight), shift, bias, spec)
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


def test_parallel_serving_is_refused_with_one_line():
    checks.check_parallelism(tensor=1, pipeline=1, data=1, expert=False, eplb=False)
    for kwargs in (dict(tensor=2), dict(pipeline=2), dict(data=2), dict(expert=True), dict(eplb=True)):
        args = dict(tensor=1, pipeline=1, data=1, expert=False, eplb=False) | kwargs
        line = _error_line(checks.check_parallelism, **args)
        assert "single rank" in line


def test_cuda_graphs_are_refused_unless_split_at_the_skipping_op():
    checks.check_cuda_graphs("NONE", [])
    checks.check_cuda_graphs("PIECEWISE", ["vllm::unified_attention_with_output", "zeda_vllm::routed_experts"])
    for mode, ops in [("FULL_AND_PIECEWISE", []), ("PIECEWISE", ["vllm::unified_attention_with_output"]),
                      ("FULL", ["zeda_vllm::routed_experts"]), ("FULL_DECODE_ONLY", [])]:  # fmt: skip
        assert "--enforce-eager" in _error_line(checks.check_cuda_graphs, mode, ops)


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
