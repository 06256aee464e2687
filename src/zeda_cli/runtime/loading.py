"""Load static or dynamic MoE checkpoints through zeda, without remote code.

Dynamic folders (zeda's own or the official ZEDA format) get the family's transformers ``...ForCausalLM`` class
with :class:`~zeda_cli.runtime.zeda_dynamic_moe.DynamicMoeMixin` in front, the same runtime the folder ships for
``trust_remote_code=True``; static folders load with the plain transformers class. Also the one place that picks
a device and finds a folder's tokenizer.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

import torch

from ..architectures import MoEAdapter, ResolvedConfig, resolve_config
from ..errors import BadInputError
from ..io.sources import read_config_json, resolve_source
from .zeda_dynamic_moe import DynamicMoeMixin, register_key_conversion

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@functools.cache
def dynamic_classes(adapter: MoEAdapter) -> tuple[type, type]:
    """(config class, model class) of the adapter's dynamic architecture, built on transformers' own classes."""
    module = importlib.import_module(f"transformers.models.{adapter.hf_module}")
    base_config = getattr(module, adapter.config_class)
    base_model = getattr(module, adapter.causal_lm_class)
    config_cls = type(
        adapter.dynamic_config_class,
        (base_config,),
        {"model_type": adapter.dynamic_model_type, "__module__": __name__},
    )
    model_cls = type(
        adapter.dynamic_architecture,
        (DynamicMoeMixin, base_model),
        {"config_class": config_cls, "__module__": __name__},
    )
    register_key_conversion(adapter.dynamic_model_type, adapter.model_type)
    # Known to the Auto classes, so AutoTokenizer / AutoConfig on a dynamic folder resolve locally instead of
    # asking to run the folder's remote code.
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(adapter.dynamic_model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def static_class(adapter: MoEAdapter) -> type:
    module = importlib.import_module(f"transformers.models.{adapter.hf_module}")
    return getattr(module, adapter.causal_lm_class)


def dynamic_hf_config(rc: ResolvedConfig, **overrides: Any) -> Any:
    """The dynamic config object for ``rc`` (official-format configs get zeda's router spec filled in)."""
    config_cls, _ = dynamic_classes(rc.adapter)
    raw = {k: v for k, v in rc.raw.items() if k not in ("model_type", "transformers_version")}
    raw.setdefault("use_zce_mask", rc.use_zce_mask)
    if "zeda" not in raw:
        raw["zeda"] = {"base_model_type": rc.adapter.model_type, "router": rc.adapter.router_spec(rc.hf)}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return config_cls(**raw)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    experts_implementation: str | None = None,
    zero_expert_bias: float | None = None,
    use_zce_mask: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Load a static or dynamic MoE from a folder (or Hub id); dynamic knobs override the saved config."""
    folder = resolve_source(str(path)).folder
    rc = resolve_config(read_config_json(folder))
    load_kwargs: dict[str, Any] = {"dtype": dtype or "auto", **kwargs}
    if experts_implementation:
        load_kwargs["experts_implementation"] = experts_implementation
    if rc.dynamic:
        config = dynamic_hf_config(rc, zero_expert_bias=zero_expert_bias, use_zce_mask=use_zce_mask)
        model = dynamic_classes(rc.adapter)[1].from_pretrained(folder, config=config, **load_kwargs)
    else:
        model = static_class(rc.adapter).from_pretrained(folder, **load_kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def checkpoint_names(folder: Path) -> Any:
    """A function turning a group of the model's in-memory tensors into checkpoint (on-disk) names and layouts
    (transformers' reverse weight conversion, e.g. fused 3-D experts back to per-expert matrices), built on a
    meta-device model of ``folder``'s config: no weights are allocated."""
    from transformers.core_model_loading import revert_weight_conversion

    rc = resolve_config(read_config_json(folder))
    if rc.dynamic:
        config, cls = dynamic_hf_config(rc), dynamic_classes(rc.adapter)[1]
    else:
        cls = static_class(rc.adapter)
        config = cls.config_class(**{k: v for k, v in rc.raw.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = cls(config)
    return lambda state: revert_weight_conversion(model, state)


def open_weights(folder: Path) -> Any:
    """The folder's weights, headers only: a safetensors checkpoint, or the sharded files of an FSDP2 stage read
    as one checkpoint in on-disk names (``io.dcp.ShardedCheckpoint``)."""
    from ..io.dcp import ShardedCheckpoint, is_sharded
    from ..io.reader import open_checkpoint

    return ShardedCheckpoint(folder, checkpoint_names(folder)) if is_sharded(folder) else open_checkpoint(folder)


def load_tokenizer(*paths: str | Path) -> Any:
    """The tokenizer of the first of ``paths`` that has one (e.g. the model's, then its teacher's), resolved
    without remote code (a dynamic folder's config type is registered locally first)."""
    from transformers import AutoTokenizer

    for path in paths:
        folder = resolve_source(str(path)).folder
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            continue  # transformers would build an empty tokenizer from the config alone
        rc = resolve_config(read_config_json(folder))
        if rc.dynamic:
            dynamic_classes(rc.adapter)
        try:
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            continue
    raise BadInputError(
        f"{paths[0]} has no tokenizer",
        expected="tokenizer files (tokenizer.json, tokenizer_config.json, ...) beside the weights",
        fix="copy the original model's tokenizer files into the folder",
    )


def resolve_device(spec: str = "auto", local_rank: int = 0, *, strict: bool = True) -> torch.device:
    """``auto`` (a GPU when one is visible), ``cpu``, ``cuda`` (this rank's GPU) or ``cuda:N``. ``strict``:
    refuse a CUDA request on a machine without GPU (plans pass ``strict=False`` to describe a GPU run anyway)."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and strict and not torch.cuda.is_available():
        raise BadInputError(f"device {spec} but no CUDA GPU is visible", expected="a GPU", fix="use device cpu")
    return torch.device("cuda", local_rank) if spec == "cuda" else torch.device(spec)
