"""Optional parts of the install: ``pip install zeda`` is the light runtime; training and benchmarks are extras.

A command that needs an extra checks for it first and, when it is missing, says which one to install (exit 2)
instead of failing later with an ImportError.
"""

from __future__ import annotations

from importlib.util import find_spec

from .errors import BadInputError

# extra -> the import names it brings (pyproject.toml [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("deepspeed", "accelerate", "datasets"),
    "bench": ("matplotlib",),
    "lmeval": ("lm_eval",),
}


def missing(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raise a one-line BadInputError naming the extra when any of its packages is not installed."""
    absent = missing(extra)
    if absent:
        raise BadInputError(
            f"{what} needs the '{extra}' extra ({', '.join(absent)} not installed)",
            expected=f"zeda installed with its {extra} dependencies",
            fix=f"pip install 'zeda[{extra}]'",
        )
