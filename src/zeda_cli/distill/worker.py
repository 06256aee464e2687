"""Entry point of every rank under the launcher: ``python -m zeda_cli.distill.worker OUT/job.json --timeout-s S``.

The process group is set up first and every rank meets the others before reading the job: on several nodes, the
job file is written by node 0 before its ranks join. The rank's backend comes from the job (``distributed.kind``);
the generation servers the launching process runs arrive in ``ZEDA_SERVERS`` (JSON). A zeda error on any rank is
one line on stderr, recorded for the launcher, and that error's exit code, so the command the user ran reports it
as it is (``launch.raise_rank_error``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ZedaError
from .engines import backend_for
from .generation import Servers
from .job import DistillJob
from .process import run_in_process

SERVERS_ENV = "ZEDA_SERVERS"
ERROR_FILE = "rank-errors.jsonl"  # one line per rank that failed with a zeda error: {"rank", "exit_code", "error"}


def _printer(rank: int):
    def on_step(record: dict[str, Any]) -> None:
        if rank == 0:
            keys = ("step", "total_steps", "loss", "ce", "kl", "aux", "zero_share", "tokens_per_s")
            sys.stdout.write(json.dumps({k: record[k] for k in keys if k in record}) + "\n")
            sys.stdout.flush()

    return on_step


def init_process_group(timeout_s: int) -> None:
    """The default process group from torchrun's environment (gloo on CPU, nccl on GPUs), if not set up yet."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def main(argv: list[str] | None = None) -> None:
    # torch.distributed's deprecation notices for the collectives DeepSpeed calls, once per call and rank.
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = sys.argv[1:] if argv is None else argv
    job_file = Path(args[0])
    timeout_s = int(args[args.index("--timeout-s") + 1]) if "--timeout-s" in args else 1800
    init_process_group(timeout_s)
    torch.distributed.barrier()  # node 0 wrote the job before its ranks got here
    job = DistillJob.read(job_file)
    servers = Servers.from_json(json.loads(os.environ.get(SERVERS_ENV) or "{}"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        backend = backend_for(job)
        run_in_process(job, backend, servers, _printer(backend.rank))
    except ZedaError as err:
        record = {"rank": rank, "exit_code": err.exit_code, "error": err.one_line()}
        with (job_file.parent / ERROR_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
        sys.stderr.write(f"rank {rank}: {err.one_line()}\n")
        sys.stderr.flush()
        os._exit(err.exit_code)  # no teardown of a half-finished process group: the launcher stops the others
    _exit_cleanly()


def _exit_cleanly() -> None:
    """Meet the other ranks, take the process group down, and leave without the interpreter's teardown.

    Everything the stage writes is closed by now. Left to the interpreter, a rank that finished could still abort
    while C++ statics go away (``terminate called without an active exception``, SIGABRT, seen in CI after a
    ZeRO-3 stage had written its output), and torchrun reports a finished stage as failed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
