"""Certified early stopping for Lightning: :class:`StopwiseEarlyStopping`.

A drop-in for ``lightning.pytorch.callbacks.EarlyStopping`` (same ``monitor``, ``mode``,
``min_delta``, ``patience``, ``check_finite`` and checkpointed state) whose rule comes from a
certificate::

    import lightning.pytorch as pl
    import stopwise as sw
    from stopwise.training.lightning import StopwiseEarlyStopping

    cert = sw.Certificate.load("val_loss_cert.json")           # stopwise.training.certify on your runs
    stopper = StopwiseEarlyStopping(certificate=cert, monitor="val_loss", mode="min")
    pl.Trainer(max_epochs=100, callbacks=[stopper]).fit(model, data)
    print(stopper.reason)                                        # the model now holds the best weights

    baseline = StopwiseEarlyStopping(patience=3, min_delta=1e-3)  # EarlyStopping's rule, no promise

Each validation run (``on_validation_end`` while fitting, sanity checks skipped) is one stage of
the certificate's learning curves, so validate as the calibration runs were validated.

At each new best validation a CPU copy of the module's ``state_dict`` is kept; at the end of
``fit`` (stopped early or not) it is loaded back into the module: the restore-best weights whose
regret the certificate bounds (``restore_best=False`` keeps the last weights). The copy is part
of the callback's checkpointed state, so resuming with ``ckpt_path`` restores the same best; it
adds one model's size to each checkpoint. Why training stopped is in :attr:`reason`, logged to
the ``stopwise.training.lightning`` logger on rank zero (INFO; a diverged run at WARNING).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

import stopwise as sw
from stopwise._errors import StopwiseError
from stopwise.training.monitor import build_monitor

__all__ = ["StopwiseEarlyStopping"]

logger = logging.getLogger(__name__)
#: What a learning-curve certificate's source holds (stopwise.training.curves_to_trace).


class StopwiseEarlyStopping(Callback):
    """A Lightning ``Callback`` that stops ``fit`` by a certified (or baseline) rule and restores the best.

    Args:
        certificate: from :func:`stopwise.training.certify`: the rule and λ for which restore-best
            stopping has expected regret <= ε with probability >= 1 - δ over the calibration runs
            (Learn-then-Test, Angelopoulos et al. 2021), for runs of the same population.
        rule, lam: an uncalibrated stopwise rule and its λ; no promise.
        patience, min_delta: Lightning's ``EarlyStopping(patience, min_delta)`` as a baseline.
        monitor: the logged metric (a key of ``trainer.callback_metrics``).
        mode: ``"min"`` when smaller is better, ``"max"`` otherwise.
        check_finite: a NaN or infinite metric stops training at once, saying that the run diverged.
        restore_best: load the best validation's weights back at the end of ``fit``.
    """

    def __init__(self, *, certificate: sw.Certificate | None = None, rule: sw.Rule | None = None,
                 lam: float | None = None, patience: int | None = None, min_delta: float = 0.0,
                 monitor: str = "val_loss", mode: Literal["min", "max"] = "min", check_finite: bool = True,
                 restore_best: bool = True) -> None:
        super().__init__()
        self.run = build_monitor(certificate=certificate, rule=rule, lam=lam, patience=patience, min_delta=min_delta,
                                 monitor=monitor, mode=mode, check_finite=check_finite, owner="StopwiseEarlyStopping")
        self.monitor, self.mode = monitor, self.run.mode
        self.restore_best = bool(restore_best)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.stopped_epoch: int | None = None

    @property
    def reason(self) -> str:
        """Why training stopped ("" while it runs)."""
        return self.run.reason

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # -- Lightning hooks --------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking \
                or getattr(trainer, "fast_dev_run", False):
            return
        if self.run.stopped:  # min_epochs / min_steps keep a stopped run going; the decision stands
            trainer.should_stop = True
            return
        logs = trainer.callback_metrics
        if self.monitor not in logs:
            raise StopwiseError(f"StopwiseEarlyStopping monitors {self.monitor!r}, which is not among the logged metrics. "
                                f"Available keys: {sorted(logs)}. Log it with self.log({self.monitor!r}, ...) in "
                                "validation_step or on_validation_epoch_end.")
        current = logs[self.monitor]
        if current.numel() != 1:
            raise StopwiseError(f"StopwiseEarlyStopping monitors {self.monitor!r}, which must be a scalar. Got a tensor of "
                                f"shape {tuple(current.shape)} instead.")
        value = float(current.detach().cpu().item())
        missing = [a for a in self.run.aux if a not in logs]
        if missing:
            raise StopwiseError(f"StopwiseEarlyStopping's rule reads {missing} beside {self.monitor!r}, which are not "
                                f"among the logged metrics. Available keys: {sorted(logs)}.")
        aux = {a: float(logs[a].detach().cpu().item()) for a in self.run.aux}
        before = self.run.best_stage
        stop = self.run.step(value, aux=aux)
        if self.run.best_stage != before:
            self.best_epoch, self.best_step = trainer.current_epoch, trainer.global_step
            if self.restore_best:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        # Any rank that stops stops them all, as in Lightning's EarlyStopping.
        stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            if trainer.is_global_zero:
                level = logging.INFO if math.isfinite(value) else logging.WARNING
                logger.log(level, "stopwise stopped training at epoch %d (step %d): %s", trainer.current_epoch,
                           trainer.global_step, self.run.reason or "another rank stopped")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_best or self.best_weights is None:
            return
        pl_module.load_state_dict(self.best_weights)
        if trainer.is_global_zero:
            logger.info("stopwise restored the weights of epoch %s (step %s, %s = %.6g)", self.best_epoch,
                        self.best_step, self.monitor, self.run.best_value)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.run.state_dict(), "best_weights": self.best_weights, "best_epoch": self.best_epoch,
                "best_step": self.best_step, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "monitor" not in state_dict:
            raise StopwiseError("The 'state_dict' parameter of StopwiseEarlyStopping.load_state_dict must come from "
                                f"its state_dict(). Got keys {sorted(state_dict)} instead.")
        self.run.load_state_dict(state_dict["monitor"])
        self.best_weights = state_dict.get("best_weights")
        self.best_epoch, self.best_step = state_dict.get("best_epoch"), state_dict.get("best_step")
        self.stopped_epoch = state_dict.get("stopped_epoch")

    def __repr__(self) -> str:
        return f"StopwiseEarlyStopping({self.run!r}, restore_best={self.restore_best})"
