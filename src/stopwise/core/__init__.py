"""The numpy-only core of stopwise: traces, stopping rules, risks, calibration and certificates.

It imports numpy and scipy (tqdm and matplotlib lazily), never torch and never an adapter: the
adapters (:mod:`stopwise.encoder`, :mod:`stopwise.decoder`, :mod:`stopwise.sampling`, ...) build
on it. Everything exported here is exported from :mod:`stopwise` too.
"""

from __future__ import annotations

from stopwise.core.calibrate import calibrate, evaluate, table
from stopwise.core.certificate import Certificate
from stopwise.core.controller import RiskController
from stopwise.core.errors import CalibrationError, StopwiseError, TraceFormatError
from stopwise.core.risks import AccuracyDrop, Gap, LossMatrix, Risk, Selective, make_risk
from stopwise.core.rules import (
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
from stopwise.core.trace import NO_ANSWER, StageBatch, Trace, hash_answers

__all__ = [
    "NO_ANSWER", "AccuracyDrop", "AllOf", "AnyOf", "BetaPosterior", "Betting", "Budget",
    "CalibrationError", "Certificate", "Entropy", "Gap", "LossMatrix", "Margin", "MaxProb",
    "MinStage", "Never", "Patience", "Risk", "RiskController", "Rule", "Saturation", "Selective", "Signal",
    "StageBatch", "StageThresholds", "Stopper", "StopwiseError", "Trace", "TraceFormatError",
    "WindowAgreement", "calibrate", "evaluate", "hash_answers", "make_risk",
    "make_rule", "register_rule", "table",
]
