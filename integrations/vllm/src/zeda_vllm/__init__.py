"""zeda-vllm: serve ZEDA dynamic MoE checkpoints (zeda exports and the official release) in vLLM, zero-expert slots
skipped before the fused-MoE kernel. Loaded by vLLM through the ``vllm.general_plugins`` entry point ``zeda``.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Register every family's dynamic architecture and config type with vLLM and transformers (idempotent), and
    the stock architectures whose vLLM model misses part of a transformers-5.2x folder (``zeda_vllm.compat``)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    from . import configs
    from .compat import enable_amx
    from .families import FAMILIES
    from .hooks import register_config_hooks

    for family in FAMILIES:
        AutoConfig.register(family.dynamic_model_type, getattr(configs, family.config_class_name), exist_ok=True)
        # Lazy "module:Class": the model modules import vLLM's model code only in the process that builds the model.
        ModelRegistry.register_model(family.architecture, f"{family.model_module}:{family.architecture}")
        if not family.stock_compatible:  # static folders of the family too (e.g. a teacher's server)
            ModelRegistry.register_model(family.vllm_model, f"{family.model_module}:{family.compat_class}")
    enable_amx()  # vLLM-CPU's bf16 kernels use AMX without asking Linux for it (SIGILL otherwise: zeda_vllm.compat)
    register_config_hooks()  # CUDA graphs: piecewise, split at the plugin's op (zeda_vllm.hooks)
    init_logger("vllm.zeda_vllm").info(
        "zeda-vllm %s plugin loaded: ZEDA zero-expert architectures %s",
        __version__,
        ", ".join(f.architecture for f in FAMILIES),
    )
