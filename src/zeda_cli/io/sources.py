"""Where a model comes from: a local folder as is, or a Hub id ``org/name[@revision]`` downloaded with
huggingface_hub; plus the folder-level files every stage reads or copies (``config.json``, tokenizer, cards)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInputError, CheckpointError, ExternalError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


# --- sources -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    spec: str  # what the user gave
    folder: Path
    repo_id: str | None = None
    revision: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "folder": str(self.folder), "repo_id": self.repo_id, "revision": self.revision}

    @property
    def commit(self) -> str | None:
        """The Hub commit a snapshot folder holds (huggingface_hub names it ``.../snapshots/<commit>``)."""
        return self.folder.name if self.repo_id and self.folder.parent.name == "snapshots" else None

    def identity(self) -> dict[str, Any]:
        """What was read, independent of how it was spelled: a Hub repo at its commit; a folder by its real path,
        the sha256 of its config.json and of its safetensors index and headers (not the tensor bytes)."""
        if self.repo_id:
            return {"repo_id": self.repo_id, "commit": self.commit or self.revision}
        return {"folder": str(self.folder.resolve()), **checkpoint_digests(self.folder)}


def checkpoint_digests(folder: Path) -> dict[str, str | None]:
    """The sha256 of a folder's config.json and of its safetensors index and headers (names, dtypes, shapes and
    offsets; not the tensor bytes, so it is cheap at any size). zeda-vllm's engine reports the same two digests of
    the folder it serves (``GET /health``), computed the same way."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index.json")):
        digest.update(path.name.encode())
        digest.update(_header_bytes(path) if path.suffix == ".safetensors" else path.read_bytes())
    config = folder / "config.json"
    return {
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None,
        "weights_sha256": digest.hexdigest(),
    }


def _header_bytes(path: Path) -> bytes:
    """A safetensors file's 8-byte length and JSON header: names, dtypes, shapes and offsets of every tensor."""
    with path.open("rb") as f:
        head = f.read(8)
        return head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else head


def is_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).expanduser().exists()


def split_repo_id(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def resolve_source(spec: str, *, allow_patterns: list[str] | None = None, token: str | None = None) -> Source:
    """A local folder as is, or a Hub id ``org/name[@revision]`` downloaded with huggingface_hub."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInputError(
                f"{spec} is a file", expected="a model folder (config.json + safetensors)", fix="pass its folder"
            )
        return Source(spec, path.resolve())
    if not is_repo_id(spec):
        raise BadInputError(
            f"model path {spec!r} does not exist",
            expected="a local model folder or a Hub id like org/name[@revision]",
            fix="check the path, or use the Hub id of the model",
        )
    repo_id, revision = split_repo_id(spec)
    folder = _snapshot(repo_id, revision, allow_patterns, token)
    return Source(spec, folder, repo_id, revision)


def _snapshot(repo_id: str, revision: str | None, allow_patterns: list[str] | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token))
    except GatedRepoError as err:
        raise ExternalError(
            f"{repo_id} is gated", expected="access to the repo", fix="accept its terms on the Hub and `hf auth login`"
        ) from err
    except RevisionNotFoundError as err:
        raise BadInputError(
            f"revision {revision!r} of {repo_id} not found", expected="a branch, tag or commit", fix="check @revision"
        ) from err
    except RepositoryNotFoundError as err:
        raise BadInputError(
            f"Hub repo {repo_id!r} not found (or private)",
            expected="an existing model repo",
            fix="check the id, or log in with `hf auth login` for private repos",
        ) from err
    except Exception as err:  # network failures surface as several httpx / hub error types
        raise ExternalError(
            f"could not download {repo_id} from the Hub ({type(err).__name__}: {err})",
            expected="network access to the Hugging Face Hub (or HF_ENDPOINT)",
            fix="check the connection, or download the model and pass its local folder",
        ) from err


def copy_top_level_files(src: Path, dst: Path, skip: re.Pattern[str]) -> None:
    """Copy the regular, non-hidden files of ``src`` whose names ``skip`` does not match (tokenizer, configs...)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not skip.search(path.name):
            shutil.copyfile(path, dst / path.name)


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise BadInputError(
            f"{folder} has no config.json",
            expected="a Hugging Face model folder",
            fix="pass the folder that holds config.json and the safetensors files",
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})", fix="restore config.json") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object", fix="restore config.json")
    return raw
