"""stopwise: stop neural computation as soon as the answer is known, with a certificate.

The core (this package's top level) is pure numpy/scipy: traces, stopping rules, calibration and
certificates. Adapters that need torch live in subpackages and are imported on demand.
"""

from __future__ import annotations

from stopwise._errors import CalibrationError, StopwiseError, TraceFormatError
from stopwise._version import __version__
from stopwise.calibrate import calibrate, evaluate, table
from stopwise.certificate import Certificate
from stopwise.controller import RiskController
from stopwise.risks import AccuracyDrop, Gap, LossMatrix, Risk, Selective, make_risk
from stopwise.rules import (
    AllOf,
    AnyOf,
    BetaPosterior,
    Betting,
    Budget,
    Entropy,
    Margin,
    MaxProb,
    MinStage,
    Never,
    Patience,
    Rule,
    Saturation,
    Signal,
    StageThresholds,
    Stopper,
    WindowAgreement,
    make_rule,
    register_rule,
)
from stopwise.trace import NO_ANSWER, StageBatch, Trace, hash_answers

__all__ = [
    "NO_ANSWER", "AccuracyDrop", "AllOf", "AnyOf", "BetaPosterior", "Betting", "Budget",
    "CalibrationError", "Certificate", "Entropy", "Gap", "LossMatrix", "Margin", "MaxProb",
    "MinStage", "Never", "Patience", "Risk", "RiskController", "Rule", "Saturation", "Selective", "Signal",
    "StageBatch", "StageThresholds", "Stopper", "StopwiseError", "Trace", "TraceFormatError",
    "WindowAgreement", "__version__", "calibrate", "evaluate", "hash_answers", "make_risk",
    "make_rule", "register_rule", "table",
]
