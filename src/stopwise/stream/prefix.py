"""Prefix classifiers: a prediction and class probabilities at every prefix (stage) of a stream.

Two kinds of streams, one interface (:class:`PrefixModel`):

- :class:`SeriesPrefixes` — time series (univariate or multivariate, equal length). One fitted
  copy of a base classifier per prefix length, trained on the series truncated there, as TEASER
  (Schäfer & Leser 2020) and ECEC (Lv et al. 2019) do. Any scikit-learn or aeon classifier with
  ``predict_proba`` that takes (n, channels, length) arrays works: aeon's do; wrap a scikit-learn
  one with :func:`flat_estimator`.
- :class:`~stopwise.stream.text.TextPrefixes` — texts read as streams of words (in
  :mod:`stopwise.stream.text`).

No torch and no aeon at import: scikit-learn is imported when a series model is fitted.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from stopwise._errors import StopwiseError, check_int
from stopwise.trace import FloatArray, IntArray

Prepared = Any  # a model's validated batch: a float (n, d, L) array or a list of word lists


class PrefixModel(Protocol):
    """What :class:`~stopwise.stream.EarlyStreamClassifier` needs of a prefix classifier."""

    n_stages: int
    classes_: np.ndarray

    def prepare(self, X: Any, *, owner: str) -> Prepared:
        """Validate a batch of whole inputs (raise a StopwiseError naming the bad value)."""

    def take(self, data: Prepared, rows: IntArray) -> Prepared:
        """The rows ``rows`` of a prepared batch."""

    def stage_counts(self, data: Prepared) -> IntArray:
        """Stages each input has (its last stage is its full length)."""

    def stage_probs(self, k: int, data: Prepared) -> FloatArray:
        """(m, C) class probabilities at stage k of every input of ``data``."""

    def seen(self, data: Prepared, stages: IntArray) -> tuple[FloatArray, FloatArray]:
        """(amount read, share of the input read) when each input stops at ``stages``."""

    def stage_costs(self, data: Prepared) -> FloatArray:
        """(K,) or (n, K) share of each input read by each stage: the trace's cumulative cost."""

    def encode(self, y: Any) -> IntArray:
        """Labels as indices into ``classes_``."""

    def start_stream(self) -> StreamBuffer:
        """An empty buffer for one input arriving in chunks."""


class StreamBuffer(Protocol):
    """One input arriving chunk by chunk."""

    def add(self, chunk: Any) -> None:
        """Append a chunk (raise on an empty one, or on one past what the model can read)."""

    def complete_stages(self) -> int:
        """How many stages the data received so far covers."""

    def final_stage(self) -> int | None:
        """The input's last stage, once known (None while more may come)."""

    def close(self) -> None:
        """No more data: the input ends here."""

    def view(self) -> Prepared:
        """The data so far as a one-row prepared batch."""

    def amount(self) -> int:
        """Points or words received."""


def prefix_lengths(length: int, n_stages: int, min_length: int = 3) -> IntArray:
    """Prefix lengths ceil(length * (k + 1) / n_stages), at least ``min_length``, duplicates
    dropped; the last is always ``length``."""
    raw = np.ceil(length * np.arange(1, n_stages + 1) / n_stages).astype(np.int64)
    out: IntArray = np.unique(np.clip(raw, min(min_length, length), length))
    return out


def paa(X: np.ndarray, segments: int = 32) -> np.ndarray:
    """Piecewise aggregate approximation (Keogh et al. 2001), flattened: each channel of each
    (n, channels, length) prefix averaged over ``segments`` equal pieces (kept whole when shorter),
    so that a classifier's cost stays flat in the prefix length."""
    arr = np.asarray(X, dtype=np.float64)
    m = arr.shape[-1]
    if m > segments:
        starts = (np.arange(segments) * m) // segments
        widths = np.diff(np.append(starts, m))
        arr = np.add.reduceat(arr, starts, axis=-1) / widths
    return arr.reshape(len(arr), -1)


