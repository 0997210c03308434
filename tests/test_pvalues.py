"""p-values and FWER procedures, cross-checked against direct scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stopwise import fwer, pvalues


@pytest.mark.parametrize(("k", "n", "eps"), [(0, 50, 0.05), (3, 100, 0.05), (10, 100, 0.1), (40, 1000, 0.05)])
def test_binomial_and_bentkus_equal_direct_binomial_tails(k: int, n: int, eps: float) -> None:
    direct = sum(stats.binom.pmf(j, n, eps) for j in range(k + 1))
    assert pvalues.binomial(np.array([k]), n, eps)[0] == pytest.approx(direct, rel=1e-9)
    assert pvalues.bentkus(np.array([k]), n, eps)[0] == pytest.approx(min(1.0, np.e * direct), rel=1e-9)


def test_hoeffding_matches_the_closed_form() -> None:
    n, eps = 200, 0.1
    for rhat in (0.0, 0.02, 0.05, 0.1, 0.3):
        a = min(rhat, eps)
        h1 = (a * np.log(a / eps) if a > 0 else 0.0) + (1 - a) * np.log((1 - a) / (1 - eps))
        assert pvalues.hoeffding(np.array([rhat * n]), n, eps)[0] == pytest.approx(np.exp(-n * h1))


def test_hoeffding_bentkus_is_the_minimum_and_all_are_capped_at_one() -> None:
    s = np.array([0.0, 5.0, 20.0, 90.0])
    hb = pvalues.hoeffding_bentkus(s, 100, 0.1)
    np.testing.assert_allclose(hb, np.minimum(pvalues.hoeffding(s, 100, 0.1), pvalues.bentkus(s, 100, 0.1)))
    for fn in pvalues.SUM_PVALUES.values():
        p = fn(s, 100, 0.1)
        assert ((p >= 0) & (p <= 1)).all()
        assert (np.diff(p) >= -1e-12).all()  # more losses, less evidence


def test_no_data_means_no_evidence() -> None:
    for fn in pvalues.SUM_PVALUES.values():
        assert fn(np.array([0.0]), np.array([0]), 0.1)[0] == 1.0
    assert pvalues.wsr(np.array([]), 0.1, 0.1) == 1.0


def test_wsr_is_valid_under_the_null_and_powerful_away_from_it() -> None:
    rng = np.random.default_rng(1)
    eps, delta = 0.2, 0.1
    # Null at the boundary: mean exactly eps. Rejections must be rare (<= delta + noise).
    null = [pvalues.wsr(rng.uniform(0, 2 * eps, 300), eps, delta, seed=i) <= delta for i in range(300)]
    assert np.mean(null) <= delta + 3 * np.sqrt(delta * (1 - delta) / 300)
    # Far below eps with low variance: WSR rejects and beats Hoeffding.
    x = rng.uniform(0.0, 0.1, 300)
    p_wsr = pvalues.wsr(x, eps, delta)
    p_h = pvalues.hoeffding(np.array([x.sum()]), 300, eps)[0]
    assert p_wsr <= delta and p_wsr < p_h


def test_min_calibration_size_is_tight() -> None:
    for eps, delta in ((0.01, 0.1), (0.05, 0.05)):
        n = pvalues.min_calibration_size(eps, delta, "binomial")
        assert pvalues.binomial(np.array([0]), n, eps)[0] <= delta < pvalues.binomial(np.array([0]), n - 1, eps)[0]
    assert pvalues.min_calibration_size(0.01, 0.1, "binomial") == 230


def test_upper_bound_inverts_the_p_value() -> None:
    ub = pvalues.upper_bound(3.0, 100, 0.1, "binomial")
    # Clopper-Pearson upper bound for 3/100 at level 0.9.
    assert ub == pytest.approx(stats.beta.ppf(0.9, 4, 97), abs=1e-6)


def test_fixed_sequence_stops_at_first_failure() -> None:
    p = np.array([0.01, 0.02, 0.2, 0.01])
    assert fwer.fixed_sequence(p, 0.1).tolist() == [True, True, False, False]


def test_bonferroni_and_holm() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.5])
    assert fwer.bonferroni(p, 0.1).tolist() == [True, False, False, False]
    # Holm: sorted 0.01 <= 0.1/4, 0.03 <= 0.1/3, 0.04 <= 0.1/2, 0.5 > 0.1.
    assert fwer.holm(p, 0.1).tolist() == [True, True, True, False]
