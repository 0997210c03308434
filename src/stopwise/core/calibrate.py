"""Choose λ on held-out traces so that stopping costs at most ε of quality, and say how sure we are.

Three methods:

- ``"ltt"`` (default): Learn-then-Test (Angelopoulos et al. 2021). Each grid λ gets a p-value for
  H0: risk(λ) > ε; an FWER procedure (fixed-sequence by default) rejects some; the cheapest
  rejected λ is certified with P(risk <= ε) >= 1 - δ.
- ``"crc"``: conformal risk control (Angelopoulos et al. 2022), E[risk] <= ε. Per-input losses
  are made monotone in λ by taking, at each stage, the worst loss of any later stage; that
  upper-bounds the true loss, so the guarantee carries over.
- ``"conditional"``: Early Time Classification's per-stage thresholds (see
  :mod:`stopwise.core.conditional`).
"""

from __future__ import annotations

import numpy as np

from stopwise.core import fwer as _fwer
from stopwise.core import pvalues as _pv
from stopwise.core.certificate import Certificate
from stopwise.core.conditional import calibrate_conditional
from stopwise.core.errors import CalibrationError, check_choice, check_int, check_open_unit
from stopwise.core.issue import issue_certificate
from stopwise.core.measure import Table, evaluate, oracle_halts, table
from stopwise.core.risks import Risk, make_risk
from stopwise.core.rules import Rule, halts_from_z
from stopwise.core.trace import FloatArray, Trace

__all__ = ["METHODS", "MULTIPLE_GRID", "WSR_CHUNK", "WSR_GRID", "Table", "calibrate", "evaluate", "oracle_halts", "table"]

METHODS = ("ltt", "crc", "conditional")
#: Default grid size for Bonferroni and Holm: their δ / m correction punishes large grids.
MULTIPLE_GRID = 100
WSR_GRID = 1000
#: λ values whose WSR p-values are computed together (memory: WSR_CHUNK x n floats).
WSR_CHUNK = 64


def _check_inputs(trace: Trace, epsilon: float, delta: float, risk: Risk, pvalue: str, method: str) -> tuple[float, str]:
    epsilon = check_open_unit(epsilon, "epsilon", "calibrate") if risk.bound == 1.0 else float(epsilon)
    if not 0.0 < epsilon < risk.bound:
        raise CalibrationError(f"The 'epsilon' parameter of calibrate must be in (0, {risk.bound:g}) (the risk's bound). Got {epsilon!r} instead.")
    delta = check_open_unit(delta, "delta", "calibrate")
    pvalue = check_choice(pvalue, "pvalue", "calibrate", ("auto", *_pv.PVALUES))
    if pvalue == "auto":
        pvalue = "binomial" if risk.binary else "hoeffding_bentkus"
    if pvalue == "binomial" and not risk.binary:
        raise CalibrationError(
            f"The exact 'binomial' p-value needs 0/1 losses; the {risk.name!r} risk is not binary. "
            f"Use one of {sorted(set(_pv.PVALUES) - {'binomial'})}."
        )
    if trace.n == 0:
        raise CalibrationError("Cannot calibrate on an empty trace (n = 0).")
    return epsilon, pvalue


