"""Issuing a certificate: from the λ values a calibration method accepted to the measured
:class:`~stopwise.core.certificate.Certificate` (cheapest accepted λ, its risk, cost and evidence).

Calibration methods (:mod:`stopwise.core.calibrate`, :mod:`stopwise.core.conditional`) call
:func:`issue_certificate`; certificates themselves only describe and check.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np

from stopwise._version import __version__
from stopwise.core import pvalues as _pv
from stopwise.core.certificate import GUARANTEES, Certificate
from stopwise.core.measure import Table, oracle_halts
from stopwise.core.risks import Risk
from stopwise.core.rules import Never, Rule
from stopwise.core.trace import FloatArray, Trace


def issue_certificate(trace: Trace, rule: Rule, risk: Risk, loss: FloatArray, tab: Table, accepted: np.ndarray,
                      p: FloatArray | None, *, method: str, epsilon: float, delta: float | None,
                      pvalue: str | None, fwer: str | None, n_min: int | None,
                      thresholds: list[float | None] | None = None) -> Certificate:
    """Pick the cheapest accepted λ and measure everything the certificate reports."""
    oracle = oracle_halts(loss, trace.lengths)
    full = float(trace.full_cost.mean())
    certified = bool(accepted.any())
    if thresholds is not None:
        final_rule = rule
        lam, p_at, j = None, None, None
    elif certified:
        idx = np.flatnonzero(accepted)
        j = int(idx[np.argmin(tab.cost[idx])])
        lam = float(tab.lam[j])
        final_rule = rule.with_lam(lam)
        p_at = None if p is None else float(p[j])
    else:
        final_rule, lam, p_at, j = Never(), None, None, None
    halts = final_rule.halts(trace)
    at = loss[np.arange(trace.n), halts] * risk.bound
    early = halts < trace.lengths - 1
    if risk.selective:
        n_eff = int(early.sum())
        emp = float(at[early].mean()) if n_eff else 0.0
    else:
        n_eff, emp = trace.n, float(at.mean())
    ub = None
    if pvalue is not None and delta is not None and j is not None:
        raw = at[early] if risk.selective else at
        ub = risk.bound * _pv.upper_bound(float(raw.sum() / risk.bound), n_eff, delta, pvalue, raw / risk.bound)
    cost = float(trace.cost_at(halts).mean())
    evidence = {"lam": tab.lam, "risk": tab.risk, "cost": tab.cost, "n_eff": tab.n_eff,
                "p_values": p, "accepted": accepted}
    return Certificate(
        rule=rule.with_lam(None).to_config() if thresholds is None else rule.to_config()["params"]["rule"],
        certified=certified,
        lam=lam,
        method=method,
        risk=risk.to_config(),
        epsilon=epsilon,
        delta=delta,
        pvalue=pvalue,
        fwer=fwer,
        n=trace.n,
        n_min=n_min,
        empirical_risk=emp,
        risk_upper_bound=ub,
        p_value=p_at,
        expected_cost=cost,
        full_cost=full,
        savings=1.0 - cost / full if full > 0 else 0.0,
        mean_stages=float(halts.mean() + 1),
        oracle_cost=float(trace.cost_at(oracle).mean()),
        oracle_mean_stages=float(oracle.mean() + 1),
        n_stages=trace.n_stages,
        grid_size=int(tab.t.size),
        n_certified=int(accepted.sum()),
        data_fingerprint=trace.fingerprint(),
        stopwise_version=__version__,
        thresholds=thresholds,
        guarantee=GUARANTEES[method],
        source={k: v for k, v in trace.meta.items() if isinstance(v, (str, int, float, bool))},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        evidence=None if thresholds is not None else evidence,
    )
