"""The FSDP2 (+ expert parallelism) backend built by transformers' DistributedConfig, on 2 CPU ranks (gloo):
stages 1 and 2 end with the weights of a one-process run (fp32, 1e-5) with ep_size 1 and 2, full and router-only;
a kill -9 mid-stage resumes from the sharded checkpoint; zeda export consolidates a sharded stage output; bad
settings are one line before any process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tiny_models import save_distill_teacher, write_prompts
from zeda_cli.cli import app
from zeda_cli.console import Output
from zeda_cli.distill.run import run_stage
from zeda_cli.errors import EXIT_BAD_INPUT
from zeda_cli.inject import inject_zero_experts
from zeda_cli.io.dcp import is_sharded
from zeda_cli.recipes import ZeroExpertsSection, load_recipe
from zeda_cli.runs import read_manifest
from zeda_cli.runtime.loading import open_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
STAGE1 = ["balance.aux_loss_coeff=0.1", "stage1.global_batch_size=8", "stage1.micro_batch_size=2",
          "stage1.optim.lr=1e-3", "stage1.max_steps=3", "stage1.save_every=2", "runtime.device=cpu"]  # fmt: skip
STAGE2 = ["stage2.steps=2", "stage2.prompts_per_step=4", "stage2.max_new_tokens=6", "stage2.micro_batch_size=2",
          "stage2.optim.lr=1e-3", "stage2.loss=sampled", "runtime.device=cpu"]  # fmt: skip


def fsdp2(ep: int) -> list[str]:
    return ["distributed.backend=fsdp2", "distributed.nproc=2", f"distributed.ep_size={ep}"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    static = save_distill_teacher(root / "static")
    inject = inject_zero_experts(str(static), root / "inject", zero=ZeroExpertsSection()).out
    rollouts = root / "rollouts.jsonl"
    g = torch.Generator().manual_seed(0)
    with rollouts.open("w") as f:
        for i in range(32):
            prompt = torch.randint(3, 80, (6,), generator=g).tolist()
            response = torch.randint(3, 80, (10,), generator=g).tolist()
            record = {"id": i, "prompt": "", "prompt_ids": prompt, "response": "", "response_ids": response}
            f.write(json.dumps({**record, "finished": False}) + "\n")
    return root, inject, rollouts, write_prompts(root / "prompts.jsonl", 32, seed=3)


def _run(stage: int, student: Path, out: Path, overrides: list[str], rollouts: Path | None = None) -> dict:
    return run_stage(stage, str(student), out, load_recipe(None, overrides), output=Output(quiet=True),
                     rollouts=str(rollouts) if rollouts else None)  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor under its checkpoint name, from a safetensors folder or a sharded (DCP) one alike."""
    ckpt = open_weights(folder)
    return {name: ckpt.read_tensor(name).clone() for name in ckpt.tensors}


def assert_same_weights(got: Path, expected: Path, start: Path, trained: str = "") -> None:
    a, b, initial = weights(got), weights(expected), weights(start)
    assert a.keys() == b.keys() == initial.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    worst = max(float((a[n].float() - b[n].float()).abs().max()) for n in b)
    print(f"{got.name}: max |weight difference| to {expected.name} {worst:.2e}")  # the figure, with pytest -s
    changed = [n for n in b if not torch.equal(b[n], initial[n])]
    assert changed, "training changed nothing"
    assert all(trained in n for n in changed), changed


@pytest.mark.parametrize(("ep", "trainable"), [(1, "full"), (2, "full"), (2, "router")])
def test_stage1_matches_a_single_process_run(base, ep, trainable):
    root, inject, rollouts, _ = base
    settings = [*STAGE1, f"stage1.trainable={trainable}"]
    if not (root / f"local-{trainable}").exists():
        _run(1, inject, root / f"local-{trainable}", settings, rollouts)
    out = root / f"fsdp2-ep{ep}-{trainable}"
    summary = _run(1, inject, out, [*settings, *fsdp2(ep)], rollouts)
    assert summary["steps"] == 3 and read_manifest(out).done and is_sharded(out)
    assert_same_weights(out, root / f"local-{trainable}", inject, "gate" if trainable == "router" else "")


