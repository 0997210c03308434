"""stopwise.serve without a model: the batcher, the bounded queue, body limits, auth, metrics, CLI help.

A fake classifier (deterministic labels from each text, a gate to hold a batch on the "model")
drives real uvicorn servers on 127.0.0.1; tests/test_serve_model.py repeats the key checks on MiniLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from stopwise.serve.app import create_app  # noqa: E402
from stopwise.serve.batcher import Policy  # noqa: E402
from stopwise.serve.runner import ServerThread  # noqa: E402

CLASSES = ("a", "b", "c")


class FakeTokenizer:
    """One token per word plus two specials, as a real tokenizer's truncation would count them."""

    def __call__(self, texts: list[str], *, truncation: bool, max_length: int, add_special_tokens: bool) -> Any:
        return {"input_ids": [list(range(min(len(t.split()) + 2, max_length))) for t in texts]}


@dataclass
class FakeCert:
    lam: float
    tag: str = "x"

    def to_json(self) -> str:
        return json.dumps({"lam": self.lam, "tag": self.tag})


@dataclass
class FakePrediction:
    predictions: np.ndarray
    probs: np.ndarray
    exit_layer: np.ndarray
    cost: np.ndarray


def label_of(text: str) -> int:
    return len(text) % 3


class FakeClassifier:
    class_names = CLASSES
    max_length = 16
    base_name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Any]] = []  # (texts, certificate) per predict call
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.tokenizer = FakeTokenizer()
        self.fail_on: str | None = None

    def check_certificate(self, certificate: Any) -> None:
        pass

    def predict(self, texts: list[str], *, certificate: Any = None, batch_size: int = 32) -> FakePrediction:
        self.calls.append((list(texts), certificate))
        self.entered.set()
        assert self.gate.wait(30)
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("boom")
        labels = np.array([label_of(t) for t in texts])
        probs = np.full((len(texts), 3), 0.1)
        probs[np.arange(len(texts)), labels] = 0.8
        exits = np.array([1 + len(t) % 6 for t in texts]) if certificate is not None else np.full(len(texts), 6)
        return FakePrediction(labels, probs, exits, exits.astype(float))


