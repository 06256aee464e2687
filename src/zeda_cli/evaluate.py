"""``zeda eval``: held-out NLL, agreement with the teacher, zero-slot share and expert FLOPs of an MoE.

The default teacher is the original static model: for a distilled folder the one its zeda manifests name (its
weights moved in training); for an untrained injection, or a baseline, the same weights with the zero experts
masked (the official ``use_zce_mask``) or the baseline switched off, so no second copy is loaded. Metrics are
sums over the predicted (non-padding) tokens of all batches:

* ``heldout_nll`` / ``perplexity``: mean token cross-entropy of the model on the texts;
* against the teacher: ``kl_to_teacher`` = mean KL(teacher || model) over the vocabulary per token,
  ``top1_agreement``, ``teacher_nll`` and ``nll_delta_pct`` = 100 * (heldout_nll - teacher_nll) / teacher_nll;
* ``zero_share``: share of the routed top-K slots skipped (zero experts, or dropped by a baseline), overall and per
  MoE layer; ``expert_flops_ratio`` = routed-expert FLOPs per token / the static top-K's (= 1 - zero_share). The
  always-on shared expert, if any, is reported on its own line and never enters the ratio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import ResolvedConfig, resolve_config
from .baselines import BaselineRouting, RoutingTally, calibrate, check_budget, get_method, runtime_form
from .checkpoint import read_config_json, resolve_source
from .errors import BadInputError, ZedaError, raise_all
from .eval_data import (
    CALIBRATION_CANDIDATES,
    HELDOUT,
    Batch,
    default_file,
    load_tokenizer,
    make_batches,
    pad_id_of,
    read_texts,
    tokenize,
)
from .flop_count import MatmulFlopCounter
from .manifest import read_manifest, write_manifest
from .runtime.zeda_dynamic_moe import RoutingRecorder, routers

TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvalSettings:
    data: Path | None = None  # default: data/heldout.jsonl of the model folder or of the folder it was made from
    teacher: str | None = None
    max_samples: int | None = None
    max_length: int = 512
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    zero_expert_bias: float | None = None
    baseline: str | None = None
    budget: float = 0.5
    renorm: str = "kept"
    calibration: Path | None = None
    calibration_samples: int = 256
    seed: int = 0
    record: bool = True  # write the result into the folder's zeda.json

    def check(self) -> None:
        problems: list[ZedaError] = []
        for name, low in (("max_samples", 1), ("max_length", 2), ("batch_size", 1), ("calibration_samples", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                flag = "--" + name.replace("_", "-")
                problems.append(BadInputError(f"{flag} {value} is too small", expected=f"{flag} >= {low}"))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(BadInputError(f"--device {self.device!r} is unknown", expected="auto, cpu or cuda"))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            problems.append(BadInputError(f"--dtype {self.dtype!r} is unknown", expected=f"auto, {', '.join(DTYPES)}"))
        for check in (lambda: self.baseline is None or get_method(self.baseline), lambda: check_budget(self.budget)):
            try:
                check()
            except ZedaError as err:
                problems.append(err)
        if self.renorm not in ("kept", "none"):
            problems.append(BadInputError(f"--renorm {self.renorm!r} is unknown", expected="kept or none"))
        raise_all(problems)


# --- scoring -----------------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """Sums over predicted tokens; the teacher's are left at 0 when there is no teacher."""

    tokens: int = 0
    nll: float = 0.0
    teacher_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def add(self, logits: torch.Tensor, teacher: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor) -> None:
        valid = mask[:, 1:].bool()
        targets = ids[:, 1:][valid]
        student = logits[:, :-1][valid]
        if teacher is not None and teacher.shape[-1] != logits.shape[-1]:
            raise BadInputError(
                f"the teacher has {teacher.shape[-1]} logits per token, the model {logits.shape[-1]}",
                expected="a teacher with the model's tokenizer and vocabulary",
                fix="pass the original model of this one as --teacher",
            )
        reference = teacher[:, :-1][valid] if teacher is not None else None
        for start in range(0, targets.numel(), 2048):  # bounded memory for large vocabularies
            rows = slice(start, start + 2048)
            self._add_rows(student[rows], None if reference is None else reference[rows], targets[rows])

    def _add_rows(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor) -> None:
        logp = F.log_softmax(student.float(), dim=-1)
        self.tokens += targets.numel()
        self.nll -= float(logp.gather(1, targets[:, None]).sum())
        if teacher is None:
            return
        logq = F.log_softmax(teacher.float(), dim=-1)
        self.teacher_nll -= float(logq.gather(1, targets[:, None]).sum())
        self.kl += float(F.kl_div(logp, logq, reduction="sum", log_target=True))
        self.agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())


