"""Who samples during distillation, behind one contract, :class:`Sampler`: the teacher's stage-1 rollouts and the
student's stage-2 samples come from transformers' ``generate`` in the training process (:mod:`.hf`) or from vLLM
servers in their own environment, driven over HTTP (:mod:`.vllm`). ``generation.engine`` names the entry of
:data:`GENERATORS` that does it; nothing else branches on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ...recipes import Recipe
from ...runs import TeacherSpec

Samples = list[tuple[list[int], bool]]  # per prompt: (response token ids up to and including EOS, finished)


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


class Sampler(Protocol):
    """The contract of a sampler.

    * ``sample(prompts, settings, seed)`` returns one response per prompt (a prompt listed twice gets two
      independent samples), deterministic for a given seed and server.
    * ``sync(model, step)`` makes the sampler follow ``model``'s current weights after optimizer step ``step``;
      returns the seconds it took (0 where it samples from the training model itself).
    """

    name: str

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples: ...
    def sync(self, model: Any, step: int) -> float: ...


@dataclass(frozen=True)
class Servers:
    """Generation servers the launching process runs for a stage, handed to every training process."""

    student: list[str] = field(default_factory=list)  # URLs serving the student (stage 2)
    teacher: list[str] = field(default_factory=list)  # URLs serving the static teacher

    def to_json(self) -> dict[str, list[str]]:
        return {"student": self.student, "teacher": self.teacher}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Servers:
        data = data or {}
        return cls(list(data.get("student") or []), list(data.get("teacher") or []))


class Generator(Protocol):
    """One way of sampling (``generation.engine``)."""

    name: str

    def teacher_sampler(self, teacher: TeacherSpec, recipe: Recipe, prompts: list[list[int]], max_new_tokens: int,
                        log_dir: Path) -> AbstractContextManager[Sampler]: ...  # fmt: skip
    def serve_student(self, job: Any, prompts: Any) -> AbstractContextManager[Servers]: ...
    def student_sampler(self, job: Any, engine: Any, tokenizer: Any, prompts: list[list[int]], servers: Servers,
                        backend: Any = None, start: int = 0) -> Sampler: ...  # fmt: skip
    def teacher_scorer(self, job: Any, engine: Any, servers: Servers) -> Any: ...


GENERATORS = {"hf": ".hf", "vllm": ".vllm"}  # generation.engine -> the module whose GENERATOR implements it


def generator(recipe: Recipe) -> Generator:
    """The entry of ``generation.engine`` (imported on use: vLLM's client is only needed when asked for)."""
    return importlib.import_module(GENERATORS[recipe.generation.engine], __name__).GENERATOR


@contextmanager
def no_servers() -> Iterator[Servers]:
    yield Servers()
