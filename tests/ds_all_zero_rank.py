"""Run under torchrun (2 ranks, CPU/gloo): rank 1 routes every slot to zero experts, rank 0 routes normally.

Trains a few ZeRO-3 steps through zeda's DeepSpeedEngine, runs a no-grad (teacher-style) forward, then saves the
consolidated model. Exits 0 when everything completes; the test bounds it with a timeout (a hang fails it).
"""

import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def main(student: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from zeda_cli.distill.engines.deepspeed import DeepSpeedEngine, hf_deepspeed_config, student_config
    from zeda_cli.recipes import OptimSection
    from zeda_cli.runtime.loading import load_model
    from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, set_zero_expert_bias

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    optim = OptimSection(lr=1e-3)
    config = student_config({"zero_optimization": {"stage": 3}}, optim, micro=2, accumulation=1, world=2)
    keep = hf_deepspeed_config(config)
    model = load_model(student, dtype=torch.float32, use_zce_mask=False)
    if rank == 1:
        set_zero_expert_bias(model, 1e4)  # every slot of every token on this rank picks a zero expert
    engine = DeepSpeedEngine(model.train(), optim, 3, config, model.config.zeda["router"]["block_class"])
    n = model.config.zeda["router"]["num_experts"]
    ids = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        with RoutingRecorder(engine.module) as rec:
            out_ = engine.forward(input_ids=ids, labels=ids)
        share = sum(int((r[2] >= n).sum()) for r in rec.records) / sum(r[2].numel() for r in rec.records)
        assert share == 1.0 if rank == 1 else share < 1.0, share
        engine.backward(out_.loss)
        engine.step()
    with torch.no_grad():
        engine.forward(input_ids=ids)
    engine.save_pretrained(Path(out), "5GB")
    del keep
    if rank == 0:
        print("ALL-ZERO-RANK-OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
