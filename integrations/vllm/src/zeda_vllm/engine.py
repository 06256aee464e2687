"""A generation engine for zeda's distillation, run in vLLM's own environment and driven over local HTTP.

zeda's training stack and vLLM cannot share an environment, so ``zeda distill`` / ``zeda convert`` start this
server with the vLLM environment's Python (or connect to one a user started) and speak JSON to it:

* ``GET /health``: ``{"ok": true, "model": ..., "dynamic": bool}`` once the engine is ready.
* ``POST /generate``: ``{"prompts": [[token ids]], "n", "max_tokens", "temperature", "top_p", "seed"}`` (prompt i
  samples with seed·100003 + i) ->
  ``{"samples": [[{"token_ids", "logprobs", "finished"}] * n] * prompts, "tokens", "seconds"}``; ``logprobs`` are
  the model's own log-probs of the sampled tokens (vLLM's ``raw_logprobs``: before temperature / top-p).
* ``POST /load_weights``: ``{"path": "/dev/shm/....safetensors"}``, a file on this machine with tensors under their
  checkpoint names (a subset is fine: only what training changed); the live model takes them and the prefix cache
  is dropped, so the next sample follows the new weights.
* ``POST /shutdown``.

    python -m zeda_vllm.engine --model DIR --port 8011 [--dtype float32] [--max-model-len 2048] [--enforce-eager]
    python -m zeda_vllm.engine --model DIR --ready-file engine.json   # any free port, written to the file

With ``--parent-pid`` the server exits when that process is gone (a trainer killed with SIGKILL leaves no engine
behind).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process: weights load in place
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Engine:
    """One ``vllm.LLM`` behind a lock: requests from several trainer ranks run one at a time."""

    def __init__(self, args: argparse.Namespace):
        from vllm import LLM

        self.model = args.model
        self.lock = threading.Lock()
        self.llm = LLM(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            enforce_eager=args.enforce_eager,
            distributed_executor_backend="uni" if args.tensor_parallel_size == 1 else None,
            seed=args.seed,
            hf_overrides=json.loads(args.hf_overrides) if args.hf_overrides else None,
        )
        self.dynamic = bool(self.llm.apply_model(lambda m: hasattr(m, "zeda_blocks"))[0])

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

    def load_weights(self, req: dict[str, Any]) -> dict[str, Any]:
        from safetensors import safe_open

        began = time.perf_counter()
        with safe_open(req["path"], framework="pt") as f:
            weights = [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118 (safe_open has no __iter__)

        with self.lock:
            # vLLM's in-place reload: restores each layer's checkpoint-format parameters, loads, then re-runs the
            # kernel-format processing (on CPU, linear weights are repacked after loading and cannot be copied into)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return {"ok": True, "tensors": len(weights), "seconds": round(time.perf_counter() - began, 4)}


def _sample(completion: Any) -> dict[str, Any]:
    ids = list(completion.token_ids)
    logprobs = [float(entry[t].logprob) for entry, t in zip(completion.logprobs or [], ids, strict=False)]
    return {"token_ids": ids, "logprobs": logprobs, "finished": completion.finish_reason == "stop"}


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
                self._reply(HTTPStatus.OK, {"ok": True, "model": engine.model, "dynamic": engine.dynamic})
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            routes = {"/generate": engine.generate, "/load_weights": engine.load_weights}
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
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def watch_parent(pid: int, interval: float = 1.0) -> None:
    """Exit as soon as the process that started this engine is gone (e.g. killed with SIGKILL)."""

    def loop() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (written to --ready-file)")
    p.add_argument("--ready-file", default=None, help='written once ready: {"url": ..., "pid": ...}')
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-overrides", default=None, help="config.json overrides, e.g. '{\"use_zce_mask\": true}'")
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent_pid:
        watch_parent(args.parent_pid)
    engine = Engine(args)
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
