"""Serving benchmark: `stopwise serve encoder` with early exit vs exits off vs a plain batched server.

Heads are trained on BBC News articles (MiniLM-L6, max_length 48 or --max-length, document-wise train / cal / test
split), max_prob is certified for the gap at ε = 0.01, δ = 0.1 on the calibration split, and three
servers run in subprocesses (the load generator does not share their GIL), each with one torch
thread, on 127.0.0.1:

- (a) ``stopwise serve encoder`` with the certificate (early exit);
- (b) the same server with ``--no-stopping`` (every layer);
- (c) a plain batched full-model server (this file, ``--baseline-server``): a minimal FastAPI app
  with an asyncio queue, batches of at most 32 texts / 5 ms, ``predict`` without a rule, none of
  the stopwise server's checks.

Against each, a loopback load generator (httpx, one text per request, the BBC test articles in a
loop) runs closed loops at concurrency 1, 4, 16, 64 and open-loop Poisson arrivals at 0.5x, 0.9x
and 1.5x of (b)'s closed-loop throughput at concurrency 64; each reports throughput (answers/s),
p50 / p99 latency, errors (non-200 other than 503), rejected (503), unanswered (no answer within
the drain timeout, or the connection failed), mean exit layer and the gap: the share of answers
that differ from the full model's label for the same text (the reference is (b)'s answers).

The drift run starts (a) with ``--recalibrate`` and streams BBC articles, then CHAMP maths
problems (``champ-dataset``), reporting per phase the gap to the full model (reference computed
in this process), λ over time, recalibrations and fallbacks (/metrics and the server's log).

    PYTHONPATH=src nice -n 10 python benchmarks/serve.py --json [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:  # FastAPI resolves the baseline handler's annotation at module level
    from fastapi import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]

ROOT = Path(__file__).resolve().parents[1]
EPSILON, DELTA, MAX_LENGTH = 0.01, 0.1, 48  # default --max-length
CONCURRENCY = (1, 4, 16, 64)
RATE_FACTORS = (0.5, 0.9, 1.5)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def log(msg: str) -> None:
    print(f"[serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the plain baseline server (runs in its own process) -------------------------------------
def baseline_server(heads: str, port: int, threads: int) -> None:
    import contextlib

    import torch
    import uvicorn
    from fastapi import FastAPI

    from stopwise.encoder import EarlyExitClassifier

    torch.set_num_threads(threads)
    clf = EarlyExitClassifier.from_pretrained(None, heads)
    queue: asyncio.Queue[tuple[list[str], asyncio.Future[Any]]] = asyncio.Queue()

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            until = loop.time() + 0.005
            while sum(len(j[0]) for j in jobs) < 32 and (left := until - loop.time()) > 0:
                try:
                    jobs.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            texts = [t for j in jobs for t in j[0]]
            pred = await loop.run_in_executor(None, functools.partial(clf.predict, texts, batch_size=32))
            start = 0
            for batch_texts, fut in jobs:
                stop = start + len(batch_texts)
                fut.set_result([{"label_id": int(pred.predictions[i]), "exit_layer": int(pred.exit_layer[i])}
                                for i in range(start, stop)])
                start = stop

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        task = asyncio.get_running_loop().create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict[str, Any]:
        body = await request.json()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await queue.put((list(body["texts"]), fut))
        return {"results": await fut}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- servers ---------------------------------------------------------------------------------
class Server:
    """A server subprocess on a free loopback port; its stderr goes to a log file."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        from stopwise.serve.runner import free_port

        self.name, self.port = name, free_port()
        self.log_path = workdir / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=self.log_path.open("w"))

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server {self.name} did not start")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stopwise_server(name: str, heads: Path, workdir: Path, *extra: str) -> Server:
    return Server(name, ["-m", "stopwise.serve.cli", "encoder", "--heads", str(heads), "--threads", "1",
                         "--max-batch-size", "32", "--max-wait-ms", "5", *extra], workdir)


