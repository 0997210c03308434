"""`stopwise serve encoder`: an early-exit text classifier behind a dynamic batcher.

Routes: ``POST /v1/classify`` (``{"texts": [...], "truncate": false}`` → per text: label,
probabilities, exit layer, cost; plus the certificate id and λ that decided the exits),
``GET /health`` and ``GET /metrics`` (Prometheus text). Every request is checked before it takes a
place in the queue: body bytes (413, while streaming), number of texts (413), types (400), tokens
per text (400 naming the limit and the model's maximum, unless the request asks for truncation).
With a :class:`~stopwise.serve.recalibrate.Recalibrator`, a random share of the texts is answered by
the full model and recorded through every layer, and the certificate is recalibrated online.

A request is answered as soon as its own texts have exited, while the rest of its batch runs on
(``predict(on_exit=...)``), and when its client disconnects, its texts still in the batch are dropped
at the next layer (``predict(cancelled=...)``); shadowed texts run every layer by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from stopwise._errors import StopwiseError, check_int
from stopwise.http.limits import DEFAULT_MAX_BODY_BYTES, BadJSON, error_body, install, read_json
from stopwise.serve.batcher import DeadlineExceeded, DynamicBatcher, ModelThread, Policy, QueueFull, ShuttingDown
from stopwise.serve.metrics import Metrics
from stopwise.serve.progress import BatchProgress
from stopwise.serve.recalibrate import Recalibrator

try:  # FastAPI resolves the handlers' annotations at module level
    from fastapi import Request
except ImportError:  # pragma: no cover - the 'serve' extra is not installed
    Request = Any  # type: ignore[misc,assignment]

DISCONNECT_POLL_S = 0.05  # how often a waiting handler checks whether its client is still there
LOG = logging.getLogger("stopwise.serve")


def certificate_id(certificate: Any | None) -> str | None:
    """A short stable id of a certificate: the first 16 hex digits of the SHA-256 of its JSON."""
    if certificate is None:
        return None
    return hashlib.sha256(certificate.to_json().encode()).hexdigest()[:16]


def make_policy(certificate: Any | None) -> Policy:
    """The batcher's policy for ``certificate`` (None: stopping off, every text runs every layer)."""
    lam = getattr(certificate, "lam", None) if certificate is not None else None
    return Policy(certificate, certificate_id(certificate), None if lam is None else float(lam))


@dataclass
class Rows:
    """A batch's answers put together from the live rows and the shadowed (full-model) rows."""

    predictions: np.ndarray
    probs: np.ndarray
    exit_layer: np.ndarray
    cost: np.ndarray

    @classmethod
    def empty(cls, n: int, n_classes: int) -> Rows:
        return cls(np.zeros(n, np.int64), np.zeros((n, n_classes)), np.zeros(n, np.int64), np.zeros(n))

    def put(self, where: np.ndarray, part: Any) -> None:
        for name in ("predictions", "probs", "exit_layer", "cost"):
            getattr(self, name)[where] = np.asarray(getattr(part, name))


def _json(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=error_body(message, param=param), headers=headers)


