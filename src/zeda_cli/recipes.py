"""Recipes: one YAML file drives every stage. Frozen pydantic models, unknown keys rejected, all problems at once.

``load_recipe(path, overrides, values=..., flags=...)`` reads YAML, applies command-line values and ``--set
key.path=value`` overrides (values parsed as YAML) to the raw dict *before* validation, and returns a
:class:`Recipe`. This is the one route settings take: every command builds its sections here, so a bad flag and a
bad recipe key get the same checks and the same kind of message (naming the flag when it came from one).
Defaults are the official ZEDA settings (docs/method.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import BadInputError, ZedaError, raise_all

Share = Annotated[float, Field(gt=0.0, lt=1.0, json_schema_extra={"expected": "a share in (0, 1)"})]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0.0)]
FloatDtype = Literal["auto", "bfloat16", "float16", "float32"]
# Keys that no longer exist -> what replaced them (a recipe or --set using one gets this, not "unknown key").
RENAMED = {
    "generation.vllm_url": "generation.teacher_url (the static teacher's server) or generation.student_url (the "
    "student's server in stage 2): one server no longer serves both roles",
}
BASELINES = ("top_p", "naee", "threshold", "static_topk", "entropy_k", "random")  # evaluate.baselines.METHODS


class FieldProblem(ValueError):
    """Raised by a field validator with a complete zeda message (the renderer uses it as it is)."""

    def __init__(self, problem: ZedaError):
        super().__init__(problem.one_line())
        self.problem = problem


def expected(text: str) -> dict[str, Any]:
    """Field metadata: how a bad value's message describes what is allowed."""
    return {"json_schema_extra": {"expected": text}}


def _size(value: str | int) -> str | int:
    from .io.writer import parse_size

    try:
        parse_size(value)
    except ZedaError as err:
        raise FieldProblem(err) from None
    return value


ShardSize = Annotated[str | int, Field(json_schema_extra={"expected": "a size like 5GB, 500MB or 2GiB"})]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroExpertsSection(Section):
    num_zero_experts: int | None = Field(None, gt=0, **expected("Z > 0"))  # Z per MoE layer; None = N/2
    init: Annotated[Literal["gaussian", "masked"], Field(**expected("gaussian or masked"))] = "gaussian"
    seed: int = 0
    max_shard_size: ShardSize = "5GB"

    _check_size = field_validator("max_shard_size")(_size)


class BalanceSection(Section):
    target_skip: Share = 0.5  # t: share of routing slots on zero experts; w = t·N / (Z·(1-t))
    aux_loss_coeff: NonNegative = 0.1  # alpha


class OptimSection(Section):
    lr: Annotated[float, Field(gt=0.0)]
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    min_lr_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    weight_decay: NonNegative = 0.1
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.98)
    grad_clip: NonNegative = 1.0
    # The router rows in their own parameter group (None: the lr / weight decay above). Under full-parameter
    # training the router must move much further than the body: the body only compensates for skipped slots.
    router_lr: Annotated[float, Field(gt=0.0)] | None = None
    router_weight_decay: NonNegative | None = None


class DataSection(Section):
    """A prompt set: a local .jsonl / .json / .parquet file or a Hugging Face dataset id."""

    prompts: str | None = None
    files: str | None = None  # for a Hub dataset: which data file(s) of the repo (datasets' data_files)
    split: str = "train"
    field: str | None = None  # default: "messages" if present, else "prompt"
    max_prompts: PositiveInt | None = None
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    shuffle_seed: int = 0
    # Rollouts you already have (a file or a Hub dataset of prompt + response records, e.g. a released stage-1 set):
    # stage 1 trains on them instead of generating teacher rollouts (distill.rollout_import).
    rollouts: str | None = None
    rollouts_files: str | None = None  # for a Hub dataset: which data file(s) of the repo


class RolloutSection(Section):
    """Teacher rollouts for stage 1: one sampled response per prompt."""

    max_new_tokens: PositiveInt = 1024
    temperature: NonNegative = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    batch_size: PositiveInt = 8
    seed: int = 0


