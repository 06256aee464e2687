"""``zeda push`` with the real huggingface_hub client against a local Hub-compatible server (tests/hub_server.py)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_server import HubServer
from zeda_cli.cli import app
from zeda_cli.errors import EXIT_BAD_INPUT, EXIT_CHECKPOINT, EXIT_EXTERNAL
from zeda_cli.push import push_folder
from zeda_cli.recipes import PushSection

runner = CliRunner()
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def exported(tiny_dynamic, tmp_path_factory) -> Path:
    """An export of the tiny Qwen3-MoE in several shards (LFS files) + config, card, code, manifest (regular)."""
    from zeda_cli.export import export_run
    from zeda_cli.recipes import ExportSection

    out = tmp_path_factory.mktemp("push") / "export"
    export_run(tiny_dynamic("qwen3_moe"), out, settings=ExportSection(max_shard_size="60KB"))
    return out


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Backoff sleeps of zeda's retry loop, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr("zeda_cli.push.time.sleep", slept.append)
    return slept


def _point_client_at(monkeypatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the legacy LFS protocol, which the local server speaks
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline switch; only 127.0.0.1 is reached
    monkeypatch.setenv("HF_TOKEN", TOKEN)


@pytest.fixture
def hub(monkeypatch, waits) -> HubServer:
    with HubServer(tokens={TOKEN}) as server:
        _point_client_at(monkeypatch, server.endpoint)
        yield server


def _push(*args: str):
    return runner.invoke(app, ["push", *args])


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _assert_one_line_error(result, code: int, text: str) -> None:
    """Exit code != 0 and exactly one error line, the last on stderr (progress / retry lines may precede it)."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors == lines[-1:], result.stderr
    assert text in errors[0], errors[0]


# --- uploads -----------------------------------------------------------------------------------------------------
def test_push_uploads_every_file_to_main(hub, exported):
    result = _push(str(exported), "my-org/tiny-zeda", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["revision"] == "main" and data["stage"] == "export" and data["pr_url"] is None
    local = _local_files(exported)
    assert len([n for n in local if n.endswith(".safetensors")]) > 1  # several LFS files
    remote = hub.files("my-org/tiny-zeda", "main")
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local  # every file, byte for byte
    assert hub.count("lfs-upload") == len([n for n in local if n.endswith(".safetensors")])
    repo = hub.repos["my-org/tiny-zeda"]
    assert not repo.private and repo.commits[-1]["summary"].startswith("Upload export output with zeda")
    assert data["commit_oid"] == repo.heads["main"] and data["files"] == len(local)


def test_push_to_a_new_branch_privately_with_a_message(hub, exported):
    args = ["--private", "--revision", "release/v2", "--commit-message", "ZEDA tiny, stage 0"]
    result = _push(str(exported), "my-org/tiny-zeda", *args)
    assert result.exit_code == 0, result.output
    assert set(hub.files("my-org/tiny-zeda", "release/v2")) - {".gitattributes"} == set(_local_files(exported))
    assert set(hub.files("my-org/tiny-zeda", "main")) == {".gitattributes"}  # main untouched
    repo = hub.repos["my-org/tiny-zeda"]
    assert repo.private and repo.commits[-1] == {**repo.commits[-1], "ref": "release/v2", "summary": args[-1]}
    again = _push(str(exported), "my-org/tiny-zeda", "--revision", "release/v2")  # the branch exists: fine
    assert again.exit_code == 0, again.output


def test_push_as_a_pull_request(hub, exported):
    result = _push(str(exported), "my-org/tiny-zeda", "--create-pr", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pr_url"].endswith("/my-org/tiny-zeda/discussions/1")
    assert set(hub.files("my-org/tiny-zeda", "refs/pr/1")) - {".gitattributes"} == set(_local_files(exported))
    assert set(hub.files("my-org/tiny-zeda", "main")) == {".gitattributes"}  # merged only by a maintainer
    assert hub.repos["my-org/tiny-zeda"].commits[-1]["pr"] == 1


def test_push_twice_uploads_nothing_new(hub, exported):
    assert _push(str(exported), "my-org/tiny-zeda").exit_code == 0
    uploads, commits = hub.count("lfs-upload"), len(hub.repos["my-org/tiny-zeda"].commits)
    result = _push(str(exported), "my-org/tiny-zeda", "--json")
    assert result.exit_code == 0, result.output
    assert hub.count("lfs-upload") == uploads and len(hub.repos["my-org/tiny-zeda"].commits) == commits


def test_transient_failure_is_retried_and_the_upload_resumes(hub, exported, waits):
    hub.fail("commit", status=503)
    result = _push(str(exported), "my-org/tiny-zeda")
    assert result.exit_code == 0, result.output
    assert waits == [2.0] and "retry 1/3" in result.stderr
    shards = [n for n in _local_files(exported) if n.endswith(".safetensors")]
    assert hub.count("lfs-upload") == len(shards)  # the second try found the LFS objects stored: not re-sent
    assert set(hub.files("my-org/tiny-zeda")) - {".gitattributes"} == set(_local_files(exported))


def test_stale_weight_files_of_an_earlier_push_are_deleted(hub, exported, tiny_dynamic, tmp_path):
    from zeda_cli.export import export_run
    from zeda_cli.recipes import ExportSection

    assert _push(str(exported), "my-org/tiny-zeda").exit_code == 0
    single = tmp_path / "single"
    export_run(tiny_dynamic("qwen3_moe"), single, settings=ExportSection(max_shard_size="5GB"))
    assert (single / "model.safetensors").exists()
    assert _push(str(single), "my-org/tiny-zeda").exit_code == 0
    remote = hub.files("my-org/tiny-zeda")
    assert set(remote) - {".gitattributes"} == set(_local_files(single))  # no model-0000k-of-0000n left behind


def test_hidden_files_and_subfolders_stay_local(hub, exported, tmp_path):
    folder = tmp_path / "with-extras"
    shutil.copytree(exported, folder)
    (folder / ".zeda.json.tmp").write_text("{}")
    (folder / "checkpoints" / "step-10").mkdir(parents=True)
    (folder / "checkpoints" / "step-10" / "optimizer.pt").write_bytes(b"state")
    assert _push(str(folder), "my-org/tiny-zeda").exit_code == 0
    assert set(hub.files("my-org/tiny-zeda")) - {".gitattributes"} == set(_local_files(exported))


def test_the_hub_api_is_injectable(exported, monkeypatch):
    calls: list[tuple[str, tuple, dict]] = []

    class FakeApi:
        endpoint = "http://fake"

        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a, k)) or f"http://fake/{name}"

    monkeypatch.delenv("HF_TOKEN", raising=False)
    settings = PushSection(revision="refs/pr/3", commit_message="m")
    result = push_folder(exported, "org/name", settings=settings, token="t", api_factory=lambda token: FakeApi())
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]  # refs/pr/N exists already: no branch
    assert calls[1][2]["revision"] == "refs/pr/3" and calls[1][2]["commit_message"] == "m"
    assert result.revision == "refs/pr/3"