def evaluate_batches(
    model: nn.Module,
    batches: Sequence[Batch],
    num_experts: int,
    teacher: TeacherFn | None = None,
    track: Callable[[Sequence[Batch]], Any] = iter,
) -> tuple[Scores, RoutingTally]:
    """Score ``model`` (in runtime form) on ``batches``; the teacher's forward passes are not recorded."""
    scores, tally = Scores(), RoutingTally(num_experts)
    device = next(model.parameters()).device
    with RoutingRecorder(model) as recorder, torch.no_grad():
        for ids, mask in track(batches):
            ids, mask = ids.to(device), mask.to(device)
            reference = teacher(ids, mask) if teacher is not None else None
            recorder.clear()
            logits = model(input_ids=ids, attention_mask=mask).logits
            tally.add(recorder.records, mask)
            scores.add(logits, reference, ids, mask)
            recorder.clear()
    return scores, tally


# --- expert FLOPs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertFlops:
    per_expert: int  # one routed expert on one token: gate, up and down projections, 2 FLOPs per multiply-add
    moe_layers: int
    top_k: int
    shared_per_token: int | None  # always-on shared expert(s), all MoE layers

    @classmethod
    def of(cls, rc: ResolvedConfig) -> ExpertFlops:
        hidden, adapter = int(rc.hf.hidden_size), rc.adapter
        shared = None
        if adapter.shared_expert is not None:
            shared = 2 * 3 * hidden * adapter.shared_expert.intermediate(rc.hf) * len(rc.moe_layers)
        return cls(2 * 3 * hidden * adapter.expert_intermediate(rc.hf), len(rc.moe_layers), rc.top_k, shared)

    @property
    def static_per_token(self) -> int:
        return self.per_expert * self.top_k * self.moe_layers