def calibrate(
    trace: Trace,
    rule: Rule,
    *,
    epsilon: float,
    delta: float = 0.1,
    risk: Risk | str = "gap",
    method: str = "ltt",
    pvalue: str = "auto",
    fwer: str | None = None,
    grid: int | FloatArray | None = None,
    seed: int = 0,
) -> Certificate:
    """Certify the cheapest λ whose risk is at most ``epsilon``; see the module docstring.

    Args:
        trace: calibration traces, exchangeable with the inputs the rule will see.
        rule: the rule family; its λ (if set) is ignored and calibrated.
        epsilon: the largest acceptable risk, in the risk's units (a fraction for the default).
        delta: the allowed probability that the certificate is wrong (LTT, conditional).
        risk: ``"gap"`` (disagreement with full compute), ``"accuracy_drop"``, ``"selective"``,
            ``"loss"``, or a :class:`~stopwise.risks.Risk`.
        method: ``"ltt"``, ``"crc"`` or ``"conditional"``.
        pvalue: ``"auto"`` (exact binomial for 0/1 losses, else Hoeffding-Bentkus), or one of
            ``"binomial"``, ``"hoeffding"``, ``"bentkus"``, ``"hoeffding_bentkus"``, ``"wsr"``.
        fwer: ``"fixed_sequence"`` (default), ``"bonferroni"`` or ``"holm"`` (default for selective
            risk, whose evidence is weakest at the conservative end where fixed-sequence starts).
        grid: None (default): for fixed-sequence testing every distinct value of the rule's
            statistic (exact: the walk over them is the walk over the whole continuum of λ); for
            Bonferroni / Holm, whose correction grows with the grid, ``MULTIPLE_GRID`` quantiles;
            for WSR, whose p-value needs a pass over the data per λ, ``WSR_GRID`` quantiles.
            An int: at most that many quantiles (faster on huge traces); or explicit λs.
        seed: for WSR's visiting order and the conditional method's split.
    """
    risk = make_risk(risk)
    method = check_choice(method, "method", "calibrate", METHODS)
    if fwer is None:
        fwer = "holm" if risk.selective else "fixed_sequence"
    fwer = check_choice(fwer, "fwer", "calibrate", tuple(_fwer.FWER))
    if isinstance(grid, (int, np.integer)):
        check_int(int(grid), "grid", "calibrate", minimum=1)
    elif grid is None and fwer != "fixed_sequence":
        grid = MULTIPLE_GRID
    elif grid is None and pvalue == "wsr":
        grid = WSR_GRID
    epsilon, pvalue = _check_inputs(trace, epsilon, delta, risk, pvalue, method)
    if method == "conditional":
        return calibrate_conditional(trace, rule, epsilon=epsilon, delta=delta, risk=risk, pvalue=pvalue, grid=grid, seed=seed)
    eps01 = epsilon / risk.bound
    n_min = _pv.min_calibration_size(eps01, delta, pvalue) if method == "ltt" else int(np.ceil(1.0 / eps01 - 1.0))
    if trace.n < n_min:
        what = f"ε = {epsilon:g}, δ = {delta:g} with the {pvalue!r} p-value" if method == "ltt" else f"ε = {epsilon:g} (CRC needs (B) / (n + 1) <= ε)"
        raise CalibrationError(
            f"The calibration set is too small: n = {trace.n}, but certifying anything at {what} "
            f"needs at least n = {n_min} inputs."
        )
    free = rule.with_lam(None)
    z = free.z(trace)
    loss = risk.loss_matrix(trace) / risk.bound
    if method == "crc":
        return _crc(trace, free, risk, loss, z, epsilon, grid, n_min)
    tab = table(trace, free, risk, grid=grid, loss=loss, z=z)
    p = _p_values(trace, free, risk, loss, z, tab, eps01, delta, pvalue, fwer)
    rejected = _fwer.FWER[fwer](p, delta)
    return issue_certificate(
        trace, free, risk, loss, tab, rejected, p, method="ltt", epsilon=epsilon, delta=delta,
        pvalue=pvalue, fwer=fwer, n_min=n_min,
    )


def _p_values(trace: Trace, rule: Rule, risk: Risk, loss: FloatArray, z: FloatArray, tab: Table,
              eps: float, delta: float, pvalue: str, fwer: str) -> FloatArray:
    if pvalue != "wsr":
        return np.asarray(_pv.SUM_PVALUES[pvalue](tab.loss_sum, tab.n_eff, eps), dtype=np.float64)
    # WSR needs each λ's loss vector: go in chunks, and stop early for fixed-sequence.
    p = np.ones(tab.t.size)
    rows = np.arange(trace.n)
    for start in range(0, tab.t.size, WSR_CHUNK):
        ts = tab.t[start : start + WSR_CHUNK]
        halts = np.stack([halts_from_z(z, trace.lengths, t) for t in ts])
        losses = loss[rows[None, :], halts]
        if risk.selective:
            early = halts < trace.lengths[None, :] - 1
            for j in range(ts.size):
                p[start + j] = float(_pv.wsr(losses[j][early[j]], eps, delta))
        else:
            p[start : start + ts.size] = _pv.wsr(losses, eps, delta)
        if fwer == "fixed_sequence" and (p[start : start + ts.size] > delta).any():
            break
    return p


def _crc(trace: Trace, rule: Rule, risk: Risk, loss: FloatArray, z: FloatArray, epsilon: float,
         grid: int | FloatArray | None, n_min: int) -> Certificate:
    mask = trace.mask
    assert mask is not None
    # Monotone upper bound: the worst loss from this stage to the last (suffix max).
    masked = np.where(mask, loss, -np.inf)
    mono = np.maximum.accumulate(masked[:, ::-1], axis=1)[:, ::-1]
    mono = np.where(mask, mono, 0.0)
    tab = table(trace, rule, risk, grid=grid, loss=mono, z=z)
    n = trace.n
    bound_ok = (n * tab.risk + 1.0) / (n + 1.0) <= epsilon / risk.bound
    accepted = _fwer.fixed_sequence(np.where(bound_ok, 0.0, 1.0), 0.5)  # walk while the bound holds
    return issue_certificate(trace, rule, risk, loss, tab, accepted, None, method="crc", epsilon=epsilon,
                        delta=None, pvalue=None, fwer=None, n_min=n_min)
