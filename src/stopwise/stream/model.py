"""Early classification of streams with a certificate: label a series or a text as early as possible.

:class:`EarlyStreamClassifier` wraps a prefix classifier (:mod:`stopwise.stream.prefix`) and a
stopping rule (:mod:`stopwise.stream.rules`), records a trace of every prefix of held-out inputs,
and calibrates the rule twice:

- marginally, by Learn-then-Test (Angelopoulos et al. 2021): P(gap <= ε) >= 1 − δ, the gap being
  the share of inputs whose early label differs from the full-length classifier's;
- conditionally, by Early Time Classification (Ringel, Romano et al. 2024): with probability
  >= 1 − δ, for every stage t the gap among inputs stopped by stage t is <= ε.

``method`` picks which certificate :meth:`~EarlyStreamClassifier.predict` and
:meth:`~EarlyStreamClassifier.stream` use; both are kept in ``certificates_``. Offline prediction
and the online :class:`Stream` run the same :func:`decide_stage` on the rule's online
:class:`~stopwise.Stopper`, so a stream fed chunk by chunk decides exactly as ``predict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import stopwise as sw
from stopwise._errors import CalibrationError, StopwiseError, check_choice, check_open_unit
from stopwise.stream.prefix import PrefixModel, Prepared, StreamBuffer
from stopwise.stream.rules import stream_rule
from stopwise.trace import BoolArray, FloatArray, IntArray

METHODS = ("ltt", "conditional")


def decide_stage(prefixes: PrefixModel, stopper: sw.Stopper, k: int, data: Prepared,
                 last: BoolArray | bool) -> tuple[BoolArray, FloatArray]:
    """One stage for the rows the stopper still runs (``data`` holds exactly those rows): their
    probabilities and which of them stop. Offline prediction and streams both call this."""
    probs = prefixes.stage_probs(k, data)
    batch = sw.StageBatch(index=k, predictions=probs.argmax(axis=1).astype(np.int64), probs=probs)
    return stopper.step(batch, last=last), probs


@dataclass(frozen=True)
class Decision:
    """A stream's state after an update: undecided, or the label with its probabilities, the
    0-based stage it was decided at, how much of the input had been read, and the certificate."""

    decided: bool
    seen: int
    label: Any = None
    probabilities: FloatArray | None = None
    stage: int | None = None
    certificate: sw.Certificate | None = None


@dataclass(frozen=True)
class Decisions:
    """Offline decisions for n inputs: labels, probabilities, stop stages, amount and share read."""

    labels: np.ndarray
    probabilities: FloatArray
    stages: IntArray
    seen: FloatArray
    earliness: FloatArray


class EarlyStreamClassifier:
    """Certified early classification of streams (see the module docstring).

    Args:
        prefixes: a prefix model (:class:`~stopwise.stream.SeriesPrefixes`, fitted by :meth:`fit`,
            or :class:`~stopwise.stream.TextPrefixes`, whose classifier is trained already).
        rule: ``"max_prob"``, ``"margin"``, ``"stability"``, ``"combined"`` or a :class:`~stopwise.Rule`.
        epsilon: the largest gap to the full-length classifier allowed.
        delta: the allowed probability that the certificate is wrong.
        method: ``"ltt"`` (marginal) or ``"conditional"`` (per stopping time); both are calibrated.
        risk: ``"gap"`` (default) or ``"accuracy_drop"`` (needs labels).
        calibration_size: share of :meth:`fit`'s data held out to calibrate.
        seed: the train/calibration split and the conditional method's halves.
    """

    def __init__(self, prefixes: PrefixModel, *, rule: str | sw.Rule = "max_prob", epsilon: float = 0.05,
                 delta: float = 0.1, method: str = "ltt", risk: str = "gap", calibration_size: float = 0.4,
                 stable_stages: int = 1, seed: int = 0) -> None:
        self.prefixes = prefixes
        self.rule = stream_rule(rule, stable_stages=stable_stages)
        self.epsilon = check_open_unit(epsilon, "epsilon", "EarlyStreamClassifier")
        self.delta = check_open_unit(delta, "delta", "EarlyStreamClassifier")
        self.method = check_choice(method, "method", "EarlyStreamClassifier", METHODS)
        self.risk = check_choice(risk, "risk", "EarlyStreamClassifier", ("gap", "accuracy_drop"))
        self.calibration_size = check_open_unit(calibration_size, "calibration_size", "EarlyStreamClassifier")
        self.seed = seed
        self.certificates_: dict[str, sw.Certificate | None] = {}
        self.calibration_errors_: dict[str, str] = {}

    # -- training and calibration --------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> EarlyStreamClassifier:
        """Fit the prefix classifiers on part of (X, y) and calibrate on the rest."""
        n = len(X)
        if len(y) != n:
            raise StopwiseError(f"The 'y' parameter of EarlyStreamClassifier.fit must hold {n} labels. Got {len(y)} instead.")
        perm = np.random.default_rng(self.seed).permutation(n)
        n_cal = int(round(self.calibration_size * n))
        cal, tr = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        fit = getattr(self.prefixes, "fit", None)
        if fit is None:
            raise StopwiseError(f"{type(self.prefixes).__name__} has no fit: train its classifier, then call calibrate.")
        Xa = np.asarray(X) if not isinstance(X, list) else X
        fit(_rows(Xa, tr), np.asarray(y)[tr])
        return self.calibrate(_rows(Xa, cal), np.asarray(y)[cal])

    def record(self, X: Any, y: Any = None) -> sw.Trace:
        """A trace of every prefix of every input (cost: the share of the input read)."""
        p = self.prefixes
        data = p.prepare(X, owner="EarlyStreamClassifier.record")
        counts = p.stage_counts(data)
        probs = np.zeros((len(counts), p.n_stages, p.classes_.size))
        for k in range(p.n_stages):
            rows = np.flatnonzero(counts > k)
            probs[rows, k] = p.stage_probs(k, p.take(data, rows))
        mask = np.arange(p.n_stages)[None, :] < counts[:, None]
        cost = p.stage_costs(data)
        labels = None if y is None else p.encode(y)
        return sw.Trace(predictions=probs.argmax(axis=2).astype(np.int64), probs=probs, mask=mask, cost=cost,
                        labels=labels, meta={"model": f"stream:{type(p).__name__}"})

    def calibrate(self, X: Any, y: Any = None) -> EarlyStreamClassifier:
        """Record held-out inputs and calibrate both ways (see :meth:`calibrate_trace`)."""
        return self.calibrate_trace(self.record(X, y))

    def calibrate_trace(self, trace: sw.Trace) -> EarlyStreamClassifier:
        """Certify the rule marginally (LTT) and conditionally (ETC) on a recorded trace. A method
        the calibration set is too small for is recorded in ``calibration_errors_``; it raises
        only when it is the one ``method`` asks for."""
        self.certificates_, self.calibration_errors_ = {}, {}
        for method in METHODS:
            try:
                self.certificates_[method] = sw.calibrate(trace, self.rule, epsilon=self.epsilon, delta=self.delta,
                                                          risk=self.risk, method=method, seed=self.seed)
            except CalibrationError as exc:
                self.certificates_[method] = None
                self.calibration_errors_[method] = str(exc)
        if self.certificates_[self.method] is None:
            raise CalibrationError(self.calibration_errors_[self.method])
        return self

    @property
    def certificate_(self) -> sw.Certificate:
        """The certificate of ``method`` (the one predictions use)."""
        cert = self.certificates_.get(self.method)
        if cert is None:
            raise StopwiseError("EarlyStreamClassifier is not calibrated: call fit or calibrate first.")
        return cert

    @property
    def classes_(self) -> np.ndarray:
        return self.prefixes.classes_

    # -- prediction ---------------------------------------------------------------------------
    def decide(self, X: Any) -> Decisions:
        """Run the certified rule on whole inputs, stage by stage on the rows still undecided."""
        p, cert = self.prefixes, self.certificate_
        data = p.prepare(X, owner="EarlyStreamClassifier.predict")
        counts = p.stage_counts(data)
        n = len(counts)
        stopper = cert.make_rule().stopper(n)
        stages = np.full(n, -1, dtype=np.int64)
        probs = np.zeros((n, p.classes_.size))
        for k in range(p.n_stages):
            rows = stopper.active
            if rows.size == 0:
                break
            stop, pk = decide_stage(p, stopper, k, p.take(data, rows), counts[rows] - 1 == k)
            stages[rows[stop]] = k
            probs[rows[stop]] = pk[stop]
        seen, share = p.seen(data, stages)
        self.earliness_ = float(share.mean())
        return Decisions(p.classes_[probs.argmax(axis=1)], probs, stages, seen, share)

    def predict(self, X: Any) -> np.ndarray:
        """Early labels of whole inputs; sets ``earliness_`` (mean share read)."""
        return self.decide(X).labels

    def predict_proba(self, X: Any) -> FloatArray:
        """Class probabilities at each input's stopping stage; sets ``earliness_``."""
        return self.decide(X).probabilities

    def stream(self) -> Stream:
        """An online decider for one input arriving in chunks."""
        return Stream(self.prefixes, self.certificate_)


