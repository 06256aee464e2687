"""Per-stage memory estimates from config + safetensors headers, and the early refusal when they cannot fit.

Every term is counted per training process (rank) for the backend the recipe runs under, from the same precision
policy the trainer uses (``distill.precision``); ``benchmarks/memory_scale.py`` measures full-width slices of the
target models on 2 CPU ranks next to these figures. Terms (bytes):

* student weights and optimizer state: full-parameter 16 B/param (fp32 weights, gradients, Adam m and v), divided
  over the ranks that shard it (ZeRO-3: all ranks; FSDP2: ``fsdp_size``); router-only: the frozen weights in the
  compute dtype, divided the same way, + 16 B per router parameter;
* what a sharding backend gathers at once: ZeRO-3 a whole MoE block (a leaf module) twice (prefetch) plus its
  gradients; FSDP2 one decoder layer twice, its experts only over the expert-FSDP group (whole experts stay on
  their ``ep_size`` ranks), plus the head and final norm, which stay gathered, and in full-parameter backward the
  larger of one layer's and the head's unsharded gradients (with mixed precision also their fp32 copy for the
  reduce-scatter);
* a separate frozen teacher (none for a router-view teacher, or one whose log-probs come from a server): its
  weights in the compute dtype, sharded like the student's;
* activations of one micro-batch: checkpointed layer inputs (or every layer's intermediates), one layer's
  recompute, attention scores where the kernel materialises them (CPU), the MoE pairs, router logits for L_GA, the
  final hidden states and one chunk of logits (the head runs chunk by chunk: ``distill.logits``); the dense
  losses add the teacher's bf16 distribution;
* stage 2 with ``generation.engine: hf``: the KV cache and step logits of generating the whole step's samples;
  under FSDP2 also the embedding's full weight: the head's unit is kept gathered from its forward until its
  backward, so from generate's second token on the embedding is gathered beside it;
* under DeepSpeed, rank 0's consolidated save at the end of a stage: the full model in the parameters' dtype and
  one leaf's gather (device memory on CPU; on GPU DeepSpeed copies the tensors to host RAM), beside the sharded
  weights and optimizer state.
  The stage's peak is the larger of that and the training step;
* a fixed margin (runtime, allocator slack, CUDA context).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ExternalError
from ..recipes import Recipe, Stage1Section, TrainCommon

GB = 1024**3
MARGIN = {"cuda": 2 * GB, "cpu": int(0.6 * GB)}  # runtime, CUDA context, allocator slack
PROMPT_TOKENS = 1024  # prompt length assumed for generation when the prompt set is not read


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    routed_expert_params: int
    router_params: int
    hidden: int
    layers: int
    vocab: int
    kv_width: int  # key + value values stored per token per layer
    largest_block_params: int  # one MoE layer's expert parameters (routed + shared)
    largest_tensor_bytes: int
    moe_layers: int = 1
    zero_rows: int = 0  # zero-expert router rows already in the checkpoint (a dynamic folder), per layer
    embed_params: int = 0  # input embedding + output head (once when tied)
    num_experts: int = 1
    top_k: int = 1
    moe_intermediate: int = 0
    heads: int = 1
    attention_width: int = 0  # q + k + v + o values per token of one layer's attention

    @classmethod
    def from_report(cls, report: Any, hf_config: Any) -> ModelShape:
        p = report.params
        moe = max(len(report.moe_layers), 1)
        heads = int(getattr(hf_config, "num_attention_heads", 1))
        kv_heads = int(getattr(hf_config, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(hf_config, "head_dim", 0) or hf_config.hidden_size // heads)
        kv = 2 * kv_heads * head_dim
        attention = 2 * heads * head_dim + kv
        if getattr(hf_config, "kv_lora_rank", None):  # MLA caches the compressed latent + rope key
            kv = int(hf_config.kv_lora_rank) + int(getattr(hf_config, "qk_rope_head_dim", 0) or 0)
            qk = int(hf_config.qk_nope_head_dim) + int(hf_config.qk_rope_head_dim)
            attention = heads * (2 * qk + 2 * int(hf_config.v_head_dim)) + kv
        vocab, hidden = int(hf_config.vocab_size), int(hf_config.hidden_size)
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        experts = int(report.num_experts or 1)
        return cls(
            total_params=p["total"],
            routed_expert_params=p["routed_experts"],
            router_params=p["router"],
            hidden=hidden,
            layers=int(hf_config.num_hidden_layers),
            vocab=vocab,
            kv_width=kv,
            largest_block_params=(p["routed_experts"] + p.get("shared_experts", 0)) // moe,
            largest_tensor_bytes=int(report.checkpoint.get("largest_tensor_bytes", 0)),
            moe_layers=moe,
            embed_params=vocab * hidden * (1 if tied else 2),
            num_experts=experts,
            top_k=int(report.top_k or 1),
            moe_intermediate=int(report.expert_intermediate_size or 0)
            or p["routed_experts"] // max(moe * experts * 3 * hidden, 1),
            zero_rows=int(report.num_zero_experts or 0),
            heads=heads,
            attention_width=attention,
        )


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    device: str  # where the bulk lives: "cpu" or "cuda"
    per_process_gb: float  # device memory per process (RAM for cpu runs)
    host_gb: float  # host RAM on top, for all of a node's processes (offloaded state, streaming buffers)
    processes: int
    formula: str
    components: dict[str, float] = field(default_factory=dict)  # GB per process, by term

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Setup:
    """What the terms depend on, decided once per stage."""

    kind: str  # none | deepspeed | fsdp2
    ranks: int  # processes in all
    shard: int  # ranks that shard a parameter (1: none)
    ep: int
    bytes_: int  # compute dtype
    device: str
    offload: bool  # states on the host (ZeRO-3 offload, FSDP2 cpu_offload)
    reduce_bytes: int = 0  # per parameter, the gradients' copy for the reduce (FSDP2 mixed precision: fp32); 0: none


def _setup(recipe: Recipe, section: TrainCommon, device: str) -> Setup:
    from ..distill.precision import precision, read_deepspeed_json

    d = recipe.distributed
    kind, ranks = d.kind, d.world_size
    ds = read_deepspeed_json(d.deepspeed) if kind == "deepspeed" else None
    bytes_ = precision(recipe, section.trainable, device, deepspeed=ds).compute_bytes
    if kind == "deepspeed":
        zero = (ds or {}).get("zero_optimization", {"stage": 3})
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        return Setup(kind, ranks, ranks if zero.get("stage", 3) == 3 else 1, 1, bytes_, device, offload)
    if kind == "fsdp2":
        fsdp = d.fsdp_size or max(ranks // d.dp_replicate_size, 1)
        return Setup(kind, ranks, fsdp, d.ep_size, bytes_, device, d.cpu_offload, 4 if d.mixed_precision else 0)
    return Setup(kind, 1, 1, 1, bytes_, device, False)


def _sequence_tokens(section: TrainCommon, prompt_tokens: int) -> int:
    """Stage 1 trains on rollouts cut to max_seq_len; stage 2 on prompt + sampled response."""
    if isinstance(section, Stage1Section):
        return section.max_seq_len
    return prompt_tokens + section.max_new_tokens


def _states(shape: ModelShape, section: TrainCommon, s: Setup, router: int) -> tuple[int, int, int]:
    """(device bytes, host bytes, gathered-at-once bytes) of the student's weights and optimizer state."""
    p = shape.total_params
    if section.trainable == "router":
        weights, states = s.bytes_ * p // s.shard, 16 * router // s.shard
    else:
        weights, states = 16 * p // s.shard, 0
    host = 0
    if s.offload and section.trainable == "full":  # device: a compute-dtype shard; host: master, grads, Adam
        host, weights = weights, s.bytes_ * p // s.shard
    gathered = _gathered(shape, section, s)
    return weights + states, host, gathered


