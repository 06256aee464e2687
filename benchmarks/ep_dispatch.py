"""What expert parallelism's all-to-all sends, with and without zero-expert skipping, in (token, slot) pairs per rank
per layer: both bundled fixtures on 2 CPU ranks (FSDP2 + EP 2 through transformers' DistributedConfig and zeda's
zero-skipping dispatch), held-out text.

Each fixture is injected with zero experts (``zeda inject-zero-experts``) and calibrated to a zero-slot share of 0.5
on its calibration prompts (``zeda calibrate``; no distillation: the trained router's choices among the real experts
are kept, the zero rows are the injection's). Then every rank forwards and backwards its own held-out records
(benchmarks/ep_dispatch_ranks.py) and counts, per MoE layer: its slots (tokens x top-k: what a dispatch without
skipping sends), the pairs it sent into the all-to-all (the real-expert pairs only), and the rows its own experts
received, next to the real pairs every rank routed to them.

    python benchmarks/ep_dispatch.py       # both fixtures, 8 records of 256 tokens per rank (~2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, machine, print_table, write_result, zeda_json
from provenance import provenance

FIXTURES = ("pystdlib-moe", "pystdlib-glm")


def dispatch_counts(folder: Path, reports: Path, *options: str) -> list[dict[str, Any]]:
    """Each of 2 ranks forwards and backwards its records through FSDP2 + EP 2 (benchmarks/ep_dispatch_ranks.py with
    ``options``) and reports its counts; tests/test_fsdp2.py runs the same."""
    from zeda_cli.distill.launch import free_port

    reports.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(ROOT / "benchmarks" / "ep_dispatch_ranks.py"), str(folder),
               str(reports), *options]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the ranks failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)]


def fixture_rows(fixture: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    static = ROOT / "models" / fixture
    inject = work / f"{fixture}-inject"
    zeda_json("inject-zero-experts", str(static), "--out", str(inject))
    calibration = zeda_json("calibrate", str(inject), "--target-skip", str(args.target_skip), "--data",
                            str(static / "data" / "prompts.jsonl"))  # fmt: skip
    reports = dispatch_counts(inject, work / f"{fixture}-reports", "--texts", str(static / "data" / "heldout.jsonl"),
                              "--records", str(args.records), "--max-length", str(args.max_length))  # fmt: skip
    rows = []
    for report in reports:
        for layer in report["layers"]:
            rows.append({"rank": report["rank"], "layer": layer["layer"], "tokens": report["tokens"],
                         "sent_without_skipping": layer["slots"], "sent_with_skipping": layer["sent"],
                         "zero_slots": layer["zero_slots"], "received": layer["received"],
                         "real_pairs_to_my_experts": layer["real_pairs_to_my_experts"]})  # fmt: skip
    sent = sum(r["sent_with_skipping"] for r in rows)
    slots = sum(r["sent_without_skipping"] for r in rows)
    exact = all(r["received"] == r["real_pairs_to_my_experts"] for r in rows)
    return {"fixture": fixture, "calibration": calibration, "rows": rows,
            "sent_share": round(sent / max(slots, 1), 4), "received_equals_real_pairs": exact}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", nargs="*", default=list(FIXTURES), choices=FIXTURES)
    p.add_argument("--records", type=int, default=8, help="held-out records per rank")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--target-skip", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="zeda-ep-") as tmp:
        fixtures = [fixture_rows(f, Path(tmp), a) for f in a.fixtures]
    for f in fixtures:
        title = f"{f['fixture']}: (token, slot) pairs per rank and layer, zero share calibrated to {a.target_skip}"
        print_table(title,
                    ("rank", "layer", "tokens", "sent without skipping", "sent with skipping", "received",
                     "real pairs to its experts"),
                    [(r["rank"], r["layer"], r["tokens"], r["sent_without_skipping"], r["sent_with_skipping"],
                      r["received"], r["real_pairs_to_my_experts"]) for r in f["rows"]])  # fmt: skip
        print(f"{f['fixture']}: sent with skipping / without: {f['sent_share']}")
    inputs = {f"{f}/{name}": ROOT / "models" / f / name for f in a.fixtures
              for name in ("model.safetensors", "data/prompts.jsonl", "data/heldout.jsonl")}  # fmt: skip
    result = {"benchmark": "ep_dispatch", "machine": machine(), **provenance(inputs=inputs),
              "settings": {"ranks": 2, "fsdp_size": 2, "ep_size": 2, "records_per_rank": a.records,
                           "max_length": a.max_length, "target_skip": a.target_skip},
              "fixtures": fixtures}  # fmt: skip
    print(f"wrote {write_result('ep-dispatch', result, a.out)}")


if __name__ == "__main__":
    main()
