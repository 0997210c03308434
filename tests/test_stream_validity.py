"""The stream certificates hold over many calibration draws on a real aeon set (MAPIE-style).

The prefix classifiers are trained once on part of ItalyPowerDemand; the rest is recorded and
taken as the population. Calibration sets are drawn from it with replacement (i.i.d. from its
empirical distribution), so the guarantee applies exactly and the true risk of a certified rule is
its risk on the whole population, with no test noise (see stopwise.validity).
"""

from __future__ import annotations

import numpy as np
import pytest

import stopwise as sw
from stopwise.stream import EarlyStreamClassifier, SeriesPrefixes, stream_rule

pytest.importorskip("aeon")
pytest.importorskip("sklearn")

from stopwise.stream.data import load_pooled, stratified_split  # noqa: E402
from stopwise.validity import bootstrap_repeats  # noqa: E402

DELTA = 0.1
REPEATS = 200


@pytest.fixture(scope="module")
def population() -> sw.Trace:
    X, y = load_pooled("ItalyPowerDemand")
    tr, rest = stratified_split(y, (0.25, 0.75), seed=3)
    model = EarlyStreamClassifier(SeriesPrefixes(n_stages=20).fit(X[tr], y[tr]))
    return model.record(X[rest], y[rest])


def _allowance(repeats: int) -> float:
    return DELTA + 3.0 * float(np.sqrt(DELTA * (1 - DELTA) / repeats))


def _naive_violations(trace: sw.Trace, rule: sw.Rule, *, n_cal: int, epsilon: float, seed: int) -> float:
    """The most aggressive λ whose calibration gap is <= ε, with no confidence margin."""
    rng = np.random.default_rng(seed)
    bad = 0
    for _ in range(REPEATS):
        cal = trace[np.sort(rng.integers(0, trace.n, n_cal))]
        tab = sw.table(cal, rule)
        ok = tab.risk <= epsilon  # conservative first
        lam = tab.lam[np.flatnonzero(ok)[-1]] if ok.any() else tab.lam[0]
        bad += sw.evaluate(trace, rule, lam=float(lam))["risk"] > epsilon
    return bad / REPEATS


@pytest.mark.validity
@pytest.mark.parametrize("rule", ["max_prob", "combined"])
def test_marginal_guarantee_holds_over_many_calibrations_and_naive_fails(population: sw.Trace, rule: str) -> None:
    r = stream_rule(rule)
    res = bootstrap_repeats(population, r, n_cal=400, repeats=REPEATS, epsilon=0.05, delta=DELTA, seed=1)
    assert res.certified.mean() > 0.9 and res.savings.mean() > 0.2, "the certificate must save something"
    assert res.violation_rate <= _allowance(REPEATS), res.summary()
    assert _naive_violations(population, r, n_cal=400, epsilon=0.05, seed=1) > _allowance(REPEATS)


def _conditional_violated(cert: sw.Certificate, trace: sw.Trace, epsilon: float) -> bool:
    """True when some stage t has a gap > ε among the inputs stopped early by t (on the population)."""
    halts = cert.make_rule().halts(trace)
    early = halts < trace.lengths - 1
    wrong = trace.predictions[np.arange(trace.n), halts] != trace.reference
    for t in range(trace.n_stages - 1):
        by = early & (halts <= t)
        if by.any() and wrong[by].mean() > epsilon:
            return True
    return False


@pytest.mark.validity
def test_conditional_guarantee_holds_at_every_stopping_time(population: sw.Trace) -> None:
    epsilon, n_cal, repeats = 0.1, 1200, 100
    rng = np.random.default_rng(7)
    rule = sw.MaxProb()
    violated, opened = 0, 0
    for r in range(repeats):
        cal = population[np.sort(rng.integers(0, population.n, n_cal))]
        cert = sw.calibrate(cal, rule, epsilon=epsilon, delta=DELTA, method="conditional", seed=r, grid=50)
        opened += cert.certified
        violated += _conditional_violated(cert, population, epsilon)
    assert opened / repeats > 0.5, "the conditional procedure must open stages for this test to mean anything"
    assert violated / repeats <= _allowance(repeats)