class TrainCommon(Section):
    trainable: Literal["full", "router"] = "full"
    micro_batch_size: PositiveInt = 1
    gradient_checkpointing: bool = False  # recompute activations in backward (long sequences / large models)
    save_every: PositiveInt = 50
    log_every: PositiveInt = 1
    seed: int = 0


class Stage1Section(TrainCommon):
    """SFT on teacher rollouts (official: lr 2e-5 cosine to 0, 10% warmup, wd 0.1, betas (0.9, 0.98), 1 epoch)."""

    optim: OptimSection = OptimSection(lr=2e-5, schedule="cosine", warmup_ratio=0.1)
    epochs: PositiveInt = 1
    max_seq_len: PositiveInt = 4096  # rollouts (prompt + response) are cut to this many tokens
    global_batch_size: PositiveInt = 128
    max_steps: PositiveInt | None = None
    # ce (official): token CE on the teacher's sampled response tokens. kl: forward KL(teacher || student) to the
    # teacher's full next-token distribution on the rollouts (dense: every vocabulary entry carries signal), on
    # the response tokens or on every position (prompt too).
    loss: Literal["ce", "kl"] = "ce"
    kl_positions: Literal["response", "all"] = "response"
    kl_chunk_size: PositiveInt = 1024


class Stage2Section(TrainCommon):
    """On-policy distillation (official: lr 5e-6 constant, 16 prompts x 2 samples per step, 321 steps)."""

    optim: OptimSection = OptimSection(lr=5e-6, schedule="constant")
    steps: PositiveInt = 321
    prompts_per_step: PositiveInt = 16
    samples_per_prompt: PositiveInt = 2
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    max_new_tokens: PositiveInt = 1024
    loss: Literal["sampled", "full"] = "sampled"
    # trainer: a frozen teacher in the training processes scores every sample; engine: the static teacher's vLLM
    # server scores them (prompt log-probs) and the trainer holds no teacher (the sampled loss needs no more)
    teacher_logprobs: Annotated[Literal["trainer", "engine"], Field(**expected("trainer or engine"))] = "trainer"
    # sample: mean over each sample's response tokens, then over samples (official); token: over all tokens
    reduction: Literal["sample", "token"] = "sample"
    kl_chunk_size: PositiveInt = 1024


class DistributedSection(Section):
    """Where a training stage runs: one process (``none``), DeepSpeed ZeRO ranks, or FSDP2 (+ expert parallelism)
    ranks built by transformers' own ``DistributedConfig``; on one node or several (``nnodes``)."""

    backend: Annotated[Literal["none", "deepspeed", "fsdp2"], Field(**expected("none, deepspeed or fsdp2"))] | None = (
        None  # default: deepspeed when `deepspeed` is set, else none
    )
    deepspeed: str | None = None  # DeepSpeed JSON config; set -> ZeRO run under the launcher
    nproc: PositiveInt = 1  # processes (GPUs) per node
    # FSDP2: ep_size ranks share the experts of a layer (token all-to-all), fsdp_size ranks shard each parameter,
    # dp_replicate_size replicas (HSDP: one per node) all-reduce gradients; world = fsdp_size x dp_replicate_size.
    ep_size: PositiveInt = 1
    fsdp_size: PositiveInt | None = None  # default: world size / dp_replicate_size
    dp_replicate_size: PositiveInt = 1
    cpu_offload: bool = False  # FSDP2: parameters, gradients and optimizer state live on the host
    mixed_precision: bool = False  # FSDP2: bf16 compute over fp32 master weights
    nnodes: PositiveInt = 1
    node_rank: Annotated[int, Field(ge=0)] = 0
    master_addr: str = "127.0.0.1"  # the rendezvous host (node 0) when nnodes > 1
    master_port: Annotated[int, Field(gt=0, lt=65536)] | None = None  # default: a free port (one node only)
    timeout_s: PositiveInt | None = None  # collective timeout; default: derived from generation.request_timeout_s
    devices: list[Annotated[int, Field(ge=0)]] = []  # GPUs of this node the ranks use; [] = the first nproc

    @property
    def kind(self) -> str:
        """The backend in effect: the explicit one, else deepspeed when a DeepSpeed config or several processes are
        asked for (ZeRO-3 with zeda's defaults), else none (one process)."""
        return self.backend or ("deepspeed" if self.deepspeed or self.world_size > 1 else "none")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def launched(self) -> bool:
        """True when the stage runs on ranks started by a launcher (not in the calling process)."""
        return self.kind != "none"

    @model_validator(mode="after")
    def _devices(self) -> DistributedSection:
        if self.devices and len(self.devices) != self.nproc:
            raise FieldProblem(BadInputError(
                f"distributed.devices {self.devices} for {self.nproc} processes per node",
                expected="one GPU per process (distributed.nproc entries)",
                fix="list nproc GPUs, or none"))  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_process(self) -> DistributedSection:
        if self.backend == "none" and self.world_size > 1:
            raise FieldProblem(BadInputError(
                f"distributed.backend none with {self.world_size} processes",
                expected="one process, or backend deepspeed / fsdp2 for several",
                fix="drop distributed.nproc / nnodes, or pick a backend"))  # fmt: skip
        return self