def create_app(classifier: Any, certificate: Any | None = None, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
               max_queue: int = 1024, max_texts: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               timeout_s: float = 30.0, shutdown_timeout_s: float = 10.0, token: str | None = None,
               recalibrator: Recalibrator | None = None) -> Any:
    """A FastAPI app classifying with ``classifier`` (an :class:`~stopwise.encoder.EarlyExitClassifier`).

    ``certificate`` decides the exits (None: the full model, bit-identical to ``predict`` without a
    rule). ``max_batch_size``/``max_wait_ms``/``max_queue`` configure the :class:`DynamicBatcher`
    (``max_queue`` counts texts); ``max_texts`` caps one request; ``timeout_s`` is how long a
    request may wait in the queue; ``shutdown_timeout_s`` bounds the drain at shutdown. With
    ``token``, /v1 routes and /metrics need ``Authorization: Bearer <token>``. With
    ``recalibrator``, shadowed texts run every layer (answered by the final one) and feed its window;
    its recalibrations and fallbacks swap the policy from the next batch on (see
    :mod:`stopwise.serve.recalibrate` for what the online guarantee covers).

    Texts are answered as they exit and a disconnected client's texts are dropped mid-batch when
    ``classifier.predict`` takes ``on_exit`` and ``cancelled`` (an ``EarlyExitClassifier`` does); a
    stand-in whose predict takes neither is answered batch by batch.
    """
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    owner = "create_app"
    max_texts = check_int(max_texts, "max_texts", owner, minimum=1)
    if isinstance(max_queue, int) and max_texts > max_queue:
        raise StopwiseError(f"The 'max_texts' parameter of {owner} must be at most max_queue = {max_queue} (a larger "
                            f"request could never be queued). Got {max_texts} instead.")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise StopwiseError(f"The 'timeout_s' parameter of {owner} must be a positive number. Got {timeout_s!r} instead.")
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise StopwiseError(f"The 'token' parameter of {owner} must be a string of at least 8 characters or None. "
                            f"Got {'a shorter string' if isinstance(token, str) else repr(token)} instead.")
    if certificate is not None:
        classifier.check_certificate(certificate)  # refuse, at start, a certificate made for other heads
    limit = int(classifier.max_length)
    classes = [str(c) for c in classifier.class_names]
    metrics = Metrics()
    metrics.recalibrator = recalibrator
    if recalibrator is not None:
        recalibrator.start(certificate)
    # A copy for counting tokens in its own thread: a fast tokenizer called from two threads at
    # once with different truncation settings fails ("Already borrowed").
    counter_tokenizer = copy.deepcopy(classifier.tokenizer)
    counter = ModelThread()

    params = inspect.signature(classifier.predict).parameters
    progressive = "on_exit" in params and "cancelled" in params
    if not progressive:
        LOG.warning("%s.predict takes no 'on_exit' / 'cancelled': each request is answered when its whole batch "
                    "is done, and a disconnected client's texts run to the end.", type(classifier).__name__)

    def live(texts: list[str], policy: Policy, progress: BatchProgress | None, where: np.ndarray | None) -> Any:
        """predict on ``texts``, rows ``where`` of the batch (None: all of them, in order)."""
        kwargs: dict[str, Any] = {"batch_size": max_batch_size}
        if policy.certificate is not None:
            kwargs["certificate"] = policy.certificate
        if progress is None:
            return classifier.predict(texts, **kwargs)
        tracker = progress

        def on_exit(done: Any) -> None:
            rows = done.rows if where is None else where[done.rows]
            tracker.answered(rows, split(done, 0, len(done)))

        def cancelled() -> np.ndarray:
            gone = tracker.cancelled
            return gone if where is None or not len(gone) else np.flatnonzero(np.isin(where, gone))

        pred = classifier.predict(texts, on_exit=on_exit, cancelled=cancelled, **kwargs)
        tracker.dropped(int(np.count_nonzero(pred.cancelled)))
        return pred

    def run_batch(texts: list[str], policy: Policy, progress: BatchProgress | None = None) -> Any:
        if recalibrator is None:
            return live(texts, policy, progress, None)
        shadow = recalibrator.choose(len(texts))
        if not shadow.any():
            return live(texts, policy, progress, None)
        rows = Rows.empty(len(texts), len(classes))
        if not shadow.all():
            rows.put(~shadow, live([t for t, s in zip(texts, shadow, strict=True) if not s], policy, progress,
                                   np.flatnonzero(~shadow)))
        trace = classifier.record([t for t, s in zip(texts, shadow, strict=True) if s], batch_size=max_batch_size,
                                  progress=False)
        # The final layer answers a shadowed text: exactly the full model's answer.
        rows.put(shadow, Rows(trace.predictions[:, -1], trace.probs[:, -1, :], np.full(trace.n, trace.n_stages),
                              trace.full_cost))
        decision = recalibrator.observe(trace, policy.certificate)
        if decision is not None:  # in the model thread, between batches: the next batch reads the new policy
            batcher.swap(make_policy(decision.certificate))
        return rows

    def split(pred: Any, a: int, b: int) -> list[dict[str, Any]]:
        return [{"label": classes[int(pred.predictions[i])], "label_id": int(pred.predictions[i]),
                 "probabilities": [float(p) for p in pred.probs[i]], "exit_layer": int(pred.exit_layer[i]),
                 "cost": float(pred.cost[i])} for i in range(a, b)]

    def count_tokens(texts: list[str]) -> list[int]:
        ids = counter_tokenizer(texts, truncation=True, max_length=limit + 1, add_special_tokens=True)["input_ids"]
        return [len(x) for x in ids]

    batcher = DynamicBatcher(run_batch, make_policy(certificate), max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms, max_queue=max_queue, metrics=metrics, split=split,
                             progressive=progressive)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.close(timeout_s=shutdown_timeout_s)
        counter.stop()

    app = FastAPI(title="stopwise serve encoder", lifespan=lifespan)
    install(app, max_bytes=max_body_bytes)
    app.state.batcher = batcher
    app.state.metrics = metrics
    model_name = str(getattr(classifier, "base_name", "encoder"))

    def authorized(request: Request) -> bool:
        if token is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    def unauthorized() -> Any:
        return _json(401, "This server needs 'Authorization: Bearer <token>'.", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        policy = batcher.policy
        return {"status": "draining" if batcher.closing else "ok", "model": model_name, "classes": classes,
                "certificate_id": policy.certificate_id, "lambda": policy.lam, "queue_depth": metrics.queue_rows,
                "running": metrics.running_rows, "batches": metrics.batches, "dropped": metrics.dropped,
                "cancelled_running": metrics.cancelled_running, "cancelled_rows": metrics.cancelled_rows,
                "recalibration": None if recalibrator is None else recalibrator.status()}

    @app.get("/metrics")
    def prometheus(request: Request) -> Any:
        if not authorized(request):
            return unauthorized()
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def validate(body: Any) -> tuple[list[str], bool] | Any:
        if not isinstance(body, dict):
            return _json(400, f"The request body must be a JSON object. Got {type(body).__name__} instead.")
        texts, truncate = body.get("texts"), body.get("truncate", False)
        if not isinstance(texts, list):
            return _json(400, f"The 'texts' field must be a list of strings. Got {type(texts).__name__} instead.",
                         "texts")
        if not texts:
            return _json(400, "The 'texts' field must hold at least one string. Got an empty list instead.", "texts")
        if len(texts) > max_texts:
            return _json(413, f"The 'texts' field must hold at most {max_texts} strings on this server. Got "
                              f"{len(texts)} instead; split the request.", "texts")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            return _json(400, f"The 'texts' field must be a list of strings. Got {type(texts[bad]).__name__} at "
                              f"index {bad} instead.", "texts")
        if not isinstance(truncate, bool):
            return _json(400, f"The 'truncate' field must be true or false. Got {truncate!r} instead.", "truncate")
        return texts, truncate

    async def answer(request: Request, texts: list[str]) -> Any:
        """Queue the texts, and watch the client while they wait and run; None if it disconnected."""
        try:
            fut = batcher.submit(texts, timeout_s=timeout_s)
        except QueueFull as exc:
            return _json(503, str(exc), headers={"Retry-After": str(exc.retry_after)})
        except ShuttingDown as exc:
            return _json(503, str(exc), headers={"Retry-After": "5"})
        gone = False

        async def watch() -> None:
            nonlocal gone
            while not fut.done():
                if await request.is_disconnected():
                    gone = True
                    fut.cancel()
                    return
                await asyncio.sleep(DISCONNECT_POLL_S)

        watcher = asyncio.ensure_future(watch())
        try:
            return await fut
        except asyncio.CancelledError:
            if gone:
                return None
            raise
        except (DeadlineExceeded, ShuttingDown) as exc:
            return _json(503, str(exc), headers={"Retry-After": str(batcher.retry_after())})
        except Exception as exc:  # the model failed on the batch: every request in it hears why
            return _json(500, f"The model failed on this request's batch: {type(exc).__name__}: {exc}")
        finally:
            watcher.cancel()

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        arrived = time.perf_counter()
        batcher.start()  # no-op under uvicorn's lifespan; ASGI test transports may skip the lifespan
        if not authorized(request):
            return unauthorized()
        try:
            body = await read_json(request)
        except BadJSON as exc:
            metrics.answered(400)
            return _json(400, str(exc))
        checked = validate(body)
        if not isinstance(checked, tuple):
            metrics.answered(checked.status_code)
            return checked
        texts, truncate = checked
        if not truncate:
            lengths = await counter.run(count_tokens, texts)
            over = [i for i, n in enumerate(lengths) if n > limit]
            if over:
                metrics.answered(400)
                return _json(400, f"Each text must be at most {limit} tokens (the model's maximum length is {limit}); "
                                  f"{len(over)} of {len(texts)} texts are longer (first at index {over[0]}). Shorten "
                                  "them, or send \"truncate\": true to classify their first "
                                  f"{limit} tokens.", "texts")
        result = await answer(request, texts)
        if result is None:
            metrics.answered(499)
            return _json(499, "The client closed the request.")
        if not isinstance(result, tuple):
            metrics.answered(result.status_code)
            return result
        policy, rows = result
        metrics.texts += len(rows)
        metrics.exit_layer_sum += sum(r["exit_layer"] for r in rows)
        metrics.exit_layer_count += len(rows)
        metrics.answered(200, time.perf_counter() - arrived)
        return {"id": f"cls-{uuid.uuid4().hex[:12]}", "object": "classification", "model": model_name,
                "classes": classes, "certificate_id": policy.certificate_id, "lambda": policy.lam, "results": rows}

    return app
