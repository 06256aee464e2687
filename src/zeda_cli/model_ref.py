"""A model resolved once: where its files are (:class:`~zeda_cli.io.sources.Source`) and what it is (its family
adapter and config, :class:`~zeda_cli.architectures.ResolvedConfig`). Commands resolve a model here and hand the
result down; nothing below them resolves the same source again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .architectures import MoEAdapter, ResolvedConfig, resolve_config
from .io.sources import Source, read_config_json, resolve_source


@dataclass(frozen=True)
class ModelRef:
    source: Source
    rc: ResolvedConfig

    @property
    def folder(self) -> Path:
        return self.source.folder

    @property
    def adapter(self) -> MoEAdapter:
        return self.rc.adapter


def resolve_model(spec: str | Path, *, token: str | None = None, allow_patterns: list[str] | None = None) -> ModelRef:
    """Download (Hub id) or locate (folder) ``spec`` and read its config; raises for unsupported models."""
    source = resolve_source(str(spec), allow_patterns=allow_patterns, token=token)
    return ModelRef(source, resolve_config(read_config_json(source.folder)))


def as_model(model: ModelRef | str | Path) -> ModelRef:
    """Library entry points take a resolved model or, for convenience, a spec to resolve."""
    return model if isinstance(model, ModelRef) else resolve_model(model)
