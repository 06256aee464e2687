"""More stage-1/stage-2 prompts from the *training* split of the stdlib corpus (never the held-out files).

Reuses scripts/train_bundled_model.py's corpus collection, file split and prompt extraction, so the prompts are
drawn exactly like <model>/data/prompts.jsonl (which this reproduces with --count 256 --max-per-file 2 --seed 0),
only more of them (more per file). A prompt that occurs verbatim in a held-out file is dropped, as there.

    python scripts/make_prompts.py --count 4096 --out models/pystdlib-moe/data/prompts-train-4k.jsonl
    python scripts/make_prompts.py --model models/pystdlib-glm --out models/pystdlib-glm/data/prompts-train-4k.jsonl
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from transformers import AutoTokenizer  # noqa: E402

import train_bundled_model as tbm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=4096)
    p.add_argument("--max-per-file", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, nargs=2, default=(32, 64))
    p.add_argument("--model", type=Path, default=ROOT / "models" / "pystdlib-moe", help="bundled model folder")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    files = tbm.collect_corpus(a.stdlib, 0.05)
    train = [f for f in files if not f.heldout]
    held = [f for f in files if f.heldout]
    tbm.check_same_split(a.model, held)
    tok = AutoTokenizer.from_pretrained(a.model)
    records = tbm.prompt_records(
        tok, train, a.count, tuple(a.tokens), a.seed, max_per_file=a.max_per_file, exclude=[f.text for f in held]
    )
    tbm.write_jsonl(a.out, records)
    print(f"{len(records)} prompts from {len(train)} train files -> {a.out}")


if __name__ == "__main__":
    main()