# --- refusals ----------------------------------------------------------------------------------------------------
def test_no_token_fails_before_any_request(hub, exported, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = _push(str(exported), "my-org/tiny-zeda")
    _assert_one_line_error(result, EXIT_BAD_INPUT, "no Hugging Face token found")
    assert "hf auth login" in result.stderr and hub.requests == []


def test_offline_mode_is_reported_before_any_request(hub, exported, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _assert_one_line_error(_push(str(exported), "my-org/tiny-zeda"), EXIT_BAD_INPUT, "offline mode is on")
    assert hub.requests == []


def test_a_rejected_token_is_reported(hub, exported, waits):
    result = _push(str(exported), "my-org/tiny-zeda", "--token", "hf_wrong")
    _assert_one_line_error(result, EXIT_EXTERNAL, "token was rejected")
    assert waits == []  # not retried


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_then_reported(exported, monkeypatch, waits):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    _point_client_at(monkeypatch, endpoint)
    result = _push(str(exported), "my-org/tiny-zeda")
    _assert_one_line_error(result, EXIT_EXTERNAL, f"could not create the repo on {endpoint} after 4 attempts")
    assert "ConnectError" in result.stderr and "resumes" in result.stderr
    assert waits == [2.0, 4.0, 8.0]


def _drop_manifest(folder: Path) -> None:
    (folder / "zeda.json").unlink()


def _not_done(folder: Path) -> None:
    manifest = json.loads((folder / "zeda.json").read_text())
    (folder / "zeda.json").write_text(json.dumps({**manifest, "done": False}))


def _flip_a_byte(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        (_drop_manifest, "has no zeda.json"),
        (_not_done, "did not finish (zeda.json says done: false)"),
        (_flip_a_byte, "fails checksum verification: model-00002-of-"),
    ],
)
def test_incomplete_folders_are_refused_before_any_request(hub, exported, tmp_path, damage, text):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    damage(folder)
    result = _push(str(folder), "my-org/tiny-zeda")
    _assert_one_line_error(result, EXIT_CHECKPOINT, text)
    assert hub.requests == []


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["my-org/tiny-zeda", "--create-pr", "--revision", "dev"], "--create-pr with --revision 'dev'"),
        (["not a repo id"], "is not a valid Hub repo id"),
    ],
)
def test_bad_options_are_refused_before_any_request(hub, exported, args, text):
    result = _push(str(exported), *args)
    _assert_one_line_error(result, EXIT_BAD_INPUT, text)
    assert hub.requests == []


def test_push_help_has_examples():
    result = runner.invoke(app, ["push", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.stdout and "zeda push" in result.stdout
