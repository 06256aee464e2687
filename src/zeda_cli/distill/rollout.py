"""Teacher rollouts for stage 1: the frozen original model writes one response per prompt.

Resumable: records are appended per batch; a rerun with the same settings continues after the last complete
batch (batch b always uses seed ``seed + b``, so a resumed file equals an uninterrupted one). A rerun with other
settings is refused instead of mixing two distributions. ``generation.engine: vllm`` samples the same records with
a vLLM engine serving the static teacher (see :mod:`.generation`); any other engine can write the same JSONL
(fields: id, prompt, prompt_ids, response, response_ids, finished) for ``--rollouts``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import ProgressBar
from ..errors import BadInputError
from ..recipes import DataSection, Recipe, RolloutSection
from ..runs import TeacherSpec
from ..runtime.loading import load_tokenizer
from .data import append_rollouts, load_prompt_records, read_rollouts, rewrite_rollouts, tokenize_prompts
from .generation import Sampler, SamplingSettings, generator

ROLLOUTS_FILE = "rollouts.jsonl"


def meta_path(rollouts: Path) -> Path:
    return rollouts.with_name(rollouts.stem + ".meta.json")


@dataclass(frozen=True)
class RolloutSummary:
    path: Path
    prompts: int
    generated_now: int
    finished_share: float
    mean_response_tokens: float

    @classmethod
    def of(cls, path: Path, generated_now: int) -> RolloutSummary:
        records = read_rollouts(path)
        count = max(len(records), 1)
        finished = sum(r["finished"] for r in records) / count
        tokens = sum(len(r["response_ids"]) for r in records) / count
        return cls(path=path, prompts=len(records), generated_now=generated_now, finished_share=finished,
                   mean_response_tokens=tokens)  # fmt: skip


def _meta(
    teacher: TeacherSpec, data: DataSection, settings: RolloutSection, prompts: list[list[int]], engine: str
) -> dict:
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {
        "teacher": teacher.model_dump(),
        "rollout": settings.model_dump(mode="json"),
        "prompts": {"source": data.prompts, "count": len(prompts), "sha256": digest},
        **({"engine": engine} if engine != "hf" else {}),  # another engine samples other (equally valid) responses
    }


def _resume_point(path: Path, meta: dict, overwrite: bool, batch_size: int) -> list[dict[str, Any]]:
    meta_file = meta_path(path)
    if overwrite or not path.exists():
        path.unlink(missing_ok=True)
        meta_file.write_text(json.dumps(meta, indent=2))
        return []
    saved = json.loads(meta_file.read_text()) if meta_file.exists() else None
    if saved != meta:
        raise BadInputError(
            f"{path} holds rollouts made with other settings (teacher, prompts or sampling)",
            expected="the same settings to resume, or a new file",
            fix="pass --overwrite to regenerate, or choose another output",
        )
    done = read_rollouts(path)
    # A killed writer can leave part of a batch (and a cut line): keep whole batches only, regenerate the rest.
    done = done[: len(done) // batch_size * batch_size]
    rewrite_rollouts(path, done)
    return done


def generate_rollouts(
    teacher: TeacherSpec,
    recipe: Recipe,
    path: Path,
    *,
    overwrite: bool = False,
    progress: ProgressBar | None = None,
) -> RolloutSummary:
    """The teacher's response to every prompt of ``recipe.data``, sampled with ``recipe.rollout`` by the generator
    ``recipe.generation`` names, appended to ``path`` batch by batch (resumable)."""
    settings = recipe.rollout
    tokenizer = load_tokenizer(teacher.path)
    prompts = tokenize_prompts(load_prompt_records(recipe.data), tokenizer, recipe.data)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = _meta(teacher, recipe.data, settings, [p for _, p in prompts], recipe.generation.engine)
    done = _resume_point(path, meta, overwrite, settings.batch_size)
    first_batch = len(done) // settings.batch_size
    generated = 0
    if first_batch * settings.batch_size < len(prompts):
        ids = [p for _, p in prompts]
        with generator(recipe).teacher_sampler(teacher, recipe, ids, settings.max_new_tokens, path.parent) as sampler:
            generated = _generate(sampler, tokenizer, prompts, settings, path, first_batch, progress)
    return RolloutSummary.of(path, generated)


def _generate(
    sampler: Sampler,
    tokenizer: Any,
    prompts: list[tuple[str, list[int]]],
    settings: RolloutSection,
    path: Path,
    first_batch: int,
    progress: ProgressBar | None,
) -> int:
    batches = range(first_batch, (len(prompts) + settings.batch_size - 1) // settings.batch_size)
    task = progress.task(f"teacher rollouts ({sampler.name})", total=len(batches)) if progress else None
    sampling = SamplingSettings(settings.max_new_tokens, settings.temperature, settings.top_p)
    generated = tokens = 0
    began = time.perf_counter()
    for b in batches:
        chunk = prompts[b * settings.batch_size : (b + 1) * settings.batch_size]
        samples = sampler.sample([p for _, p in chunk], sampling, settings.seed + b)
        tokens += sum(len(r) for r, _ in samples)
        records = [
            {
                "id": b * settings.batch_size + i,
                "prompt": text,
                "prompt_ids": ids,
                "response": tokenizer.decode(response, skip_special_tokens=True),
                "response_ids": response,
                "finished": finished,
            }
            for i, ((text, ids), (response, finished)) in enumerate(zip(chunk, samples, strict=True))
        ]
        append_rollouts(path, records)
        generated += len(records)
        if progress and task is not None:
            progress.advance(task, info=f"{tokens / max(time.perf_counter() - began, 1e-9):.0f} tok/s")
    return generated
