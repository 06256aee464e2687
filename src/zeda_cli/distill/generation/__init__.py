"""Who samples during distillation, behind one contract, :class:`Sampler`: the teacher's stage-1 rollouts and the
student's stage-2 samples come from transformers' ``generate`` in the training process (:mod:`.hf`) or from a vLLM
engine in its own environment, driven over local HTTP (:mod:`.vllm`). The recipe's ``generation`` section picks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from ...recipes import GenerationSection, RuntimeSection
from ...runs import TeacherSpec, lineage, origin_of
from ...runtime.loading import load_tokenizer
from ..sampling import SamplingSettings

Samples = list[tuple[list[int], bool]]  # per prompt: (response token ids up to and including EOS, finished)


class Sampler(Protocol):
    """The contract of a generation engine.

    * ``sample(prompts, settings, seed)`` returns one response per prompt (a prompt listed twice gets two
      independent samples), deterministic for a given seed and engine.
    * ``sync(model)`` makes the engine sample from ``model``'s current weights (after an optimizer step); returns the
      seconds it took (0 where the engine samples from the training model itself).
    """

    name: str

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples: ...
    def sync(self, model: Any) -> float: ...


def engine_dtype(generation: GenerationSection, runtime: RuntimeSection) -> str:
    """The engine samples in the trainer's precision unless the recipe says otherwise."""
    if generation.dtype != "auto":
        return generation.dtype
    from ...runtime.loading import resolve_device
    from ..state import compute_dtype

    return str(compute_dtype(runtime, resolve_device(runtime.device))).removeprefix("torch.")


def static_folder(teacher: TeacherSpec) -> tuple[str, dict[str, Any]]:
    """What a vLLM engine serves for the static teacher: the original folder when it is on disk (stock vLLM), else
    the injected folder with its zero experts masked (zeda-vllm; exactly the original)."""
    if not teacher.masked:
        return teacher.path, {}
    origin = origin_of(lineage(Path(teacher.path))).get("folder")
    return (str(origin), {}) if origin and Path(origin).is_dir() else (teacher.path, {"use_zce_mask": True})


def engine_spec(
    folder: str,
    generation: GenerationSection,
    runtime: RuntimeSection,
    prompts: Callable[[], list[list[int]]],
    max_new_tokens: int,
    log: Path,
    hf_overrides: dict[str, Any] | None = None,
) -> Any:
    """The vLLM engine for ``folder``: the trainer's precision and a context fitting the prompts (tokenized only
    when the recipe does not set ``max_model_len``)."""
    from .vllm import EngineSpec, model_len

    length = generation.max_model_len or model_len(prompts(), max_new_tokens)
    return EngineSpec(folder, engine_dtype(generation, runtime), length, log, hf_overrides or {})


@contextmanager
def teacher_sampler(
    teacher: TeacherSpec,
    runtime: RuntimeSection,
    generation: GenerationSection,
    prompts: list[list[int]],
    max_new_tokens: int,
    log_dir: Path,
) -> Iterator[Sampler]:
    """The frozen teacher as a sampler (rollouts): loaded here (hf), or served by a vLLM engine for the block."""
    if generation.engine == "hf":
        from ...runtime.loading import load_model, resolve_device
        from ..state import compute_dtype
        from .hf import HfSampler

        device = resolve_device(runtime.device)
        model = load_model(teacher.path, dtype=compute_dtype(runtime, device), use_zce_mask=teacher.masked or None)
        yield HfSampler(model.to(device), load_tokenizer(teacher.path), device)
        return
    from .vllm import ENGINE_LOG, VllmSampler, running_engine

    folder, overrides = static_folder(teacher)
    spec = engine_spec(folder, generation, runtime, lambda: prompts, max_new_tokens, log_dir / ENGINE_LOG, overrides)
    with running_engine(spec, generation) as client:
        yield VllmSampler(client, probe_prompt=prompts[0] if prompts else [], tolerance=0.0)


def probe_tolerance(dtype: str) -> float:
    """How far the engine's log-probs may be from the trainer's after a sync (fp32: the issue's 1e-3)."""
    return 1e-3 if dtype == "float32" else 5e-2


@contextmanager
def student_engine(job: Any, prompts: Callable[[], list[list[int]]]) -> Iterator[str | None]:
    """Stage 2 with ``generation.engine: vllm``: the engine serving the student for the whole stage (its URL), started
    in the process that launches the ranks; ``None`` for ``hf`` (``prompts`` is then never called)."""
    generation = job.recipe.generation
    if job.stage != 2 or generation.engine == "hf":
        yield None
        return
    from .vllm import ENGINE_LOG, running_engine

    log = Path(job.out) / ENGINE_LOG
    spec = engine_spec(job.student, generation, job.recipe.runtime, prompts, job.recipe.stage2.max_new_tokens, log)
    with running_engine(spec, generation) as client:
        yield client.url


def student_sampler(job: Any, engine: Any, tokenizer: Any, prompts: list[list[int]]) -> Sampler:
    """The stage-2 sampler of one rank: the live model (hf), or the engine at ``job.engine_url`` (vllm)."""
    if job.recipe.generation.engine == "hf":
        from .hf import HfSampler

        return HfSampler(engine.module, tokenizer, engine.device, synced_gpus=engine.world_size > 1)
    from .vllm import ENGINE_LOG, EngineClient, VllmSampler

    generation = job.recipe.generation
    client = EngineClient(job.engine_url or generation.vllm_url, generation.request_timeout_s,
                          Path(job.out) / ENGINE_LOG)  # fmt: skip
    tolerance = probe_tolerance(engine_dtype(generation, job.recipe.runtime))
    return VllmSampler(client, prompts[0], tolerance, engine.rank)