# -- load ------------------------------------------------------------------------------------
async def _one(client: Any, url: str, text: str, out: list[dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"text": text, "status": None}
    try:
        r = await client.post(url, json={"texts": [text], "truncate": True})
        rec["status"] = r.status_code
        if r.status_code == 200:
            row = r.json()["results"][0]
            rec["label"], rec["exit"] = row["label_id"], row["exit_layer"]
    except Exception as exc:  # connection failures and timeouts count as unanswered
        rec["error"] = type(exc).__name__
    rec["latency"] = time.perf_counter() - t0
    out.append(rec)


async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float) -> tuple[list[dict[str, Any]], float]:
    import httpx

    out: list[dict[str, Any]] = []
    counter = iter(range(10**9))
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        async def worker() -> None:
            while time.perf_counter() - t0 < seconds:
                await _one(client, url, texts[next(counter) % len(texts)], out)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


async def open_loop(url: str, texts: list[str], rate: float, seconds: float, seed: int) -> tuple[list[dict[str, Any]], float]:
    import httpx

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    tasks = []
    sent = 0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=512)) as client:
        at = 0.0
        while (at := at + rng.exponential(1.0 / rate)) < seconds:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            tasks.append(asyncio.ensure_future(_one(client, url, texts[sent % len(texts)], out)))
            sent += 1
        await asyncio.wait(tasks, timeout=30)
    elapsed = time.perf_counter() - t0
    for _ in range(sent - len(out)):
        out.append({"status": None, "error": "unanswered", "latency": float("nan")})
    return out, elapsed


