"""What stopping a training run early costs, and certifying a rule against it.

Single-run stopping (:func:`certify`): the loss of stopping run i at evaluation k is its regret,
the best metric the full run reaches minus the best metric kept up to k (restore-best), scaled
by a known bound into [0, 1]. That is an (n, K) loss matrix, so Learn-then-Test (Angelopoulos,
Bates, Candès, Jordan, Lei 2021) with a bounded-mean p-value (WSR by default) certifies: with probability
>= 1 - δ over the calibration runs, the expected regret of a new run of the same population is
<= ε.

Trial pruning (:func:`pruning_trace`): the loss is 1 when a run that ends within ``within`` of
the best run of its search is stopped before its last evaluation; calibrated on those runs, the
certificate bounds the probability that such a run gets pruned. :func:`certify_pruning` does both
steps and adds the one λ the core's default grid leaves out, just beyond every good run's
statistic (see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

import stopwise as sw
from stopwise._errors import CalibrationError, StopwiseError
from stopwise.trace import IntArray
from stopwise.training.curves import REGRET, TASK_FORMAT, scores_of
from stopwise.training.monitor import check_source

PRUNED = "pruned"

__all__ = ["PRUNED", "certify", "certify_pruning", "check_certificate", "check_population", "pruning_grid",
           "pruning_trace", "regret_at", "regret_risk"]


def check_population(trace: sw.Trace, *, owner: str) -> None:
    """Refuse traces that are not learning curves made by :func:`curves_to_trace`."""
    if trace.meta.get("task_format") != TASK_FORMAT or REGRET not in trace.signals:
        raise StopwiseError(f"{owner} needs learning curves made by stopwise.training.curves_to_trace (task_format "
                            f"{TASK_FORMAT!r} and a {REGRET!r} signal). Got task_format "
                            f"{trace.meta.get('task_format')!r} and signals {sorted(trace.signals)}.")


def regret_risk() -> sw.LossMatrix:
    """The regret risk on a learning-curve trace (its ``regret`` signal, already in [0, 1])."""
    return sw.LossMatrix(signal=REGRET)


def regret_at(trace: sw.Trace, halts: IntArray) -> np.ndarray:
    """Regret per run, in the metric's units, when each run stops at ``halts`` (restore-best)."""
    check_population(trace, owner="regret_at")
    loss = trace.signals[REGRET][np.arange(trace.n), np.asarray(halts, dtype=np.int64)]
    out: np.ndarray = loss * float(trace.meta.get("regret_bound", 1.0))
    return out


def certify(trace: sw.Trace, rule: sw.Rule, *, epsilon: float, delta: float = 0.1, pvalue: str = "wsr",
            monitor: str | None = None, mode: str | None = None, **kwargs: Any) -> sw.Certificate:
    """Calibrate ``rule`` so that a new run's expected regret is <= ``epsilon`` (metric units)
    with probability >= 1 - ``delta``; see the module docstring.

    ``pvalue`` defaults to the Waudby-Smith-Ramdas betting p-value ("Estimating means of bounded
    random variables by betting", JRSS-B 2024): regrets are mostly 0 with a few large ones, a
    small variance WSR adapts to, while Hoeffding-Bentkus assumes the worst variance for the mean
    and certified half the savings on the recorded MLP runs. ``monitor`` / ``mode``, when given,
    must match the trace's (a guard against calibrating on the wrong metric). Other keyword arguments go to :func:`stopwise.calibrate`. Raises
    :class:`~stopwise.CalibrationError` naming n and the n needed when there are too few runs.
    """
    check_population(trace, owner="certify")
    for key, given in (("monitor", monitor), ("mode", mode)):
        if given is not None and trace.meta.get(key) != given:
            raise StopwiseError(f"The trace was recorded with {key} = {trace.meta.get(key)!r}, but certify was given "
                                f"{key} = {given!r}.")
    bound = float(trace.meta.get("regret_bound", 1.0))
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < bound:
        raise StopwiseError(f"The 'epsilon' parameter of certify must be a regret in (0, {bound:g}) (the trace's "
                            f"bound, in {trace.meta.get('monitor')!r} units). Got {epsilon!r} instead.")
    # No valid p-value certifies below the exact binomial size (all-zero regrets have probability
    # (1 - ε)^n under a risk of ε): refuse at once, before WSR's search for its own size.
    floor = math.ceil(math.log(delta) / math.log1p(-epsilon / bound)) if 0 < delta < 1 else 0
    if trace.n < floor:
        raise CalibrationError(f"The calibration set is too small: n = {trace.n} runs, but certifying a mean regret "
                               f"<= ε = {epsilon:g} at δ = {delta:g} needs at least n = {floor} runs with any p-value "
                               "(record more runs or ask for a larger ε).")
    # A learned rule must not be calibrated on the runs it was fitted on (LearnedStopping says which).
    check = getattr(rule, "check_calibration", None)
    if callable(check):
        check(trace)
    try:
        cert = sw.calibrate(trace, rule, epsilon=epsilon / bound, delta=delta, risk=regret_risk(), pvalue=pvalue,
                            **kwargs)
    except CalibrationError as exc:
        raise CalibrationError(f"{exc} (certify: ε = {epsilon:g} in {trace.meta.get('monitor')!r} units, "
                               f"δ = {delta:g}; record more runs or ask for a larger ε)") from None
    return cert


