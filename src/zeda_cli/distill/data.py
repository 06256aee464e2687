"""Prompt sets, teacher-rollout files and the training batches built from them.

Prompts come from a local ``.jsonl`` (parsed here, for line-numbered errors), ``.json`` / ``.parquet`` (through
``datasets``), or a Hugging Face dataset id (``datasets.load_dataset``). A record holds ``messages`` (chat turns) or
``prompt`` (text). Rollouts are JSONL, one record per prompt, appended as they are generated so that a killed run
resumes without duplicates.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ..recipes import DataSection

PromptRecord = str | list[dict[str, str]]


def load_prompt_records(data: DataSection) -> list[PromptRecord]:
    if not data.prompts:
        raise BadInputError(
            "no prompt set given",
            expected="a .jsonl/.parquet file or a Hugging Face dataset id",
            fix="pass --prompts FILE (or set data.prompts in the recipe)",
        )
    rows = _read_rows(data)
    if not rows:
        raise BadInputError(f"prompt set {data.prompts} is empty", expected="at least one record", fix="check it")
    records = [_record(row, data, i) for i, row in enumerate(rows)]
    random.Random(data.shuffle_seed).shuffle(records)
    return records[: data.max_prompts] if data.max_prompts else records


def _read_rows(data: DataSection) -> list[dict[str, Any]]:
    path = Path(data.prompts).expanduser()
    if path.suffix == ".jsonl" or (path.exists() and path.suffix not in (".json", ".parquet")):
        return _read_jsonl(path)
    if path.exists():
        return _read_with_datasets("parquet" if path.suffix == ".parquet" else "json", str(path), "train")
    if path.suffix in (".json", ".parquet") or "/" not in data.prompts:
        raise BadInputError(
            f"prompt file {data.prompts} does not exist",
            expected="a .jsonl/.json/.parquet file or a Hub dataset id (org/name)",
            fix="check the path",
        )
    return _read_with_datasets(data.prompts, data.files, data.split)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise BadInputError(f"prompt file {path} does not exist", expected="a JSONL file", fix="check the path")
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(
                    f"{path.name} line {number} is not valid JSON ({err.msg})",
                    expected="one JSON object per line",
                    fix=f"fix line {number}",
                ) from err
            if not isinstance(row, dict):
                raise BadInputError(f"{path.name} line {number} is a {type(row).__name__}", expected="a JSON object")
            rows.append(row)
    return rows


def _read_with_datasets(name: str, files: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, data_files=files, split=split)
    except Exception as err:
        raise BadInputError(
            f"could not load prompts from {files or name} ({type(err).__name__}: {err})",
            expected="a readable dataset with a 'prompt' or 'messages' column",
            fix="check the file / dataset id and --split",
        ) from err
    return [dict(row) for row in dataset]


def _record(row: dict[str, Any], data: DataSection, index: int) -> PromptRecord:
    field = data.field or ("messages" if "messages" in row else "prompt")
    value = row.get(field)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value]
    raise BadInputError(
        f"prompt record {index} has no usable {field!r} (keys: {sorted(row)})",
        expected="a non-empty 'prompt' string or a 'messages' list of {role, content}",
        fix="fix the record or pick the column with data.field / --prompt-field",
    )


def render_prompt(record: PromptRecord, tokenizer: Any, chat_template: bool) -> str:
    """The text the model is conditioned on: chat template (generation prompt added) when there is one."""
    messages = record if isinstance(record, list) else [{"role": "user", "content": record}]
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(record, str):
        return record
    return "\n".join(m["content"] for m in messages)


def tokenize_prompts(records: list[Any], tokenizer: Any, data: DataSection) -> list[tuple[str, list[int]]]:
    """(rendered text, token ids) per prompt; the chat template already carries any special tokens."""
    out = []
    templated = data.chat_template and bool(getattr(tokenizer, "chat_template", None))
    for record in records:
        text = render_prompt(record, tokenizer, data.chat_template)
        out.append((text, tokenizer(text, add_special_tokens=not templated)["input_ids"]))
    return out


# --- rollouts ----------------------------------------------------------------------------------------------------
def read_rollouts(path: Path) -> list[dict[str, Any]]:
    """Complete records only: a line cut short by a killed writer is ignored (and rewritten on resume)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def rewrite_rollouts(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def append_rollouts(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- stage-1 batches ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SftExample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens; already aligned with input_ids (shifted inside collate)


def sft_examples(rollouts: list[dict[str, Any]], max_seq_len: int) -> list[SftExample]:
    examples = []
    for r in rollouts:
        ids = (r["prompt_ids"] + r["response_ids"])[:max_seq_len]
        n_prompt = min(len(r["prompt_ids"]), len(ids))
        labels = [-100] * n_prompt + ids[n_prompt:]
        if any(t != -100 for t in labels[1:]):
            examples.append(SftExample(ids, labels))
    return examples


def step_batches(n_examples: int, global_batch: int, epochs: int, seed: int) -> list[list[int]]:
    """Deterministic example indices of every optimizer step (a resumed run replays the same order)."""
    order: list[int] = []
    for epoch in range(epochs):
        perm = list(range(n_examples))
        random.Random(seed + epoch).shuffle(perm)
        order += perm
    return [order[i : i + global_batch] for i in range(0, len(order), global_batch) if order[i : i + global_batch]]


def collate_sft(examples: list[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; ``labels`` shifted so labels[:, t] is the target of position t."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, : n - 1] = torch.tensor(e.labels[1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def my_share(items: list[Any], rank: int, world: int) -> list[Any]:
    """This rank's contiguous block of a step's items (a step splits evenly: checked at start), so the ranks'
    micro-batches are those of one process cut in ``world`` parts."""
    size = len(items) // world
    return items[rank * size : (rank + 1) * size]


def micro_batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- stage-2 batches: prompt + sampled response ----------------------------------------------------------------
def special_ids(tokenizer: Any, model: Any) -> tuple[int, list[int]]:
    """(pad id, eos ids) from the model's generation config, falling back to the tokenizer."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad), eos_ids


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, S] left-padded prompt + right-padded response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # [B, S]: targets[:, t] = input_ids[:, t + 1] (last column padding)
    response_mask: torch.Tensor  # [B, S] float: 1 where targets[:, t] is a response token

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def response_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def sequence_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Prompts left-padded to one width, responses appended and right-padded; masks for attention and loss."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    width = max((len(r) for r in responses), default=0)
    r_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        if r:
            r_ids[i, : len(r)] = torch.tensor(r)
            r_mask[i, : len(r)] = 1
    ids = torch.cat([p_ids, r_ids], dim=1)
    mask = torch.cat([p_mask, r_mask], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1)
    response = torch.zeros_like(mask, dtype=torch.float32)
    response[:, p_ids.shape[1] - 1 : -1] = r_mask.float()  # position t predicts token t+1
    return SequenceBatch(ids, mask, position_ids, targets, response)
