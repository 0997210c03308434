"""A learned stopping statistic: boosted trees that predict what stopping now would lose.

After each evaluation the rule reads features of the curve so far (the best score, its distance
to the current one, evaluations since the best, the gains of the best over the last 2, 4, 8 and
16 evaluations, the last step, the evaluation index and what is left of the horizon) and of any
auxiliary metrics the trace records (``aux``: e.g. ``val_loss`` beside a monitored ``val_acc``;
its value, its distance to its minimum so far, its change over 4 evaluations; names in
``log_aux`` are read in log scale, as a loss ratio), and predicts the regret of
restore-best stopping at that evaluation with squared-loss boosted trees
(:mod:`stopwise.core.boosting`). It stops at the first evaluation whose predicted regret is <= λ,
monotone in λ, and :func:`stopwise.training.certify` calibrates λ like any other rule.

The idea is learning-curve prediction (Domhan et al. 2015; Adriaensen et al. 2023, LC-PFN) kept
to a small model fitted on recorded runs. The promise holds because the model is fixed when
calibrated: :func:`fit_learned_stopping` records which runs it saw, and ``certify`` refuses a
calibration trace that shares one with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError, check_int
from stopwise.core.boosting import BoostedTrees, fit_boosted_trees
from stopwise.core.stage import hash_rows, hashes_digest
from stopwise.trace import FloatArray, IntArray, StageBatch
from stopwise.training.curves import REGRET
from stopwise.training.rules import SCORE, score_of

__all__ = ["CURVE_FEATURES", "LearnedStopping", "fit_learned_stopping", "run_hashes"]

#: The features read from the monitored score, in order; each auxiliary metric adds AUX_FEATURES.
CURVE_FEATURES = ("score", "best", "best_minus_score", "since_best", "index", "left", "gain_2", "gain_4", "gain_8",
                  "gain_16", "step")
AUX_FEATURES = ("value", "minus_min", "change_4")
LAGS = (2, 4, 8, 16)

State = tuple[FloatArray, FloatArray, FloatArray, FloatArray]


def _lag(hist: FloatArray, lag: int) -> FloatArray:
    """Column ``k - lag`` of a (n, k + 1) history, the first column before that."""
    out: FloatArray = hist[:, max(hist.shape[1] - 1 - lag, 0)]
    return out


def _features(state: State, horizon: int) -> FloatArray:
    scores, best, since, aux = state
    k = scores.shape[1] - 1
    s, b = scores[:, -1], best[:, -1]
    cols = [s, b, b - s, since / horizon, np.full(s.shape, k / horizon), np.full(s.shape, max(horizon - 1 - k, 0) / horizon),
            *(b - _lag(best, lag) for lag in LAGS), s - _lag(scores, 1)]
    for j in range(aux.shape[2]):
        a = aux[:, :, j]
        low = a.min(axis=1)
        cols += [a[:, -1], a[:, -1] - low, a[:, -1] - _lag(a, 4)]
    return np.stack(cols, axis=1)


def _advance(state: State, batch: StageBatch, aux: Sequence[str], log_aux: Sequence[str]) -> State:
    scores, best, since, hist = state
    s = score_of(batch)
    missing = [name for name in aux if name not in batch.signals]
    if missing:
        raise StopwiseError(f"LearnedStopping reads the auxiliary metric(s) {missing} at evaluation {batch.index}; the "
                            f"stage has signals {sorted(batch.signals)}. Record them with curves_to_trace(..., aux=...) "
                            "or pass them to RunMonitor.step(value, aux={...}).")
    prev = best[:, -1] if best.shape[1] else np.full(s.shape, -np.inf)
    b = np.maximum(prev, s)
    since = np.where(s > prev, 0.0, since + 1.0)
    cols = []
    for name in aux:
        value = np.asarray(batch.signals[name], dtype=np.float64)
        if name in log_aux:
            if not (value > 0).all():
                raise StopwiseError(f"LearnedStopping reads {name!r} in log scale (log_aux), so it must be > 0. Got "
                                    f"{value[~(value > 0)][0]} at evaluation {batch.index}.")
            value = np.log(value)
        cols.append(value)
    a = np.stack(cols, axis=1) if aux else np.zeros((s.size, 0))
    return (np.concatenate([scores, s[:, None]], axis=1), np.concatenate([best, b[:, None]], axis=1), since,
            np.concatenate([hist, a[:, None, :]], axis=1))


def _empty(n: int, n_aux: int) -> State:
    return np.zeros((n, 0)), np.zeros((n, 0)), np.zeros(n), np.zeros((n, 0, n_aux))


@sw.register_rule
class LearnedStopping(sw.Rule):
    """Stop at the first evaluation whose predicted regret is <= λ; see the module docstring.

    Build with :func:`fit_learned_stopping`. ``model`` holds the trees
    (:meth:`stopwise.core.boosting.BoostedTrees.to_dict`), so a certificate carries the whole rule.
    """

    name: ClassVar[str] = "learned_stopping"
    direction: ClassVar[int] = -1
    default_lam: ClassVar[float | None] = 0.0

    def __init__(self, *, horizon: int, model: dict[str, Any], aux: Sequence[str] = (), log_aux: Sequence[str] = (),
                 train_digest: str | None = None, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.horizon = check_int(horizon, "horizon", "LearnedStopping", minimum=1)
        self.aux, self.log_aux = _check_aux(aux, log_aux)
        self.trees = BoostedTrees.from_dict(model)
        want = len(CURVE_FEATURES) + len(AUX_FEATURES) * len(self.aux)
        if self.trees.n_features != want:
            raise StopwiseError(f"The model of LearnedStopping reads {self.trees.n_features} features; with aux = "
                                f"{self.aux} the rule computes {want}. Fit it with fit_learned_stopping.")
        self.train_digest = train_digest
        #: Hashes of the runs the model was fitted on (:func:`run_hashes`), checked by certify.
        self.train_runs: frozenset[int] | None = None

    def params(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "model": self.trees.to_dict(), "aux": list(self.aux),
                "log_aux": list(self.log_aux), "train_digest": self.train_digest}

    def with_lam(self, lam: float | None) -> LearnedStopping:
        out = LearnedStopping(lam=lam, **self.params())
        out.train_runs = self.train_runs
        return out

    def init_state(self, n: int) -> State:
        return _empty(n, len(self.aux))

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        state = _advance(state, batch, self.aux, self.log_aux)
        return state, self.trees.predict(_features(state, self.horizon))

    def check_calibration(self, trace: sw.Trace) -> None:
        """Raise when ``trace`` (a calibration trace) has another horizon or holds a run the model
        was fitted on, or does not know which runs it was fitted on (rebuilt from params alone)."""
        if trace.n_stages != self.horizon:
            raise StopwiseError(f"LearnedStopping was fitted on runs of {self.horizon} evaluations; the calibration trace "
                                f"has {trace.n_stages}.")
        if self.train_runs is None:
            raise StopwiseError("This LearnedStopping does not know the runs its model was fitted on (built from params "
                                "alone?): fit it with fit_learned_stopping so that calibration can be checked disjoint.")
        shared = int(np.isin(run_hashes(trace, aux=self.aux), np.fromiter(self.train_runs, dtype=np.int64)).sum())
        if shared:
            raise StopwiseError(f"The LearnedStopping model was fitted on {shared} of the {trace.n} calibration runs: "
                                "calibrate on runs it has not seen, or the certificate does not hold.")


def run_hashes(trace: sw.Trace, *, aux: Sequence[str] = ()) -> IntArray:
    """One 63-bit hash per run of what the rule reads of it (the scores and the ``aux`` metrics,
    float64): a run's identity across traces."""
    assert trace.mask is not None
    missing = [a for a in aux if a not in trace.signals]
    if missing:
        raise StopwiseError(f"The trace lacks the aux metric(s) {missing}; it has signals {sorted(trace.signals)}.")
    return hash_rows(np.stack([np.where(trace.mask, trace.signals[name], np.nan) for name in (SCORE, *aux)], axis=1))


