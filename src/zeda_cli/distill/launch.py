"""Relaunch a distillation stage on its ranks with torchrun; each rank runs ``zeda_cli.distill.worker``.

One node: ``torchrun --standalone`` on a free port. Several nodes (``distributed.nnodes``): the same command on
every node with ``--nnodes``, ``--node-rank`` and the rendezvous at ``distributed.master_addr:master_port``; node 0
prepares the stage folder (which must be on a filesystem every node sees) before its ranks join, and the ranks
of the other nodes read the job once they have met node 0's. The launcher is a plain function (job, output
folder, servers) -> summary, injectable in ``run_job`` for tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import StageFailedError, error_class
from ..recipes import DistributedSection
from ..runs import read_manifest
from .engines import collective_timeout_s
from .generation import Servers
from .job import DistillJob
from .worker import ERROR_FILE, SERVERS_ENV

LOG_FILE = "launcher.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(job_file: Path, dist: DistributedSection, port: int, timeout_s: int) -> list[str]:
    if dist.nnodes == 1:
        where = ["--standalone", f"--master-port={port}"]
    else:
        where = [f"--nnodes={dist.nnodes}", f"--node-rank={dist.node_rank}", f"--master-addr={dist.master_addr}",
                 f"--master-port={port}"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={dist.nproc}",
            "-m", "zeda_cli.distill.worker", str(job_file), "--timeout-s", str(timeout_s)]  # fmt: skip


def launch_job(job: DistillJob, out: Path, servers: Servers | None = None, timeout: float | None = None
               ) -> dict[str, Any]:  # fmt: skip
    """Run the job on its ranks; stream their output; the summary comes from the manifest (node 0)."""
    dist = job.recipe.distributed
    job_file = out / "job.json"
    if dist.node_rank == 0:
        job.write(out)
        (out / ERROR_FILE).unlink(missing_ok=True)
    port = dist.master_port or free_port()
    command = torchrun_command(job_file, dist, port, collective_timeout_s(job.recipe))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", SERVERS_ENV: json.dumps((servers or Servers()).to_json())}
    if dist.devices:  # the ranks' GPUs (LOCAL_RANK i -> the i-th of them)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, dist.devices))
    # node 0 keeps launcher.log in the stage folder; another node's launcher may start before node 0 has prepared
    # that (shared) folder, so its output goes to its own stderr only (the scheduler's per-node log)
    with (out / LOG_FILE).open("a") if dist.node_rank == 0 else contextlib.nullcontext() as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if log is not None:
                log.write(line)
            sys.stderr.write(line)
        code = proc.wait(timeout=timeout)
    raise_rank_error(out)
    manifest = read_manifest(out)
    if dist.node_rank != 0 and code == 0:
        return dict(manifest.metrics) if manifest and manifest.done else {"node_rank": dist.node_rank}
    if code != 0 or manifest is None or not manifest.done:
        raise StageFailedError(
            f"stage {job.stage} failed on {dist.world_size} ranks (exit code {code})",
            expected="every rank to finish",
            fix=f"read {out / LOG_FILE}; fix the cause and rerun to continue from the last checkpoint (zeda convert: "
            "the same command; zeda distill: add --resume)",
        )
    return dict(manifest.metrics)


def raise_rank_error(out: Path) -> None:
    """A zeda error that stopped a rank (an unreachable generation server, a failed sync, ...) is raised here as the
    same one-line error with its own exit code, not as a failed stage."""
    path = out / ERROR_FILE
    if not path.exists():
        return
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if lines:
        first = min(lines, key=lambda r: r["rank"])
        raise error_class(int(first["exit_code"]))(str(first["error"]))
