"""Sampling with transformers' ``generate`` on the training model itself (the default engine)."""

from __future__ import annotations

from typing import Any

import torch

from ..sampling import SamplingSettings, sample_responses
from . import Samples


class HfSampler:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | str, synced_gpus: bool = False):
        self.model, self.tokenizer, self.device, self.synced_gpus = model, tokenizer, device, synced_gpus

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        return sample_responses(self.model, self.tokenizer, prompts, settings, seed, self.device, self.synced_gpus)

    def sync(self, model: Any) -> float:
        return 0.0  # it samples from the live model
