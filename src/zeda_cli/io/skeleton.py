"""Header-only checkpoints of real architectures, for planning, tests and benchmarks without the weights.

``write_skeleton`` builds the model on the meta device from its real config, writes a safetensors header with every
tensor's true name, dtype and shape, and extends the file to its full size as a *sparse* file (no disk used), so
``zeda inspect`` and ``zeda convert --dry-run`` see a 30B checkpoint exactly as they would see the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .reader import TORCH_TO_CODE
from .writer import safetensors_header

# Published configs of the two target models (config.json values; GLM-4.7-Flash = Glm4MoeLiteConfig defaults).
QWEN3_30B_A3B: dict[str, Any] = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
    router_aux_loss_coef=0.001, torch_dtype="bfloat16",
)  # fmt: skip
GLM_4_7_FLASH: dict[str, Any] = dict(
    model_type="glm4_moe_lite", architectures=["Glm4MoeLiteForCausalLM"], torch_dtype="bfloat16"
)


def write_skeleton(config_dict: dict[str, Any], folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config_dict.items() if k not in ("model_type",)}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    entries = [
        (name, TORCH_TO_CODE[dtype if t.is_floating_point() else t.dtype], tuple(t.shape))
        for name, t in model.state_dict().items()
    ]
    header, data_size = safetensors_header(entries)
    path = folder / "model.safetensors"
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + data_size)  # sparse: the data region takes no disk space
    return folder
