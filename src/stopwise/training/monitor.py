"""Online early stopping for a plain training loop: feed one evaluation at a time.

Example::

    import stopwise as sw
    from stopwise.training import RunMonitor

    cert = sw.Certificate.load("patience_cert.json")        # made by stopwise.training.certify
    monitor = RunMonitor(certificate=cert, monitor="val_acc", mode="max")
    for epoch in range(100):
        train_one_epoch()
        if monitor.step(evaluate()):
            print(monitor.reason)                              # "patience 4 reached at evaluation 12 ..."
            break
    restore_checkpoint(monitor.best_stage)                     # restore-best: the regret is measured here

    baseline = RunMonitor.patience(5, monitor="val_loss")      # uncalibrated, Lightning semantics

Every decision is made by the rule's own online :class:`stopwise.Stopper` on a batch of one row,
so ``step`` stops exactly where the offline ``rule.halts(trace, lam)`` does on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

import stopwise as sw
from stopwise._errors import StopwiseError, check_choice
from stopwise.trace import StageBatch
from stopwise.training.curves import TASK_FORMAT
from stopwise.training.rules import SCORE, EpochPatience

Mode = Literal["min", "max"]
MODES = ("min", "max")

__all__ = ["MODES", "Mode", "RunMonitor", "build_monitor", "check_one_source", "check_source"]


def check_source(certificate: sw.Certificate, *, monitor: str, mode: str | None, owner: str,
                 population: str | None = None) -> None:
    """Refuse a certificate not made on learning curves, or on another metric, orientation or population."""
    src = certificate.source
    if src.get("task_format") != TASK_FORMAT or "monitor" not in src or "mode" not in src:
        raise StopwiseError(f"The certificate given to {owner} was not calibrated on learning curves (its source has "
                            f"task_format = {src.get('task_format')!r}, monitor = {src.get('monitor')!r}, mode = "
                            f"{src.get('mode')!r}). Calibrate with stopwise.training.certify.")
    for key, given in (("monitor", monitor), ("mode", mode), ("population", population)):
        mine = certificate.source.get("model" if key == "population" else key)
        if given is not None and mine is not None and mine != given:
            raise StopwiseError(
                f"The certificate was calibrated with {key} = {mine!r}, but {owner} was given {key} = {given!r}. "
                "A certificate vouches only for the metric and direction it was calibrated on."
            )


class RunMonitor:
    """Online early stopping for one training run: feed one evaluation at a time.

    Args:
        certificate: a certificate from :func:`stopwise.training.certify`; it fixes the rule, λ
            and the number of evaluations it was calibrated on (the run stops at the last).
        rule: an uncalibrated rule instead (its own λ, or ``lam``).
        lam: λ for ``rule`` (ignored with a certificate).
        monitor: the metric's name, checked against the certificate's.
        mode: ``"min"`` when smaller is better (losses), ``"max"`` otherwise.
        check_finite: stop at once, saying so, on a NaN or infinite value (a diverged run).
        population: when given, must be the population the certificate was calibrated on.
    """

    def __init__(self, *, certificate: sw.Certificate | None = None, rule: sw.Rule | None = None,
                 lam: float | None = None, monitor: str = "val_loss", mode: Mode = "min",
                 check_finite: bool = True, population: str | None = None) -> None:
        if (certificate is None) == (rule is None):
            raise StopwiseError("RunMonitor takes exactly one of 'certificate' (calibrated) or 'rule' (uncalibrated). "
                                f"Got certificate={certificate!r:.40} and rule={rule!r}.")
        if not isinstance(monitor, str) or not monitor:
            raise StopwiseError(f"The 'monitor' parameter of RunMonitor must be a non-empty str. Got {monitor!r} instead.")
        self.mode: Mode = check_choice(mode, "mode", "RunMonitor", MODES)  # type: ignore[assignment]
        self.monitor = monitor
        self.check_finite = bool(check_finite)
        self.horizon: int | None = None
        if certificate is not None:
            check_source(certificate, monitor=monitor, mode=self.mode, owner="RunMonitor", population=population)
            self.rule = certificate.make_rule()
            self.lam: float | None = self.rule.lam if certificate.certified else math.inf
            self.horizon = int(certificate.n_stages)
        else:
            assert rule is not None
            if not isinstance(rule, sw.Rule):
                raise StopwiseError(f"The 'rule' parameter of RunMonitor must be a stopwise Rule. Got {rule!r} instead.")
            self.rule = rule
            self.lam = rule.lam if lam is None else float(lam)
            if self.lam is None:
                raise StopwiseError(f"The rule {rule!r} given to RunMonitor has no λ: pass lam=... or calibrate it.")
        self.reset()

    @classmethod
    def patience(cls, patience: int, *, min_delta: float = 0.0, monitor: str = "val_loss",
                 mode: Mode = "min", check_finite: bool = True) -> RunMonitor:
        """Uncalibrated Lightning / Keras ``EarlyStopping(patience, min_delta)``: no promise."""
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise StopwiseError(f"The 'patience' parameter of RunMonitor.patience must be an int >= 1. Got {patience!r} instead.")
        return cls(rule=EpochPatience(min_delta=min_delta, lam=patience), monitor=monitor, mode=mode,
                   check_finite=check_finite)

    def reset(self) -> None:
        """Forget the run: the next :meth:`step` is evaluation 0 again."""
        self.stopped = False
        self.stage = 0
        self.best_value = math.nan
        self.best_stage = -1
        self.reason = ""
        self.history: list[float] = []
        self.aux_history: dict[str, list[float]] = {name: [] for name in self.aux}
        self._stopper = self.rule.stopper(n=1, lam=self.lam) if self.lam != math.inf else None

    @property
    def aux(self) -> list[str]:
        """The other metrics the rule reads beside the monitored one (``RunMonitor.step``'s ``aux``)."""
        return list(getattr(self.rule, "aux", []))

    def step(self, value: float, *, aux: Mapping[str, float] | None = None) -> bool:
        """Fold in the next evaluation of the metric; True once the run should stop.

        ``aux`` gives this evaluation's other metrics that the rule reads (:attr:`aux`, e.g.
        ``{"val_loss": 0.31}`` for a :class:`~stopwise.training.LearnedStopping` fitted with them).
        After a stop further calls change nothing and return True."""
        if self.stopped:
            return True
        if not _is_number(value):
            raise StopwiseError(f"The 'value' parameter of RunMonitor.step must be a number. Got {value!r} instead.")
        extra = self._aux_values(aux)
        value = float(value)
        k = self.stage
        self.history.append(value)
        for name, v in extra.items():
            self.aux_history[name].append(v)
        self.stage += 1
        if not math.isfinite(value):
            if self.check_finite:
                return self._stop(f"{self.monitor} became {value} at evaluation {k}: diverged")
            return self._decide_nonfinite(k)
        score = value if self.mode == "max" else -value
        if self.best_stage < 0 or score > self._best_score():
            self.best_value, self.best_stage = value, k
        last = self.horizon is not None and k >= self.horizon - 1
        if self._stopper is None:
            return self._stop(self._horizon_reason(k)) if last else False
        if not all(math.isfinite(v) for v in extra.values()):
            bad = next(name for name, v in extra.items() if not math.isfinite(v))
            if self.check_finite:
                return self._stop(f"{bad} became {extra[bad]} at evaluation {k}: diverged")
            return self._decide_nonfinite(k)
        signals = {SCORE: np.array([score]), **{name: np.array([v]) for name, v in extra.items()}}
        batch = StageBatch(index=k, predictions=np.zeros(1, dtype=np.int64), signals=signals)
        fired = bool(self._stopper.step(batch)[0])
        if fired:
            return self._stop(self._fired_reason(k))
        if last:
            return self._stop(self._horizon_reason(k))
        return False

    def _aux_values(self, aux: Mapping[str, float] | None) -> dict[str, float]:
        need = self.aux
        given = {} if aux is None else aux
        if not isinstance(given, Mapping):
            raise StopwiseError(f"The 'aux' parameter of RunMonitor.step must be a mapping of metric name to value. "
                                f"Got {type(aux).__name__} instead.")
        missing = [name for name in need if name not in given]
        if missing:
            raise StopwiseError(f"The rule {self.rule.name!r} reads the metric(s) {missing} beside {self.monitor!r}: pass "
                                f"them as RunMonitor.step(value, aux={{...}}). Got aux keys {sorted(given)}.")
        out = {}
        for name in need:
            v = given[name]
            if not _is_number(v):
                raise StopwiseError(f"The aux metric {name!r} given to RunMonitor.step must be a number. Got {v!r} instead.")
            out[name] = float(v)
        return out

    def _decide_nonfinite(self, k: int) -> bool:
        # With the check off a NaN is a stage that tells the rule nothing: it keeps training until
        # the horizon, and the stopper (which cannot fold in NaN) is left at the stage before.
        self._stopper = None
        if self.horizon is not None and k >= self.horizon - 1:
            return self._stop(self._horizon_reason(k))
        return False

    def _best_score(self) -> float:
        return self.best_value if self.mode == "max" else -self.best_value

    def _stop(self, reason: str) -> bool:
        self.stopped = True
        self.reason = reason
        return True

    def _best_text(self) -> str:
        return f"best {self.best_value:.4g} at evaluation {self.best_stage}" if self.best_stage >= 0 else "no finite value yet"

    def _fired_reason(self, k: int) -> str:
        rule = self.rule
        if isinstance(rule, EpochPatience):
            what = f"patience {self.lam:g}" if self.lam is not None else "patience"
            return f"{what} reached at evaluation {k} ({self._best_text()})"
        return f"{rule.name or type(rule).__name__} fired at evaluation {k} (λ = {self.lam:g}; {self._best_text()})"

    def _horizon_reason(self, k: int) -> str:
        note = "; the certificate certified no early stop" if self.lam == math.inf else ""
        return f"reached the last of the {self.horizon} calibrated evaluations at evaluation {k} ({self._best_text()}{note})"

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (the values seen so far); :meth:`load_state_dict` replays them."""
        return {"monitor": self.monitor, "mode": self.mode, "rule": self.rule.to_config(),
                "lam": None if self.lam is None else _json_float(self.lam),
                "history": [_json_float(v) for v in self.history], "stopped": self.stopped, "reason": self.reason,
                **({"aux_history": {k: [_json_float(v) for v in vs] for k, vs in self.aux_history.items()}}
                   if self.aux else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot taken by :meth:`state_dict` on a monitor built the same way."""
        if not isinstance(state, dict) or "history" not in state:
            raise StopwiseError(f"The 'state' parameter of RunMonitor.load_state_dict must be a dict from state_dict(). "
                                f"Got {type(state).__name__} instead.")
        lam = None if self.lam is None else _json_float(self.lam)
        for key, mine in (("monitor", self.monitor), ("mode", self.mode), ("rule", self.rule.to_config()),
                          ("lam", lam)):
            if key in state and state[key] != mine:
                raise StopwiseError(f"The saved monitor state has {key} = {state[key]!r}, but this RunMonitor has "
                                    f"{key} = {mine!r}: build the monitor as it was when saved.")
        self.reset()
        saved_aux = state.get("aux_history", {})
        if any(len(saved_aux.get(name, ())) != len(state["history"]) for name in self.aux):
            raise StopwiseError(f"The saved monitor state lacks the history of the aux metric(s) {self.aux} that the "
                                "rule reads; it was saved by another rule.")
        # Replaying the values through step() rebuilds the stopper's state with the same code.
        for i, v in enumerate(state["history"]):
            self.step(float(v), aux={name: float(saved_aux[name][i]) for name in self.aux} if self.aux else None)
        if bool(state.get("stopped", False)) != self.stopped:
            raise StopwiseError("The saved monitor state does not replay to the same decision; it was saved by "
                                "another rule or version.")

    def __repr__(self) -> str:
        status = f"stopped: {self.reason}" if self.stopped else "running"
        return f"RunMonitor({self.rule!r}, monitor={self.monitor!r}, mode={self.mode!r}, stage={self.stage}, {status})"


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def check_one_source(*, certificate: Any, rule: Any, lam: float | None, patience: int | None, min_delta: float,
                     owner: str) -> str:
    """Which of 'certificate', 'rule' or 'patience' a stopping callback was given (exactly one), with
    ``lam`` only beside a rule and ``min_delta`` only beside a patience."""
    given = [name for name, v in (("certificate", certificate), ("rule", rule), ("patience", patience)) if v is not None]
    if len(given) != 1:
        raise StopwiseError(f"{owner} takes exactly one of 'certificate' (calibrated), 'rule' (with its λ or 'lam') "
                            f"or 'patience' (the uncalibrated baseline). Got {given or 'none'}.")
    if lam is not None and rule is None:
        raise StopwiseError(f"The 'lam' parameter of {owner} applies to 'rule' only (a certificate fixes its λ, "
                            f"'patience' is its own). Got lam={lam!r} with {given[0]}.")
    if min_delta != 0.0 and patience is None:
        raise StopwiseError(f"The 'min_delta' parameter of {owner} applies to 'patience' only (a rule carries its own). "
                            f"Got min_delta={min_delta!r} with {given[0]}.")
    return given[0]


def build_monitor(*, certificate: sw.Certificate | dict[str, Any] | None, rule: sw.Rule | dict[str, Any] | None,
                  lam: float | None, patience: int | None, min_delta: float, monitor: str, mode: str,
                  check_finite: bool, owner: str) -> RunMonitor:
    """The :class:`RunMonitor` for exactly one of a certificate, a rule (+ λ) or a patience."""
    check_one_source(certificate=certificate, rule=rule, lam=lam, patience=patience, min_delta=min_delta, owner=owner)
    mode_ = check_choice(mode, "mode", owner, ("min", "max"))
    if certificate is not None:
        cert = sw.Certificate.from_dict(certificate) if isinstance(certificate, dict) else certificate
        if not isinstance(cert, sw.Certificate):
            raise StopwiseError(f"The 'certificate' parameter of {owner} must be a stopwise Certificate. "
                                f"Got {type(certificate).__name__} instead.")
        check_source(cert, monitor=monitor, mode=mode_, owner=owner)
        return RunMonitor(certificate=cert, monitor=monitor, mode=mode_,  # type: ignore[arg-type]
                          check_finite=check_finite)
    if rule is not None:
        obj = sw.make_rule(rule["name"], lam=rule.get("lam"), **rule.get("params", {})) if isinstance(rule, dict) else rule
        # The λ rides on the rule, so that the monitor's reasons name it.
        obj = obj if lam is None or not isinstance(obj, sw.Rule) else obj.with_lam(lam)
        return RunMonitor(rule=obj, monitor=monitor, mode=mode_, check_finite=check_finite)  # type: ignore[arg-type]
    assert patience is not None
    return RunMonitor.patience(patience, min_delta=min_delta, monitor=monitor, mode=mode_,  # type: ignore[arg-type]
                               check_finite=check_finite)
