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


def _children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class TreeRun:
    seconds: float
    returncode: int
    output: str
    peaks: dict[int, dict[str, Any]]  # pid -> {"cmd", "peak_rss_bytes" (VmHWM), "peak_anon_bytes" (sampled RssAnon)}

    def peaks_of(self, marker: str) -> list[dict[str, Any]]:
        """The processes whose command line contains ``marker`` (e.g. the training ranks), in pid order."""
        return [v for _, v in sorted(self.peaks.items()) if marker in v["cmd"]]


def run_tree(command: Sequence[str], env: dict[str, str] | None = None, poll_s: float = 0.05) -> TreeRun:
    """Run ``command``; the peak resident (VmHWM) and sampled peak anonymous memory of it and every process it
    starts (e.g. the ranks a launcher starts), until it exits."""
    began = time.perf_counter()
    peaks: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        while proc.poll() is None:
            tree, todo, seen = _children(), [proc.pid], set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                todo += tree.get(pid, [])
                hwm, anon = _status_bytes(pid)
                entry = peaks.setdefault(pid, {"cmd": _cmdline(pid), "peak_rss_bytes": 0, "peak_anon_bytes": 0})
                entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], hwm)
                entry["peak_anon_bytes"] = max(entry["peak_anon_bytes"], anon)
            time.sleep(poll_s)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return TreeRun(time.perf_counter() - began, proc.returncode, output, peaks)


def python_child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def zeda_child(*args: str) -> list[str]:
    return [sys.executable, "-m", "zeda_cli", *args]


def zeda_json(*args: str) -> dict[str, Any]:
    """Run ``zeda ARGS --json -q`` in a child process; its JSON summary (stdout only: warnings go to stderr), or a
    RuntimeError with the end of its stderr."""
    proc = subprocess.run(zeda_child(*args, "--json", "-q"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"zeda {' '.join(args[:4])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


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