def _largest_leaf(shape: ModelShape) -> int:
    """Parameters of ZeRO-3's largest leaf module: an MoE block, or the vocabulary's head when that is larger."""
    return max(shape.largest_block_params, shape.vocab * shape.hidden)


def _gathered(shape: ModelShape, section: TrainCommon, s: Setup, head_gradient: bool = True) -> int:
    """What a sharding backend holds unsharded at once: the current and the prefetched unit, the head (FSDP2 keeps
    it gathered through the step), and in full-parameter backward the unsharded gradients of one unit."""
    if s.kind == "none":
        return 0
    b, block = s.bytes_, shape.largest_block_params
    grads = section.trainable == "full"
    if s.kind == "deepspeed":  # the largest leaf (an MoE block, or the vocabulary's head): gathered whole, twice,
        return b * _largest_leaf(shape) * (2 + int(grads))  # and its gradients
    units = min(2, max(shape.layers, 1))  # a model of one layer has no next layer to prefetch
    dense_layer = max(shape.total_params - shape.routed_expert_params - shape.embed_params, 0) // max(shape.layers, 1)
    experts = block * (s.shard // s.ep) // max(s.shard, 1) if s.shard // s.ep > 1 else 0
    head_params = shape.vocab * shape.hidden if shape.embed_params else 0
    held = b * (dense_layer + experts) * units + b * head_params
    if not grads:
        return held
    # A unit's unsharded gradients, in the compute dtype and (mixed precision) their fp32 copy for the reduce-scatter.
    # Backward starts with the head's alone (measured: 1.6-1.8 GB missing on the Qwen slice's stage 2 without it).
    per_param = b + s.reduce_bytes
    layer_grads = (dense_layer + experts) * per_param
    head_grads = head_params * per_param if head_gradient else 0
    return held + max(layer_grads, head_grads)


def _activations(shape: ModelShape, section: TrainCommon, s: Setup, tokens: int, dense_loss: bool) -> int:
    """One micro-batch, forward and backward."""
    b, h, v, tk = s.bytes_, shape.hidden, shape.vocab, tokens
    seq = tokens // max(section.micro_batch_size, 1)
    experts = shape.num_experts + shape.num_experts // 2  # N + Z router rows
    moe = tk * shape.top_k * (4 * shape.moe_intermediate + 2 * h) * b  # pair inputs/outputs, gate/up/act/down
    attention = tk * (shape.attention_width + 6 * h) * b
    if s.device == "cpu":  # CPU's SDPA (math kernel) keeps the attention probabilities
        attention += section.micro_batch_size * shape.heads * seq * seq * 4 * 2
    layer = attention + moe + tk * experts * 4 * 3
    stored = shape.layers * (tk * h * b * 2 if section.gradient_checkpointing else layer)
    recompute = layer if section.gradient_checkpointing else 0
    router = shape.moe_layers * tk * experts * 4 * 3  # L_GA keeps every router's logits with their graph
    chunk = min(getattr(section, "kl_chunk_size", 1024), seq) * section.micro_batch_size
    head = tk * h * b * 2 + chunk * v * 16  # final hidden states + one chunk of fp32 logits, softmax, gradients
    teacher = tk * v * 2 if dense_loss else tk * 4
    return stored + recompute + router + head + teacher


def _teacher(shape: ModelShape, stage: str, recipe: Recipe, section: TrainCommon, s: Setup) -> int:
    """A separate frozen teacher's weights (sharded like the student's), or nothing."""
    needs = stage == "stage2" or recipe.stage1.loss == "kl"
    if not needs or section.trainable == "router" or _teacher_from_server(recipe, stage):
        return 0
    return s.bytes_ * shape.total_params // s.shard + _gathered(shape, section, s, head_gradient=False) // 2


def _teacher_from_server(recipe: Recipe, stage: str) -> bool:
    return stage == "stage2" and getattr(recipe.stage2, "teacher_logprobs", "trainer") == "engine"


def _generation(shape: ModelShape, recipe: Recipe, s: Setup, prompt_tokens: int) -> int:
    """Stage 2 sampled by HF generate in the trainer: every rank generates the step's whole batch."""
    s2 = recipe.stage2
    sequences = s2.prompts_per_step * s2.samples_per_prompt
    kv = sequences * (prompt_tokens + s2.max_new_tokens) * shape.layers * shape.kv_width * s.bytes_
    # FSDP2 keeps the head's unit (final norm + lm_head) gathered from its forward until its backward, and generate
    # runs forwards only: the next token's embedding unit is gathered beside it (untied weights: two matrices).
    untied = shape.embed_params >= 2 * shape.vocab * shape.hidden
    embedding = s.bytes_ * shape.vocab * shape.hidden if s.kind == "fsdp2" and untied else 0
    return kv + sequences * shape.vocab * 4 * 2 + embedding


def _consolidated_save(shape: ModelShape, s: Setup) -> int:
    """DeepSpeed ZeRO-3 writes a stage's weights from one consolidated state dict that rank 0 builds module by
    module: the whole model in the parameters' dtype, and the largest leaf's gather staged beside it once more (as
    in the training step's gathered term)."""
    if s.kind != "deepspeed" or s.shard == 1:
        return 0
    return s.bytes_ * (shape.total_params + _largest_leaf(shape))


def _server(shape: ModelShape, bytes_: int, sequences: int, new_tokens: int, prompt_tokens: int) -> int:
    """A vLLM generation server: the served weights + the KV cache of one batch."""
    kv = sequences * (new_tokens + prompt_tokens) * shape.layers * shape.kv_width * bytes_
    return bytes_ * shape.total_params + kv


def train_estimate(shape: ModelShape, recipe: Recipe, stage: str, device: str, prompt_tokens: int) -> StageEstimate:
    section = recipe.stage1 if stage == "stage1" else recipe.stage2
    s = _setup(recipe, section, device)
    shape = _with_zero_rows(shape, recipe)
    router = shape.router_params
    states, host, gathered = _states(shape, section, s, router)
    tokens = section.micro_batch_size * _sequence_tokens(section, prompt_tokens)
    dense = (stage == "stage1" and recipe.stage1.loss == "kl") or (stage == "stage2" and recipe.stage2.loss == "full")
    parts = {"weights + optimizer state": states, "gathered at once": gathered,
             "frozen teacher": _teacher(shape, stage, recipe, section, s),
             "activations (one micro-batch)": _activations(shape, section, s, tokens, dense),
             "margin": MARGIN[device]}  # fmt: skip
    if stage == "stage2" and recipe.generation.engine == "hf":
        parts["HF generate (KV cache, logits)"] = _generation(shape, recipe, s, prompt_tokens)
    total = sum(parts.values())
    formula = f"{s.kind}: " + " + ".join(f"{k} {v / GB:.2f}" for k, v in parts.items() if v)
    components = {k: round(v / GB, 3) for k, v in parts.items()}
    node_host = host * min(recipe.distributed.nproc, s.ranks)  # every rank of a node offloads its own shard
    save = _consolidated_save(shape, s)
    if save and device == "cuda":  # DeepSpeed moves each gathered tensor to the host as it builds the state dict
        node_host += save
    elif save:
        saving = states + save + MARGIN[device]
        components["rank 0's consolidated save (apart from training)"] = round(saving / GB, 3)
        if saving > total:
            formula = (f"rank 0's consolidated save: weights + optimizer state {states / GB:.2f} + the full model "
                       f"{save / GB:.2f} + margin (above the training step: {formula})")  # fmt: skip
            total = saving
    return StageEstimate(stage, device, total / GB, node_host / GB, s.ranks, formula, components)


def _with_zero_rows(shape: ModelShape, recipe: Recipe) -> ModelShape:
    """A static model's shape with the zero-expert router rows the stages train (Z per MoE layer)."""
    z = 0 if shape.zero_rows else recipe.zero_experts.num_zero_experts or shape.num_experts // 2
    extra = z * shape.hidden * shape.moe_layers
    return ModelShape(**{**asdict(shape), "total_params": shape.total_params + extra,
                         "router_params": shape.router_params + extra})  # fmt: skip


def estimate_stages(
    shape: ModelShape, recipe: Recipe, device: str, stages: list[str], prompt_tokens: int = PROMPT_TOKENS
) -> list[StageEstimate]:
    from ..distill.precision import compute_dtype

    bytes_ = compute_dtype(recipe, device).itemsize
    out = []
    for stage in stages:
        if stage in ("inject", "export"):
            stream = shape.largest_tensor_bytes * 2 + 256 * 1024**2
            out.append(StageEstimate(stage, "cpu", stream / GB, 0.0, 1, "streamed: largest tensor x2 + buffers"))
        elif stage == "rollout":
            r = recipe.rollout
            server = _server(shape, bytes_, r.batch_size, r.max_new_tokens, prompt_tokens)
            if recipe.generation.engine == "vllm":  # per GPU of a server spanning tensor_parallel_size GPUs
                tp = recipe.generation.tensor_parallel_size
                total = server / tp + MARGIN[device]
                formula = f"vLLM server: teacher weights + KV cache, over {tp} GPU{'s' if tp > 1 else ''}"
            else:
                total = server + r.batch_size * shape.vocab * 4 * 2 + MARGIN[device]
                formula = "teacher weights + KV cache + step logits (HF generate)"
            out.append(StageEstimate(stage, device, total / GB, 0.0, 1, formula))
        elif stage in ("stage1", "stage2"):
            out.append(train_estimate(shape, recipe, stage, device, prompt_tokens))
    return out


def available_memory(device: str) -> tuple[float, float]:
    """(per-process device GB, host RAM GB) of this machine."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    if device != "cuda":
        return host, host
    import torch

    if not torch.cuda.is_available():
        return 0.0, host
    return torch.cuda.get_device_properties(0).total_memory / GB, host


def check_fits(estimates: list[StageEstimate], device: str) -> None:
    per_device, host = available_memory(device)
    if device == "cuda" and per_device == 0.0:
        raise ExternalError(
            "the recipe runs on CUDA (runtime.device) but no GPU is visible",
            expected="a CUDA device",
            fix="run on a GPU machine, or set runtime.device=cpu for small models",
        )
    for e in estimates:
        host_need = e.host_gb + (e.per_process_gb * e.processes if e.device == "cpu" else 0.0)
        if e.per_process_gb > per_device or host_need > host:
            need = f"~{e.per_process_gb:.1f} GB per process ({e.formula})"
            raise ExternalError(
                f"stage {e.stage} needs {need}, host {host_need:.1f} GB; this machine has {per_device:.1f} GB per "
                f"{'GPU' if device == 'cuda' else 'process'} and {host:.1f} GB RAM",
                expected="a machine that can hold the model",
                fix="use more GPUs (distributed.backend fsdp2 with ep_size, or a ZeRO-3 config), CPU offload, or "
                "stage1/stage2.trainable=router",
            )
