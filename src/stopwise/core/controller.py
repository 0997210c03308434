"""A MAPIE-style controller around :func:`stopwise.calibrate`: configure once, calibrate on
traces, then inspect the whole λ grid's evidence (``lambdas_``, ``p_values_``, ``valid_``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_open_unit
from stopwise.core.risks import Risk
from stopwise.core.rules import Rule
from stopwise.core.trace import BoolArray, FloatArray, Trace


class RiskController:
    """Learn-then-Test risk control for one rule family.

    Args:
        rule: the rule whose λ is calibrated.
        risk: the risk to control (name or :class:`~stopwise.risks.Risk`).
        target_level: ε, the largest acceptable risk.
        confidence_level: 1 - δ, the probability that the certificate holds.
        grid: number of candidate λ or explicit λ values.
        fwer: ``"fixed_sequence"``, ``"bonferroni"``, ``"holm"`` (None: the risk's default).
        pvalue: as in :func:`stopwise.calibrate`.
    """

    def __init__(self, rule: Rule, *, risk: str | Risk = "gap", target_level: float, confidence_level: float = 0.9,
                 grid: int | FloatArray = 1000, fwer: str | None = None, pvalue: str = "auto") -> None:
        if not isinstance(rule, Rule):
            raise StopwiseError(f"The 'rule' parameter of RiskController must be a stopwise Rule. Got {rule!r} instead.")
        self.rule = rule
        self.risk = risk
        self.target_level = target_level
        self.confidence_level = check_open_unit(confidence_level, "confidence_level", "RiskController")
        self.grid = grid
        self.fwer = fwer
        self.pvalue = pvalue
        self.certificate_: Certificate | None = None

    def calibrate(self, trace: Trace) -> Certificate:
        cert = calibrate(trace, self.rule, epsilon=self.target_level, delta=1.0 - self.confidence_level,
                         risk=self.risk, pvalue=self.pvalue, fwer=self.fwer, grid=self.grid)
        self.certificate_ = cert
        return cert

    def _evidence(self, key: str) -> Any:
        if self.certificate_ is None or self.certificate_.evidence is None:
            raise StopwiseError("RiskController has not been calibrated yet: call .calibrate(trace) first.")
        return self.certificate_.evidence[key]

    @property
    def lambdas_(self) -> FloatArray:
        """Candidate λ, most conservative first."""
        return np.asarray(self._evidence("lam"))

    @property
    def risks_(self) -> FloatArray:
        return np.asarray(self._evidence("risk"))

    @property
    def p_values_(self) -> FloatArray:
        return np.asarray(self._evidence("p_values"))

    @property
    def valid_(self) -> BoolArray:
        """Which λ the FWER procedure certified."""
        return np.asarray(self._evidence("accepted"), dtype=bool)

    @property
    def valid_lambdas_(self) -> FloatArray:
        return self.lambdas_[self.valid_]