class GenerationSection(Section):
    """Who samples: the teacher's stage-1 rollouts and the student's stage-2 samples.

    ``hf``: transformers' ``generate`` in the training process. ``vllm``: vLLM servers in their own environment
    (``vllm_python``: a Python with vllm + zeda-vllm, started and stopped by zeda; default the ``.venv-vllm`` that
    ``make install-vllm`` builds), or servers a user started (``teacher_url`` / ``student_url``:
    ``python -m zeda_vllm.engine``), each checked against the weights it should serve before use.
    """

    engine: Annotated[Literal["hf", "vllm"], Field(**expected("hf or vllm"))] = "hf"
    vllm_python: str | None = None  # default: .venv-vllm/bin/python beside the zeda checkout, if it exists
    teacher_url: str | None = None  # a running server of the static teacher, e.g. http://127.0.0.1:8011
    student_url: str | None = None  # a running server of the student (stage 2), loaded from the stage's student
    num_engines: PositiveInt = 1  # data-parallel servers per role; a step's prompts are split between them
    devices: list[Annotated[int, Field(ge=0)]] = []  # GPUs the servers use (CUDA_VISIBLE_DEVICES); [] = inherited
    dtype: Annotated[FloatDtype, Field(**expected("auto, bfloat16, float16, float32"))] = "auto"
    max_model_len: PositiveInt | None = None  # default: prompt + max_new_tokens of the stage, rounded up
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # the trainer shares the GPU
    tensor_parallel_size: PositiveInt = 1
    enforce_eager: bool = False  # skip torch.compile / CUDA graphs (faster start, slower steps)
    startup_timeout_s: PositiveInt = 900
    request_timeout_s: PositiveInt = 3600
    sync_bucket_mb: PositiveInt = 512  # weight sync: the most bytes staged at once (whole modules per bucket)
    sync_dir: str | None = None  # where sync buckets are staged; default /dev/shm, else the run folder
    check_every: PositiveInt = 50  # the served weights are checked after the first step and every N steps


class RuntimeSection(Section):
    dtype: FloatDtype = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    experts_implementation: Literal["grouped_mm", "eager", "batched_mm"] | None = None


class ExportSection(Section):
    format: Annotated[Literal["zeda", "stock"], Field(**expected("zeda or stock"))] = "zeda"
    max_shard_size: ShardSize = "5GB"
    dtype: Annotated[FloatDtype, Field(**expected("auto, bfloat16, float16, float32"))] = "auto"
    base_model: str | None = None  # Hub id of the original model for the card, when the run started from a folder

    _check_size = field_validator("max_shard_size")(_size)

    @field_validator("base_model")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            fix = "pass the id of the original model, e.g. Qwen/Qwen3-30B-A3B"
            raise FieldProblem(BadInputError(f"base model {value!r} is not a Hub id", expected="org/name", fix=fix))
        return value


