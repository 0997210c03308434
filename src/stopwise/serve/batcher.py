"""An asyncio dynamic batcher with a bounded queue, per-request deadlines and cancellation.

Requests (each a list of texts) wait in a FIFO queue; the batcher takes the oldest and waits at
most ``max_wait_ms`` after its arrival for more to arrive, up to ``max_batch_size`` texts, then runs
the batch in one worker thread (the event loop keeps answering /health meanwhile) and hands
each request its own rows. This is the dynamic batching of Clipper (Crankshaw et al., NSDI 2017)
and Triton: a batch fills while the previous one runs, so under load batches grow by themselves.
With ``progressive=True`` a request is answered as soon as *its* rows are done, while the rest of
its batch still runs (:class:`~stopwise.serve.progress.BatchProgress`).

The queue holds at most ``max_queue`` texts: a request that does not fit is refused at once
(:class:`QueueFull`, HTTP 503 with Retry-After), never parked in an unbounded backlog. A request
whose client leaves (its future is cancelled) frees its place immediately and is skipped when its
batch forms; once its batch runs, a progressive ``run_batch`` drops its rows at the next layer.
The stopping policy (certificate, λ) lives in one immutable :class:`Policy` read once per batch,
so :meth:`DynamicBatcher.swap` replaces it atomically between batches.
"""

from __future__ import annotations

import asyncio
import functools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stopwise._errors import StopwiseError, check_int
from stopwise.serve.metrics import Metrics
from stopwise.serve.progress import BatchProgress, settle


@dataclass(frozen=True)
class Policy:
    """What decides the exits: a certificate (None: stopping off, the full model) and its identity."""

    certificate: Any | None
    certificate_id: str | None = None
    lam: float | None = None


class QueueFull(StopwiseError):
    """The queue cannot take the request's texts now; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(StopwiseError):
    """The server is draining and accepts no new work."""


class DeadlineExceeded(StopwiseError):
    """A request waited in the queue past its deadline; it never reached the model."""


@dataclass
class Job:
    texts: list[str]
    future: asyncio.Future[tuple[Policy, Any]]
    arrived: float
    deadline: float
    taken: bool = False  # in a batch (its place in the queue is released)
    running: bool = False  # its batch is on the model now
    progress: BatchProgress | None = None  # that batch's, when the batcher is progressive
    index: int = 0  # its place in that batch


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any] = field(repr=False)


class ModelThread:
    """One daemon thread that runs model calls in order (the model is not thread-safe).

    A daemon, unlike a ThreadPoolExecutor's workers, does not hold the process at exit: after the
    bounded graceful shutdown, a batch still running must not keep a SIGTERMed server alive.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="stopwise-model", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._tasks.put(_Task(fn, args, loop, fut))
        return fut

    def stop(self) -> None:
        self._tasks.put(None)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                result, error = task.fn(*task.args), None
            except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
                result, error = None, exc
            try:
                task.loop.call_soon_threadsafe(settle, task.future, result, error)
            except RuntimeError:  # the loop closed while the batch ran (shutdown timed out): nobody waits
                pass


