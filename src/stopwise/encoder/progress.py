"""Rows of a running :meth:`~stopwise.encoder.EarlyExitClassifier.predict` call, reported as they
leave: answers handed out as soon as a row exits, and rows of cancelled requests dropped mid-batch.

A server that batches many clients' requests answers each one when *its* rows are done instead of
when the slowest row of the batch is (``on_exit``), and stops computing the rows of a client that
left (``cancelled``). The early-exit loop itself is in :mod:`stopwise.encoder.predict`; this module
holds what it reports and the bookkeeping behind it, used only when one of the callbacks is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError
from stopwise.core.rules.base import Stopper
from stopwise.encoder.batches import Prediction


@dataclass(frozen=True)
class ExitedRows:
    """Rows that left a :meth:`predict` call with their answer: exactly the values that predict
    returns for them (``rows`` are indices into the texts given to predict)."""

    rows: np.ndarray  # (m,) original row indices
    predictions: np.ndarray  # (m,) class ids
    probs: np.ndarray  # (m, C) probabilities of the head that answered
    exit_layer: np.ndarray  # (m,) 1-based layer whose head answered
    cost: np.ndarray  # (m,) layers run, or GFLOPs with cost="flops"

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class CancellablePrediction(Prediction):
    """What :meth:`predict` returns when it was given ``cancelled``: a :class:`Prediction` whose
    rows marked in ``cancelled`` were dropped before they finished and hold no answer (class id
    -1, NaN probabilities, exit layer 0; ``cost`` is what their layers cost until they were dropped)."""

    cancelled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (n,) bool

    @property
    def labels(self) -> list[str]:
        gone = np.flatnonzero(self.cancelled)
        if len(gone):
            raise StopwiseError(f"Rows {gone[:10].tolist()} were cancelled and have no label; read the labels of "
                                "the rows where 'cancelled' is False.")
        return super().labels

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict() if not self.cancelled.any() else {
            "predictions": [None if c else self.class_names[i]
                            for i, c in zip(self.predictions, self.cancelled, strict=True)],
            "class_ids": self.predictions.tolist(),
            "probs": [None if c else np.round(p, 6).tolist() for p, c in zip(self.probs, self.cancelled, strict=True)],
            "exit_layer": self.exit_layer.tolist(), "cost": self.cost.tolist(), "seconds": self.seconds,
        }
        out["cancelled"] = self.cancelled.tolist()
        return out


def drop_stopper_rows(stopper: Stopper, keep: np.ndarray) -> None:
    """Forget the rows of ``stopper`` where ``keep`` is False, as its own step does for rows that
    stop: the rows it still runs keep their state and their order."""
    stopper.state = stopper.rule.select_state(stopper.state, keep)
    stopper.rows = stopper.rows[keep]


class Watch:
    """One predict call's reporting: ``on_exit(ExitedRows)`` as rows leave, and the rows that
    ``cancelled()`` names dropped at the next layer. Costs are those predict returns: ``unit_cost``
    per row is 1 (layers) or one layer's GFLOPs for that row."""

    def __init__(self, n: int, n_classes: int, unit_cost: np.ndarray | None,
                 on_exit: Callable[[ExitedRows], Any] | None, cancelled: Callable[[], Iterable[int]] | None) -> None:
        self.on_exit = on_exit
        self.cancelled_fn = cancelled
        self.unit_cost = unit_cost
        self.n_classes = n_classes
        self.dropped = np.zeros(n, dtype=bool)
        self.layers_run = np.zeros(n, dtype=np.int64)  # of the dropped rows

    def exited(self, rows: np.ndarray, preds: np.ndarray, probs: np.ndarray, exit_layer: int) -> None:
        """Report rows that left at 1-based layer ``exit_layer``; ``preds``/``probs`` are the values
        predict has just written for them."""
        if self.on_exit is None:
            return
        layers = np.full(len(rows), exit_layer, dtype=np.int64)
        cost = layers.astype(np.float64) if self.unit_cost is None else self.unit_cost[rows] * layers
        self.on_exit(ExitedRows(rows=rows.copy(), predictions=preds, probs=probs, exit_layer=layers, cost=cost))

    def keep_mask(self, lives: list[np.ndarray], layers_done: int) -> np.ndarray | None:
        """Which rows of ``lives`` (original indices, concatenated) go on; None when none is
        cancelled. Marks the others dropped after ``layers_done`` layers."""
        if self.cancelled_fn is None:
            return None
        gone = np.fromiter(self.cancelled_fn(), dtype=np.int64)
        if not len(gone):
            return None
        live = lives[0] if len(lives) == 1 else np.concatenate(lives)
        drop = np.isin(live, gone)
        if not drop.any():
            return None
        self.dropped[live[drop]] = True
        self.layers_run[live[drop]] = layers_done
        keep: np.ndarray = ~drop
        return keep

    def finish(self, out: tuple[np.ndarray, np.ndarray, np.ndarray], per_row: np.ndarray) -> None:
        """Mark the dropped rows in predict's outputs: no answer, and the cost of their layers."""
        if not self.dropped.any():
            return
        preds, probs, exit_layer = out
        preds[self.dropped], probs[self.dropped], exit_layer[self.dropped] = -1, np.nan, 0
        runs = self.layers_run[self.dropped].astype(np.float64)
        per_row[self.dropped] = runs if self.unit_cost is None else self.unit_cost[self.dropped] * runs
