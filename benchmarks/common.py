"""Shared by the benchmarks: machine description, child-process peak RSS, tables and JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' progress bars (weight loading, lm-eval) off in results logs
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": os.getloadavg(),
    }


@dataclass(frozen=True)
class ChildRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str
    peak_anon_bytes: int = 0  # sampled peak of RssAnon: allocated memory, without file pages of mmapped weights


def _status_bytes(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) of a process. VmHWM is the resident high-water mark, reset by exec (unlike rusage's
    ru_maxrss, which keeps the forking parent's peak, here a Python that imported torch)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


def run_child(command: Sequence[str], env: dict[str, str] | None = None, poll_s: float = 0.02) -> ChildRun:
    """Run ``command``; wall time and the child's own peak resident set size (VmHWM sampled until it exits)."""
    began = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak = anon = 0
        while proc.poll() is None:
            hwm, now_anon = _status_bytes(proc.pid)
            peak, anon = max(peak, hwm), max(anon, now_anon)
            time.sleep(poll_s)
        seconds = time.perf_counter() - began
        log.seek(0)
        output = log.read().decode(errors="replace")
    return ChildRun(seconds, peak, proc.returncode, output, anon)


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def zeda_child(*args: str) -> list[str]:
    return [sys.executable, "-m", "zeda_cli", *args]


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.table import Table

    from zeda_cli.console import make_console

    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(str(column))
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    make_console(sys.stdout).print(table)


def gb(n: float) -> float:
    return n / 1e9