def summarise(recs: list[dict[str, Any]], elapsed: float, reference: dict[str, int]) -> dict[str, Any]:
    ok = [r for r in recs if r["status"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    compared = [r for r in ok if r["text"] in reference]
    return {"requests": len(recs), "answered": len(ok), "throughput": len(ok) / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "errors": sum(1 for r in recs if r["status"] not in (None, 200, 503)),
            "rejected_503": sum(1 for r in recs if r["status"] == 503),
            "unanswered": sum(1 for r in recs if r["status"] is None),
            "mean_exit_layer": float(np.mean([r["exit"] for r in ok])) if ok else float("nan"),
            "gap": float(np.mean([r["label"] != reference[r["text"]] for r in compared])) if compared else None}


def load_suite(url: str, texts: list[str], *, seconds: float, rates: list[float],
               reference: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"closed": {}, "open": {}}
    for c in CONCURRENCY:
        recs, el = asyncio.run(closed_loop(f"{url}/v1/classify", texts, c, seconds))
        out["closed"][str(c)] = summarise(recs, el, reference)
        log(f"  closed c={c}: {out['closed'][str(c)]['throughput']:.1f}/s p99 {out['closed'][str(c)]['p99_ms']:.0f} ms")
    for i, rate in enumerate(rates):
        recs, el = asyncio.run(open_loop(f"{url}/v1/classify", texts, rate, seconds, seed=i))
        out["open"][f"{rate:.1f}"] = summarise(recs, el, reference)
        log(f"  open {rate:.1f}/s: {out['open'][f'{rate:.1f}']['throughput']:.1f}/s p99 {out['open'][f'{rate:.1f}']['p99_ms']:.0f} ms")
    return out


def reference_of(url: str, texts: list[str]) -> dict[str, int]:
    import httpx

    ref: dict[str, int] = {}
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(texts), 32):
            r = client.post(f"{url}/v1/classify", json={"texts": texts[i:i + 32], "truncate": True}).json()
            ref.update({t: row["label_id"] for t, row in zip(texts[i:i + 32], r["results"], strict=True)})
    return ref


# -- the drift run ---------------------------------------------------------------------------
async def drift_stream(url: str, phases: list[tuple[str, list[str], float]], concurrency: int
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import httpx

    out: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    state = {"phase": phases[0][0]}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def poll() -> None:
            while True:
                text = (await client.get(f"{url}/metrics")).text
                vals = dict(re.findall(r"^(stopwise_\w+) (\S+)$", text, re.M))
                timeline.append({"t": time.perf_counter() - t0, "phase": state["phase"],
                                 "lambda": float(vals.get("stopwise_serve_lambda", "nan")),
                                 "certified": float(vals.get("stopwise_policy_certified", "nan")),
                                 "recalibrations": float(vals.get("stopwise_recalibrations_total", "nan")),
                                 "fallbacks": float(vals.get("stopwise_fallbacks_total", "nan")),
                                 "window": float(vals.get("stopwise_window_traces", "nan")),
                                 "window_gap": float(vals.get("stopwise_window_gap", "nan"))})
                await asyncio.sleep(0.5)

        poller = asyncio.ensure_future(poll())
        for name, texts, seconds in phases:
            state["phase"] = name
            start, counter = time.perf_counter(), iter(range(10**9))

            async def worker(texts: list[str] = texts, start: float = start, seconds: float = seconds,
                             counter: Any = counter, name: str = name) -> None:
                while time.perf_counter() - start < seconds:
                    recs: list[dict[str, Any]] = []
                    await _one(client, f"{url}/v1/classify", texts[next(counter) % len(texts)], recs)
                    recs[0].update(phase=name, t=time.perf_counter() - t0)
                    out.extend(recs)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        poller.cancel()
    return out, timeline


def drift_run(heads: Path, cert: Path, workdir: Path, bbc: list[str], champ: list[str], reference: dict[str, int],
              *, seconds: float, shadow_rate: float, window: int, every: int) -> dict[str, Any]:
    args = ("--certificate", str(cert), "--recalibrate", "--shadow-rate", str(shadow_rate), "--window", str(window),
            "--recalibrate-every", str(every), "--epsilon", str(EPSILON), "--delta", str(DELTA))
    with stopwise_server("drift", heads, workdir, *args) as server:
        recs, timeline = asyncio.run(drift_stream(server.url, [("bbc", bbc, seconds), ("champ", champ, seconds)], 8))
        import httpx

        health = httpx.get(f"{server.url}/health").json()
    logtext = server.log_path.read_text()
    fallback_lines = [ln for ln in logtext.splitlines() if "FALLBACK" in ln]
    drift_t = min((r["t"] for r in recs if r.get("phase") == "champ"), default=float("nan"))
    phases: dict[str, Any] = {}
    for name in ("bbc", "champ"):
        part = [r for r in recs if r.get("phase") == name]
        phases[name] = summarise(part, seconds, reference)
    bins = []
    for a in np.arange(0, 2 * seconds, seconds / 6):
        part = [r for r in recs if a <= r.get("t", -1) < a + seconds / 6 and r["status"] == 200]
        cmp_ = [r["label"] != reference[r["text"]] for r in part if r["text"] in reference]
        bins.append({"from_s": float(a), "answers": len(part), "gap": float(np.mean(cmp_)) if cmp_ else None,
                     "mean_exit_layer": float(np.mean([r["exit"] for r in part])) if part else None})
    events = (health.get("recalibration") or {}).get("events", [])
    return {"shadow_rate": shadow_rate, "window": window, "recalibrate_every": every, "seconds_per_phase": seconds,
            "drift_at_s": drift_t, "phases": phases, "gap_by_time_bin": bins,
            "fallbacks_logged": len(fallback_lines), "fallback_log_lines": fallback_lines[:10],
            "final": {k: v for k, v in (health.get("recalibration") or {}).items() if k != "events"},
            "last_events": events, "timeline": timeline[:: max(1, len(timeline) // 60)]}


# -- main ------------------------------------------------------------------------------------
def prepare(quick: bool, max_length: int) -> tuple[Path, Path, list[str], list[str], Any]:
    """Heads and certificate, trained once and cached under $STOPWISE_CACHE/serve_bench[_L<max_length>]."""
    import stopwise as sw
    from stopwise.encoder import EarlyExitClassifier, data, recipes

    warnings.filterwarnings("ignore")
    root = Path(os.environ.get("STOPWISE_CACHE", Path.home() / ".cache" / "stopwise"))
    cache = root / ("serve_bench" if max_length == MAX_LENGTH else f"serve_bench_L{max_length}")
    heads, cert_path, test_path = cache / "heads", cache / "certificate.json", cache / "test_texts.json"
    if test_path.is_file():
        log(f"cached heads and certificate from {cache}")
        clf = EarlyExitClassifier.from_pretrained(None, heads)
        test_texts = json.loads(test_path.read_text())
    else:
        log("training heads on BBC articles and certifying max_prob (gap, eps 0.01, delta 0.1)")
        prep = recipes.prepare(data.bbc_news(), base="minilm", max_length=max_length, progress=False, pooling="mean")
        cert = sw.calibrate(prep.trace("cal"), sw.make_rule("max_prob"), epsilon=EPSILON, delta=DELTA, risk="gap")
        prep.clf.certificate = cert
        prep.clf.save_pretrained(heads)
        cert.save(cert_path)
        clf, test_texts = prep.clf, prep.texts("test")
        test_path.write_text(json.dumps(test_texts))
    cert = sw.Certificate.load(cert_path)
    log(f"certified: {cert.certified}, lambda {cert.lam}, mean layers on cal {cert.mean_stages:.2f} of {cert.n_stages}")
    champ_texts = data.champ_steps().texts[: 200 if quick else 600]
    return heads, cert_path, test_texts, champ_texts, clf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/serve.json and print it")
    ap.add_argument("--quick", action="store_true", help="short runs (< 3 minutes)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per load point (default 4, quick 2)")
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH,
                    help=f"tokens per text (default {MAX_LENGTH}); heads and certificate are cached per value")
    ap.add_argument("--baseline-server", nargs=2, metavar=("HEADS", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        baseline_server(args.baseline_server[0], int(args.port or args.baseline_server[1]), threads=1)
        return
    import torch

    torch.set_num_threads(2)  # training and the references; the servers get one thread each
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heads, cert_path, test_texts, champ_texts, clf = prepare(args.quick, args.max_length)
        texts = test_texts[:120] if args.quick else test_texts
        log(f"full-model reference for {len(champ_texts)} CHAMP texts (drift stream)")
        pred = clf.predict(champ_texts, batch_size=32)
        reference = {t: int(p) for t, p in zip(champ_texts, pred.predictions, strict=True)}
        torch.set_num_threads(1)
        results: dict[str, Any] = {}
        log("(b) exits off")
        with stopwise_server("exits_off", heads, work, "--no-stopping") as server:
            reference.update(reference_of(server.url, texts))
            results["exits_off"] = load_suite(server.url, texts, seconds=seconds, rates=[], reference=reference)
            sat = results["exits_off"]["closed"]["64"]["throughput"]
            rates = [round(f * sat, 1) for f in RATE_FACTORS]
            for i, rate in enumerate(rates):
                recs, el = asyncio.run(open_loop(f"{server.url}/v1/classify", texts, rate, seconds, seed=i))
                results["exits_off"]["open"][f"{rate:.1f}"] = summarise(recs, el, reference)
        log("(a) early exit")
        with stopwise_server("early_exit", heads, work, "--certificate", str(cert_path)) as server:
            results["early_exit"] = load_suite(server.url, texts, seconds=seconds, rates=rates, reference=reference)
        log("(c) plain batched full-model server")
        with Server("plain_baseline", [str(Path(__file__).resolve()), "--baseline-server", str(heads), "0"], work) as server:
            results["plain_baseline"] = load_suite(server.url, texts, seconds=seconds, rates=rates, reference=reference)
        log("drift run: BBC articles, then CHAMP problems")
        drift = drift_run(heads, cert_path, work, texts, champ_texts, reference,
                          seconds=(20.0 if args.quick else 60.0), shadow_rate=0.3 if args.quick else 0.25,
                          window=300 if args.quick else 500, every=60 if args.quick else 100)
        cert = json.loads(cert_path.read_text())
    ratios = {c: results["early_exit"]["closed"][c]["throughput"] / results["exits_off"]["closed"][c]["throughput"]
              for c in results["early_exit"]["closed"]}
    lost = {k: sum(p["unanswered"] + p["errors"] for m in v.values() for p in m.values()) for k, v in results.items()}
    out = {"benchmark": "serve", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads_per_server": 1},
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
           "seconds_per_point": seconds, "wall_s": time.time() - started, "n_texts": len(texts),
           "epsilon": EPSILON, "delta": DELTA, "max_length": args.max_length,
           "certificate": {k: cert[k] for k in ("certified", "lam", "mean_stages", "n_stages", "empirical_risk", "n")},
           "open_loop_rates": rates, "throughput_ratio_early_over_exits_off_closed": ratios,
           "lost_requests_errors_plus_unanswered": lost, "results": results, "drift": drift,
           "goal": "early exit >= 2x throughput of exits off at the same p99, eps 0.01, 0 lost, 0 errors below "
                   "saturation; drift: fallback fires and the gap stays <= eps"}
    text = json.dumps(out, indent=1, sort_keys=True, default=float)
    if args.json:
        (ROOT / "benchmarks" / "results" / "serve.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