def fit_learned_stopping(trace: sw.Trace, *, aux: Sequence[str] = (), log_aux: Sequence[str] = (), rounds: int = 100,
                         depth: int = 3,
                         learning_rate: float = 0.1, min_leaf: int = 20, l2: float = 1.0) -> LearnedStopping:
    """Fit the rule's trees on ``trace`` (runs that must not be used for calibration): every
    recorded evaluation of every run is one example, its target the regret of stopping there.

    Defaults (100 depth-3 trees, shrinkage 0.1) kept held-out regret lowest among the settings
    tried on the recorded sklearn-MLP runs; see ``benchmarks/training.py``."""
    if REGRET not in trace.signals or SCORE not in trace.signals:
        raise StopwiseError("fit_learned_stopping needs a trace from curves_to_trace (signals 'score' and 'regret').")
    horizon = trace.n_stages
    if horizon < 2:
        raise StopwiseError(f"fit_learned_stopping needs runs of at least 2 evaluations. Got {horizon}.")
    aux_names, log_names = _check_aux(aux, log_aux)
    state = _empty(trace.n, len(aux_names))
    xs = []
    for k in range(horizon):
        state = _advance(state, trace.stage(k), aux_names, log_names)
        xs.append(_features(state, horizon))
    assert trace.mask is not None
    x = np.stack(xs, axis=1)[trace.mask]
    y = np.asarray(trace.signals[REGRET], dtype=np.float64)[trace.mask]
    trees = fit_boosted_trees(x, y, rounds=rounds, depth=depth, learning_rate=learning_rate, min_leaf=min_leaf, l2=l2)
    hashes = run_hashes(trace, aux=aux_names)
    rule = LearnedStopping(horizon=horizon, model=trees.to_dict(), aux=aux, log_aux=log_aux,
                           train_digest=hashes_digest(hashes))
    rule.train_runs = frozenset(int(h) for h in hashes)
    return rule


def _check_aux(aux: Sequence[str], log_aux: Sequence[str]) -> tuple[list[str], list[str]]:
    """The aux metric names and those read in log scale (in aux order), checked."""
    if isinstance(aux, str) or not all(isinstance(a, str) and a and a not in (SCORE, REGRET) for a in aux):
        raise StopwiseError(f"The 'aux' parameter of LearnedStopping must be a list of metric names other than "
                            f"{SCORE!r} and {REGRET!r}. Got {aux!r} instead.")
    names = [str(a) for a in aux]
    if isinstance(log_aux, str) or not set(log_aux) <= set(names):
        raise StopwiseError(f"The 'log_aux' parameter of LearnedStopping must list names from aux = {names}. "
                            f"Got {log_aux!r} instead.")
    return names, [a for a in names if a in set(log_aux)]
