"""The Learning Curve Database (Mohr, Viering, Loog, van Rijn et al., "LCDB 1.0: An extensive
learning curves database for classification tasks", ECML PKDD 2022) as a learning-curve trace.

The PyPI package ``lcdb`` ships the curves as CSV files (``database-accuracy.csv``, ...): per
OpenML data set, sklearn learner and outer/inner seed, the validation score at training-set sizes
(anchors) 16, 23, 32, 45, ... A curve is one run and an anchor one stage; the cost of stage k is
the sum of the training-set sizes up to k (the learner is refitted at every anchor). This reads
the installed files directly; it never calls lcdb's download functions.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError, check_choice
from stopwise.training.curves import curves_to_trace

METRICS = ("accuracy", "f1", "auc", "logloss")
_MODES = {"accuracy": "max", "f1": "max", "auc": "max", "logloss": "min"}

__all__ = ["METRICS", "lcdb_path", "load_lcdb"]


def lcdb_path(metric: str = "accuracy") -> Path:
    """The installed ``database-<metric>.csv`` of the ``lcdb`` package."""
    metric = check_choice(metric, "metric", "lcdb_path", METRICS)
    spec = importlib.util.find_spec("lcdb")
    if spec is None or spec.origin is None:
        raise StopwiseError("The Learning Curve Database needs the 'lcdb' package: pip install lcdb.")
    path = Path(spec.origin).parent / f"database-{metric}.csv"
    if not path.is_file():
        raise StopwiseError(f"The installed lcdb package has no {path.name} (looked in {path.parent}).")
    return path


def load_lcdb(*, metric: str = "accuracy", learners: Sequence[str] | None = None, min_anchors: int = 8,
              max_runs: int | None = None, seed: int = 0) -> sw.Trace:
    """LCDB validation curves as a trace (population ``"lcdb-<metric>"``, ragged lengths).

    Args:
        metric: which CSV (``"logloss"`` is minimised; its regret bound is 10 nats, the rest 1).
        learners: keep only these learners (names as in the CSV, e.g. ``"SVC_rbf"``).
        min_anchors: drop curves with fewer anchors (too short to stop early).
        max_runs: keep a random subset of this many curves (``seed`` picks it).
    """
    path = lcdb_path(metric)
    keep = None if learners is None else set(learners)
    curves: dict[tuple[str, str, str, str], list[tuple[int, float]]] = {}
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        col = {name: header.index(name) for name in ("openmlid", "learner", "size_train", "outer_seed", "inner_seed",
                                                     "score_valid")}
        for row in reader:
            learner = row[col["learner"]]
            if keep is not None and learner not in keep:
                continue
            key = (row[col["openmlid"]], learner, row[col["outer_seed"]], row[col["inner_seed"]])
            value = row[col["score_valid"]]
            curves.setdefault(key, []).append((int(float(row[col["size_train"]])), float(value) if value else np.nan))
    if keep is not None and (missing := keep - {k[1] for k in curves}):
        raise StopwiseError(f"The 'learners' parameter of load_lcdb names learners absent from {path.name}: {sorted(missing)}.")
    keys = sorted(k for k, pts in curves.items() if len(pts) >= min_anchors)
    if max_runs is not None and max_runs < len(keys):
        pick = np.sort(np.random.default_rng(seed).choice(len(keys), size=max_runs, replace=False))
        keys = [keys[i] for i in pick]
    if not keys:
        raise StopwiseError(f"No LCDB curve has at least min_anchors = {min_anchors} anchors.")
    runs, costs, width = [], [], 0
    for key in keys:
        pts = sorted(curves[key])
        runs.append([v for _, v in pts])
        costs.append(np.cumsum([s for s, _ in pts], dtype=np.float64))
        width = max(width, len(pts))
    trace = curves_to_trace(runs, mode=_MODES[metric], monitor=f"score_valid_{metric}",  # type: ignore[arg-type]
                            population=f"lcdb-{metric}", bound=10.0 if metric == "logloss" else 1.0,
                            on_nonfinite="truncate", allow_ragged=True,
                            meta={"source": "lcdb " + path.name, "runs": len(keys)})
    cost = np.zeros((trace.n, width))
    for i, c in enumerate(costs):
        cost[i, : c.size] = c
        cost[i, c.size:] = c[-1]
    # curves_to_trace may truncate a run at a NaN; its padded tail keeps the run's last cost.
    return sw.Trace(predictions=trace.predictions, mask=trace.mask, cost=cost, signals=trace.signals,
                    meta={**trace.meta, "openmlid": [int(k[0]) for k in keys], "learner": [k[1] for k in keys]})