class DynamicBatcher:
    """Gather requests into batches for ``run_batch(texts, policy) -> rows`` (see the module docstring).

    ``run_batch`` runs in the model thread and returns one sequence (or array) per text, in order;
    each request receives ``(policy, its rows)``. ``split(rows, start, stop)`` cuts a request's part
    out of a batch's result (default: slicing). With ``progressive``, ``run_batch`` is called as
    ``run_batch(texts, policy, progress)`` with a :class:`BatchProgress`, through which it answers
    rows as they finish (a request whose rows are all answered so is settled with the list of its
    answers before the batch ends) and learns which rows to drop; requests it left unanswered are
    settled from its result, as without ``progressive``.
    """

    def __init__(self, run_batch: Callable[[list[str], Policy], Any], policy: Policy, *, max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, metrics: Metrics | None = None,
                 split: Callable[[Any, int, int], Any] | None = None, progressive: bool = False) -> None:
        owner = "DynamicBatcher"
        self.max_batch_size = check_int(max_batch_size, "max_batch_size", owner, minimum=1)
        self.max_queue = check_int(max_queue, "max_queue", owner, minimum=1)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 60_000:
            raise StopwiseError(f"The 'max_wait_ms' parameter of {owner} must be a number in [0, 60000). "
                                f"Got {max_wait_ms!r} instead.")
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.run_batch = run_batch
        self.progressive = bool(progressive)
        self.split = split or (lambda rows, a, b: rows[a:b])
        self.metrics = metrics or Metrics()
        self._policy = policy
        self.metrics.lam = policy.lam
        self._pending: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._hurried = False
        self._task: asyncio.Task[None] | None = None
        self._model: ModelThread | None = None
        self._rows_per_s = 0.0  # smoothed throughput, for Retry-After

    # -- the policy, swapped by reference ------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._policy

    def swap(self, policy: Policy) -> Policy:
        """Use ``policy`` from the next batch on (a running batch keeps its own); returns the old one."""
        old, self._policy = self._policy, policy
        self.metrics.lam = policy.lam
        return old

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching task on the running event loop."""
        if self._task is None:
            self._model = ModelThread()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="stopwise-batcher")

    def hurry(self) -> None:
        """Stop waiting for batches to fill (shutdown began): run what is queued now. Thread-safe."""
        loop = self._task.get_loop() if self._task is not None else None
        self._hurried = True
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._arrived.set)

    @property
    def closing(self) -> bool:
        return self._closing

    async def close(self, *, timeout_s: float = 10.0) -> None:
        """Accept nothing new, finish what was accepted within ``timeout_s``, then fail what is left."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("The server shut down before this request ran."))
        self._pending.clear()
        self.metrics.queue_rows = 0
        if self._model is not None:
            self._model.stop()

    # -- requests -----------------------------------------------------------------------------
    def submit(self, texts: Sequence[str], *, timeout_s: float = 30.0) -> asyncio.Future[tuple[Policy, Any]]:
        """Queue ``texts``; the future gives ``(policy, rows)``. Cancel it to withdraw the request."""
        if self._closing:
            raise ShuttingDown("The server is shutting down and accepts no new requests.")
        n = len(texts)
        if self.metrics.queue_rows + n > self.max_queue:
            self.metrics.rejected_full += 1
            raise QueueFull(f"The queue is full ({self.metrics.queue_rows} of {self.max_queue} texts waiting; this "
                            f"request has {n}). Retry later.", self.retry_after())
        loop = asyncio.get_running_loop()
        now = loop.time()
        job = Job(list(texts), loop.create_future(), now, now + float(timeout_s))
        job.future.add_done_callback(functools.partial(self._on_done, job))
        self._pending.append(job)
        self.metrics.queue_rows += n
        self._arrived.set()
        return job.future

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by half, from the measured throughput (1..60)."""
        if self._rows_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(self.metrics.queue_rows / 2 / self._rows_per_s))))

    def _on_done(self, job: Job, _: asyncio.Future[Any]) -> None:
        self._withdrawn(job)

    def _withdrawn(self, job: Job) -> None:
        if not job.future.cancelled():
            return
        if not job.taken:  # the client left while it waited: free its place now
            job.taken = True
            self.metrics.queue_rows -= len(job.texts)
            self.metrics.dropped += 1
        elif job.running:  # the client left while its batch ran: stop its rows, if the model can
            job.running = False
            if job.progress is not None:
                job.progress.withdraw(job.index)
            self.metrics.cancelled_running += 1

    # -- the loop -----------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                if self._closing and not self._pending:
                    return
                continue
            await self._run(batch)

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        wait_until = self._pending[0].arrived + self.max_wait_s
        while self.metrics.queue_rows < self.max_batch_size and not (self._closing or self._hurried):
            remaining = wait_until - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch: list[Job] = []
        rows = 0
        now = loop.time()
        while self._pending:
            job = self._pending[0]
            if job.taken or job.future.done():  # withdrawn by its client (its callback may not have run yet)
                self._withdrawn(job)
                self._pending.popleft()
                continue
            if batch and rows + len(job.texts) > self.max_batch_size:
                break  # a request stays whole; one larger than a batch runs alone
            self._pending.popleft()
            job.taken = True
            self.metrics.queue_rows -= len(job.texts)
            if now > job.deadline:
                self.metrics.expired += 1
                job.future.set_exception(DeadlineExceeded(
                    f"The request waited {now - job.arrived:.1f} s in the queue, past its deadline."))
                continue
            batch.append(job)
            rows += len(job.texts)
        return batch

    async def _run(self, batch: list[Job]) -> None:
        policy = self._policy  # one read per batch: a swap applies from the next batch on
        texts = [t for job in batch for t in job.texts]
        self.metrics.batches += 1
        self.metrics.batch_size.observe(len(texts))
        self.metrics.running_rows = len(texts)
        started = time.perf_counter()
        assert self._model is not None
        progress = (BatchProgress([(job.future, len(job.texts)) for job in batch], policy, asyncio.get_running_loop())
                    if self.progressive else None)
        for i, job in enumerate(batch):
            job.running, job.progress, job.index = True, progress, i
        try:
            # Shielded: a cancelled batcher (shutdown timeout) must not leave the model thread's
            # future unresolved for a loop that is still running.
            args = (texts, policy) if progress is None else (texts, policy, progress)
            rows = await asyncio.shield(self._model.run(self.run_batch, *args))
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.metrics.running_rows = 0
            for job in batch:
                job.running, job.progress = False, None
            if progress is not None:
                self.metrics.cancelled_rows += progress.rows_dropped
        seconds = time.perf_counter() - started
        rate = len(texts) / max(seconds, 1e-6)
        self._rows_per_s = rate if self._rows_per_s == 0 else 0.8 * self._rows_per_s + 0.2 * rate
        start = 0
        for job in batch:
            stop = start + len(job.texts)
            if not job.future.done():  # else answered as its rows finished, or cancelled (counted then)
                job.future.set_result((policy, self.split(rows, start, stop)))
            start = stop
