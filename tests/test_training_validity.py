"""The training promise, tested like MAPIE: over random calibration / test splits of real recorded
runs, the share of splits whose held-out regret exceeds ε stays <= δ (+ binomial slack), while
the naive choice (the cheapest λ whose calibration regret is <= ε) breaks it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import stopwise as sw
from stopwise.training import CurveExtrapolation, EpochPatience, certify, curves_to_trace, regret_at

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "training_sklearn_mlp.npz"
DELTA = 0.1


def _trace() -> sw.Trace:
    if not DATA.exists():
        pytest.skip("benchmarks/data/training_sklearn_mlp.npz not recorded")
    with np.load(DATA) as d:
        acc = d["val_acc"].astype(np.float64)
    return curves_to_trace(list(acc), mode="max", monitor="val_acc", population="sklearn-mlp",
                           on_nonfinite="truncate", allow_ragged=True)


def _split(trace: sw.Trace, rows: np.ndarray) -> sw.Trace:
    assert trace.mask is not None
    return sw.Trace(predictions=trace.predictions[rows], mask=trace.mask[rows], cost=trace.cost,
                    signals={k: v[rows] for k, v in trace.signals.items()}, meta=trace.meta)


def _naive_lam(cal: sw.Trace, rule: sw.Rule, eps: float) -> float:
    for lam in range(1, cal.n_stages + 1):
        if regret_at(cal, rule.halts(cal, float(lam))).mean() <= eps:
            return float(lam)
    return float(cal.n_stages)


def _violations(rule: sw.Rule, eps: float, splits: int, *, naive: bool = False) -> tuple[float, float]:
    trace = _trace()
    n_cal = int(0.7 * trace.n)
    bad, saved = 0, []
    for s in range(splits):
        perm = np.random.default_rng(s).permutation(trace.n)
        cal, test = _split(trace, np.sort(perm[:n_cal])), _split(trace, np.sort(perm[n_cal:]))
        if naive:
            halts = rule.halts(test, _naive_lam(cal, rule, eps))
        else:
            halts = certify(cal, rule, epsilon=eps, delta=DELTA).make_rule().halts(test)
        bad += int(regret_at(test, halts).mean() > eps)
        saved.append(1 - test.cost_at(halts).sum() / test.full_cost.sum())
    return bad / splits, float(np.mean(saved))


def _slack(splits: int) -> float:
    # Largest share a correct method reaches with probability >= 0.999 over the splits.
    return float(stats.binom.ppf(0.999, splits, DELTA)) / splits


def test_certified_patience_keeps_its_promise_short() -> None:
    share, saved = _violations(EpochPatience(), 0.02, 30)
    assert share <= _slack(30)
    assert saved > 0.05  # it does stop early, so the check is not vacuous


@pytest.mark.slow
@pytest.mark.validity
@pytest.mark.parametrize("eps", [0.01, 0.02])
@pytest.mark.parametrize("make", [EpochPatience, lambda: CurveExtrapolation(horizon=32)])
def test_certified_rules_keep_their_promise(make: object, eps: float) -> None:
    rule = make()  # type: ignore[operator]
    share, _ = _violations(rule, eps, 200)
    assert share <= _slack(200)


@pytest.mark.slow
@pytest.mark.validity
def test_naive_choice_breaks_the_promise() -> None:
    share, _ = _violations(EpochPatience(), 0.01, 200, naive=True)
    assert share > DELTA
