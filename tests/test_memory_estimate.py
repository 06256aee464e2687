"""The memory estimator's terms that benchmarks/memory_scale.py found missing, each pinned on its own (the measured
rows are in benchmarks/results/memory-scale-*.json): the embedding FSDP2 gathers beside the kept head while HF
generate runs, the head's unsharded gradients (and their fp32 copy under mixed precision) in FSDP2's backward, and
DeepSpeed rank 0's consolidated save."""

from __future__ import annotations

from pathlib import Path

import pytest

from zeda_cli.pipeline.memory import GB, ModelShape, train_estimate
from zeda_cli.recipes import apply_overrides, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 151_936, 2048  # Qwen3-30B-A3B's, as in the benchmark's slice
FSDP2 = ["distributed.backend=fsdp2", "distributed.nproc=2"]
DEEPSPEED = ["distributed.backend=deepspeed", f"distributed.deepspeed={ROOT / 'recipes/deepspeed/zero3.json'}",
             "distributed.nproc=2"]  # fmt: skip


def _shape(tied: bool) -> ModelShape:
    embed = VOCAB * HIDDEN * (1 if tied else 2)
    experts = 8 * 3 * HIDDEN * 768
    return ModelShape(total_params=embed + experts + 40_000_000, routed_expert_params=experts,
                      router_params=8 * HIDDEN, hidden=HIDDEN, layers=1, vocab=VOCAB, kv_width=1024,
                      largest_block_params=experts,
                      largest_tensor_bytes=VOCAB * HIDDEN * 4, embed_params=embed, num_experts=8, top_k=8,
                      moe_intermediate=768, heads=32, attention_width=4 * 4096)  # fmt: skip


def _estimate(shape: ModelShape, stage: str, device: str, *overrides: str):
    short = ["runtime.dtype=float32", "stage1.max_seq_len=256", "stage1.micro_batch_size=1"]
    raw = apply_overrides({"version": 1, "name": "t"}, [*short, *overrides])
    return train_estimate(shape, validate_recipe(raw), stage, device, prompt_tokens=64)


def test_fsdp2_hf_generate_counts_the_embedding_gathered_beside_the_kept_head():
    untied, tied = _shape(tied=False), _shape(tied=True)
    gen = "HF generate (KV cache, logits)"
    fsdp = _estimate(untied, "stage2", "cpu", *FSDP2).components[gen]
    alone = _estimate(untied, "stage2", "cpu", "distributed.nproc=1").components[gen]
    assert fsdp - alone == pytest.approx(4 * VOCAB * HIDDEN / GB, abs=1e-3)  # one fp32 vocabulary matrix
    # tied: the head's unit is the embedding's; nothing else is gathered
    assert _estimate(tied, "stage2", "cpu", *FSDP2).components[gen] == pytest.approx(
        _estimate(tied, "stage2", "cpu", "distributed.nproc=1").components[gen]
    )
    # a server generates: no HF generate term at all
    assert gen not in _estimate(untied, "stage2", "cpu", *FSDP2, "generation.engine=vllm").components


@pytest.mark.parametrize(
    ("precision", "grad_bytes"),
    [(["runtime.dtype=float32"], 4), (["runtime.dtype=bfloat16", "distributed.mixed_precision=true"], 6)],
)
def test_fsdp2_full_backward_holds_the_heads_unsharded_gradients(precision, grad_bytes):
    """bf16 gradients + their fp32 copy for the reduce-scatter under mixed precision; the head's, the largest unit
    of a real vocabulary, come first in backward (the Qwen slice's stage 2 measured 1.6-1.8 GB above without)."""
    shape = _shape(tied=False)
    gathered = {t: _estimate(shape, "stage1", "cpu", *FSDP2, *precision, f"stage1.trainable={t}")
                .components["gathered at once"] for t in ("full", "router")}  # fmt: skip
    assert gathered["full"] - gathered["router"] == pytest.approx(grad_bytes * VOCAB * HIDDEN / GB, abs=1e-3)


def test_deepspeed_rank0_consolidated_save_is_its_own_peak_on_cpu_and_host_ram_on_gpu():
    shape = _shape(tied=False)
    cpu = _estimate(shape, "stage1", "cpu", *DEEPSPEED, "stage1.trainable=router")
    save = cpu.components["rank 0's consolidated save (apart from training)"]
    full_model = 4 * (shape.total_params + VOCAB * HIDDEN) / GB  # the model + its largest leaf (the head), fp32
    assert save == pytest.approx(cpu.components["weights + optimizer state"] + full_model + 0.6, abs=1e-3)
    training = sum(v for k, v in cpu.components.items() if not k.startswith("rank 0"))
    assert save > training and cpu.per_process_gb == pytest.approx(save, abs=1e-3)  # the save is the peak here
    gpu = _estimate(shape, "stage1", "cuda", *DEEPSPEED, "stage1.trainable=router")
    assert gpu.host_gb == pytest.approx(full_model, rel=1e-3)  # DeepSpeed stages the tensors in host RAM
    assert "rank 0's consolidated save (apart from training)" not in gpu.components
    # FSDP2 saves through torch.distributed.checkpoint, shard by shard: no such term
    fsdp = _estimate(shape, "stage1", "cpu", *FSDP2, "stage1.trainable=router")
    assert not any(k.startswith("rank 0") for k in fsdp.components)
