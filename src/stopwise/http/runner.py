"""Run a uvicorn server in a background thread, and find a free loopback port (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from stopwise.core.errors import StopwiseError

#: How long ``ServerThread`` waits for uvicorn to start, and for its thread to end on exit.
START_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Serve a ready ``uvicorn.Config`` in a daemon thread; ``url`` is its base address plus ``path``.

    Used as a context manager: entering waits until uvicorn accepts connections (or raises), exiting
    asks it to stop and waits for the graceful shutdown the config allows.
    """

    def __init__(self, config: Any, *, path: str = "") -> None:
        import uvicorn

        self.host, self.port = str(config.host), int(config.port)
        self.path = path
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise StopwiseError(f"The server on {self.host}:{self.port} did not start.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=JOIN_TIMEOUT_S)
