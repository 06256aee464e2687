"""zeda push DIR REPO_ID"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import Output, key_value_table
from .options import JsonOpt, QuietOpt, TokenOpt, examples, recipe_from_flags, reported

EPILOG = examples(
    "zeda push ./qwen3-zeda/export my-org/Qwen3-30B-A3B-ZEDA",
    "zeda push ./release my-org/model --private --commit-message 'ZEDA stage 2, 321 steps'",
    "zeda push ./release my-org/model --revision v2          # to a branch (created if needed)",
    "zeda push ./release my-org/model --create-pr            # as a pull request on main",
    "HF_ENDPOINT=https://hub.example.com zeda push ./release my-org/model --token $TOKEN",
)


def push(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A zeda output folder, normally `zeda export`'s.")],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="Target model repo, org/name (created if it does not exist).")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo private (no effect if it exists).")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to (created from main if needed), or refs/pr/N.")
    ] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Commit title (default: names the stage).")] = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a verified zeda folder to the Hugging Face Hub (the server at HF_ENDPOINT, if set).

    The folder's zeda.json must say done and every file must match its checksum; nothing is sent otherwise.
    Transient network failures are retried; re-running after a failure resumes the upload.
    """
    out = Output(json_mode=json_out, quiet=quiet)
    with reported(out):
        from ..push import push_folder

        recipe = recipe_from_flags({
            "push.private": ("--private", private),
            "push.revision": ("--revision", revision),
            "push.create_pr": ("--create-pr", create_pr),
            "push.commit_message": ("--commit-message", commit_message),
        })  # fmt: skip
        if Path(folder).is_dir():  # a bad path is one error line, nothing before it
            out.log(f"Pushing {folder} to {repo_id} ...")
        result = push_folder(folder, repo_id, settings=recipe.push, token=token, log=out.log)
        data = {
            "ok": True,
            "repo_id": result.repo_id,
            "repo_url": result.repo_url,
            "revision": result.revision,
            "commit_url": result.commit_url,
            "commit_oid": result.commit_oid,
            "pr_url": result.pr_url,
            "files": result.files,
            "bytes": result.bytes,
            "stage": result.stage,
        }
        rows = [(k, v) for k, v in data.items() if k != "ok" and v is not None]
        out.result(data, key_value_table("zeda push", rows))
