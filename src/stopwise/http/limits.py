"""Request-body limits for stopwise's HTTP servers, enforced while the body streams in.

:class:`BodyLimit` is plain ASGI (standard library only) so every stopwise server wraps its app
the same way: a declared ``Content-Length`` above the limit is refused with 413 before a byte of the
body is read, and a chunked body is counted as it arrives and refused the moment it passes the
limit. Nothing ever holds more than ``max_bytes`` (plus one chunk) of a body in memory: a 10 MB
request must not reach the JSON parser, the tokenizer or the model.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from stopwise._errors import StopwiseError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: thousands of sentences, far below what hurts a 2-core host


class BodyTooLarge(StopwiseError):
    """A request body passed the server's byte limit (HTTP 413)."""

    def __init__(self, max_bytes: int, got: int | None = None) -> None:
        seen = f"{got} bytes" if got is not None else f"more than {max_bytes} bytes"
        super().__init__(f"The request body must be at most {max_bytes} bytes on this server. Got {seen} instead.")
        self.max_bytes = max_bytes


def error_body(message: str, *, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The OpenAI-style error object every stopwise server answers with."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def send_json(send: Send, status: int, payload: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with 413 (see the module docstring).

    Installed outermost, so the limit holds for every route, including ones added later. Behind it,
    reading the body raises :class:`BodyTooLarge`; :func:`install` maps that to the same 413 answer
    for apps whose error handling would otherwise turn it into a 500.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise StopwiseError(f"The 'max_bytes' parameter of BodyLimit must be an int >= 1. Got {max_bytes!r} instead.")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if declared is not None:
            size = int(declared) if declared.strip().isdigit() else None
            if size is None or size > self.max_bytes:
                why = (BodyTooLarge(self.max_bytes, size) if size is not None
                       else StopwiseError(f"The Content-Length header must be a byte count. Got {declared!r} instead."))
                await send_json(send, 413 if size is not None else 400, error_body(str(why), param="body"))
                return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                        raise BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:  # the app let it through: answer here unless it already answered
            if not started:
                await send_json(send, 413, error_body(str(exc), param="body"))


class BadJSON(StopwiseError):
    """A request body that is not JSON (HTTP 400)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def read_json(request: Any) -> Any:
    """The parsed JSON body of a Starlette ``request``.

    Raises :class:`BadJSON` for a body that is not UTF-8 JSON, and lets :class:`BodyTooLarge`
    through (it is a ValueError too, and must not be answered as bad JSON).
    """
    raw = await request.body()
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadJSON(f"The request body must be valid JSON (UTF-8). Got a parse error instead: {exc}.") from None


def install(app: Any, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Put :class:`BodyLimit` in front of a FastAPI/Starlette ``app`` and answer 413 for a body cut mid-stream."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    async def too_large(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=413, content=error_body(str(exc), param="body"), headers={"connection": "close"})

    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.add_exception_handler(BodyTooLarge, too_large)
    app.state.max_body_bytes = max_bytes
