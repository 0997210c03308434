"""The early-exit encoder as a Ray Serve deployment: ``@serve.deployment`` + ``@serve.batch``.

Past one machine stopwise scales through Ray rather than a scheduler of its own: Ray Serve runs
the replicas, routes the requests and forms the batches. :class:`EncoderDeployment` loads saved
exit heads once per replica; every text of every request goes into Ray Serve's batch queue, and
each batch Ray forms is one :meth:`~stopwise.encoder.EarlyExitClassifier.predict` call under the
certificate. ``POST /v1/classify`` answers the same JSON as ``stopwise serve encoder`` (labels,
probabilities, exit layer, cost, certificate id and λ); ``GET /health`` reports the batches seen.

Importing this module imports Ray (install the ``[ray]`` extra); :mod:`stopwise.serve` itself does
not. Serve listens on the loopback interface only::

    from stopwise.serve.ray_serve import build_app, run
    handle = run(build_app("heads/"), port=8001)   # http://127.0.0.1:8001/v1/classify
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Deployment
from starlette.requests import Request
from starlette.responses import JSONResponse

import stopwise as sw
from stopwise._errors import StopwiseError, check_directory, check_int
from stopwise.http.limits import DEFAULT_MAX_BODY_BYTES, BadJSON, error_body, read_json
from stopwise.serve.app import certificate_id

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
APP_NAME = "stopwise-encoder"
# Ray Serve's own default (5 requests in flight per replica) would cap every batch at 5 texts.
MAX_ONGOING_REQUESTS = 1024


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, param=param))


class RequestRefused(StopwiseError):
    """A request the deployment refuses before the model sees it: HTTP ``status`` (400 or 413)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@serve.deployment(name="EncoderDeployment", max_ongoing_requests=MAX_ONGOING_REQUESTS)
