"""Train the small, genuinely trained static MoE language models that zeda bundles.

Why: ZEDA turns a *trained* static MoE into a dynamic one whose routers may pick zero experts. A randomly
initialised toy has no routing structure worth preserving, so the demo, the tests and the quality benchmarks
(ZEDA vs. top-p routing and other baselines) need a real teacher that fits in the repository and trains on a
laptop CPU without any download. The corpus is therefore data every Python installation already has: the
running interpreter's own standard-library sources.

Two families (``--family``), one per router family zeda supports:

* ``qwen3_moe`` (default) -> ``models/pystdlib-moe``: ``Qwen3MoeForCausalLM``, 16 experts, top-4, softmax router,
  normalised top-k weights, a small load-balancing loss; it trains its own tokenizer.
* ``glm4_moe_lite`` -> ``models/pystdlib-glm``: ``Glm4MoeLiteForCausalLM``, GLM-4.7-Flash's structure in miniature:
  MLA attention with GLM-4.7-Flash's latent (kv_lora_rank 512, qk_rope_head_dim 64), a dense first layer, one
  shared expert, 64 routed experts top-4 behind a sigmoid router with ``routed_scaling_factor`` 1.8, whose
  ``e_score_correction_bias`` is trained the auxiliary-loss-free way of DeepSeek-V3 / GLM (after every optimizer
  step, ``bias_i += gamma * sign(mean_load - load_i)`` with the load counted from the biased top-k choice; no
  auxiliary loss). It reuses ``models/pystdlib-moe``'s tokenizer files byte for byte (``--tokenizer``).

What it does (seeded; bit-for-bit reproducible when the run is bounded by ``--steps`` rather than by the clock):

1. corpus: stdlib ``*.py`` files minus tests, ``site-packages``, generated codec tables and the pydoc topic dump,
   split *by file* into train / held-out with a stable hash of the relative path (~5% held out);
2. tokenizer: byte-level BPE (4096 entries, ``<|endoftext|>`` is eos and pad) trained on the train split and
   saved as a ``PreTrainedTokenizerFast``, or copied from ``--tokenizer`` (which must use the same split);
3. model: trained with AdamW, linear warmup and cosine decay on random 256-token windows until ``--steps``
   optimizer steps or the ``--max-minutes`` wall-clock budget, whichever comes first (the cosine schedule follows
   whichever is further along, so a time-bounded run still anneals; ``glm4_moe_lite`` has no clock bound unless
   ``--max-minutes`` is given);
4. data: held-out evaluation chunks plus train / held-out prompts (starts of functions, classes and docstrings)
   for teacher rollouts and on-policy distillation, under ``<out>/data``. No item crosses the split: a train
   prompt that occurs verbatim in a held-out file is dropped, and so is a held-out record or prompt that occurs
   verbatim in a train file (the stdlib duplicates boilerplate, e.g. the codec classes, across files);
5. evaluation: held-out token NLL vs. a unigram baseline and the per-expert routing load, written to
   ``training.json`` and a model card.

Usage:

    python scripts/train_bundled_model.py --out models/pystdlib-moe --max-minutes 44
    python scripts/train_bundled_model.py --family glm4_moe_lite --out models/pystdlib-glm --steps 5000
    python scripts/train_bundled_model.py --data-only --out models/pystdlib-moe   # rewrite <out>/data only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Must precede ``import torch`` (libgomp reads it once). On a shared, oversubscribed CPU, OpenMP threads that
# spin while waiting at barriers made a training step 4-6x slower than threads that sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    Glm4MoeLiteConfig,
    Glm4MoeLiteForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
# Directory names (anywhere in the relative path) that are skipped: tests would dominate the corpus, the rest is
# third-party code, build configuration or bytecode.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"})
# Large files that are data rather than code: the pydoc topic dump and the interpreter's build variables.
EXCLUDED_PREFIXES = ("pydoc_data/", "_sysconfigdata_", "config-")
# Marker of the generated charmap codec tables in ``encodings/`` (kilobytes of hex literals each).
CODEC_TABLE_MARKER = "gencodec.py"
PROMPT_START = re.compile(r'^[ \t]*(?:(?:async[ \t]+)?def[ \t]+\w|class[ \t]+\w|[rRbBuU]?"""|[rRuU]?\'\'\')', re.M)
SECONDS_PER_MINUTE = 60.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Per-family defaults of the flags whose default is None. The qwen3_moe values are those models/pystdlib-moe was
# trained with; a flag that only one family uses is an error with the other.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "max_minutes": 44.0,
        "steps": 100_000,
        "hidden_size": 160,
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 32,
        "experts": 16,
        "top_k": 4,
        "moe_intermediate_size": 128,
        "aux_loss_coef": 0.005,
    },
    "glm4_moe_lite": {
        "max_minutes": None,  # bounded by --steps only, so the run is bit-reproducible
        "steps": 5000,
        "tokenizer": ROOT / "models" / "pystdlib-moe",
        "hidden_size": 160,
        "layers": 4,
        "heads": 4,
        "experts": 64,
        "top_k": 4,
        "moe_intermediate_size": 32,
        "intermediate_size": 160,
        "shared_experts": 1,
        "dense_layers": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 64,
        "v_head_dim": 32,
        "routed_scaling_factor": 1.8,
        "bias_update_speed": 1e-3,
    },
}
FAMILY_FLAGS = frozenset(key for defaults in FAMILY_DEFAULTS.values() for key in defaults)
COMMON_FLAGS = frozenset({"max_minutes", "steps", "tokenizer"})


@dataclass(frozen=True)
class SourceFile:
    """One stdlib module: its path relative to the stdlib root, its text and its split."""

    path: str
    text: str
    heldout: bool


