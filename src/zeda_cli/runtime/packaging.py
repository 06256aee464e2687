"""What a dynamic model folder holds besides its weights: the config in ZEDA's format and its loading code.

Config: the official ZEDA keys (``model_type`` ``<family>_plus_plus``, ``architectures`` ``...PlusPlusForCausalLM``,
``zce_nums``, ``zce_types: ["zero"]``, ``use_zce_mask``) plus ``zero_expert_bias`` (the runtime dial), ``zeda``
(the router spec the runtime needs, the base family, the target skip) and ``auto_map`` for stock transformers.
Code: ``zeda_dynamic_moe.py`` (copied verbatim) and a generated ``modeling_zeda.py`` naming the family's classes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..architectures import MoEAdapter
from . import zeda_dynamic_moe

RUNTIME_FILE = "zeda_dynamic_moe.py"
MODELING_FILE = "modeling_zeda.py"
FORMAT_VERSION = 1

_MODELING_TEMPLATE = '''"""Loads this ZEDA dynamic {model_type} checkpoint in stock transformers.

Use AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).

Written by zeda. The model is transformers' own {causal_lm_class}; every {block_class} is made dynamic by
zeda_dynamic_moe.py: its router scores N real + Z zero-output experts, and zero-expert slots are dropped before
the expert computation.
"""

from transformers.models.{hf_module}.configuration_{hf_module} import {config_class}
from transformers.models.{hf_module}.modeling_{hf_module} import {causal_lm_class}

from .zeda_dynamic_moe import DynamicMoeMixin, register_key_conversion


class {dynamic_config_class}({config_class}):
    model_type = "{dynamic_model_type}"


class {dynamic_architecture}(DynamicMoeMixin, {causal_lm_class}):
    config_class = {dynamic_config_class}


register_key_conversion("{dynamic_model_type}", "{model_type}")
'''


def modeling_source(adapter: MoEAdapter) -> str:
    return _MODELING_TEMPLATE.format(
        model_type=adapter.model_type,
        hf_module=adapter.hf_module,
        config_class=adapter.config_class,
        causal_lm_class=adapter.causal_lm_class,
        block_class=adapter.moe_block_class,
        dynamic_config_class=adapter.dynamic_config_class,
        dynamic_architecture=adapter.dynamic_architecture,
        dynamic_model_type=adapter.dynamic_model_type,
    )


def auto_map(adapter: MoEAdapter) -> dict[str, str]:
    stem = MODELING_FILE.removesuffix(".py")
    return {
        "AutoConfig": f"{stem}.{adapter.dynamic_config_class}",
        "AutoModelForCausalLM": f"{stem}.{adapter.dynamic_architecture}",
    }


def write_loading_code(folder: Path, adapter: MoEAdapter) -> list[str]:
    """Copy the runtime and write the family's modeling file; returns the file names written."""
    shutil.copyfile(zeda_dynamic_moe.__file__, folder / RUNTIME_FILE)
    (folder / MODELING_FILE).write_text(modeling_source(adapter))
    return [RUNTIME_FILE, MODELING_FILE]


def legacy_keys(config: dict[str, Any], adapter: MoEAdapter, hf_config: Any) -> dict[str, Any]:
    """The keys older loaders read that transformers 5 saves under other names: the official ZEDA modeling code
    (transformers 4.57) reads ``num_experts`` (else assumes 128 and fails on the router size) and ``rope_theta`` /
    ``rope_scaling`` (else silently uses RoPE base 10000). Only keys the config lacks; transformers 5 maps them."""
    extra: dict[str, Any] = {}
    if adapter.num_experts_attr not in config:
        extra[adapter.num_experts_attr] = adapter.num_experts(hf_config)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return extra
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    legacy = {"rope_theta": rope["rope_theta"],
              "rope_scaling": scaling if scaling.get("rope_type", "default") != "default" else None}  # fmt: skip
    return extra | {k: v for k, v in legacy.items() if k not in config}


def dynamic_config(
    raw: dict[str, Any],
    adapter: MoEAdapter,
    hf_config: Any,
    num_zero_experts: int,
    *,
    mask: bool,
    extra: dict[str, Any] | None = None,
    zero_expert_bias: float = 0.0,
) -> dict[str, Any]:
    """The config.json of a dynamic model derived from the static ``raw`` config (which is not modified)."""
    config = {k: v for k, v in raw.items() if k not in ("auto_map", "zce_nums", "zce_types", "use_zce_mask", "zeda")}
    config.update(legacy_keys(config, adapter, hf_config))
    config.update(
        model_type=adapter.dynamic_model_type,
        architectures=[adapter.dynamic_architecture],
        zce_nums=[int(num_zero_experts)],
        zce_types=["zero"],
        use_zce_mask=bool(mask),
        zero_expert_bias=float(zero_expert_bias),
        auto_map=auto_map(adapter),
        zeda={
            "format_version": FORMAT_VERSION,
            "base_model_type": adapter.model_type,
            "base_architecture": adapter.causal_lm_class,
            "router": adapter.router_spec(hf_config),
            **(extra or {}),
        },
    )
    return config
