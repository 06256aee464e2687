"""Evaluation texts: JSONL reading with one clear error per mistake, tokenising, batching."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError

JSONL_SHAPE = 'a JSONL file with one {"text": "..."} record per line'
HELDOUT = "data/heldout.jsonl"
# Calibration texts for the baselines: never the held-out evaluation texts.
CALIBRATION_CANDIDATES = ("data/calibration.jsonl", "data/prompts.jsonl", "data/train.jsonl")
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), both [batch, length]


def read_texts(path: Path, keys: Sequence[str] = ("text",), what: str = "data file") -> list[str]:
    """The text of every record; raises BadInputError for a missing, empty or malformed file."""
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise BadInputError(f"{what} {path} {state}", expected=JSONL_SHAPE, fix="check the path")
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                texts.append(_record_text(path, lineno, line, keys))
    if not texts:
        raise BadInputError(f"{what} {path} is empty", expected=JSONL_SHAPE, fix="add records or pick another file")
    return texts


def _record_text(path: Path, lineno: int, line: str, keys: Sequence[str]) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(
            f"{path}:{lineno} is not valid JSON ({err.msg})", expected=JSONL_SHAPE, fix="fix or remove that line"
        ) from err
    value = next((record[k] for k in keys if isinstance(record, dict) and k in record), None)
    if not isinstance(value, str):
        names = " or ".join(f'"{k}"' for k in keys)
        raise BadInputError(
            f"{path}:{lineno} has no string field {names}", expected=JSONL_SHAPE, fix="fix or remove that line"
        )
    return value


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``; texts under 2 tokens (nothing to predict) are dropped."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"] if len(ids) >= 2]


def make_batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Right-padded batches of similar lengths (sorted longest first), with their attention masks."""
    ordered = sorted(sequences, key=len, reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append((ids, mask))
    return batches


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
