"""What one stage shows an online rule (:class:`StageBatch`), answers as ids, and the array types.

Traces (:mod:`stopwise.core.trace`) hold the same things for every stage of n inputs at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: Prediction value for "this stage gave no usable answer" (e.g. unparseable LLM output).
NO_ANSWER = -1

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def hash_answers(answers: Iterable[str | None]) -> IntArray:
    """Map answer strings to stable non-negative int64 ids; ``None`` maps to NO_ANSWER."""
    out = []
    for a in answers:
        if a is None:
            out.append(NO_ANSWER)
        else:
            digest = hashlib.blake2b(a.encode("utf-8"), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class StageBatch:
    """What one stage produced for the rows still running: the online view of a trace column."""

    index: int
    predictions: IntArray
    probs: FloatArray | None = None
    signals: Mapping[str, FloatArray] = field(default_factory=dict)
    cost: FloatArray | None = None

    def __len__(self) -> int:
        return int(self.predictions.shape[0])
