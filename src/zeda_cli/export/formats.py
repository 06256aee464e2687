"""Export formats, one class each, in the :data:`FORMATS` registry (``export.format`` / ``--format``).

* ``zeda`` (default): the dynamic checkpoint in the official ZEDA config format, with its loading code; the
  zeda runtime (and the zeda vLLM plugin) skips the zero-expert slots.
* ``stock``: the zero experts as real all-zero experts of the original architecture. A stock router over N+Z
  experts whose last Z experts output exactly zero routes and mixes like the dynamic model (same logits, same
  top-K, same normalisation including zero slots), so any engine loads the checkpoint unchanged — and computes the
  zero experts like any others: this format saves no compute. Not expressible (refused): masked zero experts
  (``use_zce_mask``) and a non-zero ``zero_expert_bias``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from ..architectures import ResolvedConfig
from ..errors import CheckpointError, UnsupportedModelError, ZedaError, raise_all
from ..io.reader import READ_CHUNK
from ..io.writer import OutTensor
from ..runtime.packaging import dynamic_config, write_loading_code


class ExportFormat(Protocol):
    name: str

    def check(self, rc: ResolvedConfig) -> None:
        """Raise when the run cannot be written in this format."""

    def config(self, rc: ResolvedConfig) -> dict[str, Any]:
        """The exported config.json."""

    def tensors(self, rc: ResolvedConfig, planned: list[OutTensor]) -> list[OutTensor]:
        """The exported tensors, from the run's (streamed) tensors."""

    def extra_files(self, folder: Path, rc: ResolvedConfig) -> None:
        """Write the files the format needs beside the weights (loading code)."""


class ZedaFormat:
    name = "zeda"

    def check(self, rc: ResolvedConfig) -> None:
        return None

    def config(self, rc: ResolvedConfig) -> dict[str, Any]:
        """The official ZEDA format (also normalises an official-format input), keeping zeda's own extra keys."""
        zeda = rc.raw.get("zeda") or {}
        extra = {k: v for k, v in zeda.items() if k not in ("format_version", "base_model_type", "base_architecture")}
        extra.pop("router", None)
        bias = float(rc.raw.get("zero_expert_bias") or 0.0)
        return dynamic_config(rc.raw, rc.adapter, rc.hf, rc.num_zero_experts, mask=rc.use_zce_mask, extra=extra,
                              zero_expert_bias=bias)  # fmt: skip

    def tensors(self, rc: ResolvedConfig, planned: list[OutTensor]) -> list[OutTensor]:
        return planned

    def extra_files(self, folder: Path, rc: ResolvedConfig) -> None:
        write_loading_code(folder, rc.adapter)


DYNAMIC_KEYS = ("auto_map", "zce_nums", "zce_types", "use_zce_mask", "zeda", "zero_expert_bias")


class StockFormat:
    name = "stock"

    def check(self, rc: ResolvedConfig) -> None:
        check_stock(rc)

    def config(self, rc: ResolvedConfig) -> dict[str, Any]:
        return stock_config(rc)

    def tensors(self, rc: ResolvedConfig, planned: list[OutTensor]) -> list[OutTensor]:
        return stock_tensors(rc, planned)

    def extra_files(self, folder: Path, rc: ResolvedConfig) -> None:
        return None  # plain transformers classes: no loading code


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (ZedaFormat(), StockFormat())}


def check_stock(rc: ResolvedConfig) -> None:
    """The stock format routes over N+Z experts with plain routers: a mask or a zero-expert bias cannot be kept."""
    problems: list[ZedaError] = []
    if rc.use_zce_mask:
        problems.append(
            UnsupportedModelError(
                "the run masks its zero experts (use_zce_mask: true), which the stock format cannot express",
                expected="use_zce_mask: false for --format stock",
                fix="export with --format zeda, or export a run whose zero experts are not masked",
            )
        )
    bias = float(rc.raw.get("zero_expert_bias") or 0.0)
    if bias != 0.0:
        problems.append(
            UnsupportedModelError(
                f"the run sets zero_expert_bias: {bias}, which stock routers cannot express",
                expected="zero_expert_bias: 0 for --format stock",
                fix="export with --format zeda (where the bias is a runtime dial), or set it to 0 in config.json",
            )
        )
    raise_all(problems)


