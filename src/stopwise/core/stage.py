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


def _hash63(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def hash_answers(answers: Iterable[str | None]) -> IntArray:
    """Map answer strings to stable non-negative int64 ids; ``None`` maps to NO_ANSWER."""
    return np.asarray([NO_ANSWER if a is None else _hash63(a.encode("utf-8")) for a in answers], dtype=np.int64)


def hash_rows(*parts: np.ndarray) -> IntArray:
    """One stable 63-bit id per row of the bytes of every part's row (same first axis), in order:
    a recorded input's identity, so that two traces can be checked for shared rows."""
    arrays = [np.ascontiguousarray(p) for p in parts]
    n = arrays[0].shape[0]
    return np.fromiter((_hash63(b"".join(a[i].tobytes() for a in arrays)) for i in range(n)), dtype=np.int64, count=n)


def hashes_digest(hashes: IntArray) -> str:
    """A short digest of a set of row ids (order does not matter): which rows a model saw."""
    return hashlib.sha256(np.sort(np.asarray(hashes, dtype=np.int64)).tobytes()).hexdigest()[:16]


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