@dataclass(frozen=True)
class EvalResult:
    """Mean token NLL of the model and of the unigram baseline, plus routing-slot counts per MoE layer and expert."""

    nll: float
    unigram_nll: float
    tokens: int
    expert_counts: torch.Tensor  # (moe layers, experts), top-k slots routed to each expert (the choice the model ran)
    score_counts: torch.Tensor  # the same for the top-k of the router scores alone (no correction bias)


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for whoever pipes the script."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(FAMILY_DEFAULTS), default="qwen3_moe", help="model family")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the family's bundled one)")
    parser.add_argument(
        "--max-minutes", type=float, help="wall-clock budget of the whole script (qwen3_moe: 44; glm4_moe_lite: none)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (qwen3_moe: 100000, the clock stops first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--data-only", action="store_true", help="only rewrite <out>/data/*.jsonl with <out>'s tokenizer (no training)"
    )
    corpus = parser.add_argument_group("corpus and tokenizer")
    corpus.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    corpus.add_argument("--heldout-fraction", type=float, default=0.05)
    corpus.add_argument("--vocab-size", type=int, default=4096)
    corpus.add_argument(
        "--tokenizer",
        type=Path,
        help="copy this folder's tokenizer files instead of training one (glm4_moe_lite: models/pystdlib-moe)",
    )
    model = parser.add_argument_group("model (defaults depend on --family)")
    model.add_argument("--hidden-size", type=int)
    model.add_argument("--layers", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--kv-heads", type=int, help="qwen3_moe")
    model.add_argument("--head-dim", type=int, help="qwen3_moe")
    model.add_argument("--experts", type=int, help="routed experts per MoE layer")
    model.add_argument("--top-k", type=int)
    model.add_argument("--moe-intermediate-size", type=int)
    model.add_argument("--aux-loss-coef", type=float, help="qwen3_moe: load-balancing loss coefficient")
    model.add_argument("--intermediate-size", type=int, help="glm4_moe_lite: width of the dense layers' MLP")
    model.add_argument("--shared-experts", type=int, help="glm4_moe_lite")
    model.add_argument("--dense-layers", type=int, help="glm4_moe_lite: the first N layers are dense")
    model.add_argument("--kv-lora-rank", type=int, help="glm4_moe_lite: MLA latent width")
    model.add_argument("--q-lora-rank", type=int, help="glm4_moe_lite")
    model.add_argument("--qk-nope-head-dim", type=int, help="glm4_moe_lite")
    model.add_argument("--qk-rope-head-dim", type=int, help="glm4_moe_lite")
    model.add_argument("--v-head-dim", type=int, help="glm4_moe_lite")
    model.add_argument("--routed-scaling-factor", type=float, help="glm4_moe_lite")
    model.add_argument(
        "--bias-update-speed",
        type=float,
        help="glm4_moe_lite: gamma of the aux-loss-free e_score_correction_bias update after each optimizer step",
    )
    model.add_argument("--max-position-embeddings", type=int, default=512)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--seq-len", type=int, default=256)
    optim.add_argument("--batch-size", type=int, default=8)
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--min-lr-ratio", type=float, default=0.1)
    optim.add_argument("--warmup-steps", type=int, default=100)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--grad-clip", type=float, default=1.0)
    optim.add_argument("--log-every", type=int, default=50)
    optim.add_argument("--eval-every", type=int, default=500, help="quick held-out check every N steps (0: never)")
    optim.add_argument(
        "--eval-reserve-minutes", type=float, default=3.0, help="part of --max-minutes kept for evaluation + saving"
    )
    data = parser.add_argument_group("bundled data files")
    data.add_argument("--heldout-records", type=int, default=200)
    data.add_argument("--train-prompts", type=int, default=256)
    data.add_argument("--heldout-prompts", type=int, default=64)
    data.add_argument("--chunk-tokens", type=int, default=256, help="target length of a held-out record")
    data.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    args = parser.parse_args(argv)
    defaults = FAMILY_DEFAULTS[args.family]
    foreign = sorted(f"--{key.replace('_', '-')}" for key in FAMILY_FLAGS - COMMON_FLAGS - defaults.keys()
                     if getattr(args, key) is not None)  # fmt: skip
    if foreign:
        parser.error(f"{', '.join(foreign)} do not apply to --family {args.family}")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = ROOT / "models" / ("pystdlib-moe" if args.family == "qwen3_moe" else "pystdlib-glm")
    return args


# ----------------------------------------------------------------------------------------------------- corpus


def is_heldout(rel_path: str, fraction: float) -> bool:
    """Stable split by file: a SHA-256 of the relative path, independent of the file set and of the platform."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def is_excluded(rel_path: str) -> bool:
    parts = rel_path.split("/")
    return bool(EXCLUDED_DIRS.intersection(parts[:-1])) or rel_path.startswith(EXCLUDED_PREFIXES)


def collect_corpus(stdlib: Path, heldout_fraction: float) -> list[SourceFile]:
    """All eligible stdlib modules, sorted by relative path so the order never depends on the file system."""
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if is_excluded(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if CODEC_TABLE_MARKER in text[:1000] or not text.strip():
            continue
        files.append(SourceFile(rel, text, is_heldout(rel, heldout_fraction)))
    return files


def check_same_split(folder: Path, heldout_files: Sequence[SourceFile]) -> None:
    """A tokenizer or data reused from ``folder`` must come from the same train / held-out split as this run."""
    report = folder / "training.json"
    if not report.is_file():
        raise SystemExit(f"{report} is missing: cannot check that {folder} used the same held-out split")
    expected = json.loads(report.read_text(encoding="utf-8"))["corpus"]["heldout_paths"]
    if sorted(expected) != sorted(f.path for f in heldout_files):
        raise SystemExit(f"the held-out split differs from the one {folder} was built with (check --stdlib)")


# -------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation, no added BOS) wrapped for ``AutoTokenizer``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def copy_tokenizer(source: Path, out: Path) -> None:
    """Copy the tokenizer files byte for byte (``save_pretrained`` might reformat them)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_all(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts))]


def token_stream(encoded: Sequence[list[int]], eos_id: int, seed: int) -> torch.Tensor:
    """Concatenate the files in a seeded order, each followed by eos, into one int64 token stream."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for index in order:
        ids.extend(encoded[index])
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ model


def qwen_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        # Only used by dense layers (``mlp_only_layers``); there are none. Set to the active expert width.
        intermediate_size=args.moe_intermediate_size * args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate_size,
        norm_topk_prob=True,
        router_aux_loss_coef=args.aux_loss_coef,
        output_router_logits=False,  # requested explicitly in training; off for inference
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=None,  # no BOS is ever added; files are separated by eos
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def glm_config(args: argparse.Namespace, vocab_size: int, eos_id: int) -> Glm4MoeLiteConfig:
    """GLM-4.7-Flash's ``Glm4MoeLiteConfig`` with its latent (512 + 64) and routing, every other width tiny."""
    if not 0 < args.dense_layers < args.layers:
        raise SystemExit(f"--dense-layers {args.dense_layers} must leave at least one of {args.layers} layers sparse")
    return Glm4MoeLiteConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,  # the dense layers' MLP
        moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.layers,
        mlp_layer_types=["dense"] * args.dense_layers + ["sparse"] * (args.layers - args.dense_layers),
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,  # MLA: every head reads the shared latent
        kv_lora_rank=args.kv_lora_rank,
        q_lora_rank=args.q_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        rope_interleave=True,
        n_routed_experts=args.experts,
        n_shared_experts=args.shared_experts,
        num_experts_per_tok=args.top_k,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=args.routed_scaling_factor,
        output_router_logits=False,  # requested explicitly in training; off for inference
        max_position_embeddings=args.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=None,  # no BOS is ever added; files are separated by eos
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


@dataclass(frozen=True)
class Family:
    """What the two router families differ in here: the model class, its config, the expert count, the MoE layers."""

    name: str
    model_class: type[PreTrainedModel]
    build_config: Callable[[argparse.Namespace, int, int], Any]
    num_experts: Callable[[Any], int]
    moe_layers: Callable[[Any], list[int]]


QWEN = Family(
    "qwen3_moe",
    Qwen3MoeForCausalLM,
    qwen_config,
    num_experts=lambda config: config.num_experts,
    moe_layers=lambda config: list(range(config.num_hidden_layers)),
)
GLM = Family(
    "glm4_moe_lite",
    Glm4MoeLiteForCausalLM,
    glm_config,
    num_experts=lambda config: config.n_routed_experts,
    moe_layers=lambda config: [i for i, kind in enumerate(config.mlp_layer_types) if kind == "sparse"],
)
FAMILIES = {family.name: family for family in (QWEN, GLM)}


