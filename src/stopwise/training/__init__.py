"""Early stopping for training runs with a promise: learning curves as traces.

One training run is one input, each evaluation (epoch, step, training-set size) one stage, the
validation metric the signal, cumulative compute the cost. Rules (:mod:`stopwise.training.rules`)
are calibrated by :func:`certify` so that the regret of restore-best stopping (best metric of the
full run minus best metric kept) is <= ε in expectation over new runs of the same population,
with probability >= 1 - δ; :class:`RunMonitor` applies a certificate, or a plain rule, online.

This package imports numpy only; the framework callbacks live in ``stopwise.training.hf``,
``.lightning`` and ``.optuna`` and import their frameworks themselves.
"""

from stopwise.training.conformal import ConformalEarlyStopping, ConformalEarlyStoppingRegressor
from stopwise.training.curves import REGRET, CurveRecorder, curves_to_trace, read_run, scores_of, values_of
from stopwise.training.learned import LearnedStopping, fit_learned_stopping, run_hashes
from stopwise.training.monitor import RunMonitor
from stopwise.training.risks import (
    certify,
    certify_pruning,
    check_certificate,
    pruning_grid,
    pruning_trace,
    regret_at,
    regret_risk,
)
from stopwise.training.rules import SCORE, CurveExtrapolation, EpochPatience, PercentileStopping, PlateauGain

__all__ = [
    "ConformalEarlyStopping", "ConformalEarlyStoppingRegressor",
    "REGRET", "SCORE", "CurveExtrapolation", "CurveRecorder", "EpochPatience", "LearnedStopping", "PercentileStopping",
    "PlateauGain", "RunMonitor",
    "certify", "certify_pruning", "check_certificate", "curves_to_trace", "fit_learned_stopping", "pruning_grid",
    "pruning_trace", "read_run", "run_hashes",
    "regret_at", "regret_risk",
    "scores_of", "values_of",
]
