"""Generation metrics and any other lm-evaluation-harness task, on zeda's in-memory models (``zeda eval --tasks``).

* ``agreement`` (zeda's own task): greedy continuations of held-out prompts, scored against the teacher's greedy
  continuations of the same prompts: ``prefix_tokens`` (tokens up to the first divergence), ``token_agreement``
  (that prefix over the longer continuation, 1.0 = identical), ``next_line_exact`` (the text up to the first newline
  identical) and ``exact_match``. The teacher's continuations come from the same task run on the teacher first.
* Any lm-eval task a user has data for: a built-in one re-pointed at local files (``--task-data gsm8k=test.jsonl``),
  or a user's own YAML (``--include-path DIR``).

The model is wrapped in lm-eval's ``HFLM`` as the object it is (static, dynamic, or with a baseline's routing hook
active), so nothing is loaded or fetched by name. Teacher and model run at the same batch size: greedy outputs can
move at float-noise level with the batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import extras
from ..errors import BadInputError

AGREEMENT = "agreement"
AGREEMENT_METRICS = ("token_agreement", "prefix_tokens", "next_line_exact", "exact_match")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def make_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """HFLM around a loaded model object. ``backend="causal"``: a dynamic model's type (``*_plus_plus``) is not in
    transformers' causal-LM name list, which HFLM would otherwise consult."""
    extras.require("lmeval", "zeda eval --tasks")
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    from lm_eval.models.huggingface import HFLM

    for name in ("lm_eval", "lm-eval"):  # its per-call chatter; zeda reports what ran
        logging.getLogger(name).setLevel(logging.ERROR)

    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                device=str(model.device))  # fmt: skip


def run_tasks(lm: Any, tasks: list[dict[str, Any] | str], include_path: Path | None, limit: int | None) -> dict:
    """lm-eval's ``simple_evaluate`` on ``lm``: fixed seeds, no environment report, quick standard errors."""
    import lm_eval.evaluator as evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    named = [t for t in tasks if isinstance(t, str)]
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=bool(named))
    saved, evaluator.add_env_info = evaluator.add_env_info, lambda results: None  # skips 2-4 s of subprocesses
    try:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                               bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                               fewshot_random_seed=0)  # fmt: skip
    finally:
        evaluator.add_env_info = saved


def summary(results: dict[str, Any], per_sample: bool = False) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value, metric_stderr: value, samples: n}}``; a task with several filters (gsm8k) gets
    ``metric/filter`` keys. ``per_sample`` adds the agreement task's metrics per prompt (``per_sample``: metric ->
    values in prompt order) for intervals over prompts."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," in key:
                metric, filt = key.split(",", 1)
                row[metric if filt == "none" else f"{metric}/{filt}"] = (
                    value if isinstance(value, int | float) else None
                )
        row["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
        if per_sample and task == AGREEMENT:
            samples = sorted((results.get("samples") or {}).get(task, []), key=lambda s: s["doc_id"])
            row["per_sample"] = {m: [float(s[m]) for s in samples] for m in AGREEMENT_METRICS}
        out[task] = row
    return out


# --- agreement with the teacher -----------------------------------------------------------------------------------
def _common_prefix(a: list[int] | str, b: list[int] | str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement_scores(student: str, teacher: str, tokenizer: Any) -> dict[str, float]:
    """The agreement metrics of one continuation (strings: lm-eval decodes; both are re-encoded for tokens)."""
    s_ids = tokenizer.encode(student, add_special_tokens=False)
    t_ids = tokenizer.encode(teacher, add_special_tokens=False)
    prefix = _common_prefix(s_ids, t_ids)
    longest = max(len(s_ids), len(t_ids))
    return {
        "token_agreement": 1.0 if longest == 0 else prefix / longest,
        "prefix_tokens": float(prefix),
        "next_line_exact": float(student.split("\n", 1)[0] == teacher.split("\n", 1)[0]),
        "exact_match": float(student == teacher),
    }


def agreement_task(prompts: Path, tokenizer: Any, max_new_tokens: int, name: str = AGREEMENT) -> dict[str, Any]:
    """The local ``generate_until`` task over a JSONL of ``{"prompt", "target"}`` (greedy; ends at EOS or
    ``max_new_tokens``)."""

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        return agreement_scores(results[0], doc.get("target") or "", tokenizer)

    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(prompts.resolve())}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": lambda doc: doc.get("target") or "", "target_delimiter": "", "num_fewshot": 0,
        "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False},
        "process_results": process_results, "metadata": {"version": 1},
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in AGREEMENT_METRICS],
    }  # fmt: skip


def teacher_targets(
    teacher_lm: Any, prompts: Path, out: Path, tokenizer: Any, max_new_tokens: int, limit: int | None
) -> Path:
    """The teacher's greedy continuations of (the first ``limit``) ``prompts``, as the ``target`` of each record."""
    task = agreement_task(prompts, tokenizer, max_new_tokens, "zeda_teacher_pass")
    results = run_tasks(teacher_lm, [task], None, limit)
    samples = sorted(results["samples"]["zeda_teacher_pass"], key=lambda s: s["doc_id"])
    with out.open("w", encoding="utf-8") as f:
        for sample in samples:
            record = {k: v for k, v in sample["doc"].items() if k != "target"}
            f.write(json.dumps({**record, "target": sample["filtered_resps"][0]}, ensure_ascii=False) + "\n")
    return out


# --- other tasks on local data ------------------------------------------------------------------------------------
def parse_task_data(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``NAME=FILE`` (the test split, also the few-shot source) or ``NAME:SPLIT=FILE`` -> {name: {split: file}}."""
    found: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, file = pair.partition("=")
        name, _, split = key.partition(":")
        path = Path(file).expanduser()
        if not sep or not name or not path.is_file() or path.suffix not in _BUILDERS:
            kinds = "/".join(_BUILDERS)
            raise BadInputError(f"--task-data {pair!r}", expected=f"NAME=FILE or NAME:SPLIT=FILE, an existing {kinds} "
                                "file", fix="e.g. --task-data gsm8k=gsm8k-test.jsonl")  # fmt: skip
        splits = found.setdefault(name, {})
        for s in [split] if split else ["test", "train"]:
            splits[s] = str(path.resolve())
    return found


def local_task(name: str, files: dict[str, str]) -> dict[str, Any]:
    """A built-in task's config re-pointed at local files (its ``!function`` hooks resolved)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = TaskManager().task_index.get(name)
    if entry is None or not getattr(entry, "yaml_path", None):
        raise BadInputError(f"lm-eval has no task {name!r}", expected="a task name of lm-eval 0.4.13 (e.g. gsm8k)",
                            fix="check the name, or pass your own YAML with --include-path")  # fmt: skip
    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    builder = _BUILDERS[Path(next(iter(files.values()))).suffix]
    return config | {"dataset_path": builder, "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def task_list(names: list[str], task_data: dict[str, dict[str, str]], agreement: dict[str, Any] | None) -> list:
    """What to pass to lm-eval: the agreement task's config, local-data configs, and plain names (user YAMLs)."""
    extras.require("lmeval", "zeda eval --tasks")
    out: list[dict[str, Any] | str] = []
    for name in names:
        if name == AGREEMENT:
            out.append(agreement)
        elif name in task_data:
            out.append(local_task(name, task_data[name]))
        else:
            out.append(name)
    return out


Scorer = Callable[[Any], dict[str, dict[str, Any]]]  # model object -> summary of every requested task
