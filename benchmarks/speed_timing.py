"""Timing helpers shared by the speed benchmark's block and end-to-end parts.

Wall and process CPU time of a call (CUDA synchronised), static and dynamic calls interleaved S D S D ... S with
each D divided by the mean of its neighbouring S samples, and a NaN-safe median.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, inner: int = 1) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, averaged over ``inner`` calls."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - wall) / inner, (time.process_time() - cpu) / inner


def interleaved(
    static: Callable[[], Any],
    dynamic: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    warmup: int,
    min_sample_s: float,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, Any]:
    """Time S D_a S D_b ... S (dynamic order reversed every other round); each D is divided by the mean of its two
    neighbouring S samples. Wall time is the figure; process CPU time is kept too: on a machine shared with other
    jobs it is far less disturbed (with one thread it is the work done, whoever else runs).

    ``budget_s``: fewer rounds (not below ``min_repeats``) where one round would take longer than the budget allows.
    """
    warm = {}
    for _ in range(max(1, warmup)):
        warm["static"] = time_call(static, device)[0]
        for key, fn in dynamic.items():
            warm[key] = time_call(fn, device)[0]
    probe = warm["static"]
    inner = max(1, min(100, math.ceil(min_sample_s / max(probe, 1e-6))))
    if budget_s:
        round_s = inner * (len(dynamic) * probe + sum(v for k, v in warm.items() if k != "static"))
        repeats = max(min_repeats, min(repeats, int(budget_s // max(round_s, 1e-9))))
    keys = list(dynamic)
    statics = [time_call(static, device, inner)]
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    cpu_ratios: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for key in keys if r % 2 == 0 else keys[::-1]:
            before = statics[-1]
            t = time_call(dynamic[key], device, inner)
            after = time_call(static, device, inner)
            statics.append(after)
            samples[key].append(t)
            ratios[key].append(t[0] / ((before[0] + after[0]) / 2))
            cpu_ratios[key].append(t[1] / max((before[1] + after[1]) / 2, 1e-12))
    return {
        "inner_loops": inner,
        "repeats": repeats,
        "static_s": [w for w, _ in statics],
        "static_cpu_s": [c for _, c in statics],
        "dynamic_s": {k: [w for w, _ in v] for k, v in samples.items()},
        "dynamic_cpu_s": {k: [c for _, c in v] for k, v in samples.items()},
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
    }


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