def flat_estimator(estimator: Any = None, *, segments: int = 32) -> Any:
    """A scikit-learn pipeline that turns (n, channels, length) prefixes into :func:`paa` features
    and feeds ``estimator`` (default: standardised logistic regression, cheap and with
    probabilities). aeon's early classifiers accept it as their base estimator too."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    segments = check_int(segments, "segments", "flat_estimator", minimum=1)
    features = FunctionTransformer(paa, kw_args={"segments": segments})
    if estimator is None:
        return make_pipeline(features, StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return make_pipeline(features, estimator)


def check_series(X: Any, *, owner: str, length: int | None = None, channels: int | None = None) -> FloatArray:
    """X as a float (n, channels, length) array: 2-D input is univariate; ragged, NaN or
    wrong-length input raises a StopwiseError naming the value."""
    if isinstance(X, (list, tuple)) and X and len({np.shape(x)[-1] for x in X}) > 1:
        sizes = sorted({int(np.shape(x)[-1]) for x in X})
        raise StopwiseError(
            f"The 'X' parameter of {owner} must hold series of one length; got lengths {sizes[:5]}"
            f"{'...' if len(sizes) > 5 else ''}. Pad or resample them first (aeon ships '_eq' versions "
            "of its unequal-length sets).")
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StopwiseError(f"The 'X' parameter of {owner} must be a numeric (n, length) or (n, channels, "
                            f"length) array. Got {type(X).__name__} ({exc}) instead.") from None
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[2] == 0:
        raise StopwiseError(f"The 'X' parameter of {owner} must be a non-empty (n, length) or (n, channels, "
                            f"length) array. Got shape {np.shape(X)} instead.")
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))[0])
        raise StopwiseError(f"The 'X' parameter of {owner} holds NaN or inf (first in series {row}).")
    if channels is not None and arr.shape[1] != channels:
        raise StopwiseError(f"The 'X' parameter of {owner} must have {channels} channels, as in training. "
                            f"Got {arr.shape[1]} instead.")
    if length is not None and arr.shape[2] != length:
        raise StopwiseError(f"The 'X' parameter of {owner} must hold whole series of the training length "
                            f"{length}. Got length {arr.shape[2]} instead (stream shorter prefixes with "
                            "model.stream()).")
    return arr


def _probs_in_order(raw: Any, est_classes: np.ndarray, n_classes: int) -> FloatArray:
    p = np.asarray(raw, dtype=np.float64)
    out = np.zeros((p.shape[0], n_classes))
    out[:, np.asarray(est_classes, dtype=np.int64)] = p
    return out


class SeriesPrefixes:
    """One copy of ``estimator`` per prefix length, trained on series truncated there (TEASER,
    Schäfer & Leser 2020; ECEC, Lv et al. 2019). Stages are the prefix lengths of
    :func:`prefix_lengths` (``n_stages`` at most, each at least ``min_length`` points)."""

    kind = "series"

    def __init__(self, estimator: Any = None, *, n_stages: int = 20, min_length: int = 3) -> None:
        self.estimator = estimator
        self.n_stages_requested = check_int(n_stages, "n_stages", "SeriesPrefixes", minimum=1)
        self.min_length = check_int(min_length, "min_length", "SeriesPrefixes", minimum=1)
        self.fitted = False

    def fit(self, X: Any, y: Any) -> SeriesPrefixes:
        """Fit one classifier per prefix length on (n, [channels,] length) series ``X``."""
        from sklearn.base import clone

        arr = check_series(X, owner="SeriesPrefixes.fit")
        labels = np.asarray(y)
        if labels.shape != (arr.shape[0],):
            raise StopwiseError(f"The 'y' parameter of SeriesPrefixes.fit must hold {arr.shape[0]} labels. "
                                f"Got shape {labels.shape} instead.")
        self.classes_, codes = np.unique(labels, return_inverse=True)
        if self.classes_.size < 2:
            raise StopwiseError(f"SeriesPrefixes.fit needs at least 2 classes. Got {self.classes_.tolist()}.")
        self.length_, self.n_channels_ = int(arr.shape[2]), int(arr.shape[1])
        self.stage_lengths_ = prefix_lengths(self.length_, self.n_stages_requested, self.min_length)
        self.n_stages = int(self.stage_lengths_.size)
        base = flat_estimator() if self.estimator is None else self.estimator
        self.estimators_ = [clone(base).fit(arr[:, :, :m], codes) for m in self.stage_lengths_]
        self.fitted = True
        return self

    def _require_fitted(self, owner: str) -> None:
        if not self.fitted:
            raise StopwiseError(f"{owner} needs fitted prefix classifiers: call fit first.")

    def encode(self, y: Any) -> IntArray:
        """Labels as class indices into ``classes_`` (unknown labels raise)."""
        labels = np.asarray(y)
        idx = np.searchsorted(self.classes_, labels)
        bad = (idx >= self.classes_.size) | (self.classes_[np.minimum(idx, self.classes_.size - 1)] != labels)
        if bad.any():
            raise StopwiseError(f"Label {labels[bad][0]!r} was not seen in training; classes are {self.classes_.tolist()}.")
        out: IntArray = idx.astype(np.int64)
        return out

    def prepare(self, X: Any, *, owner: str) -> FloatArray:
        self._require_fitted(owner)
        return check_series(X, owner=owner, length=self.length_, channels=self.n_channels_)

    def take(self, data: FloatArray, rows: IntArray) -> FloatArray:
        return data[rows]

    def stage_counts(self, data: FloatArray) -> IntArray:
        return np.full(len(data), self.n_stages, dtype=np.int64)

    def stage_probs(self, k: int, data: FloatArray) -> FloatArray:
        est = self.estimators_[k]
        raw = est.predict_proba(data[:, :, : self.stage_lengths_[k]])
        return _probs_in_order(raw, getattr(est, "classes_", np.arange(self.classes_.size)), self.classes_.size)

    def seen(self, data: FloatArray, stages: IntArray) -> tuple[FloatArray, FloatArray]:
        amount = self.stage_lengths_[stages].astype(np.float64)
        return amount, amount / self.length_

    def stage_costs(self, data: FloatArray) -> FloatArray:
        """(K,) share of the series read by each stage: the trace's cost."""
        out: FloatArray = self.stage_lengths_ / self.length_
        return out

    def start_stream(self) -> SeriesBuffer:
        self._require_fitted("SeriesPrefixes.start_stream")
        return SeriesBuffer(self)


