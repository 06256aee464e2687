"""Relaunch a distillation stage on N processes with torchrun; each rank runs ``zeda_cli.distill.worker``.

The launcher is a plain function (job, output folder) -> summary, injectable in ``run_job`` for tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import StageFailedError
from ..runs import read_manifest
from .job import DistillJob

LOG_FILE = "launcher.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(job_file: Path, nproc: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--master_port={port}", "-m", "zeda_cli.distill.worker", str(job_file),
    ]  # fmt: skip


def launch_job(job: DistillJob, out: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run the job on ``distributed.nproc`` ranks; stream their output; the summary comes from the manifest."""
    job_file = job.write(out)
    command = torchrun_command(job_file, job.recipe.distributed.nproc, free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (out / LOG_FILE).open("a") as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stderr.write(line)
        code = proc.wait(timeout=timeout)
    manifest = read_manifest(out)
    if code != 0 or manifest is None or not manifest.done:
        raise StageFailedError(
            f"stage {job.stage} failed on {job.recipe.distributed.nproc} ranks (exit code {code})",
            expected="every rank to finish",
            fix=f"read {out / LOG_FILE}; fix the cause and rerun to continue from the last checkpoint (zeda convert: "
            "the same command; zeda distill: add --resume)",
        )
    return dict(manifest.metrics)
