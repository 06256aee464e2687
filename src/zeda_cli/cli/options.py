"""Shared option types, the examples epilog, settings from flags, and the one error boundary every command runs
inside."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from ..console import Output
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, ZedaError
from ..recipes import Recipe, load_recipe

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for pipelines).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="Hugging Face token (default: HF_TOKEN or the cached login).")
]


RecipeOpt = Annotated[str | None, typer.Option("--recipe", "-r", help="Recipe YAML (path or shipped name).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Recipe override key.path=value (repeatable).")]
PromptsOpt = Annotated[str | None, typer.Option("--prompts", help="Prompt set: .jsonl/.parquet file or Hub dataset.")]


def recipe_from_flags(
    flags: dict[str, tuple[str, Any]], recipe: str | None = None, sets: list[str] | None = None
) -> Recipe:
    """The one route for settings: ``flags`` maps recipe keys to (flag name, value given or None); they are laid
    over the recipe (or the defaults), then ``--set`` overrides; a bad value is reported under its flag's name."""
    return load_recipe(recipe, list(sets or []), values={k: v for k, (_, v) in flags.items()},
                       flags={k: name for k, (name, _) in flags.items()})  # fmt: skip


def examples(*lines: str) -> str:
    """An epilog listing example invocations (\\b keeps the lines as written)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@contextmanager
def reported(out: Output) -> Iterator[None]:
    """Turn library errors into one message on stderr (+ JSON on stdout with --json) and an exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except ZedaError as err:
        _fail(out, err.one_line(), err.exit_code, type(err).__name__)
    except KeyboardInterrupt:
        _fail(out, "interrupted", EXIT_INTERRUPTED, "KeyboardInterrupt")
    except Exception as err:
        if os.environ.get("ZEDA_DEBUG"):
            raise
        message = f"internal error: {type(err).__name__}: {err} (set ZEDA_DEBUG=1 for the traceback)"
        _fail(out, message, EXIT_INTERNAL, type(err).__name__)


def _fail(out: Output, message: str, code: int, kind: str) -> None:
    out.error(message)
    if out.json_mode:
        sys.stdout.write(json.dumps({"ok": False, "error": message, "kind": kind, "exit_code": code}) + "\n")
    raise typer.Exit(code)
