"""``zeda calibrate``: set a dynamic model's ``zero_expert_bias`` so that its zero-expert share on the user's own
texts meets a target. The share a model learned moves with the data it sees; this dial puts it back where a
deployment wants it, without retraining. The folder is updated in place: its config.json, its card's dial line and,
for a zeda output, its manifest (the new checksums and the calibration record)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BadInputError, UnsupportedModelError
from .evaluate.calibration import calibrate_bias
from .evaluate.data import make_batches, pad_id_of, read_texts, tokenize
from .model_ref import resolve_model
from .recipes import EvalSection
from .runs import FileRecord, file_record, read_manifest, verified_manifest, write_manifest
from .runtime.loading import load_model, load_tokenizer, resolve_device

_CARD_DIAL = re.compile(r"(`zero_expert_bias` \(default )[^)]*(\))")


def calibrate_folder(
    folder: Path,
    *,
    target_skip: float,
    settings: EvalSection,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Calibrate ``folder``'s zero_expert_bias on ``settings.data`` so its zero share is ``target_skip``."""
    if not 0.0 < target_skip < 1.0:
        raise BadInputError(f"--target-skip {target_skip}", expected="a share in (0, 1)", fix="e.g. 0.5")
    ref = resolve_model(folder)
    if ref.source.repo_id is not None:
        raise BadInputError(
            f"{folder} is a Hub id", expected="a local folder (calibrate rewrites its config and card)",
            fix="download the model (huggingface-cli download) and pass its folder",
        )  # fmt: skip
    if not ref.rc.dynamic:
        raise UnsupportedModelError(
            f"{folder} is a static model",
            expected="the output of zeda inject-zero-experts / distill / export (or an official ZEDA checkpoint)",
            fix="static models have no zero experts to calibrate: convert it first",
        )
    if ref.rc.use_zce_mask:
        raise BadInputError(
            f"{folder} masks its zero experts (use_zce_mask: true): zero_expert_bias has no effect",
            expected="a model whose zero experts are live",
            fix="calibrate a distilled model (or set use_zce_mask: false in config.json first)",
        )
    manifest = verified_manifest(folder, what="DIR") if read_manifest(folder) is not None else None
    if settings.data is None:
        raise BadInputError("no calibration texts given", expected="--data FILE (your own traffic, JSONL)",
                            fix="pass --data FILE")  # fmt: skip
    texts = read_texts(settings.data, ("text", "prompt"), "calibration file")[: settings.max_samples]
    tokenizer = load_tokenizer(folder)
    batches = make_batches(tokenize(texts, tokenizer, settings.max_length), settings.batch_size, pad_id_of(tokenizer))
    if not batches:
        raise BadInputError(f"no record of {settings.data} has 2 tokens or more", fix="pass another --data")
    device = resolve_device(settings.device)
    model = load_model(folder, device=device, dtype="auto" if device.type == "cuda" else "float32", use_zce_mask=False)
    previous = float(ref.rc.raw.get("zero_expert_bias") or 0.0)

    def step(bias: float, kept: float) -> None:
        log(f"zero_expert_bias {bias:+.4f}: zero share {1 - kept:.4f}")

    found = calibrate_bias(model, 1.0 - target_skip, batches, ref.rc.num_experts, on_step=step)
    record = {"zero_expert_bias": found.param, "previous_zero_expert_bias": previous, "target_skip": target_skip,
              "zero_share": 1.0 - found.kept_share, "data": str(settings.data), "tokens": found.tokens,
              "steps": found.steps}  # fmt: skip
    _write(folder, found.param, manifest, record)
    return {"ok": True, "folder": str(folder), **record}


def _write(folder: Path, bias: float, manifest: Any, record: dict[str, Any]) -> None:
    """config.json (and the card's dial line) first, each atomically; the manifest re-sealed right after."""
    config = json.loads((folder / "config.json").read_text())
    config["zero_expert_bias"] = float(bias)
    _replace(folder / "config.json", json.dumps(config, indent=2) + "\n")
    card = folder / "README.md"
    if card.is_file() and _CARD_DIAL.search(card.read_text()):
        _replace(card, _CARD_DIAL.sub(rf"\g<1>{bias:g}, set by zeda calibrate\g<2>", card.read_text(), count=1))
    if manifest is None:
        return
    files: dict[str, FileRecord] = dict(manifest.files)
    for name in ("config.json", "README.md"):
        if name in files:
            files[name] = file_record(folder / name)
    metrics = {**manifest.metrics, "calibration": record}
    write_manifest(folder, manifest.model_copy(update={"files": files, "metrics": metrics}))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
