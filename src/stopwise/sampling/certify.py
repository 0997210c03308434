"""stopwise's calibrated stop for sampling: certify λ on recorded traces.

Risk "gap" on a sampling trace is "the answer differs from the full-budget (N-sample) majority
vote"; with labels, "accuracy_drop" is "the full vote was right and the early one is wrong".
"""

from __future__ import annotations

from typing import Any

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError
from stopwise.core.rules import Rule
from stopwise.core.trace import Trace
from stopwise.sampling.rules import VoteSettled, register, sampling_rule


def default_family(trace: Trace) -> Rule:
    """The rule family certified by default: :class:`VoteSettled` with the trace's budget."""
    return VoteSettled(budget=trace.n_stages)


def certify(trace: Trace, rule: Rule | str | None = None, *, epsilon: float = 0.05, delta: float = 0.1,
            risk: str = "gap", **kwargs: Any) -> Certificate:
    """Calibrate λ of ``rule`` (default: vote_settled) on a sampling trace; see :func:`stopwise.calibrate`."""
    register()
    if "sample" not in trace.signals:
        raise StopwiseError("This trace has no 'sample' signal: record it with stopwise.sampling (record/convert).")
    if rule is None:
        rule = default_family(trace)
    elif isinstance(rule, str):
        rule = sampling_rule(rule, max_samples=trace.n_stages)
    return calibrate(trace, rule.with_lam(None), epsilon=epsilon, delta=delta, risk=risk, **kwargs)


def split_certify(trace: Trace, rule: Rule | str | None = None, *, cal_fraction: float = 0.5, seed: int = 0,
                  **kwargs: Any) -> tuple[Certificate, dict[str, Any], Trace, Trace]:
    """Certify on a random calibration split and measure on the rest: (certificate, test check, cal, test)."""
    cal, test = trace.split(cal_fraction, seed=seed)
    cert = certify(cal, rule, **kwargs)
    return cert, cert.check(test), cal, test
