"""Config classes of zeda's ``<family>_plus_plus`` model types, so such folders load without trust_remote_code.

They are real module-level classes: vLLM pickles the config into its engine process by qualified name. Each is the
family's transformers config with another ``model_type``. Instances report the *base* model_type, so that vLLM keeps
applying what it keys on the family (e.g. MLA attention for GLM-4.7-Flash and DeepSeek-V3); the class keeps the
dynamic one, which AutoConfig registration and ``to_dict`` use.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    DeepseekV3Config,
    Glm4MoeConfig,
    Glm4MoeLiteConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)


class BaseTypeOnInstances:
    """``model_type`` descriptor: the dynamic type on the class, the base family's type on instances."""

    def __init__(self, base: str):
        self.base = base
        self.dynamic = f"{base}_plus_plus"

    def __get__(self, instance: Any, owner: type | None = None) -> str:
        return self.dynamic if instance is None else self.base

    def __set__(self, instance: Any, value: str) -> None:
        pass  # a config.json's "model_type" key must not shadow the rule above


class Qwen3MoePlusPlusConfig(Qwen3MoeConfig):
    model_type = BaseTypeOnInstances("qwen3_moe")


class Qwen2MoePlusPlusConfig(Qwen2MoeConfig):
    model_type = BaseTypeOnInstances("qwen2_moe")


class MixtralPlusPlusConfig(MixtralConfig):
    model_type = BaseTypeOnInstances("mixtral")


class OlmoePlusPlusConfig(OlmoeConfig):
    model_type = BaseTypeOnInstances("olmoe")


class Glm4MoeLitePlusPlusConfig(Glm4MoeLiteConfig):
    model_type = BaseTypeOnInstances("glm4_moe_lite")


class Glm4MoePlusPlusConfig(Glm4MoeConfig):
    model_type = BaseTypeOnInstances("glm4_moe")


class DeepseekV3PlusPlusConfig(DeepseekV3Config):
    model_type = BaseTypeOnInstances("deepseek_v3")
