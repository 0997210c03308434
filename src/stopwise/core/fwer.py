"""Family-wise error control over the λ grid (Learn-then-Test, Angelopoulos et al. 2021, Sec. 4).

Each procedure takes p-values ordered from the most conservative λ (most compute) to the least,
and returns a boolean mask of the λ whose null "risk > ε" is rejected; every rejected λ is then
certified simultaneously with probability >= 1 - δ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Mask = npt.NDArray[np.bool_]
Arr = npt.NDArray[np.float64]


def fixed_sequence(p_values: Arr, delta: float) -> Mask:
    """Walk the order; reject while p <= δ; stop at the first p > δ (no multiplicity correction)."""
    p = np.asarray(p_values, dtype=np.float64)
    failed = np.flatnonzero(p > delta)
    stop = failed[0] if failed.size else p.size
    out = np.zeros(p.size, dtype=bool)
    out[:stop] = True
    return out


def bonferroni(p_values: Arr, delta: float) -> Mask:
    """Reject every p <= δ / m."""
    p = np.asarray(p_values, dtype=np.float64)
    return p <= delta / max(p.size, 1)


def holm(p_values: Arr, delta: float) -> Mask:
    """Holm's step-down: sort p ascending, reject while p_(j) <= δ / (m - j)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    ok = p[order] <= delta / (m - np.arange(m))
    failed = np.flatnonzero(~ok)
    stop = failed[0] if failed.size else m
    out = np.zeros(m, dtype=bool)
    out[order[:stop]] = True
    return out


FWER: dict[str, Callable[[Arr, float], Mask]] = {
    "fixed_sequence": fixed_sequence,
    "bonferroni": bonferroni,
    "holm": holm,
}
