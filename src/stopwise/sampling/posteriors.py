"""Posterior probabilities that a vote's leader is right or stays the leader, behind the sampling rules.

Adaptive-Consistency's Beta and Dirichlet criteria (Aggarwal et al. 2023) and the Pólya-urn
probability that the current winner keeps winning (:class:`~stopwise.sampling.rules.VoteSettled`).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from scipy.special import gammainc, gammaln

from stopwise.core.trace import FloatArray


def dirichlet_top_probability(counts: FloatArray, *, grid: int = 512) -> FloatArray:
    """P(the leader's probability is the largest) under a Dirichlet(counts + 1) posterior.

    With G_j ~ Gamma(c_j + 1) independent, p = G / sum(G) is Dirichlet(c + 1), so
    P(p_1 > p_j for all j) = ∫ f_1(x) prod_{j>1} F_j(x) dx, a deterministic 1-D quadrature.
    ``counts`` is (rows, m) sorted descending with m >= 2 (zeros are competitors never seen).
    """
    a = counts + 1.0
    top = a[:, :1]
    hi = float(np.max(top + 12.0 * np.sqrt(top) + 20.0))
    x = np.linspace(0.0, hi, grid)[None, :]
    log_pdf = (top - 1.0) * np.log(np.maximum(x, 1e-300)) - x - gammaln(top)
    pdf = np.exp(log_pdf)
    cdf = np.ones((a.shape[0], grid))
    for j in range(1, a.shape[1]):
        cdf *= gammainc(a[:, j : j + 1], x)
    out = np.trapezoid(pdf * cdf, x, axis=1)
    clipped: FloatArray = np.clip(out, 0.0, 1.0)
    return clipped


@functools.lru_cache(maxsize=1 << 16)
def urn_keep_probability(counts: tuple[int, ...], n_none: int, remaining: int, alpha: float, draws: int) -> float:
    """P(the current vote winner still wins after ``remaining`` more samples) under a Pólya urn.

    Future samples repeat an earlier answer with probability proportional to its count (no
    answer included), or bring a new answer with weight ``alpha`` (a Chinese restaurant process:
    the posterior predictive of an exchangeable sequence). Ties go to the earliest answer, as in
    the vote. Estimated from ``draws`` simulations with a seed fixed by the arguments, so the
    statistic is a deterministic function of the counts (online and offline agree).
    """
    if not counts:
        return 0.0
    c = np.asarray(counts, dtype=np.float64)
    leader = int(np.argmax(c))  # first maximum: the earliest answer wins ties
    if remaining == 0:
        return 1.0
    if len(c) == 1 or c[leader] - np.sort(c)[-2] > remaining:
        if len(c) == 1 and c[0] <= remaining:
            pass  # a new answer could still catch up
        else:
            return 1.0
    key = hashlib.blake2b(repr((counts, n_none, remaining, alpha, draws)).encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(key, "little"))
    m = len(c)
    # Columns: existing answers, up to `remaining` new answers, then "no answer".
    tally = np.zeros((draws, m + remaining + 1))
    tally[:, :m] = c
    tally[:, -1] = n_none
    n_new = np.zeros(draws, dtype=np.int64)
    rows = np.arange(draws)
    u = rng.random((remaining, draws))
    for step in range(remaining):
        total = tally.sum(axis=1) + alpha
        weights = np.concatenate([tally, np.full((draws, 1), alpha)], axis=1)
        cum = np.cumsum(weights, axis=1) / total[:, None]
        pick = (u[step][:, None] > cum).sum(axis=1)
        is_new = pick == weights.shape[1] - 1
        pick = np.where(is_new, m + n_new, pick)
        n_new = n_new + is_new
        tally[rows, pick] += 1
    final = tally[:, :-1]
    # Simulations cannot prove the vote decided: only the exact check above returns 1.
    return min(float(np.mean(final.argmax(axis=1) == leader)), 1.0 - 0.5 / draws)


def _betainc(a: FloatArray, b: FloatArray) -> FloatArray:
    from scipy.special import betainc

    return np.asarray(betainc(a, b, 0.5))


def beta_leader_probability(counts: FloatArray) -> FloatArray:
    """Adaptive-Consistency's Beta criterion from (rows, m) answer counts sorted descending.

    With a, b the counts of the two most common answers and a uniform prior, P(the leader is truly
    more likely than the runner-up) = 1 - I_{1/2}(a + 1, b + 1); -inf for a row with no answer.
    """
    counts = np.asarray(counts, dtype=np.float64)
    a = counts[:, 0]
    b = counts[:, 1] if counts.shape[1] > 1 else np.zeros_like(a)
    return np.where(a > 0, 1.0 - _betainc(a + 1.0, b + 1.0), -np.inf)
