"""What "quality lost by stopping" means: a loss per (input, stage), bounded by B.

A risk turns a trace into an (n, K) loss matrix; the loss of stopping input i at stage k is
``loss[i, k]``, and the risk of a rule is the mean loss at the stages where it stops. Selective
risk averages only over inputs the rule answers early.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from stopwise.core.errors import StopwiseError, check_choice
from stopwise.core.trace import FloatArray, Trace


class Risk(ABC):
    """A loss matrix in [0, bound] computed from a trace."""

    name: ClassVar[str] = ""
    #: True when every loss is 0 or ``bound``: the exact binomial p-value applies.
    binary: ClassVar[bool] = True
    #: True when the risk is a mean over the inputs stopped early only.
    selective: ClassVar[bool] = False
    bound: float = 1.0

    @abstractmethod
    def loss_matrix(self, trace: Trace) -> FloatArray:
        """(n, K) losses in [0, bound]."""

    def params(self) -> dict[str, Any]:
        return {}

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params(), "bound": self.bound}

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]


class Gap(Risk):
    """Disagreement with the full-compute prediction: 1{stopped prediction != reference}."""

    name = "gap"

    def loss_matrix(self, trace: Trace) -> FloatArray:
        assert trace.reference is not None
        return np.asarray(trace.predictions != trace.reference[:, None], dtype=np.float64)


def _labels(trace: Trace, who: str) -> np.ndarray:
    if trace.labels is None:
        raise StopwiseError(f"The {who!r} risk needs labels; this trace has none (Trace.labels is None).")
    return trace.labels


class AccuracyDrop(Risk):
    """Accuracy lost against labels: 1{full compute right and stopped prediction wrong}.

    Its mean bounds the accuracy drop (full accuracy minus early accuracy) from above, since
    inputs the early stage gets right and the full model gets wrong only help; being 0/1 it takes
    the exact binomial p-value.
    """

    name = "accuracy_drop"

    def loss_matrix(self, trace: Trace) -> FloatArray:
        y = _labels(trace, self.name)
        assert trace.reference is not None
        full_right = trace.reference == y
        return np.asarray(full_right[:, None] & (trace.predictions != y[:, None]), dtype=np.float64)


class LossMatrix(Risk):
    """A user-supplied loss per (input, stage) in [0, bound], e.g. 1 - ROUGE-L for generation.

    Give the matrix directly (``loss=``) or name a trace signal that holds it (``signal=``).
    """

    name = "loss"
    binary = False

    def __init__(self, *, loss: FloatArray | None = None, signal: str | None = None, bound: float = 1.0) -> None:
        if (loss is None) == (signal is None):
            raise StopwiseError("LossMatrix needs exactly one of 'loss' (an (n, K) array) or 'signal' (a trace signal name).")
        if not isinstance(bound, (int, float)) or not np.isfinite(bound) or bound <= 0:
            raise StopwiseError(f"The 'bound' parameter of LossMatrix must be a positive finite number. Got {bound!r} instead.")
        self.loss = None if loss is None else np.asarray(loss, dtype=np.float64)
        self.signal = signal
        self.bound = float(bound)

    def params(self) -> dict[str, Any]:
        return {"signal": self.signal} if self.signal else {}

    def loss_matrix(self, trace: Trace) -> FloatArray:
        if self.signal is not None:
            if self.signal not in trace.signals:
                raise StopwiseError(f"LossMatrix signal {self.signal!r} is not in the trace (signals: {sorted(trace.signals)}).")
            loss = trace.signals[self.signal]
        else:
            assert self.loss is not None
            loss = self.loss
        if loss.shape != (trace.n, trace.n_stages):
            raise StopwiseError(f"LossMatrix loss must have shape {(trace.n, trace.n_stages)}. Got {loss.shape} instead.")
        assert trace.mask is not None
        live = loss[trace.mask]
        if not np.isfinite(live).all() or live.min(initial=0) < 0 or live.max(initial=0) > self.bound:
            raise StopwiseError(
                f"LossMatrix losses must lie in [0, {self.bound:g}] (the 'bound'). Got values from "
                f"{np.nanmin(live):g} to {np.nanmax(live):g}."
            )
        return np.where(trace.mask, loss, 0.0)


class Selective(Risk):
    """Selective risk: error rate among the inputs the rule stops before their last stage.

    ``against="reference"`` counts disagreement with full compute, ``"labels"`` errors against
    labels. The p-value uses the number of inputs stopped early as its sample size.
    """

    name = "selective"
    selective = True

    def __init__(self, *, against: str = "reference") -> None:
        self.against = check_choice(against, "against", "Selective", ("reference", "labels"))

    def params(self) -> dict[str, Any]:
        return {"against": self.against}

    def loss_matrix(self, trace: Trace) -> FloatArray:
        target = trace.reference if self.against == "reference" else _labels(trace, self.name)
        assert target is not None
        return np.asarray(trace.predictions != target[:, None], dtype=np.float64)


RISKS: dict[str, type[Risk]] = {cls.name: cls for cls in (Gap, AccuracyDrop, LossMatrix, Selective)}


def make_risk(risk: str | Risk, **params: Any) -> Risk:
    if isinstance(risk, Risk):
        return risk
    if risk not in RISKS:
        raise StopwiseError(f"Unknown risk {risk!r}. Known risks: {sorted(RISKS)}.")
    return RISKS[risk](**params)
