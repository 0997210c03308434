"""p-values for H0: risk > ε, from losses in [0, 1] on n i.i.d. calibration points.

Pure numpy/scipy, vectorised over a grid of candidate λ where the test allows it. Small p-values
are evidence that the risk at that λ is at most ε. References:

- Learn-then-Test: Angelopoulos, Bates, Candès, Jordan, Lei (2021), "Learn then Test:
  Calibrating Predictive Algorithms to Achieve Risk Control", Sec. 3 and App. B.
- Hoeffding (1963); Bentkus (2004), "On Hoeffding's inequalities"; Bates et al. (2021),
  "Distribution-free, risk-controlling prediction sets" (the Hoeffding-Bentkus combination).
- WSR: Waudby-Smith & Ramdas (2023), "Estimating means of bounded random variables by betting".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from scipy import stats
from scipy.special import bdtr, xlogy

Arr = npt.NDArray[np.float64]


def _h1(a: Arr, b: float) -> Arr:
    """Kullback-Leibler divergence between Bernoulli(a) and Bernoulli(b)."""
    out: Arr = xlogy(a, a / b) + xlogy(1.0 - a, (1.0 - a) / (1.0 - b))
    return out


def binomial(loss_sum: Arr, n: Arr | int, epsilon: float) -> Arr:
    """Exact p-value for 0/1 losses: P(Binomial(n, ε) <= number of losses).

    Valid only when each loss is 0 or 1. With n = 0 there is no evidence: p = 1.
    """
    k = np.floor(np.asarray(loss_sum, dtype=np.float64) + 1e-9)
    n_arr = np.asarray(n, dtype=np.float64)
    n_int = np.maximum(n_arr, 1).astype(np.int64)
    return np.where(n_arr > 0, bdtr(np.minimum(k, n_int).astype(np.int64), n_int, epsilon), 1.0)


def hoeffding(loss_sum: Arr, n: Arr | int, epsilon: float) -> Arr:
    """exp(-n · h1(min(R̂, ε), ε)) for losses in [0, 1] (LTT, Prop. B.1)."""
    n_arr = np.asarray(n, dtype=np.float64)
    rhat = np.asarray(loss_sum, dtype=np.float64) / np.maximum(n_arr, 1)
    p = np.exp(-n_arr * _h1(np.minimum(rhat, epsilon), epsilon))
    return np.where(n_arr > 0, np.minimum(p, 1.0), 1.0)


def bentkus(loss_sum: Arr, n: Arr | int, epsilon: float) -> Arr:
    """e · P(Binomial(n, ε) <= ⌈n·R̂⌉) for losses in [0, 1] (Bentkus 2004; LTT, Prop. B.2)."""
    n_arr = np.asarray(n, dtype=np.float64)
    k = np.ceil(np.asarray(loss_sum, dtype=np.float64) - 1e-9)
    n_int = np.maximum(n_arr, 1).astype(np.int64)
    p = np.e * bdtr(np.minimum(k, n_int).astype(np.int64), n_int, epsilon)
    return np.where(n_arr > 0, np.minimum(p, 1.0), 1.0)


def hoeffding_bentkus(loss_sum: Arr, n: Arr | int, epsilon: float) -> Arr:
    """min(Hoeffding, Bentkus): valid because each is (Bates et al. 2021, Prop. 3)."""
    return np.minimum(hoeffding(loss_sum, n, epsilon), bentkus(loss_sum, n, epsilon))


def wsr(losses: Arr, epsilon: float, delta: float, *, seed: int = 0) -> Arr | float:
    """Betting p-value (Waudby-Smith & Ramdas 2023, as in LTT App. B.3) for losses in [0, 1].

    Wealth K_t = prod_i (1 + ν_i (ε - L_i)) with the predictable bet
    ν_i = min(1, sqrt(2 log(1/δ) / (n σ̂²_{i-1}))) is a nonnegative supermartingale when
    E[L] >= ε, so p = min(1, 1 / max_t K_t) by Ville's inequality. The losses are visited in a
    seeded random order, since the bound depends on the order. ``losses`` may be 2-D
    (one row per candidate λ, same visiting order for all rows): then one p-value per row.
    """
    x = np.asarray(losses, dtype=np.float64)
    single = x.ndim == 1
    x = np.atleast_2d(x)
    n = x.shape[1]
    if n == 0:
        return 1.0 if single else np.ones(x.shape[0])
    x = x[:, np.random.default_rng(seed).permutation(n)]
    t = np.arange(1, n + 1, dtype=np.float64)
    mu_hat = (0.5 + np.cumsum(x, axis=1)) / (t + 1.0)
    sigma2 = (0.25 + np.cumsum((x - mu_hat) ** 2, axis=1)) / (t + 1.0)
    sigma2_prev = np.concatenate([np.full((x.shape[0], 1), 0.25), sigma2[:, :-1]], axis=1)
    nu = np.minimum(1.0, np.sqrt(2.0 * np.log(1.0 / delta) / (n * sigma2_prev)))
    # Keep each factor positive: 1 + ν (ε - 1) > 0 needs ν < 1 / (1 - ε).
    nu = np.minimum(nu, 0.999 / (1.0 - epsilon))
    log_k = np.cumsum(np.log1p(nu * (epsilon - x)), axis=1)
    p = np.minimum(1.0, np.exp(-log_k.max(axis=1)))
    return float(p[0]) if single else p


SumPValue = Callable[[Arr, "Arr | int", float], Arr]

#: p-values computed from (sum of losses, n, ε) alone.
SUM_PVALUES: dict[str, SumPValue] = {
    "binomial": binomial,
    "hoeffding": hoeffding,
    "bentkus": bentkus,
    "hoeffding_bentkus": hoeffding_bentkus,
}
PVALUES = (*SUM_PVALUES, "wsr")


def min_calibration_size(epsilon: float, delta: float, pvalue: str = "binomial") -> int:
    """Smallest n for which zero observed losses can certify risk <= ε at level δ.

    With no losses, the binomial and Hoeffding p-values are (1 - ε)^n, Bentkus e(1 - ε)^n.
    """
    factor = np.e if pvalue in ("bentkus",) else 1.0
    if pvalue == "wsr":
        # ν_1 .. ν_n on zero losses: a conservative closed form is hard; search instead.
        n = 1
        while float(wsr(np.zeros(n), epsilon, delta)) > delta:
            n = int(n * 1.25) + 1
        # The wealth on zero losses only grows with n, so the p-value falls with n: bisect (a
        # linear walk from n / 1.25 took over 10 minutes at ε = 1e-6).
        lo, hi = max(1, int(n / 1.25) - 1), n
        while lo < hi:
            mid = (lo + hi) // 2
            if float(wsr(np.zeros(mid), epsilon, delta)) > delta:
                lo = mid + 1
            else:
                hi = mid
        return lo
    return int(np.ceil(np.log(delta / factor) / np.log1p(-epsilon)))


def upper_bound(loss_sum: float, n: int, delta: float, pvalue: str, losses: Arr | None = None) -> float:
    """The (1 - δ) upper confidence bound on the risk implied by a p-value: the smallest ε whose
    p-value is <= δ, found by bisection (p-values fall as ε grows)."""
    if n == 0:
        return 1.0
    if pvalue == "binomial":
        # Clopper-Pearson: the exact inversion of the binomial tail.
        k = int(np.floor(loss_sum + 1e-9))
        return 1.0 if k >= n else float(stats.beta.ppf(1.0 - delta, k + 1, n - k))
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if mid <= 0.0 or mid >= 1.0:
            break
        if pvalue == "wsr":
            assert losses is not None
            p = float(wsr(losses, mid, delta))
        else:
            p = float(SUM_PVALUES[pvalue](np.asarray([loss_sum]), n, mid)[0])
        if p <= delta:
            hi = mid
        else:
            lo = mid
    return hi
