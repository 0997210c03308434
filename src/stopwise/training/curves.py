"""Learning curves as traces: one training run is one input, one evaluation is one stage.

A curve collection becomes a :class:`stopwise.Trace` whose signals are

* ``"score"``: the monitored metric oriented so that larger is better (``-val_loss`` for
  ``mode="min"``), what every training rule reads;
* ``"regret"``: per stage k, (best score the full run reaches - best score kept up to k) divided
  by ``bound``: what restore-best loses by stopping at k, in [0, 1] when ``bound`` bounds it.

Predictions hold the restore-best stage (the first best so far), costs the cumulative compute.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError, check_choice
from stopwise.trace import FloatArray
from stopwise.training.rules import SCORE

REGRET = "regret"
TASK_FORMAT = "learning_curve"

__all__ = ["REGRET", "TASK_FORMAT", "CurveRecorder", "curves_to_trace", "read_run", "scores_of", "values_of"]

Curves = Sequence[Sequence[float]] | FloatArray


def _runs(curves: Curves) -> list[FloatArray]:
    if isinstance(curves, np.ndarray):
        if curves.ndim != 2:
            raise StopwiseError(f"The 'curves' parameter of curves_to_trace must be 2-D (runs, evaluations). "
                                f"Got shape {curves.shape} instead.")
        return [np.asarray(row, dtype=np.float64) for row in curves]
    if isinstance(curves, (str, bytes)) or not isinstance(curves, Sequence):
        raise StopwiseError(f"The 'curves' parameter of curves_to_trace must be a sequence of per-run metric "
                            f"sequences. Got {type(curves).__name__} instead.")
    return [np.asarray(run, dtype=np.float64).reshape(-1) for run in curves]


def curves_to_trace(curves: Curves, *, mode: Literal["min", "max"], monitor: str, population: str,
                    cost: Sequence[float] | FloatArray | None = None, bound: float = 1.0,
                    on_nonfinite: Literal["raise", "truncate"] = "raise", allow_ragged: bool = False,
                    meta: Mapping[str, Any] | None = None, aux: Mapping[str, Curves] | None = None) -> sw.Trace:
    """Turn learning curves (one metric sequence per run) into a trace.

    Args:
        curves: per run, the metric after each evaluation (epoch, step or training-set size).
        mode: ``"min"`` when smaller is better (losses), ``"max"`` otherwise.
        monitor: the metric's name; certificates refuse monitors with another.
        population: names the runs' population (task, search space); certificates refuse others.
        cost: cumulative compute per evaluation, shared (K,) or per run (n, K); default 1, 2, ...
        bound: the largest regret, in the metric's units (1 for accuracies).
        on_nonfinite: a NaN or inf (a diverged run) raises, or ends that run just before it.
        allow_ragged: accept runs of unequal length (shorter runs are masked); else raise.
        aux: other metrics recorded at the same evaluations (e.g. ``{"val_loss": ...}`` beside a
            monitored accuracy), kept as signals of those names for rules that read them
            (:class:`~stopwise.training.learned.LearnedStopping`); each run must have as many
            values as its monitored run, and a non-finite one ends the run like the monitor's.
    """
    mode = check_choice(mode, "mode", "curves_to_trace", ("min", "max"))  # type: ignore[assignment]
    on_nonfinite = check_choice(on_nonfinite, "on_nonfinite", "curves_to_trace", ("raise", "truncate"))  # type: ignore[assignment]
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise StopwiseError(f"The 'bound' parameter of curves_to_trace must be a positive finite number. Got {bound!r} instead.")
    runs = _runs(curves)
    if not runs:
        raise StopwiseError("The 'curves' parameter of curves_to_trace holds no run.")
    extra = _aux_runs(aux, runs)
    for i, run in enumerate(runs):
        for name, values in ((monitor, run), *((a, r[i]) for a, r in extra.items())):
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size and on_nonfinite == "raise":
                raise StopwiseError(f"Run {i} has {name} = {values[bad[0]]} at evaluation {int(bad[0])} (a diverged run). "
                                    "Pass on_nonfinite='truncate' to end such runs before their first non-finite value.")
            if bad.size:
                runs[i] = runs[i][: min(bad[0], runs[i].size)]
        for r in extra.values():
            r[i] = r[i][: runs[i].size]
        if runs[i].size == 0:
            raise StopwiseError(f"Run {i} has no evaluation (before its first non-finite value).")
    lengths = np.array([r.size for r in runs])
    if not allow_ragged and lengths.min() != lengths.max():
        short = int(lengths.argmin())
        raise StopwiseError(f"The curves have unequal lengths (from {lengths.min()} to {lengths.max()} evaluations; run "
                            f"{short} has {lengths[short]}). Pass allow_ragged=True if shorter runs really ended there.")
    n, k = len(runs), int(lengths.max())
    sign = 1.0 if mode == "max" else -1.0
    score = np.full((n, k), np.nan)
    for i, run in enumerate(runs):
        score[i, : run.size] = sign * run
    mask = np.arange(k)[None, :] < lengths[:, None]
    filled = np.where(mask, score, -np.inf)
    best = np.maximum.accumulate(filled, axis=1)
    final = best[np.arange(n), lengths - 1]
    regret = np.where(mask, (final[:, None] - best) / bound, 0.0)
    if regret.max() > 1.0:
        row, col = (int(v) for v in np.unravel_index(int(regret.argmax()), regret.shape))
        raise StopwiseError(f"Run {row} loses {regret[row, col] * bound:.4g} of {monitor} by stopping at evaluation {col}, more "
                            f"than bound = {bound:g}. Pass a 'bound' at least as large as the largest possible regret.")
    # The restore-best stage: the first stage holding the best score so far.
    preds = _first_best(filled, best, mask)
    info = {"monitor": monitor, "mode": mode, "model": population, "task_format": TASK_FORMAT,
            "regret_bound": float(bound), **dict(meta or {})}
    signals = {SCORE: np.where(mask, score, 0.0), REGRET: regret}
    for name, r in extra.items():
        values = np.zeros((n, k))
        for i, run in enumerate(r):
            values[i, : run.size] = run
        signals[name] = values
    return sw.Trace(predictions=preds, mask=mask, cost=None if cost is None else np.asarray(cost, dtype=np.float64),
                    signals=signals, meta=info)


def _aux_runs(aux: Mapping[str, Curves] | None, runs: list[FloatArray]) -> dict[str, list[FloatArray]]:
    if aux is None:
        return {}
    if not isinstance(aux, Mapping):
        raise StopwiseError(f"The 'aux' parameter of curves_to_trace must be a mapping of metric name to curves. "
                            f"Got {type(aux).__name__} instead.")
    out = {}
    for name, curves in aux.items():
        if not isinstance(name, str) or not name or name in (SCORE, REGRET):
            raise StopwiseError(f"The names in 'aux' of curves_to_trace must be metric names other than {SCORE!r} and "
                                f"{REGRET!r}. Got {name!r} instead.")
        r = _runs(curves)
        if len(r) != len(runs):
            raise StopwiseError(f"The aux metric {name!r} has {len(r)} runs; the monitored curves have {len(runs)}.")
        for i, (a, m) in enumerate(zip(r, runs, strict=True)):
            if a.size != m.size:
                raise StopwiseError(f"Run {i} has {a.size} values of the aux metric {name!r} but {m.size} of the "
                                    "monitored metric: record both at the same evaluations.")
        out[name] = r
    return out


def _first_best(filled: FloatArray, best: FloatArray, mask: np.ndarray) -> np.ndarray:
    n, k = filled.shape
    # A stage improves when it beats every earlier one strictly; the restore point is the last improvement.
    prev = np.concatenate([np.full((n, 1), -np.inf), best[:, :-1]], axis=1)
    improves = (filled > prev) & mask
    idx = np.where(improves, np.arange(k)[None, :], 0)
    out: np.ndarray = np.maximum.accumulate(idx, axis=1).astype(np.int64)
    return out


def scores_of(trace: sw.Trace) -> FloatArray:
    """(n, K) oriented scores (larger is better), NaN on missing stages."""
    assert trace.mask is not None
    out: FloatArray = np.where(trace.mask, trace.signals[SCORE], np.nan)
    return out


def values_of(trace: sw.Trace) -> FloatArray:
    """(n, K) metric values as recorded (in the monitor's own direction), NaN on missing stages."""
    sign = 1.0 if trace.meta.get("mode") == "max" else -1.0
    out: FloatArray = sign * scores_of(trace)
    return out


def read_run(log: Any, *, monitor: str) -> list[float]:
    """One run's metric per evaluation from what a training loop leaves behind.

    Accepts a list of numbers, a Hugging Face ``Trainer.state.log_history`` (a list of dicts,
    only those holding ``monitor`` count), a Keras ``History.history`` dict of lists, or the path
    of a Lightning ``CSVLogger`` ``metrics.csv`` (rows with an empty ``monitor`` cell skipped).
    """
    if isinstance(log, (str, Path)):
        path = Path(log)
        if not path.is_file():
            raise StopwiseError(f"The 'log' parameter of read_run names no file: {str(path)!r}.")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and monitor not in rows[0]:
            raise StopwiseError(f"The CSV log {str(path)!r} has no column {monitor!r} (columns: {sorted(rows[0])}).")
        values = [float(r[monitor]) for r in rows if r.get(monitor, "") != ""]
    elif isinstance(log, Mapping):
        if monitor not in log:
            raise StopwiseError(f"The history has no metric {monitor!r} (metrics: {sorted(log)}).")
        values = [float(v) for v in log[monitor]]
    elif isinstance(log, Sequence) and all(isinstance(e, Mapping) for e in log) and len(log):
        values = [float(e[monitor]) for e in log if monitor in e]
    elif isinstance(log, (Sequence, np.ndarray)):
        values = [float(v) for v in log]
    else:
        raise StopwiseError(f"The 'log' parameter of read_run must be a list of numbers, a list of dicts, a dict of "
                            f"lists or a CSV path. Got {type(log).__name__} instead.")
    if not values:
        raise StopwiseError(f"The log holds no value of {monitor!r}.")
    return values


class CurveRecorder:
    """Collect a user's own runs, one :meth:`add` per run, then :meth:`to_trace` to calibrate on.

    Example::

        rec = CurveRecorder(monitor="eval_loss", mode="min", population="bert-sst2-sweep")
        for trainer in finished_trainers:
            rec.add(trainer.state.log_history)
        cert = stopwise.training.certify(rec.to_trace(), EpochPatience(), epsilon=0.01)
    """

    def __init__(self, *, monitor: str, mode: Literal["min", "max"], population: str) -> None:
        self.monitor = monitor
        self.mode = check_choice(mode, "mode", "CurveRecorder", ("min", "max"))
        self.population = population
        self.runs: list[list[float]] = []

    def add(self, log: Any) -> None:
        """Add one finished run (anything :func:`read_run` accepts)."""
        self.runs.append(read_run(log, monitor=self.monitor))

    def to_trace(self, **kwargs: Any) -> sw.Trace:
        """The runs so far as a trace (keyword arguments go to :func:`curves_to_trace`)."""
        return curves_to_trace(self.runs, mode=self.mode, monitor=self.monitor,  # type: ignore[arg-type]
                               population=self.population, **kwargs)
