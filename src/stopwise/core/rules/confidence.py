"""Rules on one stage's confidence: max probability, margin, entropy (DeeBERT), any signal (CALM)."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError, check_choice
from stopwise.core.rules.base import Rule, State
from stopwise.core.trace import FloatArray, StageBatch, Trace


def _probs(batch: StageBatch, rule: Rule, signal: str) -> FloatArray | None:
    """The stage's probability vectors, or None when the rule can use the named signal instead."""
    if batch.probs is not None:
        return batch.probs
    if signal in batch.signals:
        return None
    raise StopwiseError(
        f"{type(rule).__name__} needs class probabilities (Trace.probs) or a {signal!r} signal. "
        f"The trace has neither (signals: {sorted(batch.signals)})."
    )


# One function per statistic, shared by update and stage_statistic (the Stopper's path and the
# lone-row path), so both decide on the same floats.
def _top(p: FloatArray) -> FloatArray:
    out: FloatArray = p.max(axis=1)
    return out


def _margin(p: FloatArray) -> FloatArray:
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _entropy(p: FloatArray, normalized: bool) -> FloatArray:
    # np.maximum, not np.clip: the same values at a third of the call cost, after every layer online.
    h: FloatArray = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    return h / np.log(p.shape[1]) if normalized else h


def _entropy_bounds(top: float, c: int, normalized: bool) -> tuple[float, float] | None:
    """Bounds on :func:`_entropy` of any c nonnegative values with largest ``top`` and sum S within
    float32 softmax's rounding of 1 (|S - 1| <= s). Below: each -log p_i >= -log top, so
    H >= -S log top. Above: the other values' mass R = S - top gives at most R log((c - 1) / R),
    reached when spread evenly, which grows with R up to R = (c - 1) / e (the reasoning behind
    Fano's inequality, Cover & Thomas 2006, Thm 2.10.1). Widened by 1e-9 for float64 rounding."""
    if c < 2 or not 0.0 < top <= 2.0:  # NaN fails the comparison too
        return None
    s = (c + 3) * 2.4e-7  # softmax: ~2 ulps per value, and the denominator's sum over c terms
    log_top = math.log(top)
    lo = -(1.0 - s if log_top < 0.0 else 1.0 + s) * log_top
    r, peak = 1.0 + s - top, (c - 1) / math.e
    rest = 0.0 if r <= 0.0 else (r * math.log((c - 1) / r) if r < peak else peak)
    lo, hi = lo - 1e-9, -top * log_top + rest + 1e-9
    return (lo / math.log(c), hi / math.log(c)) if normalized else (lo, hi)


@functools.lru_cache(maxsize=64)
def _entropy_top_band(lam: float, c: int, normalized: bool) -> tuple[float, float]:
    """:meth:`Entropy.top_prob_band`: the entropy is > λ when the top value is < a (by the lower
    bound of :func:`_entropy_bounds`) and <= λ when it is >= b (by the upper bound). Both bounds
    fall as the top value grows (the upper one's derivative is -log(top (c - 1) / R) <= 0, as the
    rest R is at most (c - 1) top), so a bisection finds each; each is then moved outward by 1e-7
    so that the bisection's own rounding never counts. Cached: predict asks once per call."""

    def bound(side: int) -> Any:
        return lambda top: _entropy_bounds(top, c, normalized)[side]  # type: ignore[index]

    # The largest of c values whose sum is within float32 softmax's rounding s of 1 lies in
    # [(1 - s) / c, 1 + s]; below that the bounds contradict each other.
    s = (c + 3) * 2.4e-7
    lowest, highest = (1.0 - s) / c * (1.0 - 1e-6), 1.0 + s
    a = _first_at_most(bound(0), lam, lowest, highest)
    b = _first_at_most(bound(1), lam, lowest, highest)
    a, b = (a - 1e-7 if a > lowest else 0.0), (b + 1e-7 if b > lowest else 0.0)
    return min(a, b), b


def _first_at_most(f: Any, level: float, lo: float, hi: float) -> float:
    """The smallest x in [lo, hi] with f(x) <= level for a nonincreasing f, to 1e-15 (inf when
    f(hi) > level: no x qualifies)."""
    if not f(hi) <= level:
        return math.inf
    if f(lo) <= level:
        return lo
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if f(mid) <= level:
            hi = mid
        else:
            lo = mid
    return hi


