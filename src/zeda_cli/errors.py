"""The ZedaError family: every user-facing failure says what was received, what was expected, and the fix.

Library code raises these; only ``cli/`` turns them into a message on stderr and an exit code.
"""

from __future__ import annotations

from collections.abc import Iterable

# Exit codes: CI pipelines branch on them. EXIT_CODES is the one table (the README's "Exit codes" section is
# checked against it by tests/test_exit_codes.py); every command maps each kind of problem to the same code.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_UNSUPPORTED = 3
EXIT_CHECKPOINT = 4
EXIT_EXTERNAL = 5
EXIT_STAGE_FAILED = 6
EXIT_GATE_FAILED = 7
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug; `ZEDA_DEBUG=1` shows the traceback)",
    EXIT_BAD_INPUT: "bad input: flag, recipe, path, data; a missing extra (the message names it)",
    EXIT_UNSUPPORTED: "unsupported model: dense, unsupported family, already dynamic (inspect: not convertible)",
    EXIT_CHECKPOINT: "checkpoint problem: missing or corrupted shard, inconsistent index",
    EXIT_EXTERNAL: "external: Hub, network, disk space, not enough memory, no GPU, a generation server that fails "
    "or serves other weights",
    EXIT_STAGE_FAILED: "a pipeline stage ran and failed (rerun the same command to resume)",
    EXIT_GATE_FAILED: "`zeda eval`: a quality gate was violated (the message names each one)",
    EXIT_INTERRUPTED: "interrupted",
}


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


def error_class(exit_code: int) -> type[ZedaError]:
    """The error class that exits with ``exit_code`` (e.g. to re-raise a failure a rank reported)."""
    classes = (BadInputError, UnsupportedModelError, CheckpointError, ExternalError, StageFailedError)
    return next((c for c in classes if c.exit_code == exit_code), StageFailedError)


def raise_all(problems: list[ZedaError]) -> None:
    """Raise nothing, the one problem, or all of them at once."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ProblemsError(problems)
