"""Stopping rules for training runs (learning curves as traces).

Every rule reads the trace signal ``"score"``: the monitored metric oriented so that larger is
better (``-val_loss`` for ``mode="min"``, ``val_acc`` for ``mode="max"``), see
:func:`stopwise.training.curves.curves_to_trace`. The rules are registered by name, so a saved
certificate naming one of them loads without importing this module first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError, check_int, param_error
from stopwise.trace import FloatArray, StageBatch

#: The trace signal every training rule reads: the metric, larger is better.
SCORE = "score"

__all__ = ["SCORE", "CurveExtrapolation", "EpochPatience", "PercentileStopping", "PlateauGain", "score_of"]


def score_of(batch: StageBatch) -> FloatArray:
    """The oriented metric of a stage (larger is better), as float64."""
    if SCORE not in batch.signals:
        raise StopwiseError(
            f"Training rules read the trace signal {SCORE!r} (the metric, larger is better); the stage has "
            f"signals {sorted(batch.signals)}. Build traces with stopwise.training.curves_to_trace."
        )
    out: FloatArray = np.asarray(batch.signals[SCORE], dtype=np.float64)
    return out


@sw.register_rule
class EpochPatience(sw.Rule):
    """Keras / Lightning ``EarlyStopping(patience=λ, min_delta=...)`` as a calibratable rule.

    The statistic after each evaluation is the number of evaluations since the last improvement,
    where an improvement beats the best score so far by more than ``min_delta`` (the first
    evaluation always improves). It fires when that count reaches λ = patience, exactly as
    ``wait_count >= patience`` in Lightning's ``EarlyStopping`` and Keras' callback.
    """

    name: ClassVar[str] = "epoch_patience"
    direction: ClassVar[int] = 1
    integer: ClassVar[bool] = True
    default_lam: ClassVar[float | None] = 5.0

    def __init__(self, *, min_delta: float = 0.0, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not np.isfinite(min_delta) \
                or min_delta < 0:
            raise param_error("min_delta", "EpochPatience", "a finite number >= 0", min_delta)
        self.min_delta = float(min_delta)

    def params(self) -> dict[str, Any]:
        return {"min_delta": self.min_delta}

    def init_state(self, n: int) -> tuple[FloatArray, FloatArray]:
        return np.full(n, -np.inf), np.zeros(n)

    def update(self, state: tuple[FloatArray, FloatArray], batch: StageBatch
               ) -> tuple[tuple[FloatArray, FloatArray], FloatArray]:
        best, wait = state
        score = score_of(batch)
        better = score - self.min_delta > best
        best = np.where(better, score, best)
        wait = np.where(better, 0.0, wait + 1.0)
        return (best, wait), wait.copy()


@sw.register_rule
class PlateauGain(sw.Rule):
    """Stop when the recent rise of the best score, carried on to the horizon, is at most λ.

    The statistic after evaluation k is ``(best_k - best_{k-window}) / window * (horizon - 1 - k)``:
    what the run would still gain if its best score kept rising at its pace over the last
    ``window`` evaluations (the linear plateau test behind Prechelt's "progress" criteria, Early
    Stopping - But When?, 1998). λ = 0 is patience ``window``; a larger λ also stops runs that creep
    up too slowly to matter, and a run near its horizon has little left to lose. Before
    ``window`` evaluations it never fires.
    """

    name: ClassVar[str] = "plateau_gain"
    direction: ClassVar[int] = -1
    default_lam: ClassVar[float | None] = 0.0

    def __init__(self, *, horizon: int, window: int = 8, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.horizon = check_int(horizon, "horizon", "PlateauGain", minimum=1)
        self.window = check_int(window, "window", "PlateauGain", minimum=1)

    def params(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "window": self.window}

    def init_state(self, n: int) -> FloatArray:
        return np.full((n, self.window + 1), -np.inf)

    def update(self, state: FloatArray, batch: StageBatch) -> tuple[FloatArray, FloatArray]:
        best = np.maximum(state[:, -1], score_of(batch))
        state = np.concatenate([state[:, 1:], best[:, None]], axis=1)
        k = batch.index
        if k < self.window:
            return state, np.full(best.shape, np.inf)
        left = max(self.horizon - 1 - k, 0)
        return state, (best - state[:, 0]) / self.window * left


@sw.register_rule
class PercentileStopping(sw.Rule):
    """Stop a run whose best score so far trails the given per-stage reference by at least λ.

    ``curve[k]`` is a percentile of other runs' scores at stage k (:meth:`from_runs`: the median
    by default), as in Optuna's ``MedianPruner`` / ``PercentilePruner`` (Golovin et al. 2017,
    "Google Vizier", median stopping rule). λ = 0 is Optuna's rule; a larger λ stops later.
    Stages before ``warmup`` and beyond the curve never fire.
    """

    name: ClassVar[str] = "percentile_stopping"
    direction: ClassVar[int] = 1
    default_lam: ClassVar[float | None] = 0.0

    def __init__(self, *, curve: Sequence[float], warmup: int = 0, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        arr = np.asarray(curve, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
            raise param_error("curve", "PercentileStopping", "a non-empty 1-D sequence of finite scores", curve)
        self.curve = arr
        self.warmup = check_int(warmup, "warmup", "PercentileStopping", minimum=0)

    @classmethod
    def from_runs(cls, scores: FloatArray, *, percentile: float = 50.0, warmup: int = 0,
                  lam: float | None = None) -> PercentileStopping:
        """The rule against the ``percentile`` of (m, K) reference scores per stage (NaN: missing)."""
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise param_error("percentile", "PercentileStopping.from_runs", "a number in [0, 100]", percentile)
        arr = np.asarray(scores, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise param_error("scores", "PercentileStopping.from_runs", "a 2-D array (runs, stages)", arr.shape)
        counts = np.isfinite(arr).sum(axis=0)
        width = int(np.flatnonzero(counts > 0).max(initial=-1)) + 1
        if width == 0:
            raise StopwiseError("PercentileStopping.from_runs got no finite reference score.")
        with np.errstate(all="ignore"):
            curve = np.nanpercentile(arr[:, :width], percentile, axis=0)
        return cls(curve=curve.tolist(), warmup=warmup, lam=lam)

    def params(self) -> dict[str, Any]:
        return {"curve": self.curve.tolist(), "warmup": self.warmup}

    def init_state(self, n: int) -> FloatArray:
        return np.full(n, -np.inf)

    def update(self, state: FloatArray, batch: StageBatch) -> tuple[FloatArray, FloatArray]:
        best = np.maximum(state, score_of(batch))
        k = batch.index
        if k < self.warmup or k >= self.curve.size:
            return best, np.full(best.shape, -np.inf)
        return best, self.curve[k] - best


@sw.register_rule
class CurveExtrapolation(sw.Rule):
    """Stop when an ensemble of parametric learning curves sees little left to gain.

    After each evaluation k the recent scores (the last ``window``) are fitted per run by least
    squares with every member ``score(t) = a + b * g(t)``: power laws ``g = t^-c`` for c in
    {0.5, 1, 2} and exponential saturation ``g = exp(-t / tau)`` for tau in {5, 20}, the curve
    families of Domhan, Springenberg and Hutter (IJCAI 2015, "Speeding up automatic hyperparameter
    optimization of deep neural networks by extrapolation of learning curves"). Each predicts the
    rise of the fitted curve from the current evaluation to ``horizon``; the statistic is the
    ensemble's mean plus one standard deviation of that predicted gain (an optimistic bound). The
    rule fires when it is at most λ. Before ``min_points`` evaluations it never fires.
    """

    name: ClassVar[str] = "curve_extrapolation"
    direction: ClassVar[int] = -1
    default_lam: ClassVar[float | None] = 0.0
    _POWERS: ClassVar[tuple[float, ...]] = (0.5, 1.0, 2.0)
    _TAUS: ClassVar[tuple[float, ...]] = (5.0, 20.0)

    def __init__(self, *, horizon: int, window: int = 10, min_points: int = 4, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.horizon = check_int(horizon, "horizon", "CurveExtrapolation", minimum=1)
        self.window = check_int(window, "window", "CurveExtrapolation", minimum=3)
        self.min_points = check_int(min_points, "min_points", "CurveExtrapolation", minimum=3)

    def params(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "window": self.window, "min_points": self.min_points}

    def init_state(self, n: int) -> tuple[FloatArray, FloatArray]:
        return np.full((n, self.window), np.nan), np.full(n, -np.inf)

    def update(self, state: tuple[FloatArray, FloatArray], batch: StageBatch
               ) -> tuple[tuple[FloatArray, FloatArray], FloatArray]:
        hist, best = state
        score = score_of(batch)
        hist = np.concatenate([hist[:, 1:], score[:, None]], axis=1)
        best = np.maximum(best, score)
        k = batch.index
        points = min(k + 1, self.window)
        if k + 1 < self.min_points or k + 1 >= self.horizon:
            return (hist, best), np.full(score.shape, np.inf if k + 1 < self.min_points else -np.inf)
        t = np.arange(k + 2 - points, k + 2, dtype=np.float64)  # 1-based evaluation numbers
        y = hist[:, -points:]
        now, end = float(k + 1), float(self.horizon)
        gains = [self._gain(t, y, lambda x, c=c: x ** -c, now, end) for c in self._POWERS]
        gains += [self._gain(t, y, lambda x, tau=tau: np.exp(-x / tau), now, end) for tau in self._TAUS]
        ens = np.stack(gains, axis=1)
        return (hist, best), ens.mean(axis=1) + ens.std(axis=1)

    @staticmethod
    def _gain(t: FloatArray, y: FloatArray, shape: Any, now: float, end: float) -> FloatArray:
        # Closed-form regression of y on g = shape(t), one per row: each member is linear given its
        # shape. The gain is the fitted curve's rise from now to the horizon, not from the noisy best,
        # whose upward bias would make every noisy run look finished.
        g = shape(t)
        gc = g - g.mean()
        var = float((gc * gc).sum())
        ym = y.mean(axis=1)
        b = (y - ym[:, None]) @ gc / var if var > 0 else np.zeros(y.shape[0])
        out: FloatArray = b * (float(shape(end)) - float(shape(now)))
        return out
