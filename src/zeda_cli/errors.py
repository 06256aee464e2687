"""The ZedaError family: every user-facing failure says what was received, what was expected, and the fix.

Library code raises these; only ``cli/`` turns them into a message on stderr and an exit code.
"""

from __future__ import annotations

from collections.abc import Iterable

# Exit codes (documented in the README): CI pipelines branch on them.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception (traceback with ZEDA_DEBUG=1)
EXIT_BAD_INPUT = 2  # bad flag, recipe, path or data (also Typer's own usage errors)
EXIT_UNSUPPORTED = 3  # the model is dense, of an unsupported family, or already dynamic
EXIT_CHECKPOINT = 4  # missing / corrupted / inconsistent checkpoint files
EXIT_EXTERNAL = 5  # the Hub, network, disk space, launcher
EXIT_STAGE_FAILED = 6  # a pipeline stage ran and failed
EXIT_GATE_FAILED = 7  # zeda eval: a quality gate (--max-nll-rise, --min-zero-share, ...) was violated
EXIT_INTERRUPTED = 130


class ZedaError(Exception):
    """Base class. ``str(err)`` is one line: received, expected, fix."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, received: str, *, expected: str | None = None, fix: str | None = None):
        self.received = received
        self.expected = expected
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.received.rstrip(".")]
        if self.expected:
            parts.append(f"expected {self.expected.rstrip('.')}")
        if self.fix:
            parts.append(f"fix: {self.fix.rstrip('.')}")
        return " ".join("; ".join(parts).split())  # third-party messages quoted inside may span lines


class BadInputError(ZedaError):
    exit_code = EXIT_BAD_INPUT


class UnsupportedModelError(ZedaError):
    exit_code = EXIT_UNSUPPORTED


class CheckpointError(ZedaError):
    exit_code = EXIT_CHECKPOINT


class ExternalError(ZedaError):
    exit_code = EXIT_EXTERNAL


class StageFailedError(ZedaError):
    exit_code = EXIT_STAGE_FAILED


class ProblemsError(ZedaError):
    """Several independent problems found during validation, reported together."""

    def __init__(self, problems: Iterable[ZedaError]):
        self.problems = list(problems)
        codes = {p.exit_code for p in self.problems}
        self.exit_code = codes.pop() if len(codes) == 1 else EXIT_BAD_INPUT
        super().__init__(f"{len(self.problems)} problems: " + " | ".join(p.one_line() for p in self.problems))


def raise_all(problems: list[ZedaError]) -> None:
    """Raise nothing, the one problem, or all of them at once."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ProblemsError(problems)