def stock_config(rc: ResolvedConfig) -> dict[str, Any]:
    """The original architecture's config with N+Z experts (written under every name the raw config uses)."""
    adapter = rc.adapter
    config = {k: v for k, v in rc.raw.items() if k not in DYNAMIC_KEYS}
    config.update(model_type=adapter.model_type, architectures=[adapter.causal_lm_class])
    attr = adapter.num_experts_attr
    names = {attr, getattr(type(rc.hf), "attribute_map", {}).get(attr, attr)}
    for name in [n for n in names if n in config] or [attr]:
        config[name] = rc.num_experts + rc.num_zero_experts
    return config


def _zeros(nbytes: int) -> Iterator[memoryview]:
    block = memoryview(bytes(min(nbytes, READ_CHUNK)))
    while nbytes > 0:
        yield block[: min(nbytes, len(block))]
        nbytes -= len(block)


def _widened(base: OutTensor, rows: int) -> OutTensor:
    """``base`` with ``rows`` all-zero rows appended along dim 0 (fused expert tensors stack experts there)."""
    shape = (base.shape[0] + rows, *base.shape[1:])
    extra = OutTensor(base.name, base.dtype, shape, lambda: iter(())).nbytes - base.nbytes

    def chunks() -> Iterator[bytes | memoryview]:
        yield from base.chunks()
        yield from _zeros(extra)

    return OutTensor(base.name, base.dtype, shape, chunks)


def _zero_like(name: str, like: OutTensor) -> OutTensor:
    return OutTensor(name, like.dtype, like.shape, lambda: _zeros(like.nbytes))


def stock_tensors(rc: ResolvedConfig, tensors: list[OutTensor]) -> list[OutTensor]:
    """Add experts N..N+Z-1 as zeros to every MoE block, mirroring expert 0 or widening fused tensors."""
    adapter, n, z = rc.adapter, rc.num_experts, rc.num_zero_experts
    by_name = {t.name: t for t in tensors}
    groups: dict[str, list[str]] = {adapter.experts_prefix(b): [] for b in adapter.moe_block_prefixes(by_name)}
    marker = f".{adapter.experts_name}."
    for name in by_name:
        head, sep, _ = name.partition(marker)
        if sep and head + sep in groups:
            groups[head + sep].append(name)
    after: dict[str, list[OutTensor]] = {}  # zero experts go right after their block's last tensor
    for prefix, names in groups.items():
        suffixes = _per_expert_suffixes(prefix, names, n)
        if suffixes:
            like = {s: by_name[f"{prefix}0.{s}"] for s in suffixes}
            after[names[-1]] = [_zero_like(f"{prefix}{e}.{s}", like[s]) for e in range(n, n + z) for s in suffixes]
            continue
        fused = [k for k in names if "." not in k[len(prefix) :]]
        if not fused or any(by_name[k].shape[:1] != (n,) for k in fused):
            raise _layout_error(f"no per-expert or fused ({n}, ...) expert tensors under {prefix}*")
        by_name.update({k: _widened(by_name[k], z) for k in fused})
    return [t for k, t in by_name.items() for t in (t, *after.get(k, []))]


def _per_expert_suffixes(prefix: str, names: list[str], n: int) -> list[str]:
    """Suffixes of expert 0's tensors (``experts.0.<suffix>``), checked present for every expert 0..N-1."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    found: dict[int, set[str]] = {}
    for name in names:
        if match := pattern.match(name):
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not found:
        return []
    if sorted(found) != list(range(n)) or any(v != found[0] for v in found.values()):
        raise _layout_error(f"{prefix}* holds experts {sorted(found)} with differing tensors, expected 0..{n - 1}")
    return [k[len(f"{prefix}0.") :] for k in names if k.startswith(f"{prefix}0.")]


def _layout_error(what: str) -> CheckpointError:
    return CheckpointError(what, expected="the expert tensors the config describes",
                           fix="check that config.json matches the weights")  # fmt: skip