def post_all(url: str, bodies: list[Any], headers: dict[str, str] | None = None) -> list[Any]:
    async def go() -> list[Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            return list(await asyncio.gather(*(client.post(url, json=b, headers=headers) for b in bodies)))
    return asyncio.run(go())


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def raw_post(port: int, head: dict[str, str], chunks: Any, pause_s: float = 0.0) -> tuple[int, dict[str, Any]]:
    """POST /v1/classify over a raw socket, sending body chunks (``pause_s`` apart) until the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        lines = ["POST /v1/classify HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in head.items())]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # answered before the body ended
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
            time.sleep(pause_s)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) == 0:
            part = s.recv(65536)
            if not part:
                break
            data += part
    status = int(data.split(b" ", 2)[1])
    body = json.loads(data.split(b"\r\n\r\n", 1)[1].split(b"\r\n0\r\n")[0] or b"{}")
    return status, {"sent": sent, **body}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer() -> None:
    clf = FakeClassifier()
    app = create_app(clf, FakeCert(0.9), max_batch_size=16, max_wait_ms=500)
    with ServerThread(app) as server:
        bodies = [{"texts": [f"text {i}" + "x" * j for j in range(1 + i % 3)]} for i in range(12)]
        answers = post_all(f"{server.url}/v1/classify", bodies)
        for body, r in zip(bodies, answers, strict=True):
            assert r.status_code == 200
            got = r.json()
            assert [row["label_id"] for row in got["results"]] == [label_of(t) for t in body["texts"]]
            assert [row["exit_layer"] for row in got["results"]] == [1 + len(t) % 6 for t in body["texts"]]
            assert got["certificate_id"] and got["lambda"] == 0.9 and got["classes"] == list(CLASSES)
        sizes = [len(texts) for texts, _ in clf.calls]
        assert sum(sizes) == sum(len(b["texts"]) for b in bodies) and max(sizes) > 3  # several requests per batch
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "stopwise_serve_batch_size_count") == len(sizes) < 12
        assert metric(text, "stopwise_serve_batch_size_sum") == sum(sizes)
        assert metric(text, 'stopwise_serve_requests_total{code="200"}') == 12
        assert metric(text, "stopwise_serve_lambda") == 0.9 and metric(text, "stopwise_serve_queue_depth") == 0
        assert metric(text, "stopwise_serve_request_latency_seconds_count") == 12


def test_a_full_queue_answers_503_with_retry_after_and_serves_the_accepted_ones() -> None:
    clf = FakeClassifier()
    clf.gate.clear()  # the first batch holds the model
    app = create_app(clf, None, max_batch_size=2, max_wait_ms=0, max_queue=4, max_texts=4)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"

        async def go() -> tuple[list[Any], Any]:
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.ensure_future(client.post(url, json={"texts": ["run"]}))
                while not clf.entered.is_set():
                    await asyncio.sleep(0.01)
                queued = [asyncio.ensure_future(client.post(url, json={"texts": [f"q{i}", f"r{i}"]})) for i in range(2)]
                while app.state.metrics.queue_rows < 4:
                    await asyncio.sleep(0.01)
                refused = await client.post(url, json={"texts": ["one too many"]})
                health = (await client.get(f"{server.url}/health")).json()  # answers while the model is busy
                assert health["queue_depth"] == 4 and health["running"] == 1
                clf.gate.set()
                return list(await asyncio.gather(first, *queued)), refused

        done, refused = asyncio.run(go())
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "queue is full" in refused.json()["error"]["message"]
        assert [r.status_code for r in done] == [200, 200, 200]
        assert done[1].json()["results"][1]["label_id"] == label_of("r0")
        assert app.state.metrics.rejected_full == 1


def test_a_client_that_disconnects_has_its_queued_work_dropped() -> None:
    clf = FakeClassifier()
    clf.gate.clear()
    app = create_app(clf, None, max_batch_size=4, max_wait_ms=0)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"

        async def go() -> Any:
            async with httpx.AsyncClient(timeout=30) as a, httpx.AsyncClient(timeout=30) as b:
                first = asyncio.ensure_future(a.post(url, json={"texts": ["holds the model"]}))
                while not clf.entered.is_set():
                    await asyncio.sleep(0.01)
                leaver = asyncio.ensure_future(b.post(url, json={"texts": ["abandoned"]}))
                while app.state.metrics.queue_rows < 1:
                    await asyncio.sleep(0.01)
                leaver.cancel()  # the client gives up while its request waits
                deadline = time.monotonic() + 10
                while app.state.metrics.dropped < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                clf.gate.set()
                return await first

        assert asyncio.run(go()).status_code == 200
        assert app.state.metrics.dropped == 1 and app.state.metrics.queue_rows == 0
        r = httpx.post(url, json={"texts": ["after"]}, timeout=30)
        assert r.status_code == 200
        assert all("abandoned" not in texts for texts, _ in clf.calls)  # never reached the model
        assert "stopwise_serve_dropped_total 1" in httpx.get(f"{server.url}/metrics").text


def test_a_client_that_leaves_while_its_batch_runs_is_counted_and_others_are_answered() -> None:
    clf = FakeClassifier()
    clf.gate.clear()
    app = create_app(clf, None, max_batch_size=4, max_wait_ms=500)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"

        async def go() -> Any:
            async with httpx.AsyncClient(timeout=30) as a, httpx.AsyncClient(timeout=30) as b:
                leaver = asyncio.ensure_future(a.post(url, json={"texts": ["leaves"]}))
                # Two clients' requests reach the queue in either order: send the second once the
                # first is queued, within the batcher's wait, so the batch's order is known.
                while app.state.metrics.queue_rows < 1:
                    await asyncio.sleep(0.005)
                stayer = asyncio.ensure_future(b.post(url, json={"texts": ["stays"]}))
                while not clf.entered.is_set():
                    await asyncio.sleep(0.01)
                leaver.cancel()
                await asyncio.sleep(0.3)  # several disconnect polls
                clf.gate.set()
                return await stayer

        r = asyncio.run(go())
        assert clf.calls[0][0] == ["leaves", "stays"]  # one batch, already on the model when the client left
        assert r.status_code == 200 and r.json()["results"][0]["label_id"] == label_of("stays")
        deadline = time.monotonic() + 10
        while app.state.metrics.cancelled_running < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.metrics.cancelled_running == 1 and app.state.metrics.dropped == 0


def test_a_request_that_waits_past_its_deadline_gets_503_without_running() -> None:
    clf = FakeClassifier()
    clf.gate.clear()
    app = create_app(clf, None, max_batch_size=1, max_wait_ms=0, timeout_s=0.2)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"

        async def go() -> list[Any]:
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.ensure_future(client.post(url, json={"texts": ["first"]}))
                while not clf.entered.is_set():
                    await asyncio.sleep(0.01)
                late = asyncio.ensure_future(client.post(url, json={"texts": ["late"]}))
                await asyncio.sleep(0.5)
                clf.gate.set()
                return list(await asyncio.gather(first, late))

        first, late = asyncio.run(go())
        assert first.status_code == 200 and late.status_code == 503 and "past its deadline" in late.text
        assert "retry-after" in late.headers and [t for t, _ in clf.calls] == [["first"]]
        assert app.state.metrics.expired == 1


def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up() -> None:
    clf = FakeClassifier()
    app = create_app(clf, None, max_texts=256, max_body_bytes=1 << 20)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"
        cases: list[tuple[Any, int, str]] = [
            (b"{oops", 400, "valid JSON"), (b'{"texts": [NaN]}', 400, "valid JSON"),
            ([1, 2], 400, "JSON object"), ({"text": ["x"]}, 400, "'texts' field must be a list"),
            ({"texts": "x"}, 400, "Got str instead"), ({"texts": []}, 400, "empty list"),
            ({"texts": ["ok", 3]}, 400, "int at index 1"), ({"texts": ["ok"], "truncate": "yes"}, 400, "'truncate'"),
            ({"texts": ["x"] * 10_000}, 413, "at most 256"),
            ({"texts": [" ".join(["w"] * 30)]}, 400, "at most 16 tokens (the model's maximum length is 16)"),
        ]
        for body, status, words in cases:
            r = (httpx.post(url, content=body, timeout=30) if isinstance(body, bytes)
                 else httpx.post(url, json=body, timeout=30))
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["error"]["message"], (words, r.text)
        # A declared 10 MB body is refused from its headers; a chunked one as soon as it passes 1 MiB.
        status, body = raw_post(server.port, {"Content-Length": str(10 << 20)}, [b"x" * 65536] * 160)
        assert status == 413 and "at most 1048576 bytes" in body["error"]["message"] and body["sent"] < 10 << 20
        chunk = b"x" * 65536
        status, body = raw_post(server.port, {"Transfer-Encoding": "chunked"},
                                [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 160, pause_s=0.003)
        assert status == 413 and "at most 1048576 bytes" in body["error"]["message"]
        assert body["sent"] < 4 << 20  # refused while streaming (paced so the kernel buffers do not hide it)
        r = httpx.post(url, json={"texts": [" ".join(["w"] * 30)], "truncate": True}, timeout=30)
        assert r.status_code == 200  # truncation only when asked for
        assert not any(len(texts) > 256 for texts, _ in clf.calls)
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_failing_batch_answers_500_to_its_requests_and_the_next_batch_runs() -> None:
    clf = FakeClassifier()
    clf.fail_on = "bad"
    app = create_app(clf, None, max_wait_ms=0)
    with ServerThread(app) as server:
        r = httpx.post(f"{server.url}/v1/classify", json={"texts": ["bad"]}, timeout=30)
        assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/classify", json={"texts": ["good"]}, timeout=30).status_code == 200


def test_bearer_token_guards_v1_and_metrics() -> None:
    app = create_app(FakeClassifier(), None, token="s3cret-token")
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"
        assert httpx.post(url, json={"texts": ["x"]}).status_code == 401
        assert httpx.post(url, json={"texts": ["x"]}, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        ok = httpx.post(url, json={"texts": ["x"]}, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_policy_swap_applies_from_the_next_batch_whole() -> None:
    clf = FakeClassifier()
    old, new = FakeCert(0.9, "old"), FakeCert(0.5, "new")
    app = create_app(clf, old, max_wait_ms=0)
    with ServerThread(app) as server:
        url = f"{server.url}/v1/classify"
        first = httpx.post(url, json={"texts": ["x"]}, timeout=30).json()
        app.state.batcher.swap(Policy(new, "new-id", 0.5))
        second = httpx.post(url, json={"texts": ["x"]}, timeout=30).json()
        assert (first["lambda"], second["lambda"], second["certificate_id"]) == (0.9, 0.5, "new-id")
        assert [cert.tag for _, cert in clf.calls] == ["old", "new"]
        assert metric(httpx.get(f"{server.url}/metrics").text, "stopwise_serve_lambda") == 0.5


# -- the chat server shares the limits ---------------------------------------------------------------


class CountingChat:
    """A chat backend that counts how often the server tokenized or generated (it never should here)."""

    context_length = 64

    def __init__(self) -> None:
        self.encoded = 0
        self.generated = 0

    def encode(self, text: str) -> list[int]:
        self.encoded += 1
        return [1] * len(text.split())

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(messages[-1]["content"])

    def generate_ids(self, encoded: Any, *, n: int, temperature: float, max_tokens: int, seeds: Any,
                     stop: Any = (), cancel: threading.Event | None = None) -> Any:
        from stopwise.sampling.types import Completion

        self.generated += 1
        return [[Completion(text="ok", n_tokens=1, finish_reason="stop") for _ in range(n)]]


def test_the_chat_server_refuses_huge_bodies_and_over_long_prompts_before_the_model() -> None:
    from stopwise.sampling.server import ServerThread as ChatThread
    from stopwise.sampling.server import create_app as chat_app

    backend = CountingChat()
    app = chat_app(backend, model_name="fake", max_tokens=16)
    with ChatThread(app) as server:
        port = server.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n{\"max_tokens\": 1, " % (10 << 20))
            reply = b""
            while part := s.recv(65536):  # the server closes after its answer
                reply += part
        assert reply.startswith(b"HTTP/1.1 413") and b"at most 1048576 bytes" in reply
        assert backend.encoded == 0  # refused from the headers
        words = " ".join(["w"] * 60)  # 60 prompt tokens + 8 to generate > the 64-token context
        r = httpx.post(f"{server.url}/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": words}], "max_tokens": 8})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "at most 56 tokens" in r.json()["error"]["message"] and "context length is 64" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/completions", json={"prompt": words, "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and backend.generated == 1  # 60 + 4 fits
        assert app.state.refused == 1


# -- the command line ----------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_serve_option_has_a_description() -> None:
    from stopwise.cli import build_parser

    serve = _subparsers(build_parser())["serve"]
    parsers = {"serve": serve, **{f"serve {k}": v for k, v in _subparsers(serve).items()}}
    assert set(parsers) == {"serve", "serve chat", "serve encoder"}
    for name, parser in parsers.items():
        assert parser.description, name
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.option_strings)
        assert "--port" in parser.format_help()
    args = build_parser().parse_args(["serve", "--port", "9001"])  # the flat form still means chat
    assert args.func.__name__ == "cmd_serve" and args.port == 9001
    args = build_parser().parse_args(["serve", "encoder", "--heads", "d", "--max-batch-size", "8"])
    assert args.func.__name__ == "cmd_serve_encoder" and args.max_batch_size == 8


def test_serve_encoder_refuses_other_interfaces_without_a_token_before_loading(capsys: Any) -> None:
    from stopwise.cli import main

    assert main(["serve", "encoder", "--heads", "/nonexistent", "--host", "0.0.0.0"]) == 2
    assert "loopback" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "encoder", "--heads", "d", "--max-queue", "0"])


SLOW_CHAT_SERVER = """
import sys, time
import stopwise.sampling.local as local
from stopwise.sampling.types import Completion, GenerationCancelled

class Slow:  # 0.01 s per token, checking its cancel event between tokens as LocalBackend does
    def __init__(self, *args, **kwargs):
        pass
    def encode(self, text):
        return [1] * len(text.split())
    def encode_messages(self, messages):
        return self.encode(messages[-1]["content"])
    def generate_ids(self, encoded, *, n, temperature, max_tokens, seeds, stop=(), cancel=None):
        for _ in range(max_tokens):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("stopped")
            time.sleep(0.01)
        return [[Completion(text="done", n_tokens=max_tokens, finish_reason="length")]]

local.LocalBackend = Slow
from stopwise.sampling.server import serve
serve(model="fake", port=int(sys.argv[1]), max_tokens=5000, shutdown_timeout_s=1)
"""


def test_sigterm_stops_the_chat_server_within_its_shutdown_timeout() -> None:
    import os
    import signal
    import subprocess
    import sys

    from stopwise.serve.runner import free_port

    pytest.importorskip("torch")  # the subprocess imports stopwise.sampling.local (no model is loaded)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHAT_SERVER, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}  # 40 s of generation
        worker = threading.Thread(target=lambda: _swallow(lambda: httpx.post(f"{base}/v1/chat/completions",
                                                                               json=body, timeout=60)), daemon=True)
        worker.start()
        while httpx.get(f"{base}/health", timeout=5).json()["requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"chat server: SIGTERM to exit during a 40 s generation: {took:.2f} s")
    assert took < 6, took  # 1 s grace, then the generation stops before its next token


def _swallow(call: Any) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


def test_a_classifier_that_cannot_answer_rows_as_they_exit_is_said_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stopwise.serve"):
        create_app(FakeClassifier(), None)
    assert "FakeClassifier.predict takes no 'on_exit' / 'cancelled'" in caplog.text