@pytest.mark.parametrize("ep", [1, 2])
def test_stage2_matches_a_single_process_run(base, ep):
    root, inject, _, prompts = base
    settings = [*STAGE2, f"data.prompts={prompts}"]
    if not (root / "local-s2").exists():
        _run(2, inject, root / "local-s2", settings)
    out = root / f"fsdp2-s2-ep{ep}"
    assert _run(2, inject, out, [*settings, *fsdp2(ep)])["steps"] == 2
    assert_same_weights(out, root / "local-s2", inject)
    local = [json.loads(line) for line in (root / "local-s2" / "metrics.jsonl").read_text().splitlines()]
    ranks = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["response_tokens"] for r in local] == [2 * r["response_tokens"] for r in ranks]  # the same samples


def test_a_sharded_stage_exports_to_the_checkpoint_a_single_process_run_writes(base, tmp_path):
    root, inject, rollouts, _ = base
    out = root / "fsdp2-ep2-full"
    if not out.exists():
        _run(1, inject, out, [*STAGE1, *fsdp2(2)], rollouts)
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "export"), "--max-shard-size", "60KB"])
    assert result.exit_code == 0, result.output
    exported = weights(tmp_path / "export")
    assert exported.keys() == weights(inject).keys()  # per-expert checkpoint names, as a non-sharded export
    for name, tensor in weights(out).items():
        assert torch.equal(exported[name], tensor), name
    assert len(list((tmp_path / "export").glob("model-*.safetensors"))) > 1


def test_kill_9_mid_stage_then_the_rerun_resumes_from_the_sharded_checkpoint(base, tmp_path):
    root, inject, rollouts, _ = base
    common = [*STAGE1, "stage1.max_steps=8", "stage1.global_batch_size=4"]
    sets = [*common, *fsdp2(2)]
    args = ["distill", "--stage", "1", str(inject), "--out", str(tmp_path / "s1"), "--rollouts", str(rollouts),
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "zeda_cli", *args, "-q"], env=env, start_new_session=True)
    metrics = tmp_path / "s1" / "metrics.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, 9)  # the launcher and both ranks, without cleanup
    proc.wait()
    assert not read_manifest(tmp_path / "s1").done and list((tmp_path / "s1" / "checkpoints").glob("step-*"))
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9)) and read_manifest(tmp_path / "s1").done
    _run(1, inject, tmp_path / "local", common, rollouts)
    assert_same_weights(tmp_path / "s1", tmp_path / "local", inject)


@pytest.mark.parametrize(
    ("sets", "text"),
    [
        (["distributed.ep_size=3"], "ep_size 3 does not divide"),
        (["distributed.ep_size=2", "distributed.fsdp_size=1", "distributed.dp_replicate_size=2"],
         "ep_size 2 does not divide fsdp_size 1"),
        (["distributed.fsdp_size=4"], "is not the 2 processes"),
    ],
)  # fmt: skip
def test_bad_mesh_settings_are_one_line_before_any_process_starts(base, tmp_path, sets, text):
    _, inject, rollouts, _ = base
    all_sets = [*STAGE1, "distributed.backend=fsdp2", "distributed.nproc=2", *sets]
    result = runner.invoke(app, ["distill", "--stage", "1", str(inject), "--out", str(tmp_path / "s1"), "--rollouts",
                                 str(rollouts), *[a for s in all_sets for a in ("--set", s)]])  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT and len(lines) == 1 and text in lines[0], result.output
    assert not (tmp_path / "s1" / "launcher.log").exists()


def test_a_family_without_an_expert_parallel_plan_is_refused(tiny_dynamic, tmp_path, monkeypatch):
    # every family zeda supports has a plan in transformers 5.24; a family without one is simulated
    from transformers import OlmoeConfig

    monkeypatch.setattr(OlmoeConfig, "base_model_ep_plan", None)
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"id": 0, "prompt": "", "prompt_ids": [5, 6], "response": "",
                                    "response_ids": [7, 8], "finished": True}) + "\n")  # fmt: skip
    sets = [*STAGE1, "stage1.global_batch_size=2", "stage1.micro_batch_size=1", *fsdp2(2)]
    result = runner.invoke(app, ["distill", "--stage", "1", str(tiny_dynamic("olmoe")), "--out", str(tmp_path / "s"),
                                 "--rollouts", str(rollouts), *[a for s in sets for a in ("--set", s)]])  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == EXIT_BAD_INPUT and len(lines) == 1 and "expert-parallel plan" in lines[0], result.output


