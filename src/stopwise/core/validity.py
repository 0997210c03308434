"""Empirical check of the guarantee, the way MAPIE tests risk control.

Repeat many times: draw a calibration set, calibrate, and measure the certified rule's risk on
data the calibration never saw. For LTT the share of repeats whose risk exceeds ε must be at most
δ (plus binomial noise); for CRC the mean risk must be at most ε.

Two sources of "the risk the rule really has":
- ``population``: a large trace from the same distribution (a synthetic process or a big pool);
  its risk stands in for the true risk.
- ``bootstrap`` (:func:`bootstrap_repeats`): a real finite trace is the population. Calibration
  sets are drawn from it with replacement, i.e. i.i.d. from its empirical distribution, so the
  guarantee applies exactly and the true risk is the risk on the whole trace, with no test noise.
- ``split`` (:func:`split_repeats`): calibrate on a random part of a real trace, measure on the
  rest. A diagnostic, stricter than the guarantee: the rest's risk is measured with noise, and that
  noise is anti-correlated with the calibration sample's (the two halves share one finite total: a
  lucky calibration half leaves an unlucky rest). Even a perfectly valid procedure can exceed δ here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.risks import Risk, make_risk
from stopwise.core.rules import Rule, halts_from_z
from stopwise.core.trace import FloatArray, Trace


@dataclass
class ValidityResult:
    repeats: int
    epsilon: float
    delta: float | None
    risks: FloatArray
    certified: FloatArray
    savings: FloatArray
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def violation_rate(self) -> float:
        return float((self.risks > self.epsilon).mean())

    @property
    def allowance(self) -> float:
        """δ plus three binomial standard errors of a rate estimated from ``repeats`` draws."""
        assert self.delta is not None
        return self.delta + 3.0 * float(np.sqrt(self.delta * (1 - self.delta) / self.repeats))

    def summary(self) -> dict[str, Any]:
        return {
            **self.config,
            "repeats": self.repeats,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "violation_rate": self.violation_rate,
            "mean_risk": float(self.risks.mean()),
            "certified_rate": float(self.certified.mean()),
            "mean_savings": float(self.savings.mean()),
        }


def risk_of(cert: Certificate, trace: Trace, risk: Risk) -> float:
    """The certified rule's risk on ``trace`` (selective: among inputs stopped early)."""
    halts = cert.make_rule().halts(trace)
    return _realised(risk.loss_matrix(trace), halts, trace.lengths, selective=risk.selective)


def _realised(loss: np.ndarray, halts: np.ndarray, lengths: np.ndarray, *, selective: bool) -> float:
    """Mean loss at the stages where the rows halt; a selective risk averages over the rows that
    stopped early only (0 when none did)."""
    at_halt = loss[np.arange(len(halts)), halts]
    if selective:
        early = halts < lengths - 1
        return float(at_halt[early].mean()) if early.any() else 0.0
    return float(at_halt.mean())


class _Population:
    """A large trace with the rule's statistic and the loss precomputed, to score many certificates."""

    def __init__(self, trace: Trace, rule: Rule, risk: Risk) -> None:
        self.trace = trace
        self.z = rule.with_lam(None).z(trace)
        self.loss = risk.loss_matrix(trace)
        self.selective = risk.selective

    def risk(self, cert: Certificate) -> float:
        rule = cert.make_rule()
        if cert.certified and cert.thresholds is None:  # one λ: reuse the precomputed statistic
            halts = halts_from_z(self.z, self.trace.lengths, rule.threshold())
        else:
            halts = rule.halts(self.trace)
        return _realised(self.loss, halts, self.trace.lengths, selective=self.selective)


def population_repeats(pool: Trace, population: Trace, rule: Rule, *, n_cal: int, repeats: int, epsilon: float,
                       delta: float = 0.1, risk: str | Risk = "gap", seed: int = 0, replace: bool = False,
                       progress: bool = False, **calibrate_kwargs: Any) -> ValidityResult:
    """Calibrate on ``repeats`` random draws of ``n_cal`` rows of ``pool``; measure on ``population``."""
    from tqdm import tqdm

    risk_obj = make_risk(risk)
    scorer = _Population(population, rule, risk_obj)
    rng = np.random.default_rng(seed)
    risks, certified, savings = np.zeros(repeats), np.zeros(repeats), np.zeros(repeats)
    for r in tqdm(range(repeats), desc="calibrations", disable=not progress):
        rows = rng.integers(0, pool.n, n_cal) if replace else rng.choice(pool.n, n_cal, replace=False)
        cert = calibrate(pool[np.sort(rows)], rule, epsilon=epsilon, delta=delta, risk=risk_obj, seed=r,
                         **calibrate_kwargs)
        risks[r] = scorer.risk(cert)
        certified[r] = cert.certified
        savings[r] = cert.savings
    return ValidityResult(repeats, epsilon, cert.delta, risks, certified, savings,
                          config={"rule": repr(rule), "risk": risk_obj.name, "n_cal": n_cal, **calibrate_kwargs})


def bootstrap_repeats(trace: Trace, rule: Rule, *, n_cal: int, repeats: int, epsilon: float, delta: float = 0.1,
                      risk: str | Risk = "gap", seed: int = 0, progress: bool = False,
                      **calibrate_kwargs: Any) -> ValidityResult:
    """Calibrate on ``repeats`` i.i.d. draws (with replacement) of ``n_cal`` rows of a real trace and
    measure each certificate's risk on the whole trace, which is the true risk under the trace's
    empirical distribution."""
    res = population_repeats(trace, trace, rule, n_cal=n_cal, repeats=repeats, epsilon=epsilon, delta=delta,
                             risk=risk, seed=seed, replace=True, progress=progress, **calibrate_kwargs)
    res.config["mode"] = "bootstrap"
    return res


def split_repeats(trace: Trace, rule: Rule, *, n_cal: int, repeats: int, epsilon: float, delta: float = 0.1,
                  risk: str | Risk = "gap", seed: int = 0, progress: bool = False,
                  **calibrate_kwargs: Any) -> ValidityResult:
    """Calibrate on a random ``n_cal`` rows of a real trace, measure on the rest, ``repeats`` times.

    A diagnostic, stricter than the guarantee (see the module docstring): use
    :func:`bootstrap_repeats` to test validity."""
    from tqdm import tqdm

    risk_obj = make_risk(risk)
    risks, certified, savings = np.zeros(repeats), np.zeros(repeats), np.zeros(repeats)
    for r in tqdm(range(repeats), desc="calibrate/test splits", disable=not progress):
        cal, rest = trace.split(n_cal, seed=seed + r)
        cert = calibrate(cal, rule, epsilon=epsilon, delta=delta, risk=risk_obj, seed=r, **calibrate_kwargs)
        risks[r] = risk_of(cert, rest, risk_obj)
        certified[r] = cert.certified
        savings[r] = cert.savings
    return ValidityResult(repeats, epsilon, cert.delta, risks, certified, savings,
                          config={"rule": repr(rule), "risk": risk_obj.name, "n_cal": n_cal, "mode": "split", **calibrate_kwargs})