class EncoderDeployment:
    """One Ray Serve replica of an :class:`~stopwise.encoder.EarlyExitClassifier` with early exit.

    Args:
        heads_dir: directory written by ``save_pretrained`` (or ``stopwise encoder fit``).
        base: base model (bundled name or directory); None: the one named in the heads config.
        certificate_json: the certificate deciding the exits, as JSON; None with ``use_saved``: the
            one saved with the heads (stopping off if there is none); None without it: stopping off.
        max_batch_size / batch_wait_timeout_s: Ray Serve's batching (texts per ``predict`` call, and
            how long the first text of a batch waits for others).
        max_texts: most texts in one request; max_body_bytes: largest request body.
        threads: torch threads in the replica (None: torch's choice).
    """

    def __init__(self, heads_dir: str, *, base: str | None = None, certificate_json: str | None = None,
                 use_saved: bool = True, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
                 max_texts: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 threads: int | None = None) -> None:
        import torch

        from stopwise.encoder import EarlyExitClassifier

        if threads is not None:
            torch.set_num_threads(threads)
        self.clf = EarlyExitClassifier.from_pretrained(base, heads_dir)
        cert = sw.Certificate.from_json(certificate_json) if certificate_json is not None else (
            self.clf.certificate if use_saved else None)
        if cert is not None:
            self.clf.check_certificate(cert)  # refuse, at start, a certificate made for other heads
        self.certificate = cert
        self.certificate_id = certificate_id(cert)
        lam = getattr(cert, "lam", None) if cert is not None else None
        self.lam = None if lam is None else float(lam)
        self.max_batch_size, self.max_texts, self.max_body_bytes = max_batch_size, max_texts, max_body_bytes
        self.classes = [str(c) for c in self.clf.class_names]
        self.limit = int(self.clf.max_length)
        # The model runs in one thread of its own so that the event loop keeps taking requests
        # (and filling the next batch) meanwhile; token counts use a copy of the tokenizer, since a
        # fast tokenizer called from two threads at once fails ("Already borrowed").
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stopwise-model")
        self.counter_tokenizer = copy.deepcopy(self.clf.tokenizer)
        self.batch_sizes: list[int] = []
        # Ray Serve's documented way to set batching per deployment; its stubs type the batched
        # method as a plain coroutine function, without these setters.
        self.classify_texts.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.classify_texts.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    def _predict(self, texts: list[str]) -> Any:
        if self.certificate is None:
            return self.clf.predict(texts, batch_size=self.max_batch_size)
        return self.clf.predict(texts, certificate=self.certificate, batch_size=self.max_batch_size)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def classify_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """One ``predict`` call on the texts Ray Serve batched together (from any requests)."""
        self.batch_sizes.append(len(texts))
        pred = await asyncio.get_running_loop().run_in_executor(self.pool, self._predict, list(texts))
        return [{"label": self.classes[int(pred.predictions[i])], "label_id": int(pred.predictions[i]),
                 "probabilities": [float(p) for p in pred.probs[i]], "exit_layer": int(pred.exit_layer[i]),
                 "cost": float(pred.cost[i])} for i in range(len(texts))]

    async def classify(self, texts: list[str], *, truncate: bool = True) -> dict[str, Any]:
        """The /v1/classify answer for ``texts``, through a handle; refuses what /v1/classify refuses."""
        return await self._answer(self.check_request({"texts": texts, "truncate": truncate}))

    async def _answer(self, texts: list[str]) -> dict[str, Any]:
        rows = await asyncio.gather(*(self.classify_texts(t) for t in texts))
        return {"id": f"cls-{uuid.uuid4().hex[:12]}", "object": "classification", "model": self.clf.base_name,
                "classes": self.classes, "certificate_id": self.certificate_id, "lambda": self.lam,
                "results": list(rows)}

    def stats(self) -> dict[str, Any]:
        """What this replica has done: the size of every batch it ran, in order."""
        return {"batches": len(self.batch_sizes), "batch_sizes": list(self.batch_sizes),
                "texts": sum(self.batch_sizes)}

    def check_request(self, body: Any) -> list[str]:
        """The texts of a request body; :class:`RequestRefused` says why one is refused (400/413)."""
        if not isinstance(body, dict):
            raise RequestRefused(400, f"The request body must be a JSON object. Got {type(body).__name__} instead.")
        texts, truncate = body.get("texts"), body.get("truncate", False)
        if not isinstance(texts, list):
            raise RequestRefused(400, "The 'texts' field must be a list of strings. Got "
                                 f"{type(texts).__name__} instead.", "texts")
        if not texts:
            raise RequestRefused(400, "The 'texts' field must hold at least one string. Got an empty list instead.",
                                 "texts")
        if len(texts) > self.max_texts:
            raise RequestRefused(413, f"The 'texts' field must hold at most {self.max_texts} strings on this server. "
                                 f"Got {len(texts)} instead; split the request.", "texts")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise RequestRefused(400, "The 'texts' field must be a list of strings. Got "
                                 f"{type(texts[bad]).__name__} at index {bad} instead.", "texts")
        if not isinstance(truncate, bool):
            raise RequestRefused(400, f"The 'truncate' field must be true or false. Got {truncate!r} instead.",
                                 "truncate")
        if not truncate:
            ids = self.counter_tokenizer(texts, truncation=True, max_length=self.limit + 1,
                                         add_special_tokens=True)["input_ids"]
            over = [i for i, x in enumerate(ids) if len(x) > self.limit]
            if over:
                raise RequestRefused(400, f"Each text must be at most {self.limit} tokens (the model's maximum length "
                                     f"is {self.limit}); {len(over)} of {len(texts)} texts are longer (first at "
                                     f"index {over[0]}). Shorten them, or send \"truncate\": true to classify their "
                                     f"first {self.limit} tokens.", "texts")
        return texts

    async def __call__(self, request: Request) -> Any:
        path = request.url.path.rstrip("/")
        if path == "/health" and request.method == "GET":
            return {"status": "ok", "model": self.clf.base_name, "classes": self.classes,
                    "certificate_id": self.certificate_id, "lambda": self.lam, **self.stats()}
        if path != "/v1/classify":
            return _error(404, f"There is no route {request.url.path!r}: POST /v1/classify or GET /health.")
        if request.method != "POST":
            return _error(405, f"/v1/classify takes POST. Got {request.method} instead.")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return _error(413, f"The request body must be at most {self.max_body_bytes} bytes on this server. "
                               f"Got {declared} bytes instead.", "body")
        try:
            body = await read_json(request)
        except BadJSON as exc:
            return _error(400, str(exc))
        try:
            texts = self.check_request(body)
        except RequestRefused as exc:
            return _error(exc.status, str(exc), exc.param)
        try:
            return await self._answer(texts)
        except Exception as exc:  # the model failed on the batch: every request in it hears why
            return _error(500, f"The model failed on this request's batch: {type(exc).__name__}: {exc}")


