"""Per-stage thresholds with risk controlled conditionally on halt time.

After Ringel, Romano et al. (2024), "Early Time Classification with Accumulated Accuracy Gap
Control": one marginal λ lets inputs that halt early carry large gaps as long as late ones make up
for it. Here each stage t gets its own threshold λ_t, and the guarantee is, with probability
>= 1 - δ, for every stage t: risk among the inputs halted by stage t <= ε.

Two stages on disjoint halves of the calibration set:
1. screening (first half): walk the stages in order; for stage t walk the grid from conservative
   to aggressive and keep the last λ_t before the first whose p-value on this half, at the
   stricter ``SCREEN_SLACK * ε``, exceeds ``SCREEN_DELTA * δ`` (given the thresholds already
   chosen; thresholds stopping too few inputs are skipped); a stage with none gets "never stop
   here". The slack makes the thresholds likely to pass again on fresh data; it does not affect
   validity, which rests on step 2 alone.
2. testing (second half): fixed-sequence over the opened stages in stage order,
   H_t: "accumulated risk among inputs halted by stage t > ε", p-value on the inputs halted by t.
   At the first failure that stage and all later ones are closed (never stop there). The
   hypotheses and their order depend only on the first half, so fixed-sequence testing controls
   the family-wise error at δ, and closed stages add no inputs to any accumulated set.
"""

from __future__ import annotations

import numpy as np

from stopwise.core import pvalues as _pv
from stopwise.core.certificate import Certificate
from stopwise.core.curves import default_grid
from stopwise.core.errors import CalibrationError
from stopwise.core.issue import issue_certificate
from stopwise.core.measure import Table
from stopwise.core.risks import Risk
from stopwise.core.rules import Rule, StageThresholds
from stopwise.core.trace import FloatArray, IntArray, Trace

#: Screening asks for stronger evidence (risk <= SCREEN_SLACK * ε at level SCREEN_DELTA * δ) on
#: the first half than testing does on the second, so that the chosen thresholds pass there.
SCREEN_SLACK = 0.8
SCREEN_DELTA = 0.2


def _halts(z: FloatArray, lengths: IntArray, t_stage: FloatArray) -> IntArray:
    fires = z >= t_stage[None, :]
    first = fires.argmax(axis=1)
    fired = fires[np.arange(z.shape[0]), first]
    return np.where(fired, first, lengths - 1)


def _accumulated(loss: FloatArray, halts: IntArray, lengths: IntArray, stage: int) -> tuple[float, int]:
    """(loss sum, count) over inputs halted early by ``stage`` (forced last-stage halts excluded)."""
    by = (halts <= stage) & (halts < lengths - 1)
    return float(loss[np.arange(len(halts)), halts][by].sum()), int(by.sum())


def calibrate_conditional(trace: Trace, rule: Rule, *, epsilon: float, delta: float, risk: Risk,
                          pvalue: str, grid: int | FloatArray | None, seed: int) -> Certificate:
    """Per-stage thresholds screened on one half of ``trace`` and tested on the other (see the
    module docstring); :func:`stopwise.calibrate` with ``method="conditional"`` checks the inputs and calls this."""
    free = rule.with_lam(None)
    if trace.n < 4:
        raise CalibrationError(f"The conditional method splits the calibration set in two; n = {trace.n} is too small.")
    eps = epsilon / risk.bound
    n_min = 2 * _pv.min_calibration_size(eps, delta, pvalue)
    if trace.n < n_min:
        raise CalibrationError(
            f"The calibration set is too small: n = {trace.n}, but the conditional method at ε = {epsilon:g}, "
            f"δ = {delta:g} ({pvalue!r} p-value) needs at least n = {n_min} (two halves)."
        )
    z = free.z(trace)
    loss = risk.loss_matrix(trace) / risk.bound
    perm = np.random.default_rng(seed).permutation(trace.n)
    a, b = perm[: trace.n // 2], perm[trace.n // 2 :]
    # The candidates come from half a only, so the tests on half b see a fixed set of hypotheses.
    # Screening loops over stages and candidates: at most 200 keep it fast.
    if grid is None or isinstance(grid, (int, np.integer)):
        grid_t = default_grid(z[a], 200 if grid is None else min(200, int(grid)), free.integer)
    else:
        grid_t = np.unique(free.sign() * np.asarray(grid, dtype=np.float64))
    lengths = trace.lengths
    k = trace.n_stages
    t_stage = np.full(k, np.inf)

    # A stage whose accumulated set is small on half a would likely fail on half b and close
    # every later stage with it: open it only with a comfortable count.
    min_count = 2 * _pv.min_calibration_size(eps, delta, pvalue)

    def accumulated_p(rows: IntArray, stage: int, ts: FloatArray, level: float) -> tuple[float, int]:
        h = _halts(z[rows], lengths[rows], ts)
        s, m = _accumulated(loss[rows], h, lengths[rows], stage)
        if pvalue == "wsr":
            by = (h <= stage) & (h < lengths[rows] - 1)
            return float(_pv.wsr(loss[rows][np.arange(len(rows)), h][by], level, delta)), m
        return float(_pv.SUM_PVALUES[pvalue](np.asarray([s]), m, level)[0]), m

    # 1. screening on half a: per stage, walk from conservative to aggressive and keep the last
    # threshold before the first failure (the first that fails is where risk starts to climb;
    # taking the best of all grid points instead would overfit half a).
    for stage in range(k - 1):
        trial = t_stage.copy()
        for t in grid_t[::-1]:
            trial[stage] = t
            p, m = accumulated_p(a, stage, trial, SCREEN_SLACK * eps)
            if m < min_count:
                continue
            if p > SCREEN_DELTA * delta:
                break
            t_stage[stage] = t
    # 2. fixed-sequence testing on half b over the opened stages, in order.
    for opened_stage in np.flatnonzero(np.isfinite(t_stage)):
        stage = int(opened_stage)
        if accumulated_p(b, stage, t_stage, eps)[0] > delta:
            t_stage[stage:] = np.inf
            break
    thresholds = [None if not np.isfinite(t) else free.lam_from_threshold(t) for t in t_stage]
    final = StageThresholds(free, thresholds=[free.sign() * np.inf if x is None else x for x in thresholds])
    opened = int(np.isfinite(t_stage).sum())
    tab = Table(*(np.zeros(1) for _ in range(7)))  # one "point": the threshold vector
    cert = issue_certificate(
        trace, final, risk, loss, tab, np.array([opened > 0]), None, method="conditional",
        epsilon=epsilon, delta=delta, pvalue=pvalue, fwer="fixed_sequence", n_min=n_min,
        thresholds=thresholds,
    )
    cert.grid_size = int(grid_t.size)
    cert.n_certified = opened
    return cert