def check_certificate(cert: sw.Certificate, trace: sw.Trace) -> None:
    """Refuse a certificate made on another population, metric or horizon than ``trace``."""
    cert.ensure_compatible(trace)
    check_source(cert, monitor=str(trace.meta.get("monitor")), mode=str(trace.meta.get("mode")), owner="the trace")


def pruning_trace(trace: sw.Trace, *, within: float, groups: Sequence[Any] | np.ndarray) -> sw.Trace:
    """The runs that end within ``within`` (metric units) of their search's best, with a
    ``pruned`` loss signal: 1 at every evaluation but the last (stopping there prunes a good run).

    ``groups[i]`` names run i's search (e.g. its data set); calibrate a pruning rule on the
    result with ``risk=stopwise.LossMatrix(signal="pruned")`` to bound P(a good run is pruned).
    """
    check_population(trace, owner="pruning_trace")
    g = np.asarray(groups)
    if g.shape != (trace.n,):
        raise StopwiseError(f"The 'groups' parameter of pruning_trace must name one search per run ({trace.n}). "
                            f"Got shape {g.shape} instead.")
    if isinstance(within, bool) or not isinstance(within, (int, float)) or within < 0:
        raise StopwiseError(f"The 'within' parameter of pruning_trace must be a number >= 0. Got {within!r} instead.")
    final = np.nanmax(scores_of(trace), axis=1)
    good = np.zeros(trace.n, dtype=bool)
    for name in np.unique(g):
        rows = g == name
        good[rows] = final[rows] >= final[rows].max() - within
    idx = np.flatnonzero(good)
    assert trace.mask is not None
    mask = trace.mask[idx]
    lengths = mask.sum(axis=1)
    loss = (np.arange(trace.n_stages)[None, :] < (lengths - 1)[:, None]).astype(np.float64)
    cost = trace.cost if trace.cost is None or np.ndim(trace.cost) == 1 else trace.cost[idx]
    signals = {k: v[idx] for k, v in trace.signals.items()}
    signals[PRUNED] = loss
    return sw.Trace(predictions=trace.predictions[idx], mask=mask, cost=cost, signals=signals,
                    meta={**trace.meta, "pruning_within": float(within)})


def pruning_grid(good: sw.Trace, rule: sw.Rule) -> np.ndarray:
    """The λ grid for calibrating ``rule`` on a :func:`pruning_trace`: every distinct value of its
    statistic on the good runs, plus the first λ beyond all of them.

    The core's default grid (every distinct statistic value) leaves out the "never stop" end,
    which on an ordinary trace stops no run anywhere. A pruning trace holds the good runs only, so
    a threshold just beyond their largest statistic prunes none of them yet still prunes the bad
    runs whose statistic goes further: it is the least aggressive λ with zero calibration risk,
    and the only one a small calibration set can certify at a small ε (the first grid value
    prunes one good run, and (1 - ε)^n <= δ passes while P(Binomial(n, ε) <= 1) <= δ does not).
    Fixed-sequence testing over this grid is fixed-sequence testing over the whole continuum of
    λ: the losses change only at the statistic's values, and the added point stands for the
    interval above them.
    """
    free = rule.with_lam(None)
    z = free.z(good)
    finite = z[np.isfinite(z)]
    if free.integer:
        t = np.arange(0, (int(finite.max()) if finite.size else 0) + 2, dtype=np.float64)
    else:
        values = np.unique(finite)
        top = float(values[-1]) if values.size else 0.0
        t = np.append(values, np.nextafter(top, np.inf))
    out: np.ndarray = free.sign() * t
    return out


def certify_pruning(trace: sw.Trace, rule: sw.Rule, *, within: float, groups: Sequence[Any] | np.ndarray,
                    epsilon: float, delta: float = 0.1, **kwargs: Any) -> sw.Certificate:
    """Calibrate ``rule`` as a trial pruner: with probability >= 1 - ``delta`` over the recorded
    searches, a new run that ends within ``within`` of its search's best is pruned with
    probability <= ``epsilon`` (Learn-then-Test, Angelopoulos et al. 2021, on the ``pruned`` loss
    of :func:`pruning_trace`, exact binomial p-value, over :func:`pruning_grid`).

    ``trace`` holds all the recorded runs (``groups[i]``: run i's search); only the good ones
    enter the calibration. The promise needs a rule fixed before these runs are seen; a rule fitted
    on them (a :meth:`~stopwise.training.PercentileStopping.from_runs` median over hundreds of
    runs, which one run barely moves) makes it approximate. Other keyword arguments go to
    :func:`stopwise.calibrate`. Raises :class:`~stopwise.CalibrationError` naming the number of
    good runs when there are fewer than the exact binomial size ``log δ / log(1 - ε)``.
    """
    good = pruning_trace(trace, within=within, groups=groups)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
        raise StopwiseError(f"The 'epsilon' parameter of certify_pruning must be a probability in (0, 1). "
                            f"Got {epsilon!r} instead.")
    if "grid" in kwargs:
        raise StopwiseError("certify_pruning chooses its own grid (pruning_grid); call stopwise.calibrate on "
                            "pruning_trace(...) to pass another.")
    try:
        return sw.calibrate(good, rule, epsilon=epsilon, delta=delta, risk=sw.LossMatrix(signal=PRUNED),
                            grid=pruning_grid(good, rule), **kwargs)
    except CalibrationError as exc:
        raise CalibrationError(f"{exc} (certify_pruning: {good.n} of {trace.n} runs end within {within:g} of "
                               f"their search's best; record more searches or ask for a larger ε)") from None
