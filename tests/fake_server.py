"""A stand-in for ``zeda_vllm.engine`` that speaks its HTTP protocol with a transformers model in this process and
whose ``/load_weights`` does nothing: a server that stays on stale weights, which the probe must catch."""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from zeda_cli.io.sources import checkpoint_digests


class StaleServer:
    def __init__(self, folder: Path):
        from zeda_cli import load_model

        self.model = load_model(folder, dtype=torch.float32).eval()
        self.folder, self.loads, self.lock = str(folder), 0, threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StaleServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> list[float]:
        logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1)
        return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()

    def _route(self, path: str, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if path == "/health":
                return {"ok": True, "model": self.folder, "dynamic": True, "dtype": "float32", "weights_version": 0,
                        "checkpoint": {**checkpoint_digests(Path(self.folder)), "hf_overrides": {}}}  # fmt: skip
            if path == "/score":
                sequences = req["sequences"]
                starts = req.get("starts") or [1] * len(sequences)
                return {"logprobs": [self._logprobs(s)[b - 1 :] for s, b in zip(sequences, starts, strict=True)]}
            if path == "/generate":  # greedy continuations with their log-probs
                samples = []
                for prompt in req["prompts"]:
                    ids = list(prompt)
                    for _ in range(int(req["max_tokens"])):
                        logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                        ids.append(int(logits.argmax()))
                    new = ids[len(prompt) :]
                    samples.append([{"token_ids": new, "logprobs": self._logprobs(ids)[len(prompt) - 1 :],
                                     "finished": False}])  # fmt: skip
                return {"samples": samples}
            if path == "/load_weights":
                self.loads += 1  # and nothing else: the served weights never change
                return {"ok": True, "tensors": 0, "weights_version": self.loads}
        raise KeyError(path)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        route = self._route

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                return

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._reply(HTTPStatus.OK, route(self.path, {}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    self._reply(HTTPStatus.OK, route(self.path, json.loads(self.rfile.read(length) or b"{}")))
                except Exception as err:
                    self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"})

        return Handler