class PushSection(Section):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None  # a branch (created from main if needed) or refs/pr/N
    create_pr: bool = False
    commit_message: str | None = None
    attempts: PositiveInt = 4  # tries per Hub call before giving up on a transient failure
    backoff_s: NonNegative = 2.0  # first wait; doubles after each failed try

    @model_validator(mode="after")
    def _pr_targets_main(self) -> PushSection:
        if self.create_pr and self.revision not in (None, "main"):
            raise FieldProblem(BadInputError(
                f"--create-pr with --revision {self.revision!r}",
                expected="--create-pr alone (the pull request targets the default branch)",
                fix="drop --revision, or push to the branch without --create-pr"))  # fmt: skip
        return self


class EvalSection(Section):
    """``zeda eval``: data, reference, and (``baseline``) a training-free baseline on the static model."""

    data: Path | None = None  # default: data/heldout.jsonl of the model's folder, its lineage or its original
    teacher: str | None = None  # default: the original model, from the run's manifests
    max_samples: int | None = Field(None, ge=1, **expected("--max-samples >= 1"))
    max_length: Annotated[int, Field(ge=2, **expected("--max-length >= 2"))] = 512
    batch_size: Annotated[int, Field(ge=1, **expected("--batch-size >= 1"))] = 8
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: FloatDtype = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    zero_expert_bias: float | None = None
    baseline: str | None = None
    budget: float = 0.5  # baseline: share of the static top-K expert FLOPs kept, in (0, 1]
    renorm: Annotated[Literal["kept", "none"], Field(**expected("kept or none"))] = "kept"
    calibration: Path | None = None  # baseline: texts to calibrate on (never the evaluation texts)
    calibration_samples: Annotated[int, Field(ge=1, **expected("--calibration-samples >= 1"))] = 256
    seed: int = 0
    record: bool = True  # write the result into the folder's zeda.json
    # lm-eval tasks: "agreement" (greedy continuations vs the teacher's), built-in tasks on local data, user YAMLs
    tasks: list[str] = []
    task_data: list[str] = []  # NAME=FILE or NAME:SPLIT=FILE
    include_path: Path | None = None  # a folder of the user's own lm-eval task YAMLs
    gen_prompts: Path | None = None  # agreement prompts (default: data/prompts-heldout.jsonl of the lineage)
    max_new_tokens: PositiveInt = 32  # agreement: greedy tokens per prompt
    limit: PositiveInt | None = None  # at most this many samples per task
    # the quality-vs-FLOPs curve: the routing parameter calibrated to each budget (kept share of expert FLOPs)
    sweep_bias: bool = False
    budgets: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [0.3, 0.4, 0.5, 0.6, 0.7]
    # quality gates (a release pipeline's thresholds); a violated one exits with its own code (README, Exit codes)
    max_nll_rise: float | None = Field(None, **expected("a percentage such as 3% or 3"))  # NLL delta, in %
    max_kl: float | None = Field(None, ge=0.0)
    min_top1: float | None = Field(None, ge=0.0, le=1.0)
    min_zero_share: float | None = Field(None, ge=0.0, le=1.0)
    max_expert_flops: float | None = Field(None, gt=0.0, le=1.0)
    min_agreement: float | None = Field(None, ge=0.0, le=1.0)  # the agreement task's token_agreement

    @property
    def has_gates(self) -> bool:
        gates = (self.max_nll_rise, self.max_kl, self.min_top1, self.min_zero_share, self.max_expert_flops,
                 self.min_agreement)  # fmt: skip
        return any(v is not None for v in gates)

    @model_validator(mode="after")
    def _agreement_measured(self) -> EvalSection:
        if self.min_agreement is not None and "agreement" not in self.tasks:
            raise FieldProblem(BadInputError(
                f"--min-agreement {self.min_agreement} without --tasks agreement",
                expected="the agreement task measured for its gate", fix="add --tasks agreement"))  # fmt: skip
        return self

    @field_validator("budgets", "tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("max_nll_rise", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        return value.strip().removesuffix("%") if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
            raise FieldProblem(BadInputError(f"--device {value!r} is unknown", expected="auto, cpu, cuda or cuda:N"))
        return value

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: str | None) -> str | None:
        if value is not None and value not in BASELINES:
            raise FieldProblem(BadInputError(f"unknown baseline {value!r}", expected=f"one of: {', '.join(BASELINES)}",
                                             fix="pick one with --baseline"))  # fmt: skip
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise FieldProblem(BadInputError(
                f"budget {value} is outside (0, 1]",
                expected="the share of the static top-K expert FLOPs to keep, e.g. 0.5",
                fix="pass --budget in (0, 1]"))  # fmt: skip
        return value