def _dispatch_counts(folder: Path, reports: Path, *options: str) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ep_dispatch import dispatch_counts  # the benchmark's own launch of the rank script

    return dispatch_counts(folder, reports, *options)


@pytest.mark.parametrize("all_zero", [False, True])
def test_each_ranks_experts_receive_exactly_the_real_pairs_routed_to_them(base, all_zero, tmp_path):
    """Zero-expert slots never enter the all-to-all: the rows a rank's experts receive are the real (token,
    expert) pairs every rank routed to them; a rank whose tokens all chose zero experts neither hangs nor crashes."""
    _, inject, _, _ = base
    reports = _dispatch_counts(inject, tmp_path, *(["--all-zero"] if all_zero else []))
    assert len(reports) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in reports)
    for report in reports:
        for layer in report["layers"]:
            assert layer["received"] == layer["real_pairs_to_my_experts"], layer
            assert layer["sent"] == layer["slots"] - layer["zero_slots"], layer
    zero_rank = reports[1]["layers"]
    assert not all_zero or all(layer["sent"] == 0 for layer in zero_rank)
    assert all(layer["received"] > 0 for layer in reports[0]["layers"])


def _two_nodes(commands: list[list[str]], logs: Path) -> None:
    """Start every "node" at once (they meet at the rendezvous), wait for all; each one's output in its own log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, command in enumerate(commands):
        with (logs / f"node{i}.log").open("w") as log:
            procs.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
    deadline = time.time() + 900
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):  # one node failed: the other would wait at the rendezvous
            break
        time.sleep(0.2)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # the launcher and the ranks it started
    for i, proc in enumerate(procs):
        assert proc.wait() == 0, (logs / f"node{i}.log").read_text()[-4000:]


def test_two_nodes_under_outer_torchrun_launchers_end_with_the_weights_of_one_process(base, tmp_path):
    """Two `torchrun --nnodes 2 --nproc-per-node 1` launchers meet at a 127.0.0.1 rendezvous; each runs `zeda distill`
    as one rank (no relaunch); node 0 prepares the stage folder, which both share."""
    from zeda_cli.distill.launch import free_port

    root, inject, rollouts, _ = base
    port, out = free_port(), tmp_path / "two-nodes"
    sets = [a for s in [*STAGE1, "distributed.backend=fsdp2"] for a in ("--set", s)]
    distill = ["-m", "zeda_cli", "distill", "--stage", "1", str(inject), "--out", str(out), "--rollouts",
               str(rollouts), *sets, "-q"]  # fmt: skip
    _two_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                 "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", *distill]
                for node in (0, 1)], tmp_path / "logs")  # fmt: skip
    assert read_manifest(out).done
    if not (root / "local-full").exists():
        _run(1, inject, root / "local-full", [*STAGE1, "stage1.trainable=full"], rollouts)
    assert_same_weights(out, root / "local-full", inject)


def test_two_nodes_with_zedas_own_launcher_end_with_the_weights_of_one_process(base, tmp_path):
    """The recipe's distributed.nnodes / node_rank / master_addr / master_port: `zeda distill` on each node starts
    that node's ranks; node 0 prepares the folder before its ranks join the rendezvous."""
    from zeda_cli.distill.launch import free_port

    root, inject, rollouts, _ = base
    port, out = free_port(), tmp_path / "zeda-nodes"
    common = [*STAGE1, "distributed.backend=fsdp2", "distributed.nnodes=2", "distributed.nproc=1",
              "distributed.master_addr=127.0.0.1", f"distributed.master_port={port}"]  # fmt: skip
    _two_nodes([[sys.executable, "-m", "zeda_cli", "distill", "--stage", "1", str(inject), "--out", str(out),
                 "--rollouts", str(rollouts), *[a for s in [*common, f"distributed.node_rank={node}"]
                                                for a in ("--set", s)], "-q"] for node in (0, 1)],
               tmp_path / "logs")  # fmt: skip
    assert read_manifest(out).done
    if not (root / "local-full").exists():
        _run(1, inject, root / "local-full", [*STAGE1, "stage1.trainable=full"], rollouts)
    assert_same_weights(out, root / "local-full", inject)
