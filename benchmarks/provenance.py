"""Where a benchmark result came from, recorded in every results JSON: the exact command line, the git commit and
whether the tree was clean, the sha256 of the model, data and recipe inputs, the seeds, the machine and the wall
time. A number in the README names the JSON it came from; this says how to make that JSON again."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_STARTED = time.perf_counter()
_STARTED_AT = datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_state() -> dict[str, Any]:
    # "XY path" lines; _git strips the output, so the first line may have lost its leading blank
    dirty = [line.split(None, 1)[1] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": _git("rev-parse", "HEAD") or None, "clean": not dirty, "modified": dirty[:20]}


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, sorted; hidden files and caches left out)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))  # fmt: skip
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def command_line() -> str:
    """The command as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


_AT_START = git_state()  # the code the run started from: a commit or edit made while a long run goes on is not it


def provenance(inputs: dict[str, Path | str], seeds: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``provenance`` block of a results JSON (call it when the result is complete: it records the wall time)."""
    from common import machine

    hashed = {name: {"path": str(p), "sha256": digest(Path(p))} for name, p in inputs.items() if Path(p).exists()}
    return {
        "provenance": {
            "command": command_line(),
            "git": _AT_START,
            "inputs": hashed,
            "seeds": seeds or {},
            "machine": machine(),
            "started_at": _STARTED_AT,
            "wall_seconds": round(time.perf_counter() - _STARTED, 1),
        }
    }
