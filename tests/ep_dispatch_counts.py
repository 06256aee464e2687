"""Run under torchrun (2 ranks, CPU/gloo): a dynamic model loaded with FSDP2 + expert parallelism (ep_size 2) through
transformers' DistributedConfig and zeda's zero-skipping dispatch. Rank 1 can route every slot to zero experts
(``--all-zero``). After a forward and a backward, each rank writes ``rank<N>.json`` into the report folder: per
MoE layer, the rows this rank's experts received, the real (token, expert) pairs all ranks routed to them, and
the slots sent with and without skipping."""

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def main(folder: str, reports: str, all_zero: bool) -> None:
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    from zeda_cli.runtime.loading import load_model
    from zeda_cli.runtime.zeda_dynamic_moe import RoutingRecorder, set_zero_expert_bias, zero_skipping_expert_parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=zero_skipping_expert_parallel())
    model = load_model(folder, dtype=torch.float32, use_zce_mask=False, distributed_config=config).train()
    if all_zero and rank == 1:
        set_zero_expert_bias(model, 1e4)  # every slot of every token on this rank picks a zero expert
    n = model.config.zeda["router"]["num_experts"]
    ids = torch.randint(3, 80, (2, 12), generator=torch.Generator().manual_seed(rank))
    with RoutingRecorder(model) as rec:
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()  # the reverse all-to-alls and FSDP's reductions must not hang either
    routed = [r[2] for r in rec.records]
    everyone = [None] * world
    dist.all_gather_object(everyone, [t.tolist() for t in routed])
    local = n // world
    layers = [m for m in model.modules() if hasattr(m, "zero_skipping_dispatch")]
    report = []
    for layer, experts in enumerate(layers):
        pairs = [torch.tensor(everyone[r][layer]) for r in range(world)]
        mine = sum(int(((p >= rank * local) & (p < (rank + 1) * local)).sum()) for p in pairs)
        dispatch = experts.zero_skipping_dispatch
        report.append({"layer": layer, "received": dispatch.received, "real_pairs_to_my_experts": mine,
                       "sent": dispatch.sent, "slots": int(routed[layer].numel()),
                       "zero_slots": int((routed[layer] >= n).sum())})  # fmt: skip
    # one file per rank: two ranks printing to one pipe can interleave their lines
    Path(reports, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "layers": report, "loss": float(out.loss)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--all-zero" in sys.argv)
