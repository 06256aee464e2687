"""Recipes: one YAML file drives every stage. Frozen pydantic models, unknown keys rejected, all problems at once.

``load_recipe(path, overrides)`` reads YAML, applies ``--set key.path=value`` overrides (values parsed as YAML)
to the raw dict *before* validation, and returns a :class:`Recipe`. Defaults are the official ZEDA settings
(research/zeda-paper.md); CLI flags of single commands override the recipe they load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import BadInputError, ZedaError, raise_all

Share = Annotated[float, Field(gt=0.0, lt=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroExpertsSection(Section):
    num_zero_experts: PositiveInt | None = None  # Z per MoE layer; None = N/2
    init: Literal["gaussian", "masked"] = "gaussian"
    seed: int = 0
    max_shard_size: str = "5GB"


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


class DataSection(Section):
    """A prompt set: a local .jsonl / .json / .parquet file or a Hugging Face dataset id."""

    prompts: str | None = None
    files: str | None = None  # for a Hub dataset: which data file(s) of the repo (datasets' data_files)
    split: str = "train"
    field: str | None = None  # default: "messages" if present, else "prompt"
    max_prompts: PositiveInt | None = None
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    shuffle_seed: int = 0


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


class Stage2Section(TrainCommon):
    """On-policy distillation (official: lr 5e-6 constant, 16 prompts x 2 samples per step, 321 steps)."""

    optim: OptimSection = OptimSection(lr=5e-6, schedule="constant")
    steps: PositiveInt = 321
    prompts_per_step: PositiveInt = 16
    samples_per_prompt: PositiveInt = 2
    temperature: Annotated[float, Field(gt=0.0)] = 1.0
    max_new_tokens: PositiveInt = 1024
    loss: Literal["sampled", "full"] = "sampled"
    kl_chunk_size: PositiveInt = 1024


class DistributedSection(Section):
    deepspeed: str | None = None  # DeepSpeed JSON config; set -> ZeRO run under the launcher
    nproc: PositiveInt = 1


class RuntimeSection(Section):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    experts_implementation: Literal["grouped_mm", "eager", "batched_mm"] | None = None


class ExportSection(Section):
    format: Literal["zeda", "stock"] = "zeda"
    max_shard_size: str = "5GB"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class PushSection(Section):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


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
    export: ExportSection = ExportSection()
    push: PushSection = PushSection()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        s1 = self.stage1
        if s1.global_batch_size % s1.micro_batch_size:
            raise ValueError(
                f"stage1.global_batch_size ({s1.global_batch_size}) must be a multiple of stage1.micro_batch_size "
                f"({s1.micro_batch_size})"
            )
        return self


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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    problems: list[ZedaError] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ZedaError as err:
            problems.append(err)
            continue
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


def validate_recipe(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(merge_into_defaults(raw))
    except ValidationError as err:
        raise_all([_field_error(origin, e) for e in err.errors()])
        raise  # unreachable: errors() is never empty


def _field_error(origin: str, e: dict[str, Any]) -> ZedaError:
    loc = ".".join(str(p) for p in e["loc"])
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
    return BadInputError(f"{origin}: {loc or 'recipe'} = {received!r} is invalid", expected=detail, fix=f"set {loc}")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults), apply --set overrides, validate."""
    raw: dict[str, Any] = {}
    origin = "recipe"
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
    return validate_recipe(apply_overrides(raw, overrides or []), origin)


_PATH_KEYS = (("model",), ("teacher",), ("data", "prompts"), ("distributed", "deepspeed"))


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
