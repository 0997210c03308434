"""Measuring a rule on traces, with no guarantee: the risk/cost table over a λ grid, a fixed rule's
risk and cost, and the oracle that stops at the earliest stage as good as the last.

Calibration (:mod:`stopwise.core.calibrate`) reads these numbers to choose λ; a certificate
(:mod:`stopwise.core.certificate`) re-measures its rule with :func:`evaluate` on new traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stopwise.core.curves import default_grid, halt_sums
from stopwise.core.risks import Risk, make_risk
from stopwise.core.rules import Rule
from stopwise.core.trace import FloatArray, IntArray, Trace


@dataclass(frozen=True)
class Table:
    """Risk and cost at each λ, ordered from the most conservative λ to the least.

    ``risk`` is in the risk's own units (losses up to ``bound``); ``n_eff`` is the sample size
    behind each risk (n, or the count stopped early for selective risk).
    """

    lam: FloatArray
    t: FloatArray
    risk: FloatArray
    loss_sum: FloatArray
    n_eff: FloatArray
    cost: FloatArray
    mean_stages: FloatArray


def oracle_halts(loss: FloatArray, lengths: IntArray) -> IntArray:
    """Earliest stage whose loss is no worse than the last stage's (for the gap: first agreement)."""
    n = loss.shape[0]
    final = loss[np.arange(n), lengths - 1]
    ok = (loss <= final[:, None] + 1e-12) & (np.arange(loss.shape[1])[None, :] < lengths[:, None])
    return np.asarray(ok.argmax(axis=1), dtype=np.int64)


def table(trace: Trace, rule: Rule, risk: Risk | str = "gap", *, grid: int | FloatArray | None = None,
          loss: FloatArray | None = None, z: FloatArray | None = None) -> Table:
    """The empirical risk/cost curve of ``rule`` on ``trace`` over a λ grid (no guarantee)."""
    risk = make_risk(risk)
    rule = rule.with_lam(None) if not rule.free else rule
    z = rule.z(trace) if z is None else z
    loss = risk.loss_matrix(trace) if loss is None else loss
    if grid is None or isinstance(grid, (int, np.integer)):
        t = default_grid(z, None if grid is None else int(grid), rule.integer)
    else:
        t = np.unique(rule.sign() * np.asarray(grid, dtype=np.float64))
    lengths = trace.lengths
    stages = np.broadcast_to(np.arange(1, trace.n_stages + 1, dtype=np.float64), z.shape)
    values: dict[str, FloatArray] = {"cost": trace.cost_matrix, "stages": stages}
    if risk.selective:
        early = (np.arange(trace.n_stages)[None, :] < (lengths - 1)[:, None]).astype(np.float64)
        values["loss"] = loss * early
        values["n"] = early
    else:
        values["loss"] = loss
    sums = halt_sums(z, lengths, t, values).sums
    order = slice(None, None, -1)  # ascending t -> conservative first
    n_eff = sums["n"] if risk.selective else np.full(t.size, float(trace.n))
    return Table(
        lam=rule.sign() * t[order],
        t=t[order],
        risk=(sums["loss"] / np.maximum(n_eff, 1))[order],
        loss_sum=sums["loss"][order],
        n_eff=n_eff[order],
        cost=(sums["cost"] / trace.n)[order],
        mean_stages=(sums["stages"] / trace.n)[order],
    )


def evaluate(trace: Trace, rule: Rule, *, risk: Risk | str = "gap", lam: float | None = None) -> dict[str, Any]:
    """Risk and cost of a fixed rule on a trace (what ``stopwise check`` reports)."""
    risk = make_risk(risk)
    halts = rule.halts(trace, lam)
    loss = risk.loss_matrix(trace)[np.arange(trace.n), halts]
    if risk.selective:
        early = halts < trace.lengths - 1
        value = float(loss[early].mean()) if early.any() else 0.0
    else:
        value = float(loss.mean())
    oracle = oracle_halts(risk.loss_matrix(trace), trace.lengths)
    full = float(trace.full_cost.mean())
    cost = float(trace.cost_at(halts).mean())
    return {
        "n": trace.n,
        "risk": value,
        "expected_cost": cost,
        "full_cost": full,
        "savings": 1.0 - cost / full if full > 0 else 0.0,
        "mean_stages": float(halts.mean() + 1),
        "oracle_mean_stages": float(oracle.mean() + 1),
        "oracle_cost": float(trace.cost_at(oracle).mean()),
    }
