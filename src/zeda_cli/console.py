"""Output channels: results (tables, JSON) on stdout; logs, progress and errors on stderr.

An :class:`Output` is made once per command invocation in ``cli/`` and passed down explicitly. Progress is a Rich
bar on a terminal; in a log (CI, a pipe, a file) it is plain lines instead, at least one every ``ZEDA_LOG_INTERVAL``
seconds (default 20) while a task runs: position, the task's own numbers (loss, zero share, tokens/s), elapsed,
ETA.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

LOG_WIDTH = 160  # tables written to a file or CI log: Rich would otherwise assume 80 columns and cut cells


def make_console(file: TextIO) -> Console:
    """A Console for ``file``; not a terminal (a pipe, a CI log) and no COLUMNS set -> LOG_WIDTH columns."""
    console = Console(file=file, soft_wrap=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    stdout: Console = field(default_factory=lambda: make_console(sys.stdout))
    stderr: Console = field(default_factory=lambda: make_console(sys.stderr))

    def log(self, message: str) -> None:
        """A progress/log line on stderr (hidden by --quiet)."""
        if not self.quiet:
            self.stderr.print(escape(message), highlight=False)

    def warn(self, message: str) -> None:
        self.stderr.print(f"[yellow]Warning:[/yellow] {escape(message)}", highlight=False)

    def error(self, message: str) -> None:
        self.stderr.print(f"[bold red]Error:[/bold red] {escape(message)}", highlight=False)

    def result(self, data: dict[str, Any], table: Table | None = None) -> None:
        """The command's result: JSON on stdout with --json, else the table (if any)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif table is not None:
            self.stdout.print(table)

    @contextmanager
    def progress(self) -> Iterator[ProgressBar]:
        bar: ProgressBar = RichProgress(self) if self.stderr.is_terminal else LogProgress(self, log_interval())
        try:
            yield bar
        finally:
            bar.stop()


def log_interval() -> float:
    return float(os.environ.get("ZEDA_LOG_INTERVAL", "20"))


class ProgressBar(Protocol):
    """What library code reports progress to (it never imports Rich): tasks, advanced with an info text."""

    def task(self, description: str, total: float | None) -> Any: ...
    def advance(self, task: Any, amount: float = 1, info: str | None = None) -> None: ...
    def track(self, items: Sequence[Any] | Iterable[Any], description: str, total: int | None = None) -> Any: ...
    def stop(self) -> None: ...


def _track(bar: ProgressBar, items: Sequence[Any] | Iterable[Any], description: str, total: int | None):
    task = bar.task(description, total if total is not None else len(items))  # type: ignore[arg-type]
    for item in items:
        yield item
        bar.advance(task)


class RichProgress:
    """A live Rich bar on a terminal; starts with its first task."""

    def __init__(self, out: Output):
        self._started = False
        self.rich = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=out.stderr,
            disable=out.quiet,
            transient=False,
        )

    def task(self, description: str, total: float | None) -> TaskID:
        if not self._started:
            self.rich.start()
            self._started = True
        return self.rich.add_task(description, total=total, info="")

    def stop(self) -> None:
        if self._started:
            self.rich.stop()
            self._started = False

    def advance(self, task: TaskID, amount: float = 1, info: str | None = None) -> None:
        if info is None:
            self.rich.advance(task, amount)
        else:
            self.rich.update(task, advance=amount, info=info)

    def track(self, items: Sequence[Any] | Iterable[Any], description: str, total: int | None = None):
        return _track(self, items, description, total)


@dataclass
class _LogTask:
    description: str
    total: float | None
    started: float
    completed: float = 0.0
    info: str = ""
    printed: float = 0.0  # when its last line was written


class LogProgress:
    """Progress as plain lines for logs: a line when a task starts and ends, and at least one per ``interval``
    seconds in between (a background thread repeats the latest numbers when one step takes longer than that)."""

    def __init__(self, out: Output, interval: float):
        self.out = out
        self.interval = interval
        self.tasks: list[_LogTask] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def task(self, description: str, total: float | None) -> int:
        with self._lock:
            self.tasks.append(_LogTask(description, total, time.monotonic()))
            self._line(self.tasks[-1])
        if self._thread is None and not self.out.quiet:
            self._thread = threading.Thread(target=self._heartbeat, name="zeda-progress", daemon=True)
            self._thread.start()
        return len(self.tasks) - 1

    def advance(self, task: int, amount: float = 1, info: str | None = None) -> None:
        with self._lock:
            t = self.tasks[task]
            t.completed += amount
            t.info = t.info if info is None else info
            if self._finished(t) or time.monotonic() - t.printed >= self.interval:
                self._line(t)

    def track(self, items: Sequence[Any] | Iterable[Any], description: str, total: int | None = None):
        return _track(self, items, description, total)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _heartbeat(self) -> None:
        while not self._stopped.wait(min(max(self.interval / 4, 0.05), 5.0)):
            with self._lock:
                for t in self.tasks:
                    if not self._finished(t) and time.monotonic() - t.printed >= self.interval:
                        self._line(t)

    @staticmethod
    def _finished(t: _LogTask) -> bool:
        return t.total is not None and t.completed >= t.total

    def _line(self, t: _LogTask) -> None:
        now = time.monotonic()
        t.printed = now
        elapsed = now - t.started
        where = f"{t.completed:g}/{t.total:g}" if t.total else f"{t.completed:g}"
        eta = ""
        if t.total and 0 < t.completed < t.total:
            eta = f", ETA {_duration(elapsed / t.completed * (t.total - t.completed))}"
        info = f" {t.info}" if t.info else ""
        self.out.log(f"{t.description}: {where}{info} | {_duration(elapsed)} elapsed{eta}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def key_value_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(escape(key), "" if value is None else escape(str(value)))
    return table
