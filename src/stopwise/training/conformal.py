"""Conformalized early stopping: one hold-out set both picks the checkpoint and calibrates.

Liang, Zhou & Sesia, "Conformal inference is (almost) free for neural networks trained with early
stopping" (ICML 2023, arXiv:2301.11556), "CES". Early stopping picks the checkpoint with the best
hold-out loss; calibrating split conformal prediction on that same hold-out set then loses its
guarantee (the chosen checkpoint fits those points better than it fits new ones). CES restores it
by re-doing the choice on the hold-out set *augmented with the test point*: for classification,
for a test input x and each candidate label y, t*(x, y) = argmin_t [sum_i loss_t(x_i, y_i) +
loss_t(x, y)], and y's conformal p-value is computed with checkpoint t*(x, y). The choice is then
a symmetric function of the n + 1 points, which is all that exchangeability needs.

Inputs are what any framework hands out: per-checkpoint class probabilities (T x n x K) on the
hold-out set with its labels, and (T x m x K) on test inputs; for regression per-checkpoint
predictions (T x n) and targets. Everything is numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError, check_choice, check_int, check_open_unit

__all__ = ["ConformalEarlyStopping", "ConformalEarlyStoppingRegressor", "min_holdout"]

METHODS = ("ces", "naive", "split")
LOSSES = ("cross_entropy", "brier", "zero_one")
SCORES = ("lac", "aps")
COVERAGES = ("marginal", "label")
# -log(0) is inf, and inf + inf ties every checkpoint that ever gave a label 0: clip instead.
_LOG_FLOOR = 1e-12
# Scores this close are tied (APS gives the least likely label 1 up to rounding): a tie counts
# against the test point, so rounding can only make a p-value larger, never decide coverage.
TIE_TOLERANCE = 1e-9


def min_holdout(alpha: float) -> int:
    """Fewest calibration points at which a conformal set at level ``alpha`` can leave a label out:
    ⌈1/α⌉ - 1 (with fewer, the smallest p-value 1/(n + 1) already exceeds α)."""
    # round() first so that 1/0.1 = 10.000000000000002-style noise does not add a point.
    return math.ceil(round(1.0 / alpha, 9)) - 1


def _label_losses(probs: np.ndarray, loss: str) -> np.ndarray:
    """(..., K) probabilities -> (..., K): the loss if the label were each k."""
    if loss == "cross_entropy":
        out: np.ndarray = -np.log(np.maximum(probs, _LOG_FLOOR))
        return out
    if loss == "brier":
        out = (probs**2).sum(axis=-1, keepdims=True) - 2.0 * probs + 1.0
        return out
    out = (np.arange(probs.shape[-1]) != probs.argmax(axis=-1)[..., None]).astype(np.float64)
    return out


def _label_scores(probs: np.ndarray, score: str) -> np.ndarray:
    """(..., K) probabilities -> (..., K) nonconformity of each label (larger: stranger).

    ``lac``: 1 - p(y) (Sadinle, Lei & Wasserman 2019). ``aps``: the probability mass of every label at
    least as likely as y (Romano, Sesia & Candès 2020, without their randomization)."""
    if score == "lac":
        out: np.ndarray = 1.0 - probs
        return out
    out = (probs[..., None, :] * (probs[..., None, :] >= probs[..., :, None])).sum(axis=-1)
    return out


def _bad(name: str, owner: str, allowed: str, got: str) -> StopwiseError:
    """param_error for a ``got`` that is a description (shape, position), not a value to repr."""
    return StopwiseError(f"The '{name}' parameter of {owner} must be {allowed}. Got {got} instead.")


def _finite_array(value: Any, name: str, owner: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim or 0 in arr.shape:
        raise _bad(name, owner, f"a non-empty {ndim}-D array", f"an array of shape {arr.shape}")
    bad = np.argwhere(~np.isfinite(arr))
    if len(bad):
        raise _bad(name, owner, "finite everywhere", f"{arr[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}")
    return arr


def _checkpoint_probs(value: Any, name: str, owner: str) -> np.ndarray:
    arr = _finite_array(value, name, owner, 3)
    if arr.shape[2] < 2:
        raise _bad(name, owner, "class probabilities of shape (checkpoints, points, K) with K >= 2",
                          f"shape {arr.shape}")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise _bad(name, owner, "probabilities in [0, 1]", f"values in [{arr.min():g}, {arr.max():g}]")
    sums = arr.sum(axis=2)
    worst = np.unravel_index(np.abs(sums - 1.0).argmax(), sums.shape)
    if abs(sums[worst] - 1.0) > 1e-3:
        raise _bad(name, owner, "probabilities summing to 1 over the last axis",
                          f"a sum of {sums[worst]:.6g} at checkpoint {int(worst[0])}, point {int(worst[1])}")
    return arr


def _labels(value: Any, n: int, k: int, owner: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise _bad("holdout_labels", owner, f"a 1-D array of {n} labels (one per hold-out point)",
                          f"shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise _bad("holdout_labels", owner, "integer class indices", f"dtype {arr.dtype}")
    bad = np.flatnonzero(~np.isfinite(arr.astype(np.float64)) | (arr != np.round(arr)) | (arr < 0) | (arr >= k))
    if len(bad):
        raise _bad("holdout_labels", owner, f"integer class indices in [0, {k - 1}]",
                   f"{arr[bad[0]].item()!r} at index {int(bad[0])}")
    return arr.astype(np.int64)


def _check_size(n: int, alpha: float, owner: str, what: str) -> None:
    need = min_holdout(alpha)
    if n < need:
        raise StopwiseError(f"{owner} with alpha={alpha:g} needs at least n = ⌈1/α⌉ - 1 = {need} {what}. "
                            f"Got {n} instead.")


class _Base:
    """What the classifier and the regressor share: options, the split, the fitted check."""

    def __init__(self, *, alpha: float, method: str, split_fraction: float, random_state: int) -> None:
        owner = type(self).__name__
        self.alpha = check_open_unit(alpha, "alpha", owner)
        self.method = check_choice(method, "method", owner, METHODS)
        self.split_fraction = check_open_unit(split_fraction, "split_fraction", owner)
        self.random_state = check_int(random_state, "random_state", owner, minimum=0)
        self.n_checkpoints_: int | None = None

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows that select, rows that calibrate); both all rows unless method='split'."""
        rows = np.arange(n)
        if self.method != "split":
            return rows, rows
        perm = np.random.default_rng(self.random_state).permutation(n)
        n_sel = int(round(self.split_fraction * n))
        if not 1 <= n_sel < n:
            raise StopwiseError(f"method='split' with split_fraction={self.split_fraction:g} leaves {n_sel} of "
                                f"{n} hold-out points to select with: it needs at least one on each side.")
        return np.sort(perm[:n_sel]), np.sort(perm[n_sel:])

    def _fitted(self, what: str) -> int:
        if self.n_checkpoints_ is None:
            raise StopwiseError(f"This {type(self).__name__} instance is not fitted yet. Call 'fit' before '{what}'.")
        return self.n_checkpoints_


