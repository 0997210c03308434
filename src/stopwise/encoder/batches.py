"""What goes in and out of an :class:`~stopwise.encoder.EarlyExitClassifier`: tokenized texts,
the batches predict runs layer by layer, and the predictions; with the checks on texts and class names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from stopwise.core.errors import StopwiseError


@dataclass(frozen=True)
class Encoded:
    """Token ids per text (no padding), as :meth:`EarlyExitClassifier.tokenize` returns them."""

    ids: list[list[int]]
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Prediction:
    """What :meth:`EarlyExitClassifier.predict` returns, one entry per input row."""

    predictions: np.ndarray  # (n,) class ids
    probs: np.ndarray  # (n, C) probabilities of the head that answered
    exit_layer: np.ndarray  # (n,) 1-based layer whose head answered
    cost: np.ndarray  # (n,) layers run, or GFLOPs with cost="flops"
    class_names: tuple[str, ...]
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.predictions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": self.labels,
            "class_ids": self.predictions.tolist(),
            "probs": np.round(self.probs, 6).tolist(),
            "exit_layer": self.exit_layer.tolist(),
            "cost": self.cost.tolist(),
            "seconds": self.seconds,
        }


#: The rows of a lone row's batch (read only).
LONE_ROW = np.zeros(1, dtype=np.int64)
LONE_ROW.flags.writeable = False


def unpadded_batch(rows: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]:
    """A batch of equally long rows: no padding, and a mask of ones (one tensor call each: per-row
    tensor writes cost more than a head at batch 1)."""
    ids = torch.from_numpy(np.array(seqs, dtype=np.int64))
    return rows, ids, torch.ones(ids.shape, dtype=torch.long), True


def to_numpy(probs: torch.Tensor) -> np.ndarray:
    """Head probabilities as traces hold them (float64)."""
    out: np.ndarray = probs.double().numpy()
    return out


def saturation(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 cosine between each row's pooled state at one layer and at the one before,
    CALM's "saturation" signal (Schuster et al., 2022). Both are cast to float32 first, as
    :meth:`~stopwise.encoder.EarlyExitClassifier.features` stores them, so that the recorded
    signal and the online one are computed from the same values by the same op."""
    return F.cosine_similarity(current.float(), previous.float(), dim=-1)


def running_mean(total: torch.Tensor | None, pooled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the pooled states of layers 1..k + 1, their mean): what an exit reads with
    ``exit_input="mean"``. One function, offline over cached features and online over the live
    rows, so both compute the mean by the same ops in the same order."""
    total = pooled.float() if total is None else total + pooled.float()
    return total, total / float(k + 1)


def check_class_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) < 2:
        raise StopwiseError(f"The 'class_names' parameter must be a list of at least 2 class names. Got {names!r} instead.")
    out = tuple(str(x) for x in names)
    if len(set(out)) != len(out):
        raise StopwiseError(f"The 'class_names' parameter must hold distinct names. Got {list(out)} instead.")
    return out


def check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise StopwiseError("Texts must be a list of strings; got a single string. Wrap it in a list: [text].")
    try:
        items = list(texts)
    except TypeError:
        raise StopwiseError(f"Texts must be a list of strings. Got {type(texts).__name__} instead.") from None
    if not items:
        raise StopwiseError("Texts must be a non-empty list of strings. Got an empty list.")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise StopwiseError(f"Texts must be strings. Row {i} is {type(t).__name__}: {t!r:.60}.")
    empty = [i for i, t in enumerate(items) if not t.strip()]
    if empty:
        raise StopwiseError(f"Texts must not be empty or whitespace only. Rows {empty[:10]} are{' (and more)' if len(empty) > 10 else ''}.")
    return items