def measured_expert_flops(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Matmul FLOPs really executed inside the routed-experts modules during one forward (a cross-check)."""
    experts = [m for m in model.modules() if any(c.__name__ == "ZeroSkippingExperts" for c in type(m).__mro__)]
    starts: dict[int, int] = {}
    total = 0
    with MatmulFlopCounter() as counter, torch.no_grad():

        def before(module: nn.Module, args: Any) -> None:
            starts[id(module)] = counter.total

        def after(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal total
            total += counter.total - starts.pop(id(module))

        handles = [h for m in experts for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
    return total


def summarize(scores: Scores, tally: RoutingTally, flops: ExpertFlops, has_teacher: bool) -> dict[str, Any]:
    n = max(scores.tokens, 1)
    nll = scores.nll / n
    out: dict[str, Any] = {"tokens": scores.tokens, "heldout_nll": nll, "perplexity": math.exp(min(nll, 700.0))}
    if has_teacher:
        teacher_nll = scores.teacher_nll / n
        out |= {
            "teacher_nll": teacher_nll,
            "teacher_perplexity": math.exp(min(teacher_nll, 700.0)),
            "nll_delta_pct": 100.0 * (nll - teacher_nll) / teacher_nll if teacher_nll else None,
            "kl_to_teacher": scores.kl / n,
            "top1_agreement": scores.agree / n,
        }
    kept = 1.0 - tally.share
    return out | {
        "zero_share": tally.share,
        "zero_share_per_layer": tally.per_layer(),
        "expert_flops_per_token": kept * flops.static_per_token,
        "static_expert_flops_per_token": flops.static_per_token,
        "expert_flops_ratio": kept,
        "shared_expert_flops_per_token": flops.shared_per_token,
    }


# --- the command ---------------------------------------------------------------------------------------------------
@contextmanager
def zero_experts_masked(model: nn.Module) -> Iterator[None]:
    """The dynamic model with its zero experts masked: exactly the original static model (``use_zce_mask``)."""
    found = [router for _, router in routers(model)]
    saved = [router.mask_zero_experts for router in found]
    for router in found:
        router.mask_zero_experts = True
    try:
        yield
    finally:
        for router, value in zip(found, saved, strict=True):
            router.mask_zero_experts = value


def _forward(model: nn.Module, context: Callable[[], Any] = nullcontext) -> TeacherFn:
    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with context():
            return model(input_ids=ids, attention_mask=mask).logits

    return run


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device} but no CUDA GPU is visible", expected="a GPU", fix="use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def run_eval(
    model_spec: str,
    settings: EvalSettings,
    track: Callable[[Sequence[Batch], str], Any] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate a static or dynamic MoE (or a baseline on the static one); returns the JSON-able result."""
    settings.check()
    source = resolve_source(model_spec)
    rc = resolve_config(read_config_json(source.folder))
    data_path, texts, calibration_path, calibration_texts = _inputs(source.folder, settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    teacher_folders = [resolve_source(settings.teacher).folder] if settings.teacher else []
    tokenizer = load_tokenizer([source.folder, *teacher_folders], rc.hf)
    batches = _batches(texts, tokenizer, settings, data_path)
    calibration = _batches(calibration_texts, tokenizer, settings, calibration_path) if settings.baseline else []
    from .modeling import load_model

    masked = True if settings.baseline else None  # baselines thin the static routing of a dynamic folder
    model = load_model(
        source.folder, dtype=dtype, device=device, zero_expert_bias=settings.zero_expert_bias, use_zce_mask=masked
    )
    runtime_form(model, rc.adapter.router_spec(rc.hf), int(rc.hf.hidden_size))
    started = time.perf_counter()
    with _baseline_routing(model, settings) as routing:
        baseline = None
        if routing is not None:
            baseline = _calibrate(routing, settings, calibration, rc.num_experts, log)
            baseline["calibration_data"] = str(calibration_path)
        teacher, teacher_name = _teacher(model, source.folder, rc, settings, routing, dtype, device)
        tracked = (lambda b: track(b, "evaluating")) if track else iter
        scores, tally = evaluate_batches(model, batches, rc.num_experts, teacher, tracked)
    result = {
        "ok": True, "model": model_spec, "kind": _kind(rc, settings), "teacher": teacher_name,
        "data": str(data_path), "samples": sum(ids.shape[0] for ids, _ in batches), "max_length": settings.max_length,
        **summarize(scores, tally, ExpertFlops.of(rc), teacher is not None), "baseline": baseline,
        "device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    result["recorded_in"] = _record(source.folder, result, settings) if source.repo_id is None else None
    return result


def _inputs(folder: Path, settings: EvalSettings) -> tuple[Path, list[str], Path | None, list[str]]:
    """Read the evaluation (and calibration) texts before any weights are loaded."""
    data = settings.data or default_file(folder, [HELDOUT])
    if data is None:
        raise BadInputError(
            f"no evaluation data given and {folder} has no {HELDOUT}",
            expected='--data FILE, a JSONL file with one {"text": ...} record per line',
            fix="pass --data FILE",
        )
    texts = read_texts(data)[: settings.max_samples]
    if settings.baseline is None:
        return data, texts, None, []
    calibration = settings.calibration or default_file(folder, CALIBRATION_CANDIDATES)
    if calibration is None:
        raise BadInputError(
            f"the {settings.baseline} baseline needs calibration texts and {folder} has none",
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


def _batches(texts: Sequence[str], tokenizer: Any, settings: EvalSettings, path: Path | None) -> list[Batch]:
    sequences = tokenize(texts, tokenizer, settings.max_length)
    if not sequences:
        raise BadInputError(
            f"no record of {path} has 2 tokens or more", expected="texts to predict", fix="pass another file"
        )
    return make_batches(sequences, settings.batch_size, pad_id_of(tokenizer))


@contextmanager
def _baseline_routing(model: nn.Module, settings: EvalSettings) -> Iterator[BaselineRouting | None]:
    if settings.baseline is None:
        yield None
        return
    with BaselineRouting(model, settings.baseline, 1.0, settings.renorm, settings.seed) as routing:
        yield routing


def _calibrate(
    routing: BaselineRouting, settings: EvalSettings, batches: Sequence[Batch], num_experts: int, log: Callable
) -> dict[str, Any]:
    name = routing.method.param

    def step(value: float, share: float) -> None:
        log(f"calibrating {routing.method.name}: {name}={value:.5f} keeps {share:.4f} of the slots")

    calibration = calibrate(routing, settings.budget, batches, num_experts, on_step=step)
    log(f"{routing.method.name}: {name}={calibration.param:.5f} (kept {calibration.kept_share:.4f}, "
        f"target {settings.budget})")  # fmt: skip
    return calibration.to_dict() | {"renorm": settings.renorm, "seed": settings.seed}


def _teacher(
    model: nn.Module,
    folder: Path,
    rc: ResolvedConfig,
    settings: EvalSettings,
    routing: BaselineRouting | None,
    dtype: Any,
    device: torch.device,
) -> tuple[TeacherFn | None, str | None]:
    if settings.teacher:
        from .modeling import load_model

        return _forward(load_model(settings.teacher, dtype=dtype, device=device)), settings.teacher
    if routing is not None:
        return _forward(model, routing.disabled), "the static model (same weights, baseline off)"
    if rc.dynamic:
        from .distill.job import lineage_teacher

        spec = lineage_teacher(folder)
        if spec is not None and not (spec.masked and Path(spec.path).resolve() == folder.resolve()):
            from .modeling import load_model

            teacher = load_model(spec.path, dtype=dtype, device=device, use_zce_mask=spec.masked or None)
            return _forward(teacher), f"{spec.path} (the original, from the run's manifests)"
        how = "" if spec is not None else "; no zeda manifest: exact only for an untrained injection, else --teacher"
        return _forward(model, lambda: zero_experts_masked(model)), f"the static model (zero experts masked{how})"
    return None, None


def _kind(rc: ResolvedConfig, settings: EvalSettings) -> str:
    if settings.baseline:
        return f"baseline {settings.baseline} on the static model"
    return "dynamic" if rc.dynamic else "static"


def _record(folder: Path, result: dict[str, Any], settings: EvalSettings) -> str | None:
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