class Recipe(Section):
    version: Literal[1] = 1
    name: str | None = None
    description: str | None = None
    model: str | None = None  # source model (folder or Hub id); the CLI argument overrides it
    families: list[str] = []  # model_types `zeda convert` picks this recipe for when none is given
    teacher: str | None = None  # default: the injected model with zero experts masked (= the original)
    zero_experts: ZeroExpertsSection = ZeroExpertsSection()
    balance: BalanceSection = BalanceSection()
    data: DataSection = DataSection()
    rollout: RolloutSection = RolloutSection()
    stage1: Stage1Section = Stage1Section()
    stage2: Stage2Section = Stage2Section()
    distributed: DistributedSection = DistributedSection()
    runtime: RuntimeSection = RuntimeSection()
    generation: GenerationSection = GenerationSection()
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    push: PushSection = PushSection()
    # dotted key -> where an explicit value came from ("--target-skip", "--set", "recipe tiny-demo.yaml"); keys
    # absent here hold their default. Not serialised: it describes this command line, not the settings.
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def origin(self, key: str) -> str | None:
        """Where the value of dotted ``key`` came from, or None when it is the default."""
        return self._origins.get(key)

    def value(self, key: str) -> Any:
        return flat(self.model_dump(mode="json")).get(key)

    def with_values(self, values: dict[str, Any]) -> Recipe:
        """A copy with dotted keys set (validated again); explicit origins are kept."""
        data = self.model_dump(mode="json")
        for key, value in values.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        recipe = Recipe.model_validate(data)
        recipe._origins = dict(self._origins)
        return recipe

    @model_validator(mode="after")
    def _teacher_server(self) -> Recipe:
        s2 = self.stage2
        if s2.teacher_logprobs == "engine" and s2.loss == "full":
            raise FieldProblem(BadInputError(
                "stage2.teacher_logprobs engine with stage2.loss full",
                expected="stage2.loss sampled: a server returns the log-prob of each sampled token, the exact KL "
                "needs the teacher's whole distribution", fix="set stage2.loss sampled, or stage2.teacher_logprobs "
                "trainer"))  # fmt: skip
        if s2.teacher_logprobs == "engine" and self.generation.engine != "vllm":
            raise FieldProblem(BadInputError(
                "stage2.teacher_logprobs engine with generation.engine hf",
                expected="a vLLM server of the teacher (generation.engine vllm)",
                fix="set generation.engine vllm, or stage2.teacher_logprobs trainer"))  # fmt: skip
        return self

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        s1 = self.stage1
        if s1.global_batch_size % s1.micro_batch_size:
            raise ValueError(
                f"stage1.global_batch_size ({s1.global_batch_size}) must be a multiple of stage1.micro_batch_size "
                f"({s1.micro_batch_size})"
            )
        return self


# --- comparing settings ------------------------------------------------------------------------------------------
# Keys that change how a stage runs, not what it trains: a resumed stage takes new values of these and lists them.
HARMLESS = ("stage1.save_every", "stage1.log_every", "stage2.save_every", "stage2.log_every", "generation.vllm_python",
            "generation.teacher_url", "generation.student_url", "generation.startup_timeout_s",
            "generation.request_timeout_s", "generation.gpu_memory_utilization", "generation.enforce_eager",
            "generation.check_every", "generation.sync_bucket_mb", "generation.sync_dir", "generation.devices",
            "generation.num_engines", "generation.max_model_len", "generation.tensor_parallel_size",
            "runtime.experts_implementation", "runtime.device", "distributed.timeout_s", "distributed.master_addr",
            "distributed.master_port", "distributed.node_rank")  # fmt: skip
