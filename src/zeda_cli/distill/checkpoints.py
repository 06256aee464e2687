"""Resume checkpoints and the metrics log of a stage folder.

While training, a stage folder holds ``job.json``, ``metrics.jsonl`` and ``checkpoints/step-*``; a checkpoint is
written under a temporary name and renamed once every rank's part is in, so ``--resume`` always finds whole ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, folder: Path, enabled: bool):
        self.path = folder / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps a resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None]
        kept = [line for line in kept if _step_of(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if _step_of(line) is not None]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    folder = out / CHECKPOINTS
    done = [p for p in folder.glob("step-*") if (p / "trainer_state.json").exists()] if folder.exists() else []
    if not done:
        return None
    best = max(done, key=lambda p: int(p.name.split("-")[1]))
    return best, int(best.name.split("-")[1])


def save_checkpoint(engine: Any, out: Path, step: int, state: dict[str, Any]) -> None:
    """Atomic: written under a temporary name, renamed once complete; older checkpoints are removed after."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".partial-step-{step:08d}"
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_resume(tmp)
    engine.barrier()
    if engine.rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()


def load_checkpoint(engine: Any, out: Path) -> tuple[int, dict[str, Any]]:
    found = latest_checkpoint(out)
    if found is None:
        return 0, {}
    folder, step = found
    engine.load_resume(folder)
    return step, json.loads((folder / "trainer_state.json").read_text())
