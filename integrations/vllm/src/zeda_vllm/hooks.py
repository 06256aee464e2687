"""The plugin's model config hook: vLLM calls ``verify_and_update_config(vllm_config)`` of the class registered for
an architecture in ``vllm.model_executor.models.config.MODELS_CONFIG_MAP`` at the start of
``VllmConfig.__post_init__``, before it applies the optimization level's defaults and resolves the CUDA graph
settings (in-tree models set their cudagraph_mode defaults the same way). :func:`zeda_vllm.register` registers it for
every dynamic architecture, chaining to the base architecture's hook if vLLM has one.

On CUDA/ROCm, with cudagraph_mode left unset, it picks ``PIECEWISE`` instead of vLLM's ``FULL_AND_PIECEWISE`` and
makes sure ``zeda_vllm::routed_experts`` is a splitting op (:func:`zeda_vllm.checks.piecewise_defaults`), so
``vllm serve DIR`` of a zeda export captures CUDA graphs without flags; an explicitly requested full mode is refused
with one line.
"""

from __future__ import annotations

from typing import Any

from .checks import FULL_GRAPH_MODES, check_cuda_graphs, piecewise_defaults
from .families import BY_ARCHITECTURE


def adjust_compilation_config(vllm_config: Any, cuda_alike: bool) -> None:
    from vllm.config import CUDAGraphMode
    from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG

    comp = vllm_config.compilation_config
    enforce_eager = bool(getattr(vllm_config.model_config, "enforce_eager", False))
    if not cuda_alike or enforce_eager:
        return
    default = OPTIMIZATION_LEVEL_TO_CONFIG[vllm_config.optimization_level]["compilation_config"]["cudagraph_mode"]
    user_mode = None if comp.cudagraph_mode is None else comp.cudagraph_mode.name
    if user_mode in FULL_GRAPH_MODES:
        check_cuda_graphs(user_mode, list(comp.splitting_ops or []))  # raises: say which and why, at start-up
    mode, ops = piecewise_defaults(user_mode, comp.splitting_ops, default.name, enforce_eager)
    if mode is not None:
        comp.cudagraph_mode = CUDAGraphMode[mode]
    if ops is not None:
        comp.splitting_ops = ops


class ZeroExpertModelConfig:
    """``VerifyAndUpdateConfig`` of the dynamic architectures (duck-typed: vLLM only calls the two methods)."""

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from vllm.platforms import current_platform

        adjust_compilation_config(vllm_config, current_platform.is_cuda_alike())
        base = _base_hook(vllm_config.model_config.architecture)
        if base is not None:
            base.verify_and_update_config(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        base = _base_hook(model_config.architecture)
        if base is not None:
            base.verify_and_update_model_config(model_config)


def _base_hook(architecture: str | None) -> Any:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    family = BY_ARCHITECTURE.get(architecture or "")
    return MODELS_CONFIG_MAP.get(family.vllm_model) if family else None


def register_config_hooks() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for architecture in BY_ARCHITECTURE:
        MODELS_CONFIG_MAP.setdefault(architecture, ZeroExpertModelConfig)  # type: ignore[arg-type]
