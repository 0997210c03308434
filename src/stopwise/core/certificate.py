"""Certificates: what calibration chose, what it promises, and the evidence, as checkable JSON."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError
from stopwise.core.measure import evaluate
from stopwise.core.risks import Risk, make_risk
from stopwise.core.rules import Never, Rule, StageThresholds, rule_from_config
from stopwise.core.trace import Trace

#: Trace metadata that names the computation; a certificate refuses traces that disagree on any.
IDENTITY_KEYS = ("model", "base_model", "heads", "task_format")

GUARANTEES = {
    "ltt": "P(risk <= epsilon) >= 1 - delta over the draw of the calibration set (Learn-then-Test)",
    "crc": "E[risk] <= epsilon, in expectation over calibration set and test input (conformal risk control)",
    "conditional": (
        "P(for every stage t, risk among inputs stopped by stage t <= epsilon) >= 1 - delta "
        "(Early Time Classification, conditional on halt time)"
    ),
}


@dataclass
class Certificate:
    """The outcome of :func:`stopwise.calibrate`.

    It promises the guarantee in ``guarantee`` for new inputs drawn from the same distribution as
    the calibration traces (exchangeable with them). It promises nothing under distribution shift.
    When ``certified`` is False, no λ passed the test and :meth:`rule` runs full compute.
    """

    rule: dict[str, Any]
    certified: bool
    lam: float | None
    method: str
    risk: dict[str, Any]
    epsilon: float
    delta: float | None
    pvalue: str | None
    fwer: str | None
    n: int
    n_min: int | None
    empirical_risk: float
    risk_upper_bound: float | None
    p_value: float | None
    expected_cost: float
    full_cost: float
    savings: float
    mean_stages: float
    oracle_cost: float
    oracle_mean_stages: float
    n_stages: int
    grid_size: int
    n_certified: int
    data_fingerprint: str
    stopwise_version: str
    thresholds: list[float | None] | None = None
    guarantee: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    #: Per-λ evidence from the calibration run (λ, risk, cost, p-values, accepted); not saved.
    evidence: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    # -- use ---------------------------------------------------------------------------------
    def make_rule(self) -> Rule:
        """The certified rule, or full compute (:class:`Never`) when nothing was certified."""
        if not self.certified:
            return Never()
        base = rule_from_config(self.rule)
        if self.thresholds is not None:
            inf = math.inf * base.sign()
            return StageThresholds(base, thresholds=[inf if t is None else t for t in self.thresholds])
        return base.with_lam(self.lam)

    def ensure_compatible(self, trace: Trace) -> None:
        """Refuse traces from another computation: other stage count, or other model identity."""
        if trace.n_stages != self.n_stages:
            raise StopwiseError(
                f"This certificate was made for traces with {self.n_stages} stages; the trace has "
                f"{trace.n_stages}. It cannot vouch for another model or head set."
            )
        for key in IDENTITY_KEYS:
            mine, theirs = self.source.get(key), trace.meta.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise StopwiseError(
                    f"This certificate was made for {key} = {mine!r}; the trace comes from {theirs!r}."
                )

    def check(self, trace: Trace) -> dict[str, Any]:
        """Re-measure risk and cost of the certified rule on new traces (same risk definition)."""
        self.ensure_compatible(trace)
        result = evaluate(trace, self.make_rule(), risk=self.risk_object())
        result["epsilon"] = self.epsilon
        result["within_epsilon"] = bool(result["risk"] <= self.epsilon)
        return result

    def risk_object(self) -> Risk:
        """The risk the certificate controls, rebuilt from its config."""
        return make_risk(self.risk["name"], **self.risk.get("params", {}))

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _clean({k: v for k, v in asdict(self).items() if k != "evidence"})
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = sorted(k for k in required if k not in data)
        if missing:
            raise StopwiseError(f"Not a stopwise certificate: missing fields {missing}.")
        extra = sorted(set(data) - known)
        if extra:
            warnings.warn(f"Ignoring unknown certificate fields {extra} (written by a newer stopwise?).", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> Certificate:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StopwiseError(f"Not a stopwise certificate (invalid JSON): {exc}") from None
        if not isinstance(data, dict):
            raise StopwiseError("Not a stopwise certificate: the JSON is not an object.")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        path = Path(path)
        if not path.is_file():
            raise StopwiseError(f"Certificate file '{path}' does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StopwiseError(f"'{path}' is not a stopwise certificate (invalid JSON: not UTF-8 text).") from None
        return cls.from_json(text)

    def __str__(self) -> str:
        rule = self.rule.get("name", "?")
        head = f"stopwise certificate ({self.method}, {rule})"
        if not self.certified:
            status = "NOT CERTIFIED: no λ passed; the rule falls back to full compute"
        elif self.thresholds is not None:
            status = f"certified per-stage thresholds {[_fmt(t) for t in self.thresholds]}"
        else:
            status = f"certified λ = {self.lam:.6g}"
        lines = [
            head,
            f"  {status}",
            f"  risk: {self.risk.get('name')} <= ε = {self.epsilon:g}"
            + (f" with probability >= {1 - self.delta:g}" if self.delta is not None and self.method != "crc" else " in expectation"),
            f"  guarantee: {self.guarantee}",
            f"  calibration: n = {self.n}, p-value {self.pvalue}, FWER {self.fwer}, "
            f"{self.n_certified}/{self.grid_size} grid points certified",
            f"  calibration risk {self.empirical_risk:.4g}"
            + (f", upper bound {self.risk_upper_bound:.4g}" if self.risk_upper_bound is not None else "")
            + (f", p = {self.p_value:.3g}" if self.p_value is not None else ""),
            f"  cost: {self.expected_cost:.4g} of {self.full_cost:.4g} (saves {100 * self.savings:.1f}%), "
            f"mean stages {self.mean_stages:.3g} of {self.n_stages}, oracle {self.oracle_mean_stages:.3g}",
            f"  data {self.data_fingerprint}, stopwise {self.stopwise_version}",
            "  valid for new inputs exchangeable with the calibration set; not under distribution shift",
        ]
        return "\n".join(lines)


def _fmt(t: float | None) -> str:
    return "never" if t is None else f"{t:.4g}"


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