class ConformalEarlyStopping(_Base):
    """Prediction sets from checkpointed classifiers, choosing the checkpoint on the calibration set.

    Liang, Zhou & Sesia (2023), arXiv:2301.11556, Algorithm 2 and its marginal-coverage version
    (Appendix A2). ``method``:

    - ``"ces"``: for each test input x and candidate label y, the checkpoint minimizing the hold-out
      loss plus loss_t(x, y); y's p-value (1 + #{i : s_t*(x_i, y_i) >= s_t*(x, y)}) / (n + 1); y is in the set
      when its p-value > α. **Guarantee**: if the n hold-out points and the test point are
      exchangeable (e.g. i.i.d.) and the checkpoints were trained on other data, P(Y ∈ C(X)) >= 1 - α,
      marginally over hold-out and test draws (``coverage="label"``: conditionally on each
      true label). Not conditional on x, nor on the hold-out set drawn.
    - ``"naive"``: the checkpoint with the best hold-out loss, calibrated on the same points. No
      guarantee: below 1 - α when many checkpoints compete on a small hold-out set.
    - ``"split"``: a random ``split_fraction`` of the hold-out set selects, the rest calibrates: valid,
      but calibrated on fewer points (wider sets at small n).

    ``loss`` picks the checkpoint (``cross_entropy`` -log p(y), ``brier``, ``zero_one``); ``score`` is
    the nonconformity (``lac`` 1 - p(y), ``aps`` the mass of labels at least as likely as y). Ties in
    the argmin go to the earliest checkpoint; scores within ``TIE_TOLERANCE`` (1e-9) count as tied,
    and ties count against the test point (conservative).

    After :meth:`fit`: ``holdout_loss_`` (T,), ``best_checkpoint_`` (what naive / split select). After
    :meth:`pvalues` or :meth:`predict_sets`: ``selected_checkpoints_`` (m, K), the checkpoint used for
    each test point and candidate label.
    """

    def __init__(self, *, alpha: float = 0.1, method: str = "ces", loss: str = "cross_entropy", score: str = "lac",
                 coverage: str = "marginal", split_fraction: float = 0.5, random_state: int = 0) -> None:
        super().__init__(alpha=alpha, method=method, split_fraction=split_fraction, random_state=random_state)
        owner = type(self).__name__
        self.loss = check_choice(loss, "loss", owner, LOSSES)
        self.score = check_choice(score, "score", owner, SCORES)
        self.coverage = check_choice(coverage, "coverage", owner, COVERAGES)
        self.selected_checkpoints_: np.ndarray | None = None

    def fit(self, holdout_probs: Any, holdout_labels: Any) -> ConformalEarlyStopping:
        """Store the hold-out losses and scores of every checkpoint.

        ``holdout_probs``: (T checkpoints, n points, K classes) probabilities; ``holdout_labels``: (n,)
        integer classes in [0, K)."""
        owner = f"{type(self).__name__}.fit"
        probs = _checkpoint_probs(holdout_probs, "holdout_probs", owner)
        n_ckpt, n, k = probs.shape
        labels = _labels(holdout_labels, n, k, owner)
        select, calib = self._split(n)
        if self.coverage == "label":
            counts = np.bincount(labels[calib], minlength=k)
            _check_size(int(counts.min()), self.alpha, type(self).__name__,
                        f"calibration points of every class (coverage='label'; class {int(counts.argmin())} has the fewest)")
        else:
            _check_size(len(calib), self.alpha, type(self).__name__, "calibration points")
        at_label = np.arange(n), labels
        losses = _label_losses(probs, self.loss)[:, at_label[0], at_label[1]]  # (T, n)
        self.holdout_loss_ = losses[:, select].sum(axis=1)
        self.best_checkpoint_ = int(self.holdout_loss_.argmin())
        # CES selects on all n points, so its calibration scores are all n points as well.
        self._cal_scores = _label_scores(probs, self.score)[:, at_label[0], at_label[1]][:, calib]  # (T, n_cal)
        self._cal_labels = labels[calib]
        self.n_classes_, self.n_checkpoints_ = k, n_ckpt
        return self

    def pvalues(self, test_probs: Any) -> np.ndarray:
        """(m, K) conformal p-value of every candidate label of every test point."""
        n_ckpt = self._fitted("pvalues")
        owner = f"{type(self).__name__}.pvalues"
        probs = _checkpoint_probs(test_probs, "test_probs", owner)
        if probs.shape[0] != n_ckpt or probs.shape[2] != self.n_classes_:
            raise _bad("test_probs", owner, f"of shape ({n_ckpt}, m, {self.n_classes_}) like the hold-out "
                              "probabilities given to fit", f"shape {probs.shape}")
        m, k = probs.shape[1], probs.shape[2]
        if self.method == "ces":
            # Symmetric in the n + 1 points up to float rounding of the sum, which can only matter
            # between checkpoints whose augmented losses agree to ~1e-16 relative.
            augmented = self.holdout_loss_[:, None, None] + _label_losses(probs, self.loss)
            chosen = augmented.argmin(axis=0)  # (m, K)
        else:
            chosen = np.full((m, k), self.best_checkpoint_, dtype=np.int64)
        test_scores = np.take_along_axis(_label_scores(probs, self.score), chosen[None], axis=0)[0]
        counts = np.zeros((m, k), dtype=np.int64)
        n_cal = np.zeros((m, k), dtype=np.int64)
        groups = [(self._cal_labels == y, np.arange(k) == y) for y in range(k)] if self.coverage == "label" \
            else [(np.ones(len(self._cal_labels), dtype=bool), np.ones(k, dtype=bool))]
        for rows, label_cols in groups:
            for t in np.unique(chosen[:, label_cols]):
                cal = np.sort(self._cal_scores[t, rows])
                cells = (chosen == t) & label_cols[None, :]
                counts[cells] = len(cal) - np.searchsorted(cal, test_scores[cells] - TIE_TOLERANCE, side="left")
                n_cal[cells] = len(cal)
        self.selected_checkpoints_ = chosen
        out: np.ndarray = (1.0 + counts) / (1.0 + n_cal)
        return out

    def predict_sets(self, test_probs: Any) -> np.ndarray:
        """(m, K) boolean: label k is in test point j's prediction set (its p-value > α)."""
        self._fitted("predict_sets")
        out: np.ndarray = self.pvalues(test_probs) > self.alpha
        return out


