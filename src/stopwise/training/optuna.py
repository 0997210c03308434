"""Trial pruning for Optuna by a stopwise rule: :class:`CertifiedPruner`.

Example::

    import optuna, stopwise as sw
    from stopwise.training.optuna import CertifiedPruner

    cert = sw.Certificate.load("pruning_cert.json")     # calibrated on pruning_trace(...) of past searches
    pruner = CertifiedPruner(certificate=cert, monitor="val_acc")
    study = optuna.create_study(direction="maximize", pruner=pruner)

    def objective(trial):
        for epoch in range(32):
            trial.report(train_and_validate(trial, epoch), step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return best_val_acc

What it promises. A certificate made by calibrating a rule on
:func:`stopwise.training.pruning_trace` of recorded searches with the ``pruned`` loss
(``risk=stopwise.LossMatrix(signal="pruned")``, Learn-then-Test, Angelopoulos et al. 2021)
bounds, with probability >= 1 - δ over those searches, the probability that a run ending within
``within`` of its search's best is pruned by ε: for a new search from the same population, the
configuration that would come out best is pruned with probability at most ε. It holds for curves
exchangeable with the calibration runs: same metric, same evaluations, same kind of search. It
does not cover the sampler's reaction to pruning (a pruned trial changes what is tried next), nor
a study whose objective reports anything else. A regret certificate
(:func:`stopwise.training.certify`) may be given too; it then bounds each trial's regret. With a
plain rule, or :meth:`CertifiedPruner.percentile` (Optuna's ``PercentilePruner`` / the median
stopping rule of Golovin et al. 2017, "Google Vizier", against the study's completed trials),
nothing is promised.

How it decides. Stage k is the trial's k-th reported value (in step order). Every call recomputes
the rule with its offline code (``rule.z`` on the trial's curve, as ``rule.halts`` does), so the
decision depends on the stored intermediate values only: it holds across processes and storages,
and :meth:`CertifiedPruner.replay` reproduces a study's pruning offline. A trial is never pruned
at or after the certificate's last calibrated evaluation (``horizon - 1``): it has finished. A NaN
or infinite value prunes at once (a diverged run) unless ``check_finite=False``, which leaves the
rest of that trial unpruned. Why a trial was pruned is in :attr:`CertifiedPruner.reasons` and
logged to the ``stopwise.training.optuna`` logger (INFO).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

import stopwise as sw
from stopwise._errors import StopwiseError, check_int
from stopwise.training.curves import curves_to_trace
from stopwise.training.monitor import check_one_source, check_source
from stopwise.training.rules import EpochPatience, PercentileStopping

__all__ = ["CertifiedPruner"]

logger = logging.getLogger(__name__)
#: What a learning-curve certificate's source holds (stopwise.training.curves_to_trace).
Mode = Literal["min", "max"]


class CertifiedPruner(BasePruner):
    """An ``optuna.pruners.BasePruner`` that prunes by a certified (or baseline) stopwise rule.

    Args:
        certificate: a learning-curve certificate (see the module docstring for what it promises);
            it fixes the rule, λ and the horizon.
        rule, lam: an uncalibrated stopwise rule and its λ; no promise.
        patience, min_delta: prune after ``patience`` reports without an improvement > ``min_delta``.
        monitor: the name of what the objective reports, checked against the certificate's metric.
        horizon: the number of reports of a full trial (taken from a certificate); none is pruned
            at its last one.
        check_finite: prune a trial at once when it reports a NaN or infinite value.
    """

    def __init__(self, *, certificate: sw.Certificate | None = None, rule: sw.Rule | None = None,
                 lam: float | None = None, patience: int | None = None, min_delta: float = 0.0,
                 monitor: str = "value", horizon: int | None = None, check_finite: bool = True) -> None:
        check_one_source(certificate=certificate, rule=rule, lam=lam, patience=patience, min_delta=min_delta,
                         owner="CertifiedPruner")
        if not isinstance(monitor, str) or not monitor:
            raise StopwiseError(f"The 'monitor' parameter of CertifiedPruner must be a non-empty str. Got {monitor!r} instead.")
        self.monitor = monitor
        self.check_finite = bool(check_finite)
        self.certificate = certificate
        self.horizon = None if horizon is None else check_int(horizon, "horizon", "CertifiedPruner", minimum=1)
        self.reasons: dict[int, str] = {}
        self._percentile: tuple[float, int, int] | None = None
        self.rule: sw.Rule
        if certificate is not None:
            if not isinstance(certificate, sw.Certificate):
                raise StopwiseError(f"The 'certificate' parameter of CertifiedPruner must be a stopwise Certificate. "
                                    f"Got {type(certificate).__name__} instead.")
            # The mode is the study's direction, checked when the pruner first sees the study.
            check_source(certificate, monitor=monitor, mode=None, owner="CertifiedPruner")
            if horizon is not None and horizon != certificate.n_stages:
                raise StopwiseError(f"The 'horizon' parameter of CertifiedPruner must be the certificate's "
                                    f"{certificate.n_stages} evaluations (or None). Got {horizon!r} instead.")
            self.rule = certificate.make_rule()
            self.lam: float | None = self.rule.lam if certificate.certified else math.inf
            self.horizon = int(certificate.n_stages)
        elif rule is not None:
            if not isinstance(rule, sw.Rule):
                raise StopwiseError(f"The 'rule' parameter of CertifiedPruner must be a stopwise Rule. Got {rule!r} instead.")
            self.rule, self.lam = rule, rule.lam if lam is None else float(lam)
            if self.lam is None:
                raise StopwiseError(f"The rule {rule!r} given to CertifiedPruner has no λ: pass lam=... or calibrate it.")
        else:
            assert patience is not None
            self.rule, self.lam = EpochPatience(min_delta=min_delta, lam=patience), float(patience)
            check_int(patience, "patience", "CertifiedPruner", minimum=1)
        aux = list(getattr(self.rule, "aux", ()))
        if aux:
            raise StopwiseError(f"The rule {self.rule.name!r} given to CertifiedPruner reads the metric(s) "
                                f"{aux} beside the objective, but an Optuna trial reports one "
                                "value per step. Fit it without aux metrics (fit_learned_stopping(..., aux=())).")

    @classmethod
    def percentile(cls, percentile: float = 50.0, *, lam: float = 0.0, warmup: int = 0, n_startup_trials: int = 5,
                   monitor: str = "value", horizon: int | None = None, check_finite: bool = True) -> CertifiedPruner:
        """Prune a trial whose best so far trails the ``percentile`` of the study's completed trials
        at the same stage by at least ``lam`` (Optuna's ``PercentilePruner``; 50 is ``MedianPruner``),
        once ``n_startup_trials`` trials have completed. The reference moves with the study, so
        nothing is certified."""
        rule = PercentileStopping(curve=[0.0], warmup=warmup, lam=lam)  # checks warmup and lam
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise StopwiseError(f"The 'percentile' parameter of CertifiedPruner.percentile must be a number in [0, 100]. "
                                f"Got {percentile!r} instead.")
        out = cls(rule=rule, monitor=monitor, horizon=horizon, check_finite=check_finite)
        out._percentile = (float(percentile), rule.warmup, check_int(n_startup_trials, "n_startup_trials",
                                                                     "CertifiedPruner.percentile", minimum=1))
        return out

    # -- deciding ---------------------------------------------------------------------------------
    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        """Optuna's hook: True when ``trial`` should be pruned now (see the module docstring)."""
        mode = self._mode(study)
        values = [trial.intermediate_values[s] for s in sorted(trial.intermediate_values)]
        if not values:
            return False
        reference: list[list[float]] = []
        if self._percentile is not None:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            reference = [[t.intermediate_values[s] for s in sorted(t.intermediate_values)] for t in done]
        stage, reason = self.decide(values, mode=mode, reference=reference)
        if stage is None:
            return False
        if trial.number not in self.reasons:
            self.reasons[trial.number] = reason
            logger.info("stopwise pruned trial %d at step %d: %s", trial.number, sorted(trial.intermediate_values)[stage],
                        reason)
        return True

    def decide(self, values: Sequence[float], *, mode: Mode, reference: Sequence[Sequence[float]] = ()
               ) -> tuple[int | None, str]:
        """The stage at which a trial reporting ``values`` is pruned (None: not yet) and why.

        ``reference`` holds the completed trials' curves (used by :meth:`percentile` only)."""
        arr = np.asarray(values, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(arr))
        finite = arr if bad.size == 0 else arr[: bad[0]]
        last = len(arr) if self.horizon is None else min(len(arr), self.horizon - 1)
        rule = self._rule_for(reference, mode)
        first: int | None = None
        if rule is not None and finite.size and self.lam != math.inf:
            trace = curves_to_trace(finite[None, :], mode=mode, monitor=self.monitor, population="optuna-trial",
                                    bound=float(max(np.ptp(finite), 1.0)))
            fires = np.flatnonzero(rule.z(trace)[0, :last] >= rule.threshold(self.lam))
            first = int(fires[0]) if fires.size else None
        if first is not None:
            best = finite[: first + 1].max() if mode == "max" else finite[: first + 1].min()
            return first, f"{rule!r} fired at report {first} (λ = {self.lam:g}; best {self.monitor} {best:.4g})"
        if bad.size and self.check_finite and bad[0] < last:
            return int(bad[0]), f"{self.monitor} became {arr[bad[0]]} at report {int(bad[0])}: diverged"
        return None, ""

    def replay(self, curves: Sequence[Sequence[float]], *, direction: Literal["minimize", "maximize"]
               ) -> list[int | None]:
        """Offline: the stage at which each trial of a sequential study would be pruned (None:
        completed), trials in the order they ran, each curve as its objective would report it in
        full. Equal to what the live study pruned (tested)."""
        if direction not in ("minimize", "maximize"):
            raise StopwiseError(f"The 'direction' parameter of CertifiedPruner.replay must be 'minimize' or 'maximize'. "
                                f"Got {direction!r} instead.")
        mode: Mode = "min" if direction == "minimize" else "max"
        completed: list[list[float]] = []
        out: list[int | None] = []
        for curve in curves:
            values = [float(v) for v in curve]
            # Rules are causal, so the first stage that prunes the full curve is the first report
            # after which the live study, asking after every report, pruned.
            stage, _ = self.decide(values, mode=mode, reference=completed)
            out.append(stage)
            if stage is None:
                completed.append(values)
        return out

    def _rule_for(self, reference: Sequence[Sequence[float]], mode: Mode) -> sw.Rule | None:
        if self._percentile is None:
            return self.rule
        percentile, warmup, startup = self._percentile
        if len(reference) < startup:
            return None
        width = max(len(r) for r in reference)
        scores = np.full((len(reference), width), np.nan)
        sign = 1.0 if mode == "max" else -1.0
        for i, r in enumerate(reference):
            scores[i, : len(r)] = sign * np.asarray(r, dtype=np.float64)
        scores[~np.isfinite(scores)] = np.nan
        return PercentileStopping.from_runs(scores, percentile=percentile, warmup=warmup, lam=self.lam)

    def _mode(self, study: optuna.study.Study) -> Mode:
        if len(study.directions) != 1:
            raise StopwiseError(f"CertifiedPruner prunes single-objective studies only. Got a study with "
                                f"{len(study.directions)} directions.")
        direction = study.directions[0]
        if direction == StudyDirection.NOT_SET:
            raise StopwiseError("CertifiedPruner needs the study's direction ('minimize' or 'maximize'). Got NOT_SET.")
        mode: Mode = "min" if direction == StudyDirection.MINIMIZE else "max"
        if self.certificate is not None:
            check_source(self.certificate, monitor=self.monitor, mode=mode, owner=f"CertifiedPruner (the study's direction {direction.name.lower()})")
        return mode

    def __repr__(self) -> str:
        what = f"percentile {self._percentile[0]:g} of completed trials" if self._percentile else repr(self.rule)
        return f"CertifiedPruner({what}, lam={self.lam}, monitor={self.monitor!r}, horizon={self.horizon})"

