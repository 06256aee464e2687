"""``zeda eval``: held-out NLL, agreement with the teacher, zero-slot share and expert FLOPs of an MoE.

The default teacher is the original static model: for a distilled folder the one its run's lineage names (its
weights moved in training); for an untrained injection, or a baseline, the same weights with the zero experts
masked (the official ``use_zce_mask``) or the baseline switched off, so no second copy is loaded. The metrics are
described in :mod:`zeda_cli.evaluate.scoring`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import ResolvedConfig
from ..errors import BadInputError
from ..model_ref import ModelRef, as_model
from ..recipes import EvalSection
from ..runs import find_file, lineage, original_teacher, read_manifest, write_manifest
from ..runtime.loading import load_model, load_tokenizer, resolve_device
from ..runtime.zeda_dynamic_moe import set_zero_expert_bias, zero_experts_masked
from .baselines import BaselineRouting, calibrate, runtime_form
from .calibration import calibrate_bias
from .data import CALIBRATION_CANDIDATES, HELDOUT, Batch, make_batches, pad_id_of, read_texts, tokenize
from .flops import ExpertFlops
from .gates import check_gates, gate_summary
from .scoring import TeacherFn, evaluate_batches, summarize
from .tasks import (
    AGREEMENT,
    Scorer,
    agreement_task,
    make_lm,
    parse_task_data,
    run_tasks,
    summary,
    task_list,
    teacher_targets,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_PROMPTS = "data/prompts-heldout.jsonl"


def _forward(model: nn.Module, context: Callable[[], Any] = nullcontext) -> TeacherFn:
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with context():
            return model(input_ids=ids, attention_mask=mask).logits

    return run


def _measure(
    net: nn.Module,
    rc: ResolvedConfig,
    folder: Path,
    settings: EvalSection,
    routing: BaselineRouting | None,
    tokenizer: Any,
    batches: Sequence[Batch],
    calibration: Sequence[Batch],
    stack: ExitStack,
    track: Callable[[Sequence[Batch], str], Any] | None,
    log: Callable[[str], None],
    per_record: bool = False,
    **load: Any,
) -> dict[str, Any]:
    """Everything measured on the loaded model: the baseline's calibration, NLL / KL / routing against the teacher,
    the lm-eval tasks, and the curve; keys of the eval result (``tasks`` / ``curve`` only when asked for)."""
    baseline = _calibrate(routing, settings, calibration, rc.num_experts, log) if routing is not None else None
    reference = _teacher(net, folder, rc, settings, routing, **load)
    teacher = reference.logits() if reference else None
    tracked = (lambda b: track(b, "evaluating")) if track else iter
    scores, tally = evaluate_batches(net, batches, rc.num_experts, teacher, tracked)
    flops = ExpertFlops.of(rc)
    out = {"teacher": reference and reference.name,
           **summarize(scores, tally, flops, teacher is not None, per_record), "baseline": baseline}  # fmt: skip
    scorer = task_scorer(settings, folder, tokenizer, reference, stack, log, per_record) if settings.tasks else None
    if scorer is not None:
        out["tasks"] = scorer(net)
    if settings.sweep_bias:
        out["curve"] = sweep(net, routing, settings, batches, calibration, teacher, flops, rc.num_experts, scorer, log,
                             per_record)  # fmt: skip
    return out


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """Evaluation dtype: ``auto`` is float32 on CPU and the checkpoint's own dtype on GPU."""
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def run_eval(
    model: ModelRef | str,
    settings: EvalSection,
    track: Callable[[Sequence[Batch], str], Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
    per_record: bool = False,
) -> dict[str, Any]:
    """Evaluate a static or dynamic MoE (or a baseline on the static one); returns the JSON-able result.
    ``per_record`` adds each held-out record's sums (and the agreement task's per-prompt metrics) to the result and
    to every curve point: what intervals over records are computed from (benchmarks/quality.py)."""
    ref = as_model(model)
    rc, folder = ref.rc, ref.folder
    data_path, texts, calibration_path, calibration_texts = _inputs(folder, settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tokenizer = load_tokenizer(folder, *([settings.teacher] if settings.teacher else []))
    batches = _batches(texts, tokenizer, settings, data_path)
    calibration = _batches(calibration_texts, tokenizer, settings, calibration_path) if calibration_path else []
    masked = True if settings.baseline else None  # baselines thin the static routing of a dynamic folder
    net = load_model(
        folder, dtype=dtype, device=device, zero_expert_bias=settings.zero_expert_bias, use_zce_mask=masked
    )
    runtime_form(net, rc.adapter.router_spec(rc.hf), int(rc.hf.hidden_size))
    started = time.perf_counter()
    with _baseline_routing(net, settings) as routing, ExitStack() as stack:
        measured = _measure(net, rc, folder, settings, routing, tokenizer, batches, calibration, stack, track, log,
                            per_record, dtype=dtype, device=device)  # fmt: skip
    if measured["baseline"] is not None:
        measured["baseline"]["calibration_data"] = str(calibration_path)
    result = {
        "ok": True, "model": ref.source.spec, "kind": _kind(rc, settings), "teacher": measured.pop("teacher"),
        "data": str(data_path), "samples": sum(ids.shape[0] for ids, _ in batches), "max_length": settings.max_length,
        **measured, "device": str(device), "dtype": str(next(net.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    if settings.has_gates:
        result["gates"] = gate_summary(check_gates(result, settings))
        result["ok"] = result["gates"]["passed"]
    result["recorded_in"] = _record(folder, result, settings) if ref.source.repo_id is None else None
    return result


def _inputs(folder: Path, settings: EvalSection) -> tuple[Path, list[str], Path | None, list[str]]:
    """Read the evaluation (and calibration) texts before any weights are loaded."""
    data = settings.data or find_file(folder, [HELDOUT])
    if data is None:
        raise BadInputError(
            f"no evaluation data given and {folder} has no {HELDOUT}",
            expected='--data FILE, a JSONL file with one {"text": ...} record per line',
            fix="pass --data FILE",
        )
    texts = read_texts(data)[: settings.max_samples]
    if settings.baseline is None and not settings.sweep_bias:
        return data, texts, None, []
    calibration = settings.calibration or find_file(folder, CALIBRATION_CANDIDATES)
    if calibration is None:
        raise BadInputError(
            f"{'the ' + settings.baseline + ' baseline' if settings.baseline else '--sweep-bias'} needs calibration "
            f"texts and {folder} has none",
            expected=f'--calibration FILE (JSONL, "text" or "prompt" records) or one of {CALIBRATION_CANDIDATES}',
            fix="pass --calibration FILE with texts that are not the evaluation texts",
        )
    if calibration.resolve() == data.resolve():
        raise BadInputError(
            f"calibration and evaluation texts are the same file ({data})",
            expected="calibration texts disjoint from the held-out evaluation texts",
            fix="pass another --calibration FILE (e.g. training text or the prompts file)",
        )
    calibration_texts = read_texts(calibration, ("text", "prompt"), "calibration file")
    return data, texts, calibration, calibration_texts[: settings.calibration_samples]


def _batches(texts: Sequence[str], tokenizer: Any, settings: EvalSection, path: Path | None) -> list[Batch]:
    sequences = tokenize(texts, tokenizer, settings.max_length)
    if not sequences:
        raise BadInputError(
            f"no record of {path} has 2 tokens or more", expected="texts to predict", fix="pass another file"
        )
    return make_batches(sequences, settings.batch_size, pad_id_of(tokenizer))


def sweep(
    net: nn.Module,
    routing: BaselineRouting | None,
    settings: EvalSection,
    batches: Sequence[Batch],
    calibration: Sequence[Batch],
    teacher: TeacherFn | None,
    flops: ExpertFlops,
    n: int,
    scorer: Scorer | None,
    log: Callable[[str], None],
    per_record: bool = False,
) -> list[dict[str, Any]]:
    """The quality-vs-FLOPs curve: at each of ``settings.budgets`` (kept share of the expert FLOPs), the routing
    parameter is calibrated on the calibration texts (a dynamic model's zero_expert_bias, or the baseline's), then
    the model is scored on the evaluation texts. The model's own setting is restored afterwards."""
    saved = routing.param if routing is not None else float(getattr(net.config, "zero_expert_bias", 0.0) or 0.0)
    points = []
    try:
        for budget in settings.budgets:
            if routing is not None:
                found = calibrate(routing, budget, calibration, n)
            else:
                found = calibrate_bias(net, budget, calibration, n)
            scores, tally = evaluate_batches(net, batches, n, teacher)
            point = summarize(scores, tally, flops, teacher is not None, per_record)
            if scorer is not None:
                point["tasks"] = scorer(net)
            points.append({"budget": budget, **point, "calibration": found.to_dict()})
            log(f"sweep: {found.param_name}={found.param:.4f} -> expert FLOPs {point['expert_flops_ratio']:.3f}, "
                f"NLL {point['heldout_nll']:.4f}")  # fmt: skip
    finally:
        if routing is not None:
            routing.param = saved
        else:
            set_zero_expert_bias(net, saved)
    return points


def task_scorer(
    settings: EvalSection,
    folder: Path,
    tokenizer: Any,
    reference: Reference | None,
    stack: ExitStack,
    log: Callable[[str], None],
    per_sample: bool = False,
) -> Scorer:
    """A function scoring a model on ``settings.tasks`` with lm-eval; for the agreement task the teacher's
    continuations are generated once, here, and reused by every call."""
    agreement = None
    if AGREEMENT in settings.tasks:
        prompts = _generation_prompts(folder, settings)
        if reference is None:
            raise BadInputError(
                "--tasks agreement compares with a teacher and this static model has none",
                expected="--teacher ORIGINAL, a dynamic model, or --baseline",
                fix="pass --teacher",
            )
        targets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zeda-agreement-"))) / "targets.jsonl"
        with reference.context():
            lm = make_lm(reference.model, tokenizer, settings.batch_size)
            teacher_targets(lm, prompts, targets, tokenizer, settings.max_new_tokens, settings.limit)
        log(f"agreement: the teacher's greedy continuations of {prompts} ({settings.max_new_tokens} tokens)")
        agreement = agreement_task(targets, tokenizer, settings.max_new_tokens)
    tasks = task_list(settings.tasks, parse_task_data(settings.task_data), agreement)

    def score(model: nn.Module) -> dict[str, dict[str, Any]]:
        try:
            results = run_tasks(make_lm(model, tokenizer, settings.batch_size), tasks, settings.include_path,
                                settings.limit)  # fmt: skip
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise BadInputError(f"lm-eval could not run {', '.join(settings.tasks)} ({type(err).__name__}: {err})",
                                expected="task names lm-eval knows, with their data on this machine",
                                fix="check --tasks, --task-data and --include-path") from err  # fmt: skip
        return summary(results, per_sample)

    return score


def _generation_prompts(folder: Path, settings: EvalSection) -> Path:
    prompts = settings.gen_prompts or find_file(folder, [GENERATION_PROMPTS])
    if prompts is None:
        raise BadInputError(f"--tasks agreement needs prompts and {folder} has no {GENERATION_PROMPTS}",
                            expected='--gen-prompts FILE, JSONL with one {"prompt": ...} per line',
                            fix="pass --gen-prompts FILE")  # fmt: skip
    return prompts


@contextmanager
def _baseline_routing(model: nn.Module, settings: EvalSection) -> Iterator[BaselineRouting | None]:
    if settings.baseline is None:
        yield None
        return
    with BaselineRouting(model, settings.baseline, 1.0, settings.renorm, settings.seed) as routing:
        yield routing


def _calibrate(
    routing: BaselineRouting, settings: EvalSection, batches: Sequence[Batch], num_experts: int, log: Callable
) -> dict[str, Any]:
    name = routing.method.param

    def step(value: float, share: float) -> None:
        log(f"calibrating {routing.method.name}: {name}={value:.5f} keeps {share:.4f} of the slots")

    calibration = calibrate(routing, settings.budget, batches, num_experts, on_step=step)
    log(f"{routing.method.name}: {name}={calibration.param:.5f} (kept {calibration.kept_share:.4f}, "
        f"target {settings.budget})")  # fmt: skip
    return calibration.to_dict() | {"renorm": settings.renorm, "seed": settings.seed}


@dataclass(frozen=True)
class Reference:
    """The teacher: a model object and the context that makes it the original (nullcontext for a separate model;
    the baseline switched off, or the zero experts masked, when it is the evaluated model's own weights)."""

    model: nn.Module
    context: Callable[[], Any]
    name: str

    def logits(self) -> TeacherFn:
        return _forward(self.model, self.context)


def _teacher(
    model: nn.Module,
    folder: Path,
    rc: ResolvedConfig,
    settings: EvalSection,
    routing: BaselineRouting | None,
    *,
    dtype: Any,
    device: torch.device,
) -> Reference | None:
    if settings.teacher:
        return Reference(load_model(settings.teacher, dtype=dtype, device=device), nullcontext, settings.teacher)
    if routing is not None:
        return Reference(model, routing.disabled, "the static model (same weights, baseline off)")
    if rc.dynamic:
        spec = original_teacher(lineage(folder))
        if spec is not None and not (spec.masked and Path(spec.path).resolve() == folder.resolve()):
            teacher = load_model(spec.path, dtype=dtype, device=device, use_zce_mask=spec.masked or None)
            return Reference(teacher, nullcontext, f"{spec.path} (the original, from the run's manifests)")
        how = "" if spec is not None else "; no zeda manifest: exact only for an untrained injection, else --teacher"
        return Reference(model, lambda: zero_experts_masked(model), f"the static model (zero experts masked{how})")
    return None


def _kind(rc: ResolvedConfig, settings: EvalSection) -> str:
    if settings.baseline:
        return f"baseline {settings.baseline} on the static model"
    return "dynamic" if rc.dynamic else "static"


def _record(folder: Path, result: dict[str, Any], settings: EvalSection) -> str | None:
    """Put the result into the folder's zeda.json (other metrics kept); None when there is none or no --record."""
    manifest = read_manifest(folder) if settings.record else None
    if manifest is None:
        return None
    if settings.baseline:
        key = f"{settings.baseline}@{settings.budget:g}"
        manifest.metrics.setdefault("baselines", {})[key] = result
        where = f"metrics.baselines[{key!r}]"
    else:
        manifest.metrics["eval"] = result
        where = "metrics.eval"
    write_manifest(folder, manifest)
    return f"{folder / 'zeda.json'} ({where})"
