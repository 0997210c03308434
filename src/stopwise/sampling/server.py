"""`stopwise serve`: an OpenAI-compatible server for a local model, on the loopback interface only.

Endpoints: ``GET /v1/models``, ``GET /health``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` with ``n``, ``temperature``, ``max_tokens``, ``logprobs``, ``seed`` and
``stop``. Requests above the limits (``max_n``, ``max_tokens``, prompt tokens: the model's context
length less ``max_tokens``, or ``max_prompt_tokens``) are refused with HTTP 400, and bodies over
``max_body_bytes`` with 413 while they stream in (never read whole), all with an OpenAI-style error
body. One generation runs at a time (the model is not thread-safe).

A generation runs in a worker thread while the handler watches its connection: when the client
disconnects (an adaptive sampler cancels the requests it no longer needs), the generation stops
before its next token and frees the model for the next request; a request still waiting for the
model gives up its place. Responses are not streamed. On SIGTERM the server stops accepting
connections, waits at most ``shutdown_timeout_s`` for the generations in flight, then stops them
before their next token.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from stopwise._errors import StopwiseError
from stopwise.http import limits
from stopwise.http import runner as http_runner
from stopwise.http.runner import free_port
from stopwise.sampling.types import GenerationCancelled

try:  # FastAPI resolves the handlers' annotations at module level
    from fastapi import Request
except ImportError:  # pragma: no cover - the 'serve' extra is not installed
    Request = Any  # type: ignore[misc,assignment]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DISCONNECT_POLL_S = 0.1  # how often a waiting handler checks whether its client is still there
LOCK_POLL_S = 0.05  # how often a request waiting for the model checks whether it was cancelled

log = logging.getLogger("stopwise.serve")


def _error(status: int, message: str, param: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                              "param": param, "code": None}})


def _cut(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _peer(request: Any) -> str:
    client = getattr(request, "client", None)
    return f"{client.host}:{client.port}" if client else "?"


def _accepts_cancel(generate_ids: Any) -> bool:
    """Whether a backend's ``generate_ids`` takes a ``cancel`` event (LocalBackend does)."""
    try:
        params = inspect.signature(generate_ids).parameters
    except (TypeError, ValueError):
        return False
    return "cancel" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def context_length(backend: Any) -> int | None:
    """The backend's context window in tokens (``context_length``, else its model config), or None."""
    n = getattr(backend, "context_length", None)
    if n is None:
        n = getattr(getattr(getattr(backend, "model", None), "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def create_app(backend: Any, *, model_name: str = "smollm2", max_n: int = 16, max_tokens: int = 256,
               max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20) -> Any:
    """A FastAPI app serving ``backend`` (a :class:`~stopwise.sampling.local.LocalBackend`).

    A prompt may have at most ``max_prompt_tokens`` tokens (None: no limit of its own) and, with
    the request's ``max_tokens``, must fit the model's context length. ``app.state.requests`` counts
    the generations started, ``app.state.cancelled`` the requests abandoned by their clients
    (stopped mid-generation or before they reached the model) and ``app.state.refused`` the
    requests refused for their size before reaching the model.
    """
    import anyio
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="stopwise serve")
    limits.install(app, max_bytes=max_body_bytes)
    lock = threading.Lock()
    app.state.requests = 0
    app.state.cancelled = 0
    app.state.refused = 0
    context = context_length(backend)
    cancellable = _accepts_cancel(backend.generate_ids)
    if not cancellable:
        log.warning("The backend %s cannot stop a generation early: requests whose client disconnects run to the end.",
                    type(backend).__name__)

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

    async def read(request: Request) -> tuple[Any, Any]:
        """The JSON body, or an error answer (a body over the byte limit raises: 413 from limits)."""
        try:
            return await limits.read_json(request), None
        except limits.BadJSON as exc:
            return None, _error(400, str(exc))

    def check_prompt(ids: list[int], opts: dict[str, Any], param: str) -> Any:
        """A 400 naming the limit when the prompt is too long for this server or the model's context."""
        room = None if context is None else context - opts["max_tokens"]
        caps = [c for c in (max_prompt_tokens, room) if c is not None]
        if not caps or len(ids) <= min(caps):
            return None
        app.state.refused += 1
        ctx = (f"the model's context length is {context} tokens, of which max_tokens = {opts['max_tokens']} "
               "are kept for the answer" if context is not None else "the model's context length is unknown")
        mine = f"; this server's max_prompt_tokens is {max_prompt_tokens}" if max_prompt_tokens is not None else ""
        return _error(400, f"The prompt must be at most {min(caps)} tokens ({ctx}{mine}). Got {len(ids)} tokens "
                           "instead; shorten it.", param)

    def run(ids: list[int], opts: dict[str, Any], cancel: threading.Event) -> list[Any]:
        """In a worker thread: wait for the model (giving up when cancelled), then generate."""
        while not lock.acquire(timeout=LOCK_POLL_S):
            if cancel.is_set():
                raise GenerationCancelled("The request was cancelled while it waited for the model.")
        try:
            if cancel.is_set():
                raise GenerationCancelled("The request was cancelled while it waited for the model.")
            app.state.requests += 1
            extra: dict[str, Any] = {"cancel": cancel} if cancellable else {}
            comps: list[Any] = backend.generate_ids([ids], n=opts["n"], temperature=opts["temperature"],
                                                    max_tokens=opts["max_tokens"], seeds=[opts["seed"]],
                                                    stop=opts["stop"], **extra)[0]
            return comps
        finally:
            lock.release()

    async def generate(request: Request, ids: list[int], opts: dict[str, Any]) -> list[Any] | None:
        """``run`` in a worker thread while watching the client; None when the client disconnected."""
        cancel = threading.Event()
        started = time.monotonic()

        async def watch() -> None:
            try:
                while not await request.is_disconnected():
                    await anyio.sleep(DISCONNECT_POLL_S)
            finally:  # disconnected, or the handler itself is cancelled (server shutdown)
                cancel.set()

        comps: list[Any] | None = None
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                comps = await run_in_threadpool(run, ids, opts, cancel)
            except GenerationCancelled as exc:
                app.state.cancelled += 1
                log.info("Client %s disconnected: %s Stopped after %.2f s; the model is free.",
                         _peer(request), exc, time.monotonic() - started)
            except Exception as exc:  # re-raised below as itself, not wrapped in an ExceptionGroup
                error = exc
            else:
                if cancel.is_set():
                    log.info("Client %s disconnected; its generation had already finished (%.2f s).",
                             _peer(request), time.monotonic() - started)
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return comps

    def usage(prompt_ids: list[int], comps: list[Any]) -> dict[str, int]:
        done = sum(c.n_tokens for c in comps)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": done, "total_tokens": len(prompt_ids) + done}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "requests": app.state.requests, "cancelled": app.state.cancelled}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "stopwise"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, err = await read(request)
        if err is not None:
            return err
        opts, err = validate(body)
        if err is not None or opts is None:
            return err
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            return _error(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
        ids = await run_in_threadpool(backend.encode_messages, messages)  # a long prompt must not stall the loop
        err = check_prompt(ids, opts, "messages")
        if err is not None:
            return err
        comps = await generate(request, ids, opts)
        if comps is None:  # nobody is listening any more
            return _error(499, "The client closed the request.")
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
        body, err = await read(request)
        if err is not None:
            return err
        opts, err = validate(body)
        if err is not None or opts is None:
            return err
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _error(400, "'prompt' must be a non-empty string (one prompt per request).", "prompt")
        ids = await run_in_threadpool(backend.encode, prompt)
        err = check_prompt(ids, opts, "prompt")
        if err is not None:
            return err
        comps = await generate(request, ids, opts)
        if comps is None:
            return _error(499, "The client closed the request.")
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


class ServerThread(http_runner.ServerThread):
    """Run an app with uvicorn in a background thread (tests, notebooks); ``url`` ends in /v1."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        host = check_host(host)
        super().__init__(uvicorn.Config(app, host=host, port=port or free_port(host), log_level="warning",
                                        lifespan="off"), path="/v1")


def serve(*, model: str = "smollm2", host: str = "127.0.0.1", port: int = 8000, max_n: int = 16, max_tokens: int = 256,
          max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20, shutdown_timeout_s: float = 5.0,
          threads: int | None = None, system: str | None = None) -> None:
    """Blocking: load the model and serve it until SIGINT/SIGTERM (then at most ``shutdown_timeout_s``
    for the generations in flight, which are stopped before their next token after that)."""
    import uvicorn

    from stopwise.sampling.local import LocalBackend

    check_host(host)
    if not log.handlers:  # uvicorn configures only its own loggers: show ours (disconnects) like them
        from uvicorn.logging import DefaultFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    backend = LocalBackend(model, threads=threads, system=system)
    app = create_app(backend, model_name=str(model), max_n=max_n, max_tokens=max_tokens,
                     max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=max(1, round(shutdown_timeout_s)))
