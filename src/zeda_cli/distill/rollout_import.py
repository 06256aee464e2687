"""Rollouts a user already has (``data.rollouts``: a local JSONL / JSON / parquet file or a Hub dataset, e.g. a
released stage-1 set) in place of teacher generation, checked record by record and written in zeda's own format.

A record is one of:

* zeda's own: ``prompt_ids`` and ``response_ids`` (token ids; ``prompt`` / ``response`` text optional);
* text: ``prompt`` and ``response`` strings (the prompt is rendered like zeda's prompts, with the chat template
  when the recipe says so; the response is tokenized as it is and ended with EOS when ``finished`` is true);
* chat: ``messages``, a list of ``{role, content}`` whose last turn is the assistant's response.

A bad record is one error naming its line (or row) and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..recipes import DataSection
from .data import render_prompt, rewrite_rollouts


def _rows(source: str, files: str | None, split: str) -> list[tuple[int, Any]]:
    """(line number or row, parsed record) of every record; a line that is not JSON is an error here already."""
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix not in (".json", ".parquet")):
        if not path.is_file():
            raise BadInputError(f"rollout file {source} does not exist", expected="a JSONL file",
                                fix="check data.rollouts / --rollouts")  # fmt: skip
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise BadInputError(
                        f"{path.name} line {number} is not valid JSON ({err.msg})",
                        expected="one JSON object per line",
                        fix=f"fix line {number}",
                    ) from err
        return rows
    import datasets

    try:
        if path.is_file():
            dataset = datasets.load_dataset("parquet" if path.suffix == ".parquet" else "json", data_files=str(path),
                                            split="train")  # fmt: skip
        else:
            dataset = datasets.load_dataset(source, data_files=files, split=split)
    except Exception as err:
        raise BadInputError(f"could not load rollouts from {source} ({type(err).__name__}: {err})",
                            expected="a readable file or dataset of rollout records",
                            fix="check data.rollouts / data.rollouts_files") from err  # fmt: skip
    return [(i + 1, dict(row)) for i, row in enumerate(dataset)]


def _ids(value: Any, vocab: int) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value if all(0 <= t < vocab for t in value) else None
    return None


def normalize(row: Any, data: DataSection, tokenizer: Any, eos: int, vocab: int) -> dict[str, Any] | str:
    """A record in zeda's format, or what is wrong with it."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    if "prompt_ids" in row or "response_ids" in row:
        prompt, response = _ids(row.get("prompt_ids"), vocab), _ids(row.get("response_ids"), vocab)
        if prompt is None or response is None:
            return f"has prompt_ids / response_ids that are not lists of token ids in [0, {vocab})"
        text = (str(row.get("prompt", "")), str(row.get("response", "")))
    else:
        if isinstance(row.get("messages"), list) and row["messages"]:
            *turns, last = row["messages"]
            if not (
                isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str)
            ):
                return "has messages whose last turn is not an assistant message with text content"
            record: Any = [{"role": str(t.get("role", "user")), "content": str(t.get("content", ""))} for t in turns]
            answer = last["content"]
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            record, answer = row["prompt"], row["response"]
        else:
            return f"has neither prompt_ids/response_ids, prompt/response nor messages (keys: {sorted(row)[:8]})"
        rendered = render_prompt(record, tokenizer, data.chat_template)
        templated = data.chat_template and bool(getattr(tokenizer, "chat_template", None))
        prompt = tokenizer(rendered, add_special_tokens=not templated)["input_ids"]
        response = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if row.get("finished", True) and (not response or response[-1] != eos):
            response = [*response, eos]
        text = (rendered, answer)
    if not response:
        return "has an empty response"
    finished = bool(row.get("finished", bool(response) and response[-1] == eos))
    return {"prompt": text[0], "prompt_ids": prompt, "response": text[1], "response_ids": response,
            "finished": finished}  # fmt: skip


def import_rollouts(data: DataSection, tokenizer: Any, eos: int, vocab: int, out: Path) -> dict[str, Any]:
    """Check every record of ``data.rollouts`` and write them to ``out`` in zeda's format; returns the meta."""
    source = str(data.rollouts)
    rows = _rows(source, data.rollouts_files, data.split)
    if not rows:
        raise BadInputError(f"rollouts {source} hold no record", expected="at least one", fix="check the file")
    name = Path(source).name
    records = []
    for number, row in rows:
        record = normalize(row, data, tokenizer, eos, vocab)
        if isinstance(record, str):
            raise BadInputError(f"{name} line {number} {record}",
                                expected="prompt_ids + response_ids, prompt + response, or messages ending with the "
                                "assistant's response", fix=f"fix line {number} (or drop it)")  # fmt: skip
        records.append({"id": len(records), **record})
    limit = data.max_prompts
    records = records[:limit] if limit else records
    out.parent.mkdir(parents=True, exist_ok=True)
    rewrite_rollouts(out, records)
    digest = hashlib.sha256(json.dumps(records).encode()).hexdigest()
    meta = {"imported_from": source, "records": len(records), "sha256": digest}
    out.with_name(out.stem + ".meta.json").write_text(json.dumps(meta, indent=2))
    return meta
