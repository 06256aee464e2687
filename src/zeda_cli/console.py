"""Output channels: results (tables, JSON) on stdout; logs, progress and errors on stderr.

An :class:`Output` is made once per command invocation in ``cli.py`` and passed down explicitly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

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
        bar = ProgressBar(self)
        try:
            yield bar
        finally:
            bar.stop()


class ProgressBar:
    """Thin wrapper so library code can report progress without importing Rich; starts with its first task."""

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
        task = self.task(description, total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            self.advance(task)


def key_value_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(escape(key), "" if value is None else escape(str(value)))
    return table
