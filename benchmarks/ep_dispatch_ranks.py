"""Run under torchrun (2 ranks, CPU/gloo): a dynamic model loaded with FSDP2 + expert parallelism (ep_size 2) through
transformers' DistributedConfig and zeda's zero-skipping dispatch. After a forward and a backward, each rank writes
``rank<N>.json`` into the report folder: per MoE layer, the rows this rank's experts received, the real (token,
expert) pairs all ranks routed to them, the (token, slot) pairs this rank sent into the all-to-all (with skipping)
and all its slots (what a dispatch without skipping sends).

    torchrun --nproc-per-node 2 benchmarks/ep_dispatch_ranks.py DYNAMIC_DIR REPORTS [--all-zero]
        [--texts FILE.jsonl --records N --max-length L]

Inputs: random token ids (2 x 12 per rank), or with ``--texts`` the ``text`` records of a JSONL file, rank r taking
records r, r + world, ... (N per rank, each truncated to L tokens). ``--all-zero`` sends every slot of rank 1 to
zero experts (a rank with nothing to send must neither hang nor crash). Used by tests/test_fsdp2.py and
benchmarks/ep_dispatch.py."""

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def _inputs(folder: str, rank: int, world: int, texts: str | None, records: int, max_length: int) -> torch.Tensor:
    if texts is None:
        return torch.randint(3, 80, (2, 12), generator=torch.Generator().manual_seed(rank))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    lines = Path(texts).read_text(encoding="utf-8").splitlines()
    mine = [json.loads(line)["text"] for line in lines[rank::world]][:records]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in mine]
    width = min(len(i) for i in ids)  # equal lengths: no padding tokens among the counted slots
    return torch.tensor([i[:width] for i in ids])


def _option(args: list[str], name: str, default: str | None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def main(folder: str, reports: str, all_zero: bool, args: list[str]) -> None:
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
    records, max_length = int(_option(args, "--records", "8")), int(_option(args, "--max-length", "256"))
    ids = _inputs(folder, rank, world, _option(args, "--texts", None), records, max_length)
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
    result = {"rank": rank, "tokens": int(ids.numel()), "layers": report, "loss": float(out.loss)}
    Path(reports, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--all-zero" in sys.argv, sys.argv[3:])