def family_of(model: PreTrainedModel) -> Family:
    return FAMILIES[model.config.model_type]


def build_model(family: Family, config: Any, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = family.model_class(config)
    # grouped_mm runs natively on CPU in torch >= 2.9; eager indexes 3-D expert weights (slow backward) and
    # batched_mm computes every expert for every token.
    model.set_experts_implementation("grouped_mm")
    return model


def correction_biases(model: PreTrainedModel) -> list[torch.Tensor]:
    """The ``e_score_correction_bias`` buffer of every MoE layer's router (sigmoid family), in layer order."""
    layers = model.model.layers
    return [layers[i].mlp.gate.e_score_correction_bias for i in family_of(model).moe_layers(model.config)]


def routed_choice(model: PreTrainedModel, router_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per MoE layer, the (tokens, top_k) expert ids the model routes to, recomputed from the recorded logits.

    Softmax family: top-k of the logits. Sigmoid family: top-k of sigmoid scores + correction bias, which is the
    model's own choice when ``n_group`` is 1 (group-limited routing is not reproduced here).
    """
    k = model.config.num_experts_per_tok
    if family_of(model) is QWEN:
        return [logits.topk(k, dim=-1).indices for logits in router_logits]
    if model.config.n_group != 1:
        raise SystemExit("routed_choice reproduces the sigmoid router for n_group 1 only")
    biases = correction_biases(model)
    return [
        (logits.sigmoid() + bias).topk(k, dim=-1).indices for logits, bias in zip(router_logits, biases, strict=True)
    ]


@torch.no_grad()
def update_correction_bias(model: PreTrainedModel, router_logits: Sequence[torch.Tensor], gamma: float) -> float:
    """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step: each expert's bias moves by ``gamma``
    towards the mean load (up if under-loaded, down if over-loaded), the load counted on this step's biased choice.

    Returns this step's imbalance: the most loaded expert's load over the mean load, averaged over MoE layers.
    """
    experts = family_of(model).num_experts(model.config)
    choices = routed_choice(model, [logits.detach() for logits in router_logits])
    ratios = []
    for bias, chosen in zip(correction_biases(model), choices, strict=True):
        load = torch.bincount(chosen.reshape(-1), minlength=experts).float()
        mean = load.mean()
        bias += gamma * torch.sign(mean - load)
        ratios.append((load.max() / mean).item())
    return sum(ratios) / len(ratios)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay projection and expert matrices; not norms, the (tied) embedding or the router."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "embed_tokens" in name or name.endswith("gate.weight")
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup times a cosine from 1 to ``min_ratio`` over ``progress`` in [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warmup * (min_ratio + (1.0 - min_ratio) * cosine)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[start : start + seq_len] for start in starts.tolist()])


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens (the tail is dropped)."""
    count = stream.numel() // seq_len
    return stream[: count * seq_len].view(count, seq_len)


# ------------------------------------------------------------------------------------------------- evaluation


def unigram_logprobs(train_stream: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Add-one smoothed unigram log-probabilities fitted on the train tokens."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log()


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    sequences: Sequence[torch.Tensor],
    unigram: torch.Tensor,
    batch_size: int = 16,
) -> EvalResult:
    """Token NLL (every position but the first of each sequence), unigram NLL on the same tokens, expert load."""
    was_training = model.training
    model.eval()
    config = model.config
    family = family_of(model)
    experts, k = family.num_experts(config), config.num_experts_per_tok
    nll_sum = unigram_sum = 0.0
    tokens = 0
    counts = torch.zeros(len(family.moe_layers(config)), experts, dtype=torch.long)
    score_counts = torch.zeros_like(counts)
    for start in range(0, len(sequences), batch_size):
        batch = list(sequences[start : start + batch_size])
        input_ids, mask = pad(batch, config.pad_token_id)
        out = model(input_ids=input_ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        targets, valid = input_ids[:, 1:], mask[:, 1:].bool()
        logprobs = F.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_sum -= logprobs[valid].double().sum().item()
        unigram_sum -= unigram[targets[valid]].sum().item()
        tokens += int(valid.sum())
        flat_mask = mask.reshape(-1).bool()
        logits = [router_logits[flat_mask] for router_logits in out.router_logits]
        for layer, (chosen, layer_logits) in enumerate(zip(routed_choice(model, logits), logits, strict=True)):
            counts[layer] += torch.bincount(chosen.reshape(-1), minlength=experts)
            by_score = layer_logits.topk(k, dim=-1).indices  # softmax and sigmoid are monotonic
            score_counts[layer] += torch.bincount(by_score.reshape(-1), minlength=experts)
    model.train(was_training)
    return EvalResult(nll_sum / tokens, unigram_sum / tokens, tokens, counts, score_counts)


def pad(batch: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of 1-D token tensors; returns ids and attention mask."""
    length = max(seq.numel() for seq in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : seq.numel()] = seq
        mask[row, : seq.numel()] = 1
    return ids, mask


def load_fractions(counts: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of routing slots that went to each expert (rows sum to 1)."""
    fractions = counts.double() / counts.sum(dim=1, keepdim=True)
    return [[round(value, 5) for value in row] for row in fractions.tolist()]


# ------------------------------------------------------------------------------------------------------- data


def occurs_in(fragment: str, texts: Sequence[str]) -> bool:
    """Whether ``fragment`` occurs verbatim in one of ``texts``."""
    return any(fragment in text for text in texts)


def line_chunks(tokenizer: PreTrainedTokenizerFast, text: str, target: int) -> Iterator[str]:
    """Whole-line chunks of roughly ``target`` tokens (at least 3/4 of it; lines longer than it are skipped)."""
    lines = text.splitlines(keepends=True)
    lengths = [len(ids) for ids in encode_all(tokenizer, lines)] if lines else []
    chunk: list[str] = []
    size = 0
    for line, length in zip(lines, lengths, strict=True):
        if size + length > target:
            if size >= target * 3 // 4:
                yield "".join(chunk)
            chunk, size = [], 0
            if length > target:
                continue
        chunk.append(line)
        size += length
    if size >= target * 3 // 4:
        yield "".join(chunk)


def heldout_records(
    tokenizer: PreTrainedTokenizerFast,
    files: Sequence[SourceFile],
    count: int,
    target: int,
    exclude: Sequence[str] = (),
) -> list[dict[str, str]]:
    """``count`` chunks spread evenly over all held-out chunks (deterministic, files in path order), minus those
    that occur verbatim in one of ``exclude`` (the train files): dropped after the spread, so that every other
    record stays the one it was and the set may come out a little smaller than ``count``."""
    chunks = [chunk for source in files for chunk in line_chunks(tokenizer, source.text, target) if chunk.strip()]
    if len(chunks) > count:
        chunks = [chunks[i * len(chunks) // count] for i in range(count)]
    return [{"text": chunk} for chunk in chunks if not occurs_in(chunk, exclude)]


def prompt_records(
    tokenizer: PreTrainedTokenizerFast,
    files: Sequence[SourceFile],
    count: int,
    token_range: tuple[int, int],
    seed: int,
    max_per_file: int = 2,
    exclude: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Beginnings of functions, classes and docstrings, ``token_range`` tokens long, from a seeded shuffle.

    A prompt that occurs verbatim in one of ``exclude`` (the other split's files) is dropped but still uses its
    file's slot, so the random draw of every other prompt is unchanged and the set is refilled at its end.
    """
    candidates = [(source, m.start()) for source in files for m in PROMPT_START.finditer(source.text)]
    rng = random.Random(seed)
    rng.shuffle(candidates)
    per_file: dict[str, int] = {}
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    for source, offset in candidates:
        if len(records) == count:
            break
        if per_file.get(source.path, 0) >= max_per_file:
            continue
        length = rng.randint(*token_range)
        ids = tokenizer(source.text[offset : offset + 8 * token_range[1]], add_special_tokens=False)["input_ids"]
        prompt = tokenizer.decode(ids[:length])
        if len(ids) < length or "\ufffd" in prompt or not prompt.strip() or prompt in seen:
            continue
        seen.add(prompt)
        per_file[source.path] = per_file.get(source.path, 0) + 1
        if not occurs_in(prompt, exclude):
            records.append({"prompt": prompt})
    return records


def write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class BundledData:
    """The evaluation records and prompt sets written under ``<out>/data``."""

    records: list[dict[str, str]]
    train_prompts: list[dict[str, str]]
    heldout_prompts: list[dict[str, str]]

    def write(self, out: Path) -> None:
        write_jsonl(out / "data" / "heldout.jsonl", self.records)
        write_jsonl(out / "data" / "prompts.jsonl", self.train_prompts)
        write_jsonl(out / "data" / "prompts-heldout.jsonl", self.heldout_prompts)

    def counts(self) -> dict[str, int]:
        return {
            "heldout_records": len(self.records),
            "train_prompts": len(self.train_prompts),
            "heldout_prompts": len(self.heldout_prompts),
        }


def bundled_data(
    args: argparse.Namespace,
    tokenizer: PreTrainedTokenizerFast,
    train_files: Sequence[SourceFile],
    heldout_files: Sequence[SourceFile],
) -> BundledData:
    """Records and prompts of both splits; nothing of one split occurs verbatim in a file of the other."""
    train_texts = [f.text for f in train_files]
    heldout_texts = [f.text for f in heldout_files]
    span = tuple(args.prompt_tokens)
    return BundledData(
        records=heldout_records(tokenizer, heldout_files, args.heldout_records, args.chunk_tokens, train_texts),
        train_prompts=prompt_records(
            tokenizer, train_files, args.train_prompts, span, args.seed, exclude=heldout_texts
        ),
        heldout_prompts=prompt_records(
            tokenizer, heldout_files, args.heldout_prompts, span, args.seed + 1, exclude=train_texts
        ),
    )


# --------------------------------------------------------------------------------------------------- training


def step_metrics(model: PreTrainedModel, out: Any, args: argparse.Namespace) -> tuple[float, float]:
    """After the optimizer step: (train cross-entropy, the family's balance metric) of this step.

    qwen3_moe: ``out.loss`` includes ``aux_loss_coef`` x the load-balancing loss; the metric is that loss.
    glm4_moe_lite: ``out.loss`` is the cross-entropy alone; the correction biases are updated here and the metric
    is the step's max / mean expert load.
    """
    loss = out.loss.detach().item()
    if family_of(model) is QWEN:
        aux = out.aux_loss.detach().item()
        return loss - args.aux_loss_coef * aux, aux
    return loss, update_correction_bias(model, out.router_logits, args.bias_update_speed)


def bias_range(model: PreTrainedModel) -> list[float]:
    values = torch.cat(correction_biases(model))
    return [round(values.min().item(), 5), round(values.max().item(), 5)]


def train(
    model: PreTrainedModel,
    stream: torch.Tensor,
    quick_eval: Sequence[torch.Tensor],
    unigram: torch.Tensor,
    args: argparse.Namespace,
    budget_s: float,
) -> dict[str, Any]:
    """AdamW with warmup + cosine on random windows until ``args.steps`` or ``budget_s`` seconds, whichever first."""
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
    )
    sigmoid = family_of(model) is GLM
    metric_name = "max/mean load" if sigmoid else "aux"
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.perf_counter()
    step = 0
    window_ce = window_aux = 0.0
    window_start, window_steps = start, 0
    history: list[dict[str, Any]] = []
    final_ce = float("nan")
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        lr = args.lr * lr_factor(step, progress, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, args.batch_size, args.seq_len, generator)
        out = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        ce, aux = step_metrics(model, out, args)
        window_ce += ce
        window_aux += aux
        window_steps += 1
        if step % args.log_every == 0:
            now = time.perf_counter()
            final_ce = window_ce / window_steps
            tok_s = window_steps * args.batch_size * args.seq_len / (now - window_start)
            log(
                f"step {step:5d} | {100 * progress:5.1f}% | lr {lr:.2e} | ce {final_ce:.4f} | "
                f"{metric_name} {window_aux / window_steps:.4f} | {tok_s:,.0f} tok/s | {now - start:,.0f}s"
            )
            entry: dict[str, Any] = {"step": step, "seconds": round(now - start, 1), "train_ce": round(final_ce, 4)}
            if sigmoid:
                entry |= {"max_over_mean_load": round(window_aux / window_steps, 4), "bias_range": bias_range(model)}
            history.append(entry)
            window_ce = window_aux = 0.0
            window_start, window_steps = now, 0
        if args.eval_every and step % args.eval_every == 0:
            result = evaluate(model, quick_eval, unigram)
            log(f"step {step:5d} | held-out subset nll {result.nll:.4f} ({result.tokens} tokens)")
            if history:
                history[-1]["heldout_subset_nll"] = round(result.nll, 4)
    if window_steps:
        final_ce = window_ce / window_steps
    seconds = time.perf_counter() - start
    tokens = step * args.batch_size * args.seq_len
    log(f"trained {step} steps, {tokens:,} tokens in {seconds:,.0f}s ({tokens / seconds:,.0f} tok/s)")
    return {
        "steps": step,
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 1),
        "final_train_ce": final_ce,
        "tokens_per_second": round(tokens / seconds, 1),
        "history": history,
    }


# --------------------------------------------------------------------------------------------------- outputs


def sample_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, seed: int) -> str:
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=96, do_sample=True, temperature=0.7, top_p=0.95)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def load_table(load: list[list[float]]) -> str:
    experts = len(load[0])
    header = "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " | min | max |"
    rule = "|" + "---|" * (experts + 3)
    rows = [
        f"| {layer} | "
        + " | ".join(f"{100 * v:.1f}" for v in row)
        + f" | {100 * min(row):.1f} | {100 * max(row):.1f} |"
        for layer, row in enumerate(load)
    ]
    return "\n".join([header, rule, *rows])


def qwen_card(report: dict[str, Any], sample_prompt: str, sample: str) -> str:
    corpus, arch, run, ev = report["corpus"], report["architecture"], report["training"], report["evaluation"]
    hyper = report["hyperparameters"]
    return f"""---
library_name: transformers
license: apache-2.0
pipeline_tag: text-generation
tags:
- moe
- qwen3_moe
- zeda
---

# pystdlib-moe

A small but genuinely trained static Mixture-of-Experts language model: `Qwen3MoeForCausalLM` with
{arch["num_experts"]} experts per layer and top-{arch["num_experts_per_tok"]} routing, trained from scratch on the
Python {corpus["python_version"]} standard library. It is zeda's bundled teacher: the demo, the tests and the
quality benchmarks convert it into a dynamic MoE with zero experts (ZEDA) and compare against baselines such as
top-p routing. It writes plausible-looking Python, not correct programs.

## Corpus

The `*.py` sources of the CPython {corpus["python_version"]} standard library of the interpreter that ran the script
(`sysconfig.get_paths()["stdlib"]`), without `site-packages`, test packages (`test/`, `tests/`, `idle_test/`), the
generated codec tables in `encodings/`, `pydoc_data/` and `_sysconfigdata_*`. Files are split by a SHA-256 of their
relative path: {corpus["train_files"]} train files ({corpus["train_chars"]:,} characters, {corpus["train_tokens"]:,}
tokens) and {corpus["heldout_files"]} held-out files ({corpus["heldout_chars"]:,} characters,
{corpus["heldout_tokens"]:,} tokens). The CPython sources are distributed under the Python Software Foundation
License; the model weights and this card are released under Apache-2.0 with zeda.

## Tokenizer

Byte-level BPE (`tokenizers`, GPT-2 pre-tokenisation) with {arch["vocab_size"]} entries trained on the train split;
`<|endoftext|>` (id {arch["eos_token_id"]}) is eos and pad and separates files during training. No BOS is added.

## Architecture

| | |
|---|---|
| class | `Qwen3MoeForCausalLM` (`model_type: qwen3_moe`) |
| layers | {arch["num_hidden_layers"]}, all sparse (`decoder_sparse_step: 1`, `mlp_only_layers: []`) |
| hidden size | {arch["hidden_size"]} |
| attention | {arch["num_attention_heads"]} query heads, {arch["num_key_value_heads"]} KV heads, head_dim \
{arch["head_dim"]}, RoPE, QK-norm |
| experts | {arch["num_experts"]} per layer, top-{arch["num_experts_per_tok"]}, `norm_topk_prob: true`, \
moe_intermediate_size {arch["moe_intermediate_size"]} |
| router aux loss coefficient | {arch["router_aux_loss_coef"]} |
| embeddings | tied input / output |
| parameters | {arch["parameters"]:,} total, {arch["active_parameters"]:,} active per token |
| trained context | {hyper["seq_len"]} tokens (`max_position_embeddings` {arch["max_position_embeddings"]}) |

## Training

AdamW (betas 0.9 / 0.95, weight decay {hyper["weight_decay"]} on projection and expert matrices), peak learning
rate {hyper["lr"]}, {hyper["warmup_steps"]} warmup steps then cosine decay to {hyper["min_lr_ratio"]}x, gradient
clipping {hyper["grad_clip"]}, batches of {hyper["batch_size"]} random {hyper["seq_len"]}-token windows, fp32,
{hyper["threads"]} CPU threads, `experts_implementation="grouped_mm"`, seed {hyper["seed"]}.

- steps: {run["steps"]:,}; tokens seen: {run["tokens_seen"]:,} (~{run["epochs"]:.1f} passes over the train split)
- training time: {run["train_seconds"] / 60:.1f} min ({run["tokens_per_second"]:,.0f} tokens/s), whole script
  {run["wall_seconds"] / 60:.1f} min on {run["device"]}
- final train cross-entropy: {run["final_train_ce"]:.3f} nats/token

## Evaluation (held-out files)

| | NLL (nats/token) | perplexity |
|---|---|---|
| this model, all held-out files ({ev["heldout_tokens"]:,} tokens) | {ev["heldout_nll"]:.3f} | \
{math.exp(ev["heldout_nll"]):.1f} |
| unigram baseline (fitted on train tokens), same tokens | {ev["unigram_nll"]:.3f} | \
{math.exp(ev["unigram_nll"]):.1f} |
| this model, `data/heldout.jsonl` ({ev["records_tokens"]:,} tokens) | {ev["records_nll"]:.3f} | \
{math.exp(ev["records_nll"]):.1f} |

Per-expert load on the held-out files: percentage of the top-{arch["num_experts_per_tok"]} routing slots that
each expert receives (uniform would be {100 / arch["num_experts"]:.2f}%).

{load_table(ev["expert_load"])}

## Sample (temperature 0.7, top-p 0.95)

Prompt (from `data/prompts-heldout.jsonl`):

```python
{sample_prompt}
```

Continuation:

```python
{sample}
```

## Files

- `model.safetensors`, `config.json`, `generation_config.json`: the model (fp32).
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer (`AutoTokenizer.from_pretrained` works offline).
- `data/heldout.jsonl`: {ev["records"]} held-out chunks `{{"text": ...}}` of about {hyper["chunk_tokens"]} tokens
  (whole lines) for quality benchmarks.
- `data/prompts.jsonl`: {report["data"]["train_prompts"]} prompts `{{"prompt": ...}}` ({hyper["prompt_tokens"][0]}-\
{hyper["prompt_tokens"][1]} tokens: starts of functions, classes and docstrings) from train files, for teacher
  rollouts and on-policy distillation; `data/prompts-heldout.jsonl`: {report["data"]["heldout_prompts"]} from
  held-out files.
- `training.json`: corpus statistics, hyperparameters, loss curve, evaluation and expert load.

## Reproduce

```bash
{report["command"]}
```

The run above was bounded by the wall clock, so the exact step count depends on the machine; with `--steps
{run["steps"]} --max-minutes 1000` the schedule is fixed by steps and the run is deterministic on a given
torch / CPU combination. Built with Python {corpus["python_version"]}, torch {report["versions"]["torch"]},
transformers {report["versions"]["transformers"]}, tokenizers {report["versions"]["tokenizers"]}.
"""


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def load_summary_table(layers: Sequence[int], load: list[list[float]], by_score: list[list[float]]) -> str:
    """Per MoE layer: the spread of the expert loads (in %) and how many experts get under a quarter of uniform."""
    header = (
        "| layer | min | p10 | median | p90 | max | max / mean | experts < 1/4 of uniform "
        "| max / mean without the bias |"
    )
    rows = [header, "|" + "---|" * 9]
    for layer, row, score_row in zip(layers, load, by_score, strict=True):
        mean = 1.0 / len(row)
        cells = [100 * v for v in (min(row), quantile(row, 0.1), quantile(row, 0.5), quantile(row, 0.9), max(row))]
        starving = sum(v < mean / 4 for v in row)
        rows.append(
            f"| {layer} | " + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {max(row) / mean:.2f} | {starving} | {max(score_row) / mean:.2f} |"
        )  # fmt: skip
    return "\n".join(rows)


def bias_table(layers: Sequence[int], biases: list[list[float]]) -> str:
    rows = ["| layer | min | max | mean | std |", "|---|---|---|---|---|"]
    for layer, row in zip(layers, biases, strict=True):
        rows.append(
            f"| {layer} | {min(row):+.4f} | {max(row):+.4f} | {statistics.fmean(row):+.4f} "
            f"| {statistics.pstdev(row):.4f} |"
        )
    return "\n".join(rows)


def glm_card(report: dict[str, Any], sample_prompt: str, sample: str) -> str:
    corpus, arch, run, ev = report["corpus"], report["architecture"], report["training"], report["evaluation"]
    hyper, tok = report["hyperparameters"], report["tokenizer"]
    ref = Glm4MoeLiteConfig()  # GLM-4.7-Flash's published config is Glm4MoeLiteConfig's defaults
    with torch.device("meta"):
        full = Glm4MoeLiteForCausalLM(ref)
    ref_total, ref_active = sum(p.numel() for p in full.parameters()), active_parameters(full)
    layers = ev["moe_layers"]
    dense = [i for i, kind in enumerate(arch["mlp_layer_types"]) if kind == "dense"]
    last = run["history"][-1] if run["history"] else {}
    uniform = 1.0 / arch["n_routed_experts"]
    worst = max(max(row) for row in ev["expert_load"]) / uniform
    starving = sum(v < uniform / 4 for row in ev["expert_load"] for v in row)
    return f"""---
library_name: transformers
license: apache-2.0
pipeline_tag: text-generation
tags:
- moe
- glm4_moe_lite
- zeda
---

# pystdlib-glm

A small but genuinely trained static Mixture-of-Experts language model with GLM-4.7-Flash's structure in miniature:
`Glm4MoeLiteForCausalLM` with multi-head latent attention on GLM-4.7-Flash's latent (kv_lora_rank
{arch["kv_lora_rank"]}, qk_rope_head_dim {arch["qk_rope_head_dim"]}), a dense first layer, one shared expert and
{arch["n_routed_experts"]} routed experts with top-{arch["num_experts_per_tok"]} routing behind a sigmoid router
whose `e_score_correction_bias` was trained without an auxiliary loss. It is trained from scratch on the Python
{corpus["python_version"]} standard library with the same split and the same tokenizer as `models/pystdlib-moe`
(zeda's Qwen3-MoE teacher), so it is zeda's bundled teacher of the sigmoid router family: the same held-out data,
a second routing semantics. It writes plausible-looking Python, not correct programs.

## Corpus

The `*.py` sources of the CPython {corpus["python_version"]} standard library of the interpreter that ran the script
(`sysconfig.get_paths()["stdlib"]`), without `site-packages`, test packages (`test/`, `tests/`, `idle_test/`), the
generated codec tables in `encodings/`, `pydoc_data/` and `_sysconfigdata_*`. Files are split by a SHA-256 of their
relative path: {corpus["train_files"]} train files ({corpus["train_chars"]:,} characters, {corpus["train_tokens"]:,}
tokens) and {corpus["heldout_files"]} held-out files ({corpus["heldout_chars"]:,} characters,
{corpus["heldout_tokens"]:,} tokens), the split of `models/pystdlib-moe` (the script checks the held-out paths
against its `training.json`). The CPython sources are distributed under the Python Software Foundation License;
the model weights and this card are released under Apache-2.0 with zeda.

## Tokenizer

`tokenizer.json` and `tokenizer_config.json` are byte-for-byte copies of `{tok["source"]}`'s (sha256 of
`tokenizer.json`: `{tok["tokenizer_json_sha256"][:16]}…`): byte-level BPE (`tokenizers`, GPT-2 pre-tokenisation)
with {arch["vocab_size"]} entries trained on the train split; `<|endoftext|>` (id {arch["eos_token_id"]}) is eos and
pad and separates files during training. No BOS is added.

## Architecture

| | this model | GLM-4.7-Flash (`Glm4MoeLiteConfig()` defaults) |
|---|---|---|
| class | `Glm4MoeLiteForCausalLM` (`model_type: glm4_moe_lite`) | the same |
| layers | {arch["num_hidden_layers"]}: {", ".join(map(str, dense))} dense (MLP width {arch["intermediate_size"]}), \
{", ".join(map(str, layers))} MoE (`mlp_layer_types`) | {ref.num_hidden_layers}, the first dense \
(width {ref.intermediate_size}) |
| hidden size | {arch["hidden_size"]} | {ref.hidden_size} |
| attention (MLA) | {arch["num_attention_heads"]} heads; q_lora_rank {arch["q_lora_rank"]}, kv_lora_rank \
**{arch["kv_lora_rank"]}**, qk_nope_head_dim {arch["qk_nope_head_dim"]}, qk_rope_head_dim \
**{arch["qk_rope_head_dim"]}**, v_head_dim {arch["v_head_dim"]}, interleaved RoPE | {ref.num_attention_heads} heads; \
{ref.q_lora_rank}, **{ref.kv_lora_rank}**, {ref.qk_nope_head_dim}, **{ref.qk_rope_head_dim}**, {ref.v_head_dim} |
| routed experts | {arch["n_routed_experts"]} per MoE layer, top-{arch["num_experts_per_tok"]}, moe_intermediate_size \
{arch["moe_intermediate_size"]} | {ref.n_routed_experts}, top-{ref.num_experts_per_tok}, {ref.moe_intermediate_size} |
| shared experts | {arch["n_shared_experts"]} (always on) | {ref.n_shared_experts} |
| router | sigmoid scores; choice by score + `e_score_correction_bias`; weights = the chosen scores over their sum \
(`norm_topk_prob: {str(arch["norm_topk_prob"]).lower()}`) x `routed_scaling_factor` {arch["routed_scaling_factor"]}; \
n_group {arch["n_group"]}, topk_group {arch["topk_group"]} | the same, {ref.routed_scaling_factor}, n_group \
{ref.n_group} |
| embeddings | tied input / output | untied |
| parameters | {arch["parameters"]:,} total, {arch["active_parameters"]:,} active per token | \
{ref_total / 1e9:.1f}B total, {ref_active / 1e9:.1f}B active (the same count at full size) |
| trained context | {hyper["seq_len"]} tokens (`max_position_embeddings` {arch["max_position_embeddings"]}) | \
{ref.max_position_embeddings:,} |

kv_lora_rank 512 and qk_rope_head_dim 64 are kept at full size because vLLM's CPU MLA decode kernel is compiled for
that latent only; every other width is small.

## Training

AdamW (betas 0.9 / 0.95, weight decay {hyper["weight_decay"]} on projection and expert matrices, none on norms, the
embedding and the router), peak learning rate {hyper["lr"]}, {hyper["warmup_steps"]} warmup steps then cosine decay
to {hyper["min_lr_ratio"]}x, gradient clipping {hyper["grad_clip"]}, batches of {hyper["batch_size"]} random
{hyper["seq_len"]}-token windows, fp32, {hyper["threads"]} CPU threads, `experts_implementation="grouped_mm"`, seed
{hyper["seed"]}. The loss is the token cross-entropy alone.

Router balance, the auxiliary-loss-free way of DeepSeek-V3 and GLM: after every optimizer step, each MoE layer's
`e_score_correction_bias` (a buffer, no gradient) moves by gamma = {hyper["bias_update_speed"]} per expert,
`bias_i += gamma * sign(mean_load - load_i)`, with the load counted from that step's *biased* top-k choice. No
sequence-level auxiliary loss was used (`sequence_aux_loss_coef` {hyper["sequence_aux_loss_coef"]}): the bias alone
balanced the load, so none was needed: on the held-out files the most loaded expert of a layer gets at most
{worst:.2f}x the mean load, and {starving} of the {len(layers) * arch["n_routed_experts"]} routed experts get less
than a quarter of it (table below).

- steps: {run["steps"]:,} (bounded by `--steps`, not by the clock); tokens seen: {run["tokens_seen"]:,}
  (~{run["epochs"]:.1f} passes over the train split)
- training time: {run["train_seconds"] / 60:.1f} min ({run["tokens_per_second"]:,.0f} tokens/s), whole script
  {run["wall_seconds"] / 60:.1f} min on {run["device"]}
- final train cross-entropy: {run["final_train_ce"]:.3f} nats/token; max / mean expert load of the last
  {hyper["log_every"]} steps' batches: {last.get("max_over_mean_load", float("nan")):.2f}

## Evaluation (held-out files)

| | NLL (nats/token) | perplexity |
|---|---|---|
| this model, all held-out files ({ev["heldout_tokens"]:,} tokens) | {ev["heldout_nll"]:.3f} | \
{math.exp(ev["heldout_nll"]):.1f} |
| unigram baseline (fitted on train tokens), same tokens | {ev["unigram_nll"]:.3f} | \
{math.exp(ev["unigram_nll"]):.1f} |
| this model, `data/heldout.jsonl` ({ev["records_tokens"]:,} tokens) | {ev["records_nll"]:.3f} | \
{math.exp(ev["records_nll"]):.1f} |
| unigram baseline, `data/heldout.jsonl` | {ev["records_unigram_nll"]:.3f} | \
{math.exp(ev["records_unigram_nll"]):.1f} |

Per-expert load on the held-out files: percentage of the top-{arch["num_experts_per_tok"]} routing slots that each
of the {arch["n_routed_experts"]} experts receives with the trained correction bias (uniform would be
{100 / arch["n_routed_experts"]:.3f}%); the last column is the same choice made from the scores alone, without the
bias. The full per-expert loads are in `training.json` (`evaluation.expert_load`).

{load_summary_table(layers, ev["expert_load"], ev["expert_load_by_score"])}

The trained `e_score_correction_bias` per MoE layer (all zeros at initialisation). Only its spread within a layer
steers the choice: an offset common to all experts changes nothing, and the sign updates drift upwards because at
most steps more experts are under- than over-loaded.

{bias_table(layers, ev["correction_bias"])}

## Sample (temperature 0.7, top-p 0.95)

Prompt (from `data/prompts-heldout.jsonl`):

```python
{sample_prompt}
```

Continuation:

```python
{sample}
```

## Files

- `model.safetensors`, `config.json`, `generation_config.json`: the model (fp32).
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer (`AutoTokenizer.from_pretrained` works offline).
- `data/heldout.jsonl`: {ev["records"]} held-out chunks `{{"text": ...}}` of about {hyper["chunk_tokens"]} tokens
  (whole lines) for quality benchmarks.
- `data/prompts.jsonl`: {report["data"]["train_prompts"]} prompts `{{"prompt": ...}}` ({hyper["prompt_tokens"][0]}-\
{hyper["prompt_tokens"][1]} tokens: starts of functions, classes and docstrings) from train files, for teacher
  rollouts and on-policy distillation; `data/prompts-heldout.jsonl`: {report["data"]["heldout_prompts"]} from
  held-out files; `data/prompts-train-4k.jsonl`: 4,096 more train prompts (`python scripts/make_prompts.py
  --model {report["out"]} --count 4096 --out {report["out"]}/data/prompts-train-4k.jsonl`).
  No record or prompt occurs verbatim in a file of the other split. Same tokenizer and split as
  `models/pystdlib-moe`, so these files are identical to its.
- `training.json`: corpus statistics, hyperparameters, loss curve, evaluation, expert load and correction biases.

## Reproduce

```bash
{report["command"]}
```

The run is bounded by `--steps`, so it is deterministic on a given torch / CPU combination. Built with Python
{corpus["python_version"]}, torch {report["versions"]["torch"]}, transformers {report["versions"]["transformers"]},
tokenizers {report["versions"]["tokenizers"]}.
"""


def active_parameters(model: PreTrainedModel) -> int:
    config = model.config
    experts_per_layer = family_of(model).num_experts(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total - experts + experts * config.num_experts_per_tok // experts_per_layer


def architecture_report(model: PreTrainedModel, eos_id: int) -> dict[str, Any]:
    config = model.config
    keys = (
        ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
         "max_position_embeddings")
        if family_of(model) is QWEN
        else ("vocab_size", "hidden_size", "num_hidden_layers", "mlp_layer_types", "intermediate_size",
              "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "rope_interleave", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "routed_scaling_factor", "n_group",
              "topk_group", "max_position_embeddings", "tie_word_embeddings")
    )  # fmt: skip
    return {key: getattr(config, key) for key in keys} | {
        "eos_token_id": eos_id,
        "parameters": sum(p.numel() for p in model.parameters()),
        "active_parameters": active_parameters(model),
    }


def load_tokenizer(
    args: argparse.Namespace, train_files: Sequence[SourceFile], heldout_files: Sequence[SourceFile]
) -> PreTrainedTokenizerFast:
    """Train the tokenizer on the train split, or load ``--tokenizer`` after checking it used the same split."""
    if args.tokenizer is None:
        return train_tokenizer([f.text for f in train_files], args.vocab_size, args.max_position_embeddings)
    check_same_split(args.tokenizer, heldout_files)
    log(f"tokenizer: reusing {args.tokenizer}")
    return PreTrainedTokenizerFast.from_pretrained(args.tokenizer)


def write_data_only(args: argparse.Namespace, train_files: list[SourceFile], heldout_files: list[SourceFile]) -> None:
    """``--data-only``: rebuild ``<out>/data/*.jsonl`` with the folder's own tokenizer; weights untouched."""
    check_same_split(args.out, heldout_files)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer or args.out)
    data = bundled_data(args, tokenizer, train_files, heldout_files)
    data.write(args.out)
    log(f"wrote {args.out / 'data'}: {data.counts()}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    # With more than one thread, the backward of the expert dispatch (``hidden_states[perm]`` in transformers'
    # grouped_mm experts: an accumulating index_put) adds duplicate rows in a racy order unless deterministic
    # algorithms are on; then a run bounded by --steps is bit-reproducible (measured: no slowdown).
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    family = FAMILIES[args.family]

    files = collect_corpus(args.stdlib, args.heldout_fraction)
    train_files = [f for f in files if not f.heldout]
    heldout_files = [f for f in files if f.heldout]
    if not train_files or not heldout_files:
        raise SystemExit(f"no usable stdlib sources under {args.stdlib}")
    log(f"corpus: {len(train_files)} train / {len(heldout_files)} held-out files from {args.stdlib}")
    if args.data_only:
        write_data_only(args, train_files, heldout_files)
        return

    tokenizer = load_tokenizer(args, train_files, heldout_files)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    train_stream = token_stream(encode_all(tokenizer, [f.text for f in train_files]), eos_id, args.seed)
    heldout_stream = token_stream(encode_all(tokenizer, [f.text for f in heldout_files]), eos_id, args.seed)
    log(
        f"tokenizer: {len(tokenizer)} entries; {train_stream.numel():,} train / {heldout_stream.numel():,} "
        f"held-out tokens ({sum(len(f.text) for f in train_files) / train_stream.numel():.2f} chars/token)"
    )

    model = build_model(family, family.build_config(args, len(tokenizer), eos_id), args.seed)
    total_params = sum(p.numel() for p in model.parameters())
    log(f"model: {family.model_class.__name__}, {total_params:,} parameters ({active_parameters(model):,} active)")

    heldout_windows = list(windows(heldout_stream, args.seq_len))
    quick_eval = heldout_windows[:: max(1, len(heldout_windows) // 32)][:32]
    unigram = unigram_logprobs(train_stream, len(tokenizer))
    budget_s = math.inf
    if args.max_minutes is not None:
        budget_s = args.max_minutes * SECONDS_PER_MINUTE - (time.perf_counter() - wall_start)
        budget_s -= args.eval_reserve_minutes * SECONDS_PER_MINUTE
        if budget_s <= 0:
            raise SystemExit("--max-minutes leaves no time for training")
    log(f"training for at most {args.steps} steps / {budget_s / 60:.1f} min")
    run = train(model, train_stream, quick_eval, unigram, args, budget_s)

    result = evaluate(model, heldout_windows, unigram)
    log(f"held-out nll {result.nll:.4f} vs unigram {result.unigram_nll:.4f} over {result.tokens:,} tokens")
    data = bundled_data(args, tokenizer, train_files, heldout_files)
    record_ids = [torch.tensor(ids) for ids in encode_all(tokenizer, [r["text"] for r in data.records])]
    record_result = evaluate(model, record_ids, unigram)
    log(f"heldout.jsonl nll {record_result.nll:.4f} over {record_result.tokens:,} tokens")

    model.eval()
    sample_prompt = data.heldout_prompts[0]["prompt"]
    sample = sample_generation(model, tokenizer, sample_prompt, args.seed)
    log(f"sample:\n{sample_prompt}{sample}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(args.out, max_shard_size="50MB")
    if args.tokenizer is None:
        tokenizer.save_pretrained(args.out)
    else:
        copy_tokenizer(args.tokenizer, args.out)
    data.write(args.out)

    run.update(
        wall_seconds=round(time.perf_counter() - wall_start, 1),
        epochs=run["tokens_seen"] / train_stream.numel(),
        device=f"{platform.machine()} CPU, {args.threads} threads",
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )
    streams = {"train_tokens": train_stream.numel(), "heldout_tokens": heldout_stream.numel()}
    report = build_report(args, argv, model, eos_id, train_files, heldout_files, streams, run)
    report["evaluation"] = evaluation_report(model, result, record_result, len(data.records))
    report["data"] = data.counts()
    report["sample"] = {"prompt": sample_prompt, "continuation": sample}
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    card = qwen_card if family is QWEN else glm_card
    (args.out / "README.md").write_text(card(report, sample_prompt, sample), encoding="utf-8")
    for layer, row in zip(family.moe_layers(model.config), report["evaluation"]["expert_load"], strict=True):
        log(f"layer {layer} expert load: min {100 * min(row):.2f}% max {100 * max(row):.2f}%")
    log(f"wrote {args.out} in {run['wall_seconds'] / 60:.1f} min")


def build_report(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    model: PreTrainedModel,
    eos_id: int,
    train_files: Sequence[SourceFile],
    heldout_files: Sequence[SourceFile],
    streams: dict[str, int],
    run: dict[str, Any],
) -> dict[str, Any]:
    """``training.json`` minus the evaluation and data counts."""
    hyper_keys = ["seed", "threads", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "grad_clip", "max_minutes", "steps", "chunk_tokens"]  # fmt: skip
    hyper = {key: getattr(args, key) for key in hyper_keys} | {"prompt_tokens": list(args.prompt_tokens)}
    report: dict[str, Any] = {
        "command": "python scripts/train_bundled_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "family": args.family,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "corpus": {
            "stdlib": str(args.stdlib),
            "python_version": platform.python_version(),
            "train_files": len(train_files),
            "heldout_files": len(heldout_files),
            "train_chars": sum(len(f.text) for f in train_files),
            "heldout_chars": sum(len(f.text) for f in heldout_files),
            **streams,
            "heldout_paths": [f.path for f in heldout_files],
        },
        "architecture": architecture_report(model, eos_id),
        "hyperparameters": hyper,
        "training": run,
    }
    if family_of(model) is GLM:
        hyper |= {"log_every": args.log_every, "bias_update_speed": args.bias_update_speed,
                  "sequence_aux_loss_coef": 0.0}  # fmt: skip
        report["out"] = display_path(args.out)
        report["tokenizer"] = {
            "source": display_path(args.tokenizer) if args.tokenizer else None,
            "tokenizer_json_sha256": sha256_file(args.out / "tokenizer.json"),
        }
    return report


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (the card shows it in commands)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def evaluation_report(
    model: PreTrainedModel, result: EvalResult, records: EvalResult, record_count: int
) -> dict[str, Any]:
    """The ``evaluation`` entry of ``training.json``: NLLs, expert load (and, sigmoid family, the correction bias)."""
    load = load_fractions(result.expert_counts)
    report: dict[str, Any] = {
        "heldout_nll": round(result.nll, 5),
        "unigram_nll": round(result.unigram_nll, 5),
        "heldout_tokens": result.tokens,
        "records": record_count,
        "records_nll": round(records.nll, 5),
        "records_unigram_nll": round(records.unigram_nll, 5),
        "records_tokens": records.tokens,
        "expert_load": load,
        "expert_load_min_max": [[min(row), max(row)] for row in load],
    }
    if family_of(model) is GLM:
        by_score = load_fractions(result.score_counts)
        biases = [[round(v, 6) for v in bias.tolist()] for bias in correction_biases(model)]
        report |= {
            "moe_layers": family_of(model).moe_layers(model.config),
            "expert_load_by_score": by_score,
            "expert_load_by_score_min_max": [[min(row), max(row)] for row in by_score],
            "correction_bias": biases,
            "correction_bias_min_max": [[min(row), max(row)] for row in biases],
        }
    return report


if __name__ == "__main__":
    main()
