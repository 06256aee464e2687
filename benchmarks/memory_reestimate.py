"""The estimates of a finished ``memory_scale.py`` run, recomputed with the estimator as it is now: the measured
peaks are kept (they took an hour on 2 cores and do not depend on the estimator), every row's estimate is what
`zeda convert --dry-run` prints today for the same cut slice and settings (a header-only skeleton: nothing trains).

    python benchmarks/memory_reestimate.py benchmarks/results/memory-scale-qwen3.json \\
        --out benchmarks/results/memory-scale-qwen3-reestimated.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import machine, print_table, write_result
from memory_scale import estimate, row_overrides, sliced, write_deepspeed_bf16, write_prompts
from provenance import provenance
from zeda_cli.io.skeleton import write_skeleton


def reestimate(measured: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    seq = measured["settings"]["seq_len"]
    prompts = write_prompts(work / "prompts.jsonl", 8)
    write_deepspeed_bf16(work)
    precision = measured["settings"].get("precision", "float32")
    skeletons: dict[tuple[str, int], Path] = {}
    rows = []
    for row in measured["rows"]:
        experts = int(row["cut"].split("-> ")[1])
        key = (row["model"], experts)
        if key not in skeletons:
            skeletons[key] = write_skeleton(sliced(row["model"], experts)[0], work / f"{row['model']}-{experts}")
        overrides = row_overrides(row["backend"], row["trainable"], row["stage"], seq, prompts, precision, work)
        est = estimate(skeletons[key], f"stage{row['stage']}", overrides, work)
        peak = max(row["measured_anon_gb_per_rank"])
        rows.append({**{k: row[k] for k in ("model", "backend", "trainable", "stage", "cut")},
                     "failed": bool(row.get("failed")), "measured_anon_gb_per_rank": row["measured_anon_gb_per_rank"],
                     "estimate_at_measurement_gb": row["estimate_gb_per_rank"],
                     "estimate_gb_per_rank": round(est["per_process_gb"], 3),
                     "error": None if row.get("failed") else round(est["per_process_gb"] / peak - 1.0, 3),
                     "formula": est["formula"], "components_gb": est.get("components")})  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("measured", type=Path, help="a memory_scale.py results JSON")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    measured = json.loads(a.measured.read_text())
    with tempfile.TemporaryDirectory(prefix="zeda-reestimate-") as tmp:
        rows = reestimate(measured, Path(tmp))
    print_table(f"{a.measured.name}: measured peak per rank vs the estimate then and now",
                ("model", "backend", "trainable", "stage", "measured GB", "estimate then", "estimate now", "error"),
                [(r["model"], r["backend"], r["trainable"], r["stage"], max(r["measured_anon_gb_per_rank"]),
                  r["estimate_at_measurement_gb"], r["estimate_gb_per_rank"],
                  "failed" if r["failed"] else f"{r['error']:+.1%}") for r in rows])  # fmt: skip
    result = {"benchmark": "memory_reestimate", "machine": machine(), **provenance(inputs={"measured": a.measured}),
              "measured_run": measured["provenance"], "settings": measured["settings"], "rows": rows,
              "worst_error": max((abs(r["error"]) for r in rows if r["error"] is not None), default=None)}  # fmt: skip
    print(f"wrote {write_result('memory-reestimate', result, a.out)}")


if __name__ == "__main__":
    main()
