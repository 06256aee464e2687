"""Sampling with transformers' ``generate`` on a model in this process: the teacher's rollouts (a frozen copy) or the
student's stage-2 samples (the live training model, so nothing needs syncing)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ...recipes import Recipe
from ...runs import TeacherSpec
from ...runtime.loading import load_model, load_tokenizer, resolve_device
from ..data import left_pad, special_ids
from ..precision import compute_dtype
from . import Samples, SamplingSettings, Servers, no_servers


def cut_at_eos(tokens: list[int], eos_ids: list[int], pad_id: int) -> tuple[list[int], bool]:
    """Response up to and including the first EOS; (tokens, finished)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1], True
    while tokens and tokens[-1] == pad_id and pad_id not in eos_ids:
        tokens = tokens[:-1]
    return tokens, False


@torch.no_grad()
def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: SamplingSettings,
    seed: int,
    device: torch.device | str = "cpu",
    synced_gpus: bool = False,
) -> list[tuple[list[int], bool]]:
    """One sampled response per prompt (temperature 0 = greedy); deterministic for a given seed."""
    from transformers import GenerationConfig

    pad_id, eos_ids = special_ids(tokenizer, model)
    ids, mask = left_pad(prompts, pad_id)
    config = GenerationConfig(
        do_sample=settings.temperature > 0,
        temperature=settings.temperature if settings.temperature > 0 else None,
        top_p=settings.top_p if settings.temperature > 0 else None,
        top_k=0 if settings.temperature > 0 else None,  # sample the full distribution
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, synced_gpus=synced_gpus
    )
    model.train(was_training)
    return [cut_at_eos(row[ids.shape[1] :].tolist(), eos_ids, pad_id) for row in out.cpu()]


class HfSampler:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str, synced_gpus: bool = False):
        self.model, self.tokenizer, self.device, self.synced_gpus = model, tokenizer, device, synced_gpus

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        return sample_responses(self.model, self.tokenizer, prompts, settings, seed, self.device, self.synced_gpus)

    def sync(self, model: Any, step: int) -> float:
        return 0.0  # it samples from the live model


class HfGenerator:
    """``generation.engine: hf``: the teacher loaded here for its rollouts; stage 2 samples from the live student."""

    name = "hf"

    @contextmanager
    def teacher_sampler(self, teacher: TeacherSpec, recipe: Recipe, prompts: list[list[int]], max_new_tokens: int,
                        log_dir: Path) -> Iterator[HfSampler]:  # fmt: skip
        device = resolve_device(recipe.runtime.device)
        model = load_model(teacher.path, dtype=compute_dtype(recipe, device.type), use_zce_mask=teacher.masked or None)
        yield HfSampler(model.to(device), load_tokenizer(teacher.path), device)

    def serve_student(self, job: Any, prompts: Any) -> Any:
        return no_servers()

    def student_sampler(self, job: Any, engine: Any, tokenizer: Any, prompts: list[list[int]], servers: Servers,
                        backend: Any = None, start: int = 0) -> HfSampler:  # fmt: skip
        return HfSampler(engine.module, tokenizer, engine.device, synced_gpus=engine.world_size > 1)

    def teacher_scorer(self, job: Any, engine: Any, servers: Servers) -> Any:
        raise ValueError("stage2.teacher_logprobs engine needs generation.engine vllm (the recipe refuses it)")


GENERATOR = HfGenerator()
