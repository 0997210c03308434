"""Certified early stopping for the Hugging Face ``Trainer``: :class:`StopwiseCallback`.

Example::

    import stopwise as sw
    from stopwise.training.hf import StopwiseCallback

    cert = sw.Certificate.load("eval_loss_cert.json")        # stopwise.training.certify on your own runs
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[StopwiseCallback(certificate=cert, monitor="eval_loss", mode="min")])
    trainer.train()                                            # stops early; the model holds the best weights

    baseline = StopwiseCallback(patience=3, min_delta=1e-3)    # EarlyStoppingCallback's rule, no promise

Each evaluation is one stage of the certificate's learning curves: evaluate exactly as the runs it
was calibrated on were evaluated (same metric, same ``eval_steps``), or its promise does not hold.

Restoring the best weights (what the certificate's regret is measured against):

* ``restore_best="memory"`` (default): a CPU copy of the model's ``state_dict`` is taken at each
  new best evaluation and loaded back at the end of training, whether the run stopped early or
  not. Exact, needs no checkpoints, costs one model's worth of host memory. When the Trainer saves
  a checkpoint, the copy rides along as ``stopwise_best.safetensors`` in it (or, when the best is
  the checkpoint's own weights, a small ``stopwise_best.json`` saying so), so a run resumed from
  ``output_dir/checkpoint-<step>`` restores a best reached before the resume. A checkpoint without
  them (moved elsewhere, or saved by an older version) cannot: the callback then raises at the end
  of training rather than keep the last weights.
* ``restore_best="checkpoint"``: the Trainer's own ``load_best_model_at_end`` restores the best
  saved checkpoint; the callback checks that ``metric_for_best_model`` / ``greater_is_better``
  are the monitored metric and mode and that every evaluation is saved. Survives resuming.
* ``restore_best=False``: keep the last weights (the promise is then about a best you did not keep).

The callback is stateful (``TrainerState.stateful_callbacks``): with
``TrainingArguments(restore_callback_states_from_checkpoint=True)`` a resumed run continues the
same decision. Why it stopped is in :attr:`StopwiseCallback.reason` and logged (logger
``stopwise.training.hf``, INFO; a diverged run at WARNING).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

import stopwise as sw
from stopwise._errors import StopwiseError, check_choice
from stopwise.training.monitor import build_monitor

__all__ = ["StopwiseCallback"]

logger = logging.getLogger(__name__)
RESTORE = ("memory", "checkpoint")
#: Files of the in-memory best inside a Trainer checkpoint folder (restore_best="memory").
BEST_WEIGHTS, BEST_MARKER = "stopwise_best.safetensors", "stopwise_best.json"


class StopwiseCallback(TrainerCallback, ExportableState):
    """A ``transformers.TrainerCallback`` that stops training by a certified (or baseline) rule.

    Args:
        certificate: from :func:`stopwise.training.certify` (or its ``to_dict()``): the rule and λ
            for which restore-best stopping has expected regret <= ε with probability >= 1 - δ over
            the calibration runs (Learn-then-Test, Angelopoulos et al. 2021), for runs of the same
            population evaluated the same way.
        rule, lam: an uncalibrated stopwise rule (or its ``to_config()``) and its λ; no promise.
        patience, min_delta: ``EarlyStoppingCallback(early_stopping_patience, early_stopping_threshold)``
            as a baseline: stop after ``patience`` evaluations without an improvement > ``min_delta``.
        monitor: the key of the metric in the evaluation metrics (e.g. ``"eval_loss"``); with several
            eval datasets, the prefixed key of one of them (``"eval_val_loss"``).
        mode: ``"min"`` when smaller is better, ``"max"`` otherwise.
        check_finite: a NaN or infinite metric stops training at once, saying that the run diverged.
        restore_best: ``"memory"``, ``"checkpoint"`` or False; see the module docstring.
    """

    def __init__(self, *, certificate: sw.Certificate | dict[str, Any] | None = None,
                 rule: sw.Rule | dict[str, Any] | None = None, lam: float | None = None, patience: int | None = None,
                 min_delta: float = 0.0, monitor: str = "eval_loss", mode: Literal["min", "max"] = "min",
                 check_finite: bool = True, restore_best: Literal["memory", "checkpoint", False] = "memory") -> None:
        if restore_best is not False:
            check_choice(restore_best, "restore_best", "StopwiseCallback", RESTORE)
        self.run = build_monitor(certificate=certificate, rule=rule, lam=lam, patience=patience,
                                     min_delta=min_delta, monitor=monitor, mode=mode, check_finite=check_finite,
                                     owner="StopwiseCallback")
        self.monitor, self.mode = monitor, self.run.mode
        self.restore_best = restore_best
        self._args: dict[str, Any] = {
            "certificate": certificate.to_dict() if isinstance(certificate, sw.Certificate) else certificate,
            "rule": rule.to_config() if isinstance(rule, sw.Rule) else rule, "lam": lam, "patience": patience,
            "min_delta": min_delta, "monitor": monitor, "mode": mode, "check_finite": check_finite,
            "restore_best": restore_best}
        self.best_step: int | None = None
        self.stopped_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._training = False
        # (global step, eval-set prefixes) of an evaluation round that has not shown the metric yet.
        self._pending: tuple[int, list[str]] | None = None
        self._last_read: int | None = None

    @property
    def reason(self) -> str:
        """Why training stopped ("" while it runs)."""
        return self.run.reason

    # -- TrainerState.stateful_callbacks --------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Constructor arguments and the monitor's history, JSON-able (HF's ``ExportableState``)."""
        return {"args": dict(self._args),
                "attributes": {"monitor_state": self.run.state_dict(), "best_step": self.best_step,
                               "stopped_step": self.stopped_step}}

    @property
    def monitor_state(self) -> dict[str, Any]:
        """The :class:`RunMonitor` snapshot; assigning one (as HF does on resume) replays it."""
        return self.run.state_dict()

    @monitor_state.setter
    def monitor_state(self, value: dict[str, Any]) -> None:
        self.run.load_state_dict(value)

    # -- Trainer events -----------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._check_args(args)
        if state.global_step == 0:  # a fresh run, not a resumed one
            self.run.reset()
            self.best_step = self.stopped_step = None
            self.best_weights = None
        elif self.restore_best == "memory" and self.best_weights is None and self.best_step is not None:
            self.best_weights = self._load_best(_checkpoint(args, state.global_step), kwargs.get("model"))
        if self.restore_best == "memory" and self.best_weights is None and self.best_step is not None:
            logger.warning("stopwise resumed at step %d with its best so far at step %d, whose weights are not in the "
                           "checkpoint: unless a later evaluation beats it, restoring the best will fail at the end "
                           "(restore_best='checkpoint' survives resuming)", state.global_step, self.best_step)
        self._pending = self._last_read = None
        self._training = True
        if self.run.stopped:  # resumed from a checkpoint taken after the stop: the decision stands
            control.should_training_stop = True
            logger.info("stopwise: the resumed run had already stopped (%s)", self.run.reason)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, model: torch.nn.Module | None = None,
                    **kwargs: Any) -> None:
        # Evaluations outside train() (a final trainer.evaluate()) are not stages of the run.
        if not self._training or metrics is None:
            return
        if self.run.stopped:
            control.should_training_stop = True
            return
        name = self.monitor
        if name not in metrics:
            prefix = _other_eval_set(metrics, name)
            if prefix is not None:
                self._skip(state.global_step, prefix)
                return
            hint = f" (did you mean 'eval_{name}'?)" if f"eval_{name}" in metrics else ""
            raise StopwiseError(f"StopwiseCallback monitors {name!r}, which is not in the evaluation metrics{hint}. "
                                f"Available keys: {sorted(metrics)}.")
        self._pending, self._last_read = None, state.global_step
        value = metrics[name]
        if isinstance(value, torch.Tensor):
            value = float(value.item())
        missing = [a for a in self.run.aux if a not in metrics]
        if missing:
            raise StopwiseError(f"StopwiseCallback's rule reads {missing} beside {name!r}, which the evaluation metrics lack. "
                                f"Available keys: {sorted(metrics)}.")
        aux = {a: _number(metrics[a]) for a in self.run.aux}
        before = self.run.best_stage
        stop = self.run.step(value, aux=aux)
        if self.run.best_stage != before:
            self.best_step = state.global_step
            if self.restore_best == "memory" and model is not None:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if stop:
            self.stopped_step = state.global_step
            control.should_training_stop = True
            diverged = not math.isfinite(float(value))
            logger.log(logging.WARNING if diverged else logging.INFO, "stopwise stopped training at step %d: %s",
                       state.global_step, self.run.reason)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.restore_best != "memory" or self.best_weights is None or self.best_step is None:
            return
        folder = _checkpoint(args, state.global_step)
        if not os.path.isdir(folder):  # a hyperparameter search's run folder: not ours to guess
            logger.warning("stopwise: no checkpoint folder %s to keep the best weights in", folder)
            return
        marker = {"best_step": self.best_step, "in_checkpoint_model": self.best_step == state.global_step}
        if not marker["in_checkpoint_model"]:  # else the checkpoint's own weights are the best: no second copy
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.best_weights.items()}, os.path.join(folder, BEST_WEIGHTS),
                      metadata={"best_step": str(self.best_step)})
        with open(os.path.join(folder, BEST_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, sort_keys=True)

    def _load_best(self, folder: str, model: torch.nn.Module | None) -> dict[str, torch.Tensor] | None:
        """The best weights kept in a checkpoint by :meth:`on_save`, or None when it holds none for this best."""
        try:
            with open(os.path.join(folder, BEST_MARKER), encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return None
        if marker.get("best_step") != self.best_step:
            return None
        if marker.get("in_checkpoint_model"):  # the resumed model was just loaded from this checkpoint
            if model is None:
                return None
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        from safetensors.torch import load_file

        logger.info("stopwise: the best weights of step %d come from %s", self.best_step, folder)
        return load_file(os.path.join(folder, BEST_WEIGHTS))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        self._training = False
        if self._pending is not None:
            self._skip(-1, "")
        if self.restore_best != "memory" or model is None or self.best_step is None:
            return
        if self.best_weights is None:
            raise StopwiseError(f"StopwiseCallback cannot restore the best weights (step {self.best_step}, "
                                f"{self.monitor} = {self.run.best_value:.6g}): they were reached before the "
                                f"run was resumed and the checkpoint holds no {BEST_WEIGHTS} / {BEST_MARKER} for that "
                                "step. Resume from the checkpoint folder the Trainer wrote, or use restore_best='checkpoint'.")
        model.load_state_dict(self.best_weights)
        logger.info("stopwise restored the weights of step %d (%s = %.6g)", self.best_step, self.monitor,
                    self.run.best_value)

    def _skip(self, step: int, prefix: str) -> None:
        if step == self._last_read:  # this round already showed the metric
            return
        if self._pending is not None and self._pending[0] != step:
            raise StopwiseError(f"StopwiseCallback monitors {self.monitor!r}, but the evaluation at step "
                                f"{self._pending[0]} reported only the eval sets {self._pending[1]}: name the metric "
                                f"with its set's prefix (e.g. '{self._pending[1][0]}_loss').")
        self._pending = (step, [*(self._pending[1] if self._pending else []), prefix])

    def _check_args(self, args: TrainingArguments) -> None:
        name, mode = self.monitor, self.run.mode
        best_metric = args.metric_for_best_model
        if best_metric is not None and not best_metric.startswith("eval_"):
            best_metric = f"eval_{best_metric}"
        if args.load_best_model_at_end and (best_metric != name or bool(args.greater_is_better) != (mode == "max")):
            raise StopwiseError(
                f"TrainingArguments has load_best_model_at_end with metric_for_best_model = {best_metric!r} and "
                f"greater_is_better = {args.greater_is_better!r}, but StopwiseCallback monitors {name!r} with mode = "
                f"{mode!r}: the restored checkpoint would not be the best the callback stops on.")
        if self.restore_best != "checkpoint":
            return
        if not args.load_best_model_at_end:
            raise StopwiseError("The 'restore_best' parameter of StopwiseCallback is 'checkpoint', which needs "
                                "TrainingArguments(load_best_model_at_end=True). Got load_best_model_at_end=False instead.")
        save, evaluate = (getattr(x, "value", x) for x in (args.save_strategy, args.eval_strategy))
        same = save == evaluate != "no" and (evaluate != "steps" or args.save_steps == args.eval_steps)
        if not same:
            raise StopwiseError(f"With restore_best='checkpoint' every evaluation must be saved, so that the best one can "
                                f"be restored. Got save_strategy = {args.save_strategy!r}, save_steps = "
                                f"{args.save_steps!r}, eval_strategy = {args.eval_strategy!r}, eval_steps = "
                                f"{args.eval_steps!r} instead.")

    def __repr__(self) -> str:
        return f"StopwiseCallback({self.run!r}, restore_best={self.restore_best!r})"


def _checkpoint(args: TrainingArguments, step: int) -> str:
    # The folder Trainer._save_checkpoint writes outside a hyperparameter search.
    return os.path.join(str(args.output_dir), f"checkpoint-{step}")


def _number(value: Any) -> Any:
    """A metric as a float when HF logged a tensor (RunMonitor checks the rest)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else value


def _other_eval_set(metrics: dict[str, float], name: str) -> str | None:
    # With a dict of eval datasets the Trainer calls on_evaluate once per set, its keys prefixed
    # "eval_<set>_" (each call has "<prefix>_runtime"): a call for another set is not an error,
    # as long as some set of the same round reports the metric (checked by the caller).
    prefixes = [k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")]
    if len(prefixes) == 1 and prefixes[0] != "eval" and not name.startswith(prefixes[0] + "_"):
        return prefixes[0]
    return None
