"""Prometheus text exposition (format 0.0.4) for the encoder server, without a client library.

Updated from the event loop only (the batcher sets results there), so no locks are needed; the
recalibrator's counters are single assignments made by the model thread, read as they stand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it (``_bucket{le=...}``, ``_sum``, ``_count``)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += float(value)
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


def _num(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


class Metrics:
    """Counters, gauges and histograms of one encoder server; :meth:`render` gives the /metrics text."""

    def __init__(self) -> None:
        self.responses: dict[int, int] = {}  # HTTP status -> answers sent by /v1/classify
        self.texts = 0  # texts classified and answered
        self.batches = 0
        self.rejected_full = 0  # refused because the queue was full
        self.dropped = 0  # requests whose client left before their batch ran: no model work was done
        self.cancelled_running = 0  # clients that left while their batch ran
        self.cancelled_rows = 0  # texts of those clients dropped mid-batch: their later layers never ran
        self.expired = 0  # requests that waited past their deadline in the queue
        self.queue_rows = 0  # texts accepted and not yet in a batch
        self.running_rows = 0  # texts in the batch on the model now
        self.exit_layer_sum = 0.0
        self.exit_layer_count = 0
        self.lam: float | None = None
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.recalibrator: Any | None = None  # a Recalibrator: its lines are appended to the exposition

    def answered(self, status: int, seconds: float | None = None) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        if seconds is not None:
            self.latency.observe(seconds)

    @property
    def mean_exit_layer(self) -> float:
        return self.exit_layer_sum / self.exit_layer_count if self.exit_layer_count else float("nan")

    def render(self) -> str:
        p = "stopwise_serve"
        lines = [f"# HELP {p}_requests_total Answers of /v1/classify by HTTP status.",
                 f"# TYPE {p}_requests_total counter"]
        lines += [f'{p}_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.responses.items())]
        for name, kind, value, text in (
            ("texts_total", "counter", self.texts, "Texts classified and answered."),
            ("batches_total", "counter", self.batches, "Dynamic batches run on the model."),
            ("rejected_queue_full_total", "counter", self.rejected_full, "Requests refused with 503: queue full."),
            ("dropped_total", "counter", self.dropped, "Requests dropped before running: their client disconnected."),
            ("cancelled_running_total", "counter", self.cancelled_running,
             "Requests whose client disconnected while their batch ran (answer discarded)."),
            ("cancelled_rows_total", "counter", self.cancelled_rows,
             "Texts dropped mid-batch because their client disconnected (their remaining layers not run)."),
            ("expired_total", "counter", self.expired, "Requests that waited in the queue past their deadline."),
            ("queue_depth", "gauge", self.queue_rows, "Texts accepted and waiting for a batch."),
            ("running_texts", "gauge", self.running_rows, "Texts in the batch running on the model."),
            ("mean_exit_layer", "gauge", self.mean_exit_layer, "Mean exit layer (1-based) of the texts answered."),
            ("lambda", "gauge", float("nan") if self.lam is None else self.lam,
             "Threshold of the certified rule in use (NaN: stopping off, full model)."),
        ):
            lines += [f"# HELP {p}_{name} {text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {_num(float(value))}"]
        lines += [f"# HELP {p}_batch_size Texts per dynamic batch.", f"# TYPE {p}_batch_size histogram",
                  *self.batch_size.lines(f"{p}_batch_size")]
        lines += [f"# HELP {p}_request_latency_seconds Time from arrival to answer of /v1/classify requests.",
                  f"# TYPE {p}_request_latency_seconds histogram", *self.latency.lines(f"{p}_request_latency_seconds")]
        if self.recalibrator is not None:
            lines += self.recalibrator.metric_lines()
        return "\n".join(lines) + "\n"