class SeriesBuffer:
    """Points of one series received so far (chunks of shape (t,) or (channels, t))."""

    def __init__(self, model: SeriesPrefixes) -> None:
        self.model = model
        self.data = np.empty((model.n_channels_, 0))
        self.closed = False

    def add(self, chunk: Any) -> None:
        arr = np.asarray(chunk, dtype=np.float64)
        if arr.ndim == 1 and self.model.n_channels_ == 1:
            arr = arr[None, :]
        if arr.ndim == 0 or arr.ndim > 2 or arr.shape[0] != self.model.n_channels_ or arr.shape[-1] == 0:
            raise StopwiseError(f"The 'chunk' parameter of Stream.update must be a non-empty ({self.model.n_channels_}, t) "
                                f"array of new points (t >= 1). Got shape {arr.shape} instead.")
        if not np.isfinite(arr).all():
            raise StopwiseError("The 'chunk' parameter of Stream.update holds NaN or inf; fill or drop those points first.")
        total = self.data.shape[1] + arr.shape[1]
        if total > self.model.length_:
            raise StopwiseError(f"The stream now holds {total} points, more than the training length {self.model.length_}: "
                                "the prefix classifiers cannot read past it.")
        self.data = np.concatenate([self.data, arr], axis=1)

    def complete_stages(self) -> int:
        return int(np.searchsorted(self.model.stage_lengths_, self.data.shape[1], side="right"))

    def final_stage(self) -> int | None:
        return self.model.n_stages - 1

    def close(self) -> None:
        if self.data.shape[1] < self.model.length_:
            raise StopwiseError(f"Stream.close: a series ends at the training length {self.model.length_}; "
                                f"this one has only {self.data.shape[1]} points.")
        self.closed = True

    def view(self) -> FloatArray:
        out: FloatArray = self.data[None]
        return out

    def amount(self) -> int:
        return int(self.data.shape[1])