def lower_envelope(test_predictions: np.ndarray, holdout_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint minimizing ``holdout_loss[t] + (y - test_predictions[t])**2`` as a step function of y.

    Returns ``(knots, checkpoints)``: checkpoint ``checkpoints[l]`` wins on ``(knots[l-1], knots[l]]``
    (``knots[-1]`` = -inf, the last step runs to +inf), ``len(knots) == len(checkpoints) - 1``. All
    parabolas share the y² term, so this is the lower envelope of the lines -2 μ_t y + μ_t² + L_t,
    found by sorting their slopes (O(T log T); Liang, Zhou & Sesia 2023, Appendix A4)."""
    mu, loss = np.asarray(test_predictions, dtype=np.float64), np.asarray(holdout_loss, dtype=np.float64)
    # Decreasing slope -2μ (increasing μ) is the order in which lines win from y = -inf; among equal
    # μ only the lowest intercept (then the earliest checkpoint) can ever win.
    order = np.lexsort((np.arange(len(mu)), mu**2 + loss, mu)).tolist()
    # Plain floats: this loop runs once per test point, and numpy scalars cost more than the work.
    m, c = mu.tolist(), (mu**2 + loss).tolist()
    stack: list[int] = []
    for t in order:
        if stack and m[stack[-1]] == m[t]:
            continue
        while len(stack) >= 2 and _cross(m, c, stack[-2], t) <= _cross(m, c, stack[-2], stack[-1]):
            stack.pop()
        stack.append(t)
    knots = np.array([_cross(m, c, a, b) for a, b in zip(stack[:-1], stack[1:], strict=True)])
    return knots, np.array(stack, dtype=np.int64)


def _cross(mu: list[float], intercept: list[float], a: int, b: int) -> float:
    """y at which checkpoints a and b (mu[a] < mu[b]) have equal augmented loss."""
    return (intercept[b] - intercept[a]) / (2.0 * (mu[b] - mu[a]))


class ConformalEarlyStoppingRegressor(_Base):
    """Prediction intervals from checkpointed regressors, choosing the checkpoint on the calibration set.

    Liang, Zhou & Sesia (2023), arXiv:2301.11556, Algorithm 3 (squared-error early stopping,
    absolute-residual scores). ``method="ces"``: the checkpoint minimizing the augmented hold-out
    loss sum_i (y_i - f_t(x_i))² + (y - f_t(x))² is a step function of the candidate y
    (:func:`lower_envelope`); on each step, y is kept when |y - f_t(x)| <= Q_t, the ⌈(1-α)(n+1)⌉-th
    smallest hold-out residual of that step's checkpoint; the interval is the convex hull of what
    is kept. **Guarantee**: hold-out and test points exchangeable, checkpoints trained on other data
    => P(Y ∈ C(X)) >= 1 - α, marginally (not conditionally on x or on the hold-out set).

    When no y survives (rare), ``if_empty="naive"`` returns the naive interval instead, which
    contains the empty one and so keeps the guarantee (the paper's Appendix A5); ``"empty"``
    returns (nan, nan). ``empty_`` (m,) records which rows it was. ``"naive"`` and ``"split"`` methods
    as in :class:`ConformalEarlyStopping`.
    """

    def __init__(self, *, alpha: float = 0.1, method: str = "ces", if_empty: str = "naive",
                 split_fraction: float = 0.5, random_state: int = 0) -> None:
        super().__init__(alpha=alpha, method=method, split_fraction=split_fraction, random_state=random_state)
        self.if_empty = check_choice(if_empty, "if_empty", type(self).__name__, ("naive", "empty"))
        self.empty_: np.ndarray | None = None

    def fit(self, holdout_predictions: Any, holdout_targets: Any) -> ConformalEarlyStoppingRegressor:
        """``holdout_predictions``: (T checkpoints, n points); ``holdout_targets``: (n,)."""
        owner = f"{type(self).__name__}.fit"
        preds = _finite_array(holdout_predictions, "holdout_predictions", owner, 2)
        targets = _finite_array(holdout_targets, "holdout_targets", owner, 1)
        if targets.shape[0] != preds.shape[1]:
            raise _bad("holdout_targets", owner, f"a 1-D array of {preds.shape[1]} targets (one per "
                              "hold-out point)", f"shape {targets.shape}")
        select, calib = self._split(preds.shape[1])
        _check_size(len(calib), self.alpha, type(self).__name__, "calibration points")
        resid = np.abs(targets[None, :] - preds)
        self.holdout_loss_ = (resid[:, select] ** 2).sum(axis=1)
        self.best_checkpoint_ = int(self.holdout_loss_.argmin())
        rank = math.ceil((1.0 - self.alpha) * (len(calib) + 1))
        self.quantiles_ = np.sort(resid[:, calib], axis=1)[:, rank - 1]  # (T,) Q_t
        self.n_checkpoints_ = preds.shape[0]
        return self

    def predict_intervals(self, test_predictions: Any) -> np.ndarray:
        """(m, 2) array of [low, high] per test point, from (T, m) checkpoint predictions."""
        n_ckpt = self._fitted("predict_intervals")
        owner = f"{type(self).__name__}.predict_intervals"
        preds = _finite_array(test_predictions, "test_predictions", owner, 2)
        if preds.shape[0] != n_ckpt:
            raise _bad("test_predictions", owner, f"of shape ({n_ckpt}, m) like the hold-out predictions "
                              "given to fit", f"shape {preds.shape}")
        best = self.best_checkpoint_
        naive = np.stack([preds[best] - self.quantiles_[best], preds[best] + self.quantiles_[best]], axis=1)
        self.empty_ = np.zeros(preds.shape[1], dtype=bool)
        if self.method != "ces":
            return naive
        out = np.empty_like(naive)
        for j in range(preds.shape[1]):
            knots, ckpts = lower_envelope(preds[:, j], self.holdout_loss_)
            lows = np.maximum(preds[ckpts, j] - self.quantiles_[ckpts], np.concatenate([[-np.inf], knots]))
            highs = np.minimum(preds[ckpts, j] + self.quantiles_[ckpts], np.concatenate([knots, [np.inf]]))
            kept = lows <= highs
            if kept.any():
                out[j] = lows[kept].min(), highs[kept].max()
            else:
                self.empty_[j] = True
                out[j] = naive[j] if self.if_empty == "naive" else np.nan
        return out