# Caps a resumed stage may raise when its learning-rate schedule does not depend on them.
CAPS = {"stage1.max_steps": "stage1.optim", "stage2.steps": "stage2.optim"}


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every dotted key whose value differs (a key missing on one side counts as None)."""
    a, b = flat(old), flat(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


# --- loading -----------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BadInputError(f"--set {text!r}", expected="key.path=value (e.g. stage1.optim.lr=1e-5)", fix="fix it")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _section_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the section at ``path`` (empty when the path does not lead to a section)."""
    for part in path:
        field = model.model_fields.get(part)
        section = _section_of(field.annotation) if field else None
        if section is None:
            return []
        model = section
    return sorted(model.model_fields)


def _path_error(path: list[str]) -> ZedaError | None:
    """The first unknown segment of a --set key path, named with the keys allowed at that level."""
    model: type[BaseModel] = Recipe
    if (dotted := ".".join(path)) in RENAMED:
        return _renamed(f"--set {dotted}", dotted)
    for depth, part in enumerate(path):
        where = ".".join(path[:depth]) or "the recipe"
        field = model.model_fields.get(part)
        if field is None:
            return BadInputError(
                f"--set {'.'.join(path)}: unknown key {part!r} in {where}",
                expected=f"one of {', '.join(sorted(model.model_fields))}",
                fix="check the spelling against the recipe reference in README",
            )
        section = _section_of(field.annotation)
        if depth < len(path) - 1 and section is None:
            return BadInputError(
                f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is a value, not a section",
                expected="a key path ending at a value", fix=f"use --set {'.'.join(path[: depth + 1])}=<value>",
            )  # fmt: skip
        model = section or model
    return None