class Stream:
    """One input fed chunk by chunk: :meth:`update` returns an undecided :class:`Decision` until the
    certified rule stops, then the label. Updating a decided stream raises (its answer is final)."""

    def __init__(self, prefixes: PrefixModel, certificate: sw.Certificate) -> None:
        self.prefixes = prefixes
        self.certificate = certificate
        self.buffer: StreamBuffer = prefixes.start_stream()
        self.stopper = certificate.make_rule().stopper(1)
        self.next_stage = 0
        self.last_probs: FloatArray = np.zeros(0)
        self.decision: Decision | None = None

    def update(self, chunk: Any) -> Decision:
        """Add a chunk (points or words) and run every stage it completes."""
        self._check_open()
        self.buffer.add(chunk)
        return self._advance()

    def close(self) -> Decision:
        """The input ended: decide at its last stage if the rule has not stopped before."""
        self._check_open()
        self.buffer.close()
        return self._advance()

    def _check_open(self) -> None:
        if self.decision is not None and self.decision.decided:
            raise StopwiseError(f"This stream decided {self.decision.label!r} at stage {self.decision.stage}; "
                                "it takes no more data. Start a new one with model.stream().")

    def _advance(self) -> Decision:
        final = self.buffer.final_stage()
        while self.next_stage < self.buffer.complete_stages():
            k = self.next_stage
            self.next_stage += 1
            stop, probs = decide_stage(self.prefixes, self.stopper, k, self.buffer.view(), k == final)
            self.last_probs = probs[0]
            if stop[0]:
                return self._decided(k, probs[0])
        if final is not None and self.next_stage == final + 1 and self.next_stage > 0:
            # A text closed right after a whole stage: that stage was its last, where offline
            # prediction stops every row whatever the rule says.
            return self._decided(final, self.last_probs)
        self.decision = Decision(False, self.buffer.amount())
        return self.decision

    def _decided(self, k: int, probs: FloatArray) -> Decision:
        seen = int(self.prefixes.seen(self.buffer.view(), np.array([k]))[0][0])
        label = self.prefixes.classes_[int(probs.argmax())]
        label = label.item() if isinstance(label, np.generic) else label
        self.decision = Decision(True, seen, label, probs, k, self.certificate)
        return self.decision


def _rows(X: Any, rows: IntArray) -> Any:
    if isinstance(X, list):
        return [X[int(i)] for i in rows]
    return X[rows]