class MaxProb(Rule):
    """Stop when the top class probability is >= λ (the classic softmax-confidence exit)."""

    name = "max_prob"
    default_lam = 0.9

    def statistic_all(self, trace: Trace, rows: slice) -> FloatArray | None:
        if trace.probs is None:
            sig = trace.signals.get("max_prob")
            return None if sig is None else np.asarray(sig[rows], dtype=np.float64)
        return np.asarray(trace.probs[rows].max(axis=2), dtype=np.float64)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        p = _probs(batch, self, "max_prob")
        return state, batch.signals["max_prob"] if p is None else _top(p)

    def stage_statistic(self, probs: FloatArray) -> FloatArray:
        return _top(probs)

    def earliest_stop(self, lam: float | None = None) -> float:
        return math.inf if self.threshold(lam) > 1.0 else 0.0  # no probability exceeds 1

    def top_prob_band(self, n_classes: int, lam: float | None = None) -> tuple[float, float] | None:
        t = self.threshold(lam)
        return t, t


class Margin(Rule):
    """Stop when top-1 minus top-2 probability is >= λ."""

    name = "margin"
    default_lam = 0.5

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        p = _probs(batch, self, "margin")
        return state, batch.signals["margin"] if p is None else _margin(p)

    def stage_statistic(self, probs: FloatArray) -> FloatArray:
        return _margin(probs)


class Entropy(Rule):
    """Stop when the entropy of the stage's prediction is <= λ (DeeBERT, Xin et al. 2020).

    With ``normalized=True`` the entropy is divided by log C, as FastBERT's "speed" threshold.
    """

    name = "entropy"
    direction = -1
    default_lam = 0.1

    def __init__(self, *, normalized: bool = False, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.normalized = bool(normalized)

    def params(self) -> dict[str, Any]:
        return {"normalized": self.normalized}

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        p = _probs(batch, self, "entropy")
        return state, batch.signals["entropy"] if p is None else _entropy(p, self.normalized)

    def stage_statistic(self, probs: FloatArray) -> FloatArray:
        return _entropy(probs, self.normalized)

    def top_prob_band(self, n_classes: int, lam: float | None = None) -> tuple[float, float] | None:
        if not isinstance(n_classes, int) or n_classes < 2:
            return None
        a, b = _entropy_top_band(-self.threshold(lam), n_classes, self.normalized)
        return None if a == b else (a, b)  # a == b would claim any floats (all stop, or none)

    def earliest_stop(self, lam: float | None = None) -> float:
        return math.inf if -self.threshold(lam) < 0.0 else 0.0  # no entropy is negative


class Signal(Rule):
    """Threshold any per-stage signal recorded in the trace, e.g. a learned confidence."""

    name = "signal"

    def __init__(self, *, signal: str, stop_when: str = "high", lam: float | None = None) -> None:
        super().__init__(lam=lam)
        if not isinstance(signal, str) or not signal:
            raise StopwiseError(f"The 'signal' parameter of Signal must be a signal name. Got {signal!r} instead.")
        self.signal = signal
        self.stop_when = check_choice(stop_when, "stop_when", "Signal", ("high", "low"))

    def params(self) -> dict[str, Any]:
        return {"signal": self.signal, "stop_when": self.stop_when}

    def sign(self) -> int:
        # The direction depends on the instance: update() already negates "low" signals.
        return 1 if self.stop_when == "high" else -1

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        if self.signal not in batch.signals:
            raise StopwiseError(
                f"Signal rule needs the signal {self.signal!r}. The trace has {sorted(batch.signals)}."
            )
        value = batch.signals[self.signal]
        return state, value if self.stop_when == "high" else -value

    def statistic_all(self, trace: Trace, rows: slice) -> FloatArray | None:
        value = trace.signals.get(self.signal)
        if value is None:
            return None  # update() raises the helpful error
        return value[rows] if self.stop_when == "high" else -value[rows]


class Saturation(Signal):
    """Stop when the hidden state has saturated: cos(h_k, h_{k-1}) >= λ (CALM, Schuster et al. 2022).

    Reads the ``saturation`` signal that adapters record.
    """

    name = "saturation"
    default_lam = 0.99

    def __init__(self, *, lam: float | None = None) -> None:
        super().__init__(signal="saturation", stop_when="high", lam=lam)

    def params(self) -> dict[str, Any]:
        return {}
