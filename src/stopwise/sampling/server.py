"""`stopwise serve`: an OpenAI-compatible server for a local model, on the loopback interface only.

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` with ``n``, ``temperature``, ``max_tokens``, ``logprobs``, ``seed`` and
``stop``. Requests above the limits (``max_n``, ``max_tokens``) are refused with HTTP 400 and an
OpenAI-style error body. One generation runs at a time (the model is not thread-safe).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from stopwise._errors import StopwiseError

try:  # FastAPI resolves the handlers' annotations at module level
    from fastapi import Request
except ImportError:  # pragma: no cover - the 'serve' extra is not installed
    Request = Any  # type: ignore[misc,assignment]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _error(status: int, message: str, param: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                              "param": param, "code": None}})


def _cut(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def create_app(backend: Any, *, model_name: str = "smollm2", max_n: int = 16, max_tokens: int = 256) -> Any:
    """A FastAPI app serving ``backend`` (a :class:`~stopwise.sampling.local.LocalBackend`)."""
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="stopwise serve")
    lock = threading.Lock()
    app.state.requests = 0

    def validate(body: Any) -> tuple[dict[str, Any] | None, Any]:
        if not isinstance(body, dict):
            return None, _error(400, "The request body must be a JSON object.")
        n, temp, mt = body.get("n", 1), body.get("temperature", 1.0), body.get("max_tokens", 16)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
            return None, _error(400, f"'n' must be an integer in [1, {max_n}] on this server. Got {n!r}.", "n")
        if not isinstance(temp, (int, float)) or not 0.0 <= float(temp) <= 2.0:
            return None, _error(400, f"'temperature' must be a number in [0, 2]. Got {temp!r}.", "temperature")
        if not isinstance(mt, int) or isinstance(mt, bool) or not 1 <= mt <= max_tokens:
            return None, _error(400, f"'max_tokens' must be an integer in [1, {max_tokens}] on this server. Got {mt!r}.", "max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [str(s) for s in stop]
        seed = body.get("seed")
        return {"n": n, "temperature": float(temp), "max_tokens": mt, "stop": stop,
                "seed": int(seed) if isinstance(seed, int) else int(time.time_ns() % (2**31))}, None

    def run(ids: list[int], opts: dict[str, Any]) -> list[Any]:
        with lock:
            app.state.requests += 1
            return backend.generate_ids([ids], n=opts["n"], temperature=opts["temperature"], max_tokens=opts["max_tokens"],
                                        seeds=[opts["seed"]], stop=opts["stop"])[0]

    def usage(prompt_ids: list[int], comps: list[Any]) -> dict[str, int]:
        done = sum(c.n_tokens for c in comps)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": done, "total_tokens": len(prompt_ids) + done}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "requests": app.state.requests}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "stopwise"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        opts, err = validate(body)
        if err is not None or opts is None:
            return err
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return _error(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
        ids = backend.encode_messages(messages)
        comps = await run_in_threadpool(run, ids, opts)
        want_lp = bool(body.get("logprobs"))
        choices = []
        for i, c in enumerate(comps):
            text = _cut(c.text, opts["stop"])
            lp = {"content": [{"token": "", "logprob": x, "bytes": None, "top_logprobs": []} for x in c.logprobs or ()]}
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": lp if want_lp else None, "finish_reason": "stop" if c.finish_reason == "stop_string" else c.finish_reason})
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(ids, comps)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        opts, err = validate(body)
        if err is not None or opts is None:
            return err
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _error(400, "'prompt' must be a non-empty string (one prompt per request).", "prompt")
        ids = backend.encode(prompt)
        comps = await run_in_threadpool(run, ids, opts)
        want_lp = body.get("logprobs") is not None and body.get("logprobs") is not False
        choices = []
        for i, c in enumerate(comps):
            lp = {"tokens": [], "token_logprobs": list(c.logprobs or ()), "top_logprobs": None, "text_offset": []}
            choices.append({"index": i, "text": _cut(c.text, opts["stop"]), "logprobs": lp if want_lp else None,
                            "finish_reason": "stop" if c.finish_reason == "stop_string" else c.finish_reason})
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage(ids, comps)}

    return app


def check_host(host: str) -> str:
    if host not in LOOPBACK:
        raise StopwiseError(f"The 'host' parameter of stopwise serve must be a loopback address {list(LOOPBACK)} "
                            f"(the server has no authentication). Got {host!r} instead.")
    return host


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, notebooks); ``url`` ends in /v1."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        self.host = check_host(host)
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StopwiseError(f"The server on {self.host}:{self.port} did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(*, model: str = "smollm2", host: str = "127.0.0.1", port: int = 8000, max_n: int = 16, max_tokens: int = 256,
          threads: int | None = None, system: str | None = None) -> None:
    """Blocking: load the model and serve it until interrupted."""
    import uvicorn

    from stopwise.sampling.local import LocalBackend

    check_host(host)
    backend = LocalBackend(model, threads=threads, system=system)
    app = create_app(backend, model_name=str(model), max_n=max_n, max_tokens=max_tokens)
    uvicorn.run(app, host=host, port=port, log_level="info")