def apply_overrides(raw: dict[str, Any], overrides: list[str], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``values`` (dotted key -> value, from command-line flags; None = not given) then ``--set`` texts, in order."""
    problems: list[ZedaError] = []
    settings: list[tuple[list[str], Any]] = [(k.split("."), v) for k, v in (values or {}).items() if v is not None]
    for text in overrides:
        try:
            settings.append(parse_override(text))
        except ZedaError as err:
            problems.append(err)
    for path, value in settings:
        if (err := _path_error(path)) is not None:
            problems.append(err)
            continue
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    raise_all(problems)
    return raw


def merge_into_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The defaults with ``raw`` laid over them section by section (so a stage keeps its own defaults)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    return merge(Recipe().model_dump(mode="json"), raw)


def validate_recipe(raw: dict[str, Any], origin: str = "recipe", flags: dict[str, str] | None = None) -> Recipe:
    """The recipe, or every problem at once; a problem with a key in ``flags`` is named by that flag."""
    try:
        return Recipe.model_validate(merge_into_defaults(raw))
    except ValidationError as err:
        raise_all([_field_error(origin, e, flags or {}) for e in err.errors()])
        raise  # unreachable: errors() is never empty


def _field_error(origin: str, e: dict[str, Any], flags: dict[str, str]) -> ZedaError:
    loc = ".".join(str(p) for p in e["loc"])
    problem = e.get("ctx", {}).get("error")
    if isinstance(problem, FieldProblem):
        where = f"{origin}: {loc}" if loc else origin
        return _flag_problem(flags[loc], problem.problem) if loc in flags else _keyed(where, problem)
    if e["type"] == "extra_forbidden" and loc in RENAMED:
        return _renamed(f"{origin}: {loc}", loc)
    if e["type"] == "extra_forbidden":
        allowed = _allowed_keys(Recipe, [str(p) for p in e["loc"][:-1]])
        return BadInputError(
            f"{origin}: unknown key {loc!r}",
            expected=f"one of {', '.join(allowed)}",
            fix="fix the spelling (keys are listed in README, Recipes)",
        )
    received = e.get("input")
    detail = e["msg"]
    if e["type"] == "literal_error":
        detail = f"allowed values: {e.get('ctx', {}).get('expected', '')}"
    if loc in flags:
        shown = f"{received!r}" if isinstance(received, str) else f"{received}"
        return BadInputError(
            f"{flags[loc]} {shown} ({loc})", expected=_expected(e["loc"]) or detail, fix=f"pass another {flags[loc]}"
        )
    return BadInputError(f"{origin}: {loc or 'recipe'} = {received!r} is invalid", expected=detail, fix=f"set {loc}")


def _renamed(where: str, key: str) -> ZedaError:
    return BadInputError(f"{where} is no longer a recipe key", expected=RENAMED[key], fix="use the new key")


def _flag_problem(flag: str, problem: ZedaError) -> ZedaError:
    """A validator's message, named by the flag that carried the value (unless it names it already)."""
    return problem if flag in problem.received else BadInputError(f"{flag}: {problem.one_line()}")


def _keyed(where: str, problem: FieldProblem) -> ZedaError:
    """A validator's message about a recipe key; a model-level check (``--create-pr with --revision``) as it is."""
    text = problem.problem.one_line()
    return problem.problem if text.startswith("--") else BadInputError(f"{where}: {text}")


def _expected(loc: tuple[Any, ...]) -> str | None:
    """The ``expected`` text declared on the field at ``loc`` (None when it declares none)."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        model = _section_of(field.annotation) if field else None  # type: ignore[assignment]
        if model is None:
            return None
    field = model.model_fields.get(str(loc[-1]))
    extra = field.json_schema_extra if field else None
    return extra.get("expected") if isinstance(extra, dict) else None  # type: ignore[return-value]


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    values: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply flag ``values`` and ``--set`` overrides, validate.

    ``values`` maps dotted recipe keys to what the command line gave (None: not given); ``flags`` maps the same keys
    to the flag names, so that a bad value is reported as the user typed it (``--zero-experts 0; expected Z > 0``).
    """
    raw: dict[str, Any] = {}
    origin = "recipe"
    origins: dict[str, str] = {}
    if path is not None:
        file = resolve_recipe_path(path)
        origin = file.name
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            raise BadInputError(f"{file} is not valid YAML ({err})", fix="fix the YAML syntax") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise BadInputError(f"{file} holds a {type(loaded).__name__}", expected="a YAML mapping of sections")
        raw = loaded or {}
        _anchor_paths(raw, file.parent)
        origins = dict.fromkeys(flat(raw), f"recipe {file.name}")
    for key, value in (values or {}).items():
        if value is not None:
            origins[key] = (flags or {}).get(key, key)
    for text in overrides or []:
        key = text.partition("=")[0].strip()
        origins.update({k: "--set" for k in list(origins) if k.startswith(f"{key}.")} | {key: "--set"})
    recipe = validate_recipe(apply_overrides(raw, overrides or [], values), origin, flags)
    recipe._origins = origins
    return recipe


_PATH_KEYS = (("model",), ("teacher",), ("data", "prompts"), ("data", "rollouts"), ("distributed", "deepspeed"))


def _anchor_paths(raw: dict[str, Any], folder: Path) -> None:
    """Relative paths in a recipe file resolve from the working directory, else from the recipe's folder or the
    one above it (a source checkout's root), so shipped recipes work from anywhere."""
    for keys in _PATH_KEYS:
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        value = node.get(keys[-1]) if isinstance(node, dict) else None
        if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
            continue
        for base in (folder, folder.parent):
            if (base / value).exists():
                node[keys[-1]] = str((base / value).resolve())
                break


def recipes_dir() -> Path:
    """The shipped recipes: ``recipes/`` of a source checkout, else the copy installed with the package."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "recipes"


def resolve_recipe_path(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if file.exists():
        return file
    shipped = recipes_dir() / (str(path) if str(path).endswith(".yaml") else f"{path}.yaml")
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
    raise BadInputError(
        f"recipe {str(path)!r} not found",
        expected=f"a YAML file path or a shipped recipe name ({names})",
        fix="check the path",
    )


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
