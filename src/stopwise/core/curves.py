"""Risk and cost of a rule at every λ of a grid, in one pass over the trace.

For input i let m[i, k] = max_{j <= k} z[i, j] (z oriented so the rule fires when z >= t). Input i
halts at stage k exactly for thresholds t in (m[i, k-1], m[i, k]], and at its last stage above
that. So any per-stage value v[i, k] (a loss, a cost) summed over inputs at their halt stages is a
step function of t whose jumps sit at the m[i, k]: a sorted grid, one searchsorted and a bincount
give it at all G grid points in O(nK log G), instead of O(nKG) for a loop over λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stopwise.core.trace import FloatArray, IntArray


@dataclass(frozen=True)
class Curves:
    """Sums over inputs at each threshold of an ascending grid ``t`` (last point: never stop)."""

    t: FloatArray
    sums: dict[str, FloatArray]


def prefix_max(z: FloatArray) -> FloatArray:
    return np.maximum.accumulate(z, axis=1)


def halt_sums(z: FloatArray, lengths: IntArray, t_grid: FloatArray, values: dict[str, FloatArray]) -> Curves:
    """Σ_i v[i, halt_i(t)] for each named (n, K) array v and each t in ascending ``t_grid``."""
    t_grid = np.asarray(t_grid, dtype=np.float64)
    if t_grid.size > 1 and (np.diff(t_grid) <= 0).any():
        raise ValueError("t_grid must be strictly ascending")
    n, k = z.shape
    g = t_grid.size
    m = prefix_max(z)
    # b[i, k]: first grid index whose t exceeds m[i, k]; stage k+1 takes over from there.
    b = np.searchsorted(t_grid, m[:, :-1], side="right")
    beyond = np.arange(k - 1)[None, :] >= (lengths - 1)[:, None]
    b[beyond] = g  # stages past the last existing one never take over
    flat_b = b.ravel()
    sums: dict[str, FloatArray] = {}
    for name, v in values.items():
        delta = (v[:, 1:] - v[:, :-1]).ravel()
        diff = np.bincount(flat_b, weights=delta, minlength=g + 1)[:g]
        diff[0] += v[:, 0].sum()
        sums[name] = np.cumsum(diff, dtype=np.float64)
    return Curves(t=t_grid, sums=sums)


def default_grid(z: FloatArray, size: int | None, integer: bool) -> FloatArray:
    """Ascending candidate thresholds (without +inf, the "never stop" point).

    ``size=None`` takes every distinct value the statistic takes. Halting decisions only change
    at those values, so fixed-sequence testing over them is fixed-sequence testing over the whole
    continuum of λ: exact, with no data-dependent coarsening. An int thins them to at most that
    many quantiles, which is faster on huge traces but makes the grid depend on the data.
    """
    finite = z[np.isfinite(z)]
    if integer:
        hi = int(finite.max()) if finite.size else 0
        return np.arange(0, hi + 1, dtype=np.float64)
    values = np.unique(finite)
    if size is not None and values.size > size:
        values = np.unique(np.quantile(values, np.linspace(0.0, 1.0, size)))
    return values
