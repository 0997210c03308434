"""Running a stopwise ASGI app with uvicorn: loopback by default, bounded graceful shutdown."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from stopwise._errors import StopwiseError
from stopwise.http import runner as http_runner
from stopwise.http.runner import free_port

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, *, token: str | None) -> str:
    """Loopback addresses always; another interface only behind a bearer token."""
    if host not in LOOPBACK and token is None:
        raise StopwiseError(f"The 'host' parameter of stopwise serve encoder must be a loopback address "
                            f"{list(LOOPBACK)} unless a --token is set (anyone on the network could use it). "
                            f"Got {host!r} instead.")
    return host


def uvicorn_config(app: Any, *, host: str, port: int, shutdown_timeout_s: float, log_level: str = "info") -> Any:
    """uvicorn settings shared by the CLI and :class:`ServerThread`.

    ``timeout_graceful_shutdown`` bounds how long SIGTERM waits for requests in flight: uvicorn
    stops accepting connections, waits up to that long for the open requests (the batcher keeps
    running them), then cancels what is left and runs the app's shutdown (which drains the
    batcher, again bounded).
    """
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=max(1, round(shutdown_timeout_s)))


def run(app: Any, *, host: str, port: int, shutdown_timeout_s: float,
        on_exit: Sequence[Callable[[], None]] = ()) -> None:
    """Blocking: serve ``app`` until SIGINT/SIGTERM, calling each ``on_exit`` as the signal arrives
    (the encoder app's batcher stops waiting for batches to fill, so the drain starts at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            for callback in on_exit:
                callback()

    Server(uvicorn_config(app, host=host, port=port, shutdown_timeout_s=shutdown_timeout_s)).run()


class ServerThread(http_runner.ServerThread):
    """Serve an app with uvicorn in a background thread (tests, notebooks), lifespan included."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None,
                 shutdown_timeout_s: float = 5.0) -> None:
        host = check_host(host, token=None)
        super().__init__(uvicorn_config(app, host=host, port=port or free_port(host),
                                        shutdown_timeout_s=shutdown_timeout_s, log_level="warning"))
