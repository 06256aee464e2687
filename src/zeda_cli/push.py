"""``zeda push``: upload a verified zeda folder to the Hugging Face Hub (or any server at ``HF_ENDPOINT``).

Everything that can be checked locally is checked before the first request: the folder's manifest (exists, done,
every checksum), the options, the token. Then ``create_repo(exist_ok=True)``, the branch when ``--revision`` names
a new one, and ``upload_folder`` — resumable: re-running skips what the server already holds (LFS objects and,
with hf_xet, chunks). Transient failures (connection, timeouts, 5xx, 429) are retried with backoff, then reported.
The ``HfApi`` comes from a factory so tests and callers can substitute it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import BadInputError, ExternalError, ZedaError, raise_all
from .recipes import PushSection
from .runs import verified_manifest

ApiFactory = Callable[[str], Any]  # token -> an object with HfApi's create_repo / create_branch / upload_folder
T = TypeVar("T")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Weight files of an earlier push that the new folder does not have are deleted: a stale model.safetensors
# would otherwise shadow a new sharded index when the model is loaded.
_STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
# zeda folders are flat: hidden files are partial writes or caches, subfolders hold training checkpoints.
_IGNORE_PATTERNS = [".*", "*/*"]


def check_repo_id(repo_id: str) -> list[ZedaError]:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return [BadInputError(f"REPO_ID {repo_id!r} is not a valid Hub repo id ({err})",
                              expected="org/name or name", fix="e.g. my-org/Qwen3-30B-A3B-ZEDA")]  # fmt: skip
    return []


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str | None
    pr_url: str | None
    files: int
    bytes: int
    stage: str


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN / the cached ``hf auth login`` token (huggingface_hub's own lookup, no request)."""
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise BadInputError(
            "no Hugging Face token found (no --token, no HF_TOKEN, no cached login)",
            expected="a token with write access to the target repo",
            fix="pass --token, set HF_TOKEN, or run `hf auth login`",
        )
    return found


def default_api(token: str) -> Any:
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():  # huggingface_hub would refuse every request with a less direct message
        raise BadInputError(
            "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)",
            expected="online mode to push",
            fix="unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE for this command",
        )
    return HfApi(token=token)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    settings: PushSection,
    token: str | None = None,
    api_factory: ApiFactory = default_api,
    log: Callable[[str], None] = lambda _: None,
) -> PushResult:
    problems = check_repo_id(repo_id)
    try:
        if not folder.is_dir():
            raise BadInputError(f"DIR {folder} is not a folder", expected="a zeda output folder", fix="check the path")
        manifest = verified_manifest(folder, what="DIR")
    except ZedaError as err:
        raise_all([*problems, err])
    raise_all(problems)
    if manifest.stage != "export":
        log(f"note: {folder} is a {manifest.stage!r} stage output, not an export (no model card); see `zeda export`")
    api = api_factory(resolve_token(token))
    endpoint = str(getattr(api, "endpoint", "the Hub"))
    call = _Caller(endpoint, settings, log)
    repo_url = call(
        "create the repo", lambda: api.create_repo(repo_id, private=settings.private or None, exist_ok=True)
    )
    revision = settings.revision or "main"
    if revision != "main" and not revision.startswith("refs/"):
        call(f"create branch {revision}", lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    info = call("upload the folder", lambda: _upload(api, folder, repo_id, settings, manifest.stage))
    sizes = [p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return PushResult(
        repo_id, str(repo_url), revision, str(info), getattr(info, "oid", None), getattr(info, "pr_url", None),
        len(sizes), sum(sizes), manifest.stage,
    )  # fmt: skip


def _upload(api: Any, folder: Path, repo_id: str, settings: PushSection, stage: str) -> Any:
    from . import __version__

    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=None if settings.create_pr else settings.revision,
        create_pr=settings.create_pr or None,
        commit_message=settings.commit_message or f"Upload {stage} output with zeda {__version__}",
        ignore_patterns=list(_IGNORE_PATTERNS),
        delete_patterns=list(_STALE_PATTERNS),
    )


class _Caller:
    """Runs one Hub call with retries on transient failures; turns every failure into a one-line ZedaError."""

    def __init__(self, endpoint: str, settings: PushSection, log: Callable[[str], None]):
        self.endpoint, self.settings, self.log = endpoint, settings, log

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        wait = self.settings.backoff_s
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return fn()
            except Exception as err:  # sorted below: transient -> retry, known -> clear error, else re-raised
                if not is_transient(err):
                    explained = self._explain(what, err)
                    if explained is None:
                        raise
                    raise explained from err
                if attempt == self.settings.attempts:
                    raise self._unreachable(what, err, attempt) from err
                self.log(
                    f"could not {what} ({_describe(err)}); retry {attempt}/{self.settings.attempts - 1} in {wait:g}s"
                )
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def _unreachable(self, what: str, err: Exception, attempts: int) -> ExternalError:
        return ExternalError(
            f"could not {what} on {self.endpoint} after {attempts} attempts ({_describe(err)})",
            expected="a reachable Hub server (check the network, or HF_ENDPOINT)",
            fix="re-run the same command when the server is reachable: the upload resumes where it stopped",
        )

    def _explain(self, what: str, err: Exception) -> ZedaError | None:
        status, where = _status(err), self.endpoint
        if status == 401:
            return ExternalError(
                f"the token was rejected by {where} (401) when trying to {what}",
                expected="a valid token",
                fix="pass --token, set HF_TOKEN, or run `hf auth login` again",
            )
        if status == 403:
            return ExternalError(
                f"no write access on {where} (403) when trying to {what}",
                expected="a token with write access to the repo's namespace",
                fix="use a write token of the repo's owner or organisation",
            )
        if status == 404:
            return BadInputError(
                f"{where} answered 404 when trying to {what} ({_describe(err)})",
                expected="an existing repo and revision (refs/pr/N must exist)",
                fix="check REPO_ID and --revision",
            )
        if status is not None or isinstance(err, ValueError):
            return ExternalError(
                f"the Hub refused to {what}: {_describe(err)}",
                expected="a request the Hub accepts",
                fix="read the server's message; fix the folder or the options, then re-run",
            )
        return None


def is_transient(err: BaseException) -> bool:
    """Network errors and retryable HTTP statuses, anywhere in the exception chain (uploads wrap them)."""
    import httpx2  # huggingface_hub's HTTP client

    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, httpx2.TransportError) or _status(seen) in _TRANSIENT_STATUS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return int(status) if isinstance(status, int) else None


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__