def _number(value: Any, name: str, owner: str, *, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise StopwiseError(f"The '{name}' parameter of {owner} must be a number >= {minimum}. Got {value!r} instead.")
    return float(value)


def build_app(heads_dir: str | Path, *, base: str | Path | None = None, certificate: Any = None,
              stopping: bool = True, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
              num_replicas: int = 1, num_cpus: float = 1.0, max_texts: int = 256,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threads: int | None = None) -> Any:
    """A Ray Serve application (``EncoderDeployment`` bound to its arguments) for :func:`run`.

    ``certificate`` is a :class:`~stopwise.Certificate` or the path of its JSON; None: the one saved
    with the heads (stopping off if there is none). ``stopping=False`` runs every layer for every
    text (the bare model). ``num_cpus`` is what each of the ``num_replicas`` replicas reserves.
    """
    owner = "build_app"
    heads = check_directory(heads_dir, "heads_dir", owner, holding="saved exit heads")
    max_batch_size = check_int(max_batch_size, "max_batch_size", owner, minimum=1)
    num_replicas = check_int(num_replicas, "num_replicas", owner, minimum=1)
    max_texts = check_int(max_texts, "max_texts", owner, minimum=1)
    max_body_bytes = check_int(max_body_bytes, "max_body_bytes", owner, minimum=1)
    if threads is not None:
        threads = check_int(threads, "threads", owner, minimum=1)
    wait = _number(batch_wait_timeout_s, "batch_wait_timeout_s", owner, minimum=0.0)
    cpus = _number(num_cpus, "num_cpus", owner, minimum=0.0)
    if not isinstance(stopping, bool):
        raise StopwiseError(f"The 'stopping' parameter of {owner} must be True or False. Got {stopping!r} instead.")
    if not stopping and certificate is not None:
        raise StopwiseError(f"The 'certificate' parameter of {owner} must be None when stopping=False (the bare "
                            "model uses no certificate). Got a certificate instead.")
    if certificate is None or isinstance(certificate, sw.Certificate):
        cert_json = None if certificate is None else certificate.to_json()
    elif isinstance(certificate, (str, Path)):
        cert_json = sw.Certificate.load(certificate).to_json()
    else:
        raise StopwiseError(f"The 'certificate' parameter of {owner} must be a Certificate, the path of its JSON or "
                            f"None. Got {type(certificate).__name__} instead.")
    # @serve.deployment makes the class a Deployment at run time; its stubs keep the class type.
    deployment = cast(Deployment, EncoderDeployment).options(num_replicas=num_replicas,
                                                             ray_actor_options={"num_cpus": cpus})
    return deployment.bind(str(heads.resolve()), base=None if base is None else str(base), certificate_json=cert_json,
                           use_saved=stopping, max_batch_size=max_batch_size, batch_wait_timeout_s=wait,
                           max_texts=max_texts, max_body_bytes=max_body_bytes, threads=threads)


def run(app: Any, *, port: int = 8000, host: str = "127.0.0.1", name: str = APP_NAME) -> Any:
    """Start Serve's HTTP proxy on the loopback ``host``:``port`` and deploy ``app`` at ``/``.

    Returns the deployment handle (``handle.classify.remote(texts).result()``,
    ``handle.stats.remote().result()``). Needs a running Ray (``ray.init``) or starts a local one.
    """
    if host not in LOOPBACK_HOSTS:
        raise StopwiseError(f"The 'host' parameter of run must be a loopback address {list(LOOPBACK_HOSTS)} (the "
                            f"deployment has no authentication). Got {host!r} instead.")
    port = check_int(port, "port", "run", minimum=1)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/")


def main(argv: list[str] | None = None) -> int:
    """``python -m stopwise.serve.ray_serve --heads DIR``: deploy on a local Ray and serve until Ctrl-C.

    Ctrl-C (SIGINT) shuts Serve and Ray down in order. SIGTERM is handled by Ray's own core worker,
    which exits at once (status 15) and takes the local Ray it started down with it.
    """
    import argparse
    import sys
    import threading

    import ray

    p = argparse.ArgumentParser(prog="python -m stopwise.serve.ray_serve",
                                description="Serve saved exit heads with Ray Serve on 127.0.0.1 (POST /v1/classify, "
                                            "GET /health), batching texts with @serve.batch.")
    p.add_argument("--heads", required=True, metavar="DIR", help="directory of saved exit heads")
    p.add_argument("--base", default=None, help="base model (default: the one named in the heads config)")
    p.add_argument("--certificate", default=None, metavar="JSON", help="certificate (default: the saved one)")
    p.add_argument("--no-stopping", action="store_true", help="run every layer for every text (the bare model)")
    p.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most texts per predict call (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill (default 10)")
    p.add_argument("--num-replicas", type=int, default=1, help="replicas (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: torch's choice)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray started here (default: all)")
    args = p.parse_args(argv)
    try:
        app = build_app(args.heads, base=args.base, certificate=args.certificate, stopping=not args.no_stopping,
                        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                        num_replicas=args.num_replicas, threads=args.threads)
    except StopwiseError as exc:
        print(f"stopwise: error: {exc}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    try:
        run(app, port=args.port)
        print(f"stopwise ray serve: http://127.0.0.1:{args.port}/v1/classify", file=sys.stderr, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:  # also while deploying: Serve and Ray still go down in order
        pass
    except StopwiseError as exc:
        print(f"stopwise: error: {exc}", file=sys.stderr)
        return 2
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]  # Ray Serve leaves it unannotated
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
