"""What the early-classification literature reports: accuracy, earliness, their harmonic mean
(Schäfer & Leser 2020, TEASER), and ERDE for early risk detection in text streams (Losada &
Crestani 2016)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stopwise._errors import StopwiseError, check_int, param_error


def _same_length(a: np.ndarray, b: np.ndarray, owner: str) -> None:
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise StopwiseError(f"{owner} needs two non-empty 1-D arrays of one length. Got shapes {a.shape} and {b.shape}.")


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of inputs labelled right."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    _same_length(t, p, "accuracy")
    return float((t == p).mean())


def earliness(seen: Any, total: Any) -> float:
    """Mean share of each input read before its decision: mean(seen_i / total_i), in (0, 1]."""
    s, t = np.asarray(seen, dtype=np.float64), np.asarray(total, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(s.shape, float(t))
    _same_length(s, t, "earliness")
    if (t <= 0).any() or (s < 0).any() or (s > t).any():
        raise StopwiseError("earliness needs 0 <= seen <= total and total > 0 for every input.")
    return float((s / t).mean())


def harmonic_mean(acc: float, earl: float) -> float:
    """2·acc·(1 − earliness) / (acc + 1 − earliness), TEASER's single score (0 when both terms are 0)."""
    for name, v in (("acc", acc), ("earl", earl)):
        if not 0.0 <= v <= 1.0:
            raise param_error(name, "harmonic_mean", "a float in [0, 1]", v)
    denom = acc + 1.0 - earl
    return 0.0 if denom == 0.0 else 2.0 * acc * (1.0 - earl) / denom


def erde(y_true: Any, y_pred: Any, delays: Any, *, o: int, c_fp: float | None = None, c_fn: float = 1.0,
         c_tp: float = 1.0) -> float:
    """Early Risk Detection Error ERDE_o (Losada & Crestani 2016), averaged over subjects.

    For a binary decision (1: at risk) taken after ``delays[i]`` writings (chunks) k:
    c_fp for a false positive, c_fn for a false negative, lc_o(k)·c_tp for a true positive with
    lc_o(k) = 1 − 1 / (1 + e^(k − o)), 0 for a true negative. ``c_fp`` defaults to the share of
    positives in ``y_true``, as in eRisk.
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    k = np.asarray(delays, dtype=np.float64)
    _same_length(t, p, "erde")
    _same_length(t, k, "erde")
    o = check_int(o, "o", "erde", minimum=1)
    if not (np.isin(t, (0, 1)).all() and np.isin(p, (0, 1)).all()):
        raise StopwiseError("erde needs binary labels and decisions (1: at risk, 0: not).")
    if (k < 1).any():
        raise StopwiseError("erde needs delays >= 1 (the number of writings read before each decision).")
    fp_cost = float(t.mean()) if c_fp is None else float(c_fp)
    with np.errstate(over="ignore"):
        lc = 1.0 - 1.0 / (1.0 + np.exp(k - o))
    cost = np.where((p == 1) & (t == 0), fp_cost, 0.0)
    cost = np.where((p == 0) & (t == 1), c_fn, cost)
    cost = np.where((p == 1) & (t == 1), lc * c_tp, cost)
    return float(cost.mean())


def erde_macro(y_true: Any, y_pred: Any, delays: Any, *, o: int) -> float:
    """ERDE_o for a multi-class stream task, each class in turn as "at risk" (one vs rest), averaged."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(t)
    return float(np.mean([erde((t == c).astype(int), (p == c).astype(int), delays, o=o) for c in classes]))


def summary(y_true: Any, y_pred: Any, shares: Any) -> dict[str, float]:
    """Accuracy, earliness (mean share read) and their harmonic mean."""
    acc = accuracy(y_true, y_pred)
    s = np.asarray(shares, dtype=np.float64)
    earl = earliness(s, np.ones_like(s))
    return {"accuracy": acc, "earliness": earl, "harmonic_mean": harmonic_mean(acc, earl)}
