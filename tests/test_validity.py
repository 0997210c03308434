"""The guarantee, tested the way MAPIE does: many random calibration sets from a distribution with
known risk; the share of repeats whose true risk exceeds ε must be at most δ plus binomial noise.

Allowance: with R repeats, the observed violation share of a valid procedure (true rate <= δ)
exceeds δ + 3 sqrt(δ(1 - δ) / R) with probability about 0.1% or less. R defaults to 500 per
configuration; set STOPWISE_VALIDITY_REPEATS for a longer run (`make validity` uses 2000).
True risk: measured on a 200,000-input population from the same synthetic process (standard
error about 0.0005 at ε = 0.05).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import stopwise as sw
from stopwise.synthetic import synthetic_trace
from stopwise.validity import bootstrap_repeats, population_repeats, split_repeats

pytestmark = pytest.mark.validity

REPEATS = int(os.environ.get("STOPWISE_VALIDITY_REPEATS", "500"))
EPS, DELTA, N_CAL = 0.05, 0.1, 1000
REAL_TRACE = Path(__file__).resolve().parents[1] / "src" / "stopwise" / "data" / "bbc_minilm.npz"


@pytest.fixture(scope="module")
def world() -> tuple[sw.Trace, sw.Trace]:
    pool = synthetic_trace(60_000, seed=2024, with_loss=True)
    population = synthetic_trace(200_000, seed=7, with_loss=True)
    return pool, population


CONFIGS = [
    ("max_prob", "gap", {"pvalue": "binomial"}),
    ("max_prob", "gap", {"pvalue": "hoeffding"}),
    ("max_prob", "gap", {"pvalue": "bentkus"}),
    ("max_prob", "gap", {"pvalue": "hoeffding_bentkus"}),
    ("margin", "gap", {"pvalue": "wsr"}),
    ("entropy", "gap", {"pvalue": "binomial", "fwer": "holm"}),
    ("patience", "gap", {"pvalue": "binomial", "fwer": "bonferroni"}),
    ("betting", "gap", {"pvalue": "binomial"}),
    ("max_prob", "accuracy_drop", {"pvalue": "binomial"}),
    ("margin", "selective", {"pvalue": "binomial", "fwer": "holm"}),
    ("max_prob", "loss", {"pvalue": "hoeffding_bentkus"}),
    ("entropy", "loss", {"pvalue": "wsr"}),
]


def _risk(name: str) -> sw.Risk | str:
    return sw.LossMatrix(signal="loss") if name == "loss" else name


@pytest.mark.parametrize(("rule", "risk", "kwargs"), CONFIGS, ids=[f"{r}-{k}-{'-'.join(map(str, kw.values()))}" for r, k, kw in CONFIGS])
def test_ltt_violation_rate_is_at_most_delta(world, rule: str, risk: str, kwargs: dict) -> None:
    pool, population = world
    res = population_repeats(pool, population, sw.make_rule(rule), n_cal=N_CAL, repeats=REPEATS,
                             epsilon=EPS, delta=DELTA, risk=_risk(risk), **kwargs)
    assert res.violation_rate <= res.allowance, res.summary()
    # The guarantee must not be bought by never stopping: most repeats certify and save compute.
    assert res.certified.mean() >= 0.5 and res.savings.mean() > 0.02, res.summary()


def test_crc_mean_risk_is_at_most_epsilon(world) -> None:
    pool, population = world
    res = population_repeats(pool, population, sw.MaxProb(), n_cal=N_CAL, repeats=REPEATS, epsilon=EPS, method="crc")
    # E[risk] <= ε: the mean over repeats, with three standard errors of slack.
    assert res.risks.mean() <= EPS + 3 * res.risks.std() / np.sqrt(REPEATS), res.summary()
    assert res.savings.mean() > 0.05


def test_conditional_violation_rate_per_stage_is_at_most_delta(world) -> None:
    pool, population = world
    repeats = max(100, REPEATS // 5)  # each repeat runs a two-stage search; 100 keep CI short
    rng = np.random.default_rng(5)
    z = sw.MaxProb().z(population)
    gap = population.predictions != population.reference[:, None]
    violations, certified = 0, 0
    for r in range(repeats):
        cal = pool[np.sort(rng.choice(pool.n, 2 * N_CAL, replace=False))]
        cert = sw.calibrate(cal, sw.MaxProb(), epsilon=EPS, delta=DELTA, method="conditional", seed=r)
        certified += cert.certified
        if not cert.certified:
            continue
        t = np.array([np.inf if x is None else x for x in cert.thresholds])
        fires = z >= t[None, :]
        first = fires.argmax(axis=1)
        h = np.where(fires[np.arange(population.n), first], first, population.lengths - 1)
        loss = gap[np.arange(population.n), h]
        worst = max(
            (loss[(h <= s) & (h < population.lengths - 1)].mean() for s in range(population.n_stages - 1)
             if ((h <= s) & (h < population.lengths - 1)).any()),
            default=0.0,
        )
        violations += worst > EPS
    allowance = DELTA + 3 * np.sqrt(DELTA * (1 - DELTA) / repeats)
    assert violations / repeats <= allowance
    assert certified / repeats >= 0.5


def test_the_harness_catches_an_invalid_procedure(world) -> None:
    """Picking the cheapest λ whose calibration risk is <= ε (no test) must fail this suite:
    otherwise the suite could not tell a valid procedure from an invalid one."""
    pool, population = world
    rng = np.random.default_rng(3)
    rule = sw.MaxProb()
    z_pop = rule.z(population)
    violations = 0
    repeats = 200
    for _ in range(repeats):
        cal = pool[np.sort(rng.choice(pool.n, N_CAL, replace=False))]
        tab = sw.table(cal, rule, "gap", grid=1000)
        ok = np.flatnonzero(tab.risk <= EPS)
        t = tab.t[ok[np.argmin(tab.cost[ok])]]
        h = sw.rules.halts_from_z(z_pop, population.lengths, t)
        violations += (population.predictions_at(h) != population.reference).mean() > EPS
    assert violations / repeats > DELTA + 3 * np.sqrt(DELTA * (1 - DELTA) / repeats)


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason="the shipped real trace is added with the encoder adapter")
@pytest.mark.parametrize(("rule", "pvalue", "epsilon"), [("max_prob", "binomial", 0.02), ("entropy", "hoeffding_bentkus", 0.02),
                                                      ("margin", "wsr", 0.02), ("patience", "binomial", 0.05)])
def test_real_trace_violation_rate_is_at_most_delta(rule: str, pvalue: str, epsilon: float) -> None:
    """The shipped BBC/MiniLM trace is the population: calibration sets are i.i.d. draws from it
    (with replacement), so the true risk of each certificate is its risk on the whole trace."""
    trace = sw.Trace.load(REAL_TRACE)
    res = bootstrap_repeats(trace, sw.make_rule(rule), n_cal=trace.n // 2, repeats=REPEATS, epsilon=epsilon,
                            delta=DELTA, pvalue=pvalue)
    assert res.violation_rate <= res.allowance, res.summary()
    assert res.certified.mean() >= 0.5 and res.savings.mean() > 0.05, res.summary()


@pytest.mark.skipif(not REAL_TRACE.is_file(), reason="the shipped real trace is added with the encoder adapter")
def test_real_trace_split_check_is_stricter_than_the_guarantee() -> None:
    """Calibrate on half, measure on the other half. The rest's risk moves against the calibration
    half's (one finite total), so this may exceed δ even for a valid procedure; it must stay close
    to the bootstrap rate and never certify a rule that is wrong for most splits."""
    trace = sw.Trace.load(REAL_TRACE)
    repeats = max(200, REPEATS // 2)
    split = split_repeats(trace, sw.MaxProb(), n_cal=trace.n // 2, repeats=repeats, epsilon=0.02, delta=DELTA)
    assert split.violation_rate <= 2 * DELTA, split.summary()
    assert np.median(split.risks) <= 0.02, split.summary()
