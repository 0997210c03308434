"""Votes over sampled answers, on dense per-question codes (0, 1, ...; NO_ANSWER = -1).

Ties go to the answer that appeared first, so the running vote after k samples depends only on
those k samples (causal) and is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stopwise.core.trace import NO_ANSWER, FloatArray, IntArray


def dense_codes(answers: Sequence[str | None]) -> tuple[IntArray, list[str]]:
    """Per-question codes in order of first appearance, and the answer string of each code."""
    seen: dict[str, int] = {}
    codes = []
    for a in answers:
        if a is None:
            codes.append(NO_ANSWER)
        else:
            codes.append(seen.setdefault(a, len(seen)))
    return np.asarray(codes, dtype=np.int64), list(seen)


def running_votes(codes: IntArray, weights: FloatArray | None = None) -> IntArray:
    """(n, K) winner of the vote over the first k+1 samples of each row (NO_ANSWER if none valid).

    ``codes`` must be dense per row (from :func:`dense_codes`), so the first-appearance order of
    answers is their code order and ties go to the smallest code.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n, k = codes.shape
    # A floor keeps a valid answer with zero confidence countable (it still beats no answer).
    w = np.ones((n, k)) if weights is None else np.maximum(np.asarray(weights, dtype=np.float64), 1e-12)
    n_codes = int(codes.max(initial=-1)) + 1
    out = np.full((n, k), NO_ANSWER, dtype=np.int64)
    if n_codes == 0:
        return out
    tally = np.zeros((n, n_codes))
    rows = np.arange(n)
    for j in range(k):
        valid = codes[:, j] >= 0
        np.add.at(tally, (rows[valid], codes[valid, j]), w[valid, j])
        best = tally.argmax(axis=1)  # argmax takes the first maximum: the earliest answer
        out[:, j] = np.where(tally[rows, best] > 0, best, NO_ANSWER)
    return out


def vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> str | None:
    """The (weighted) majority answer of one question's samples; None if none is valid."""
    codes, names = dense_codes(answers)
    if not names:
        return None
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[None, :]
    winner = int(running_votes(codes[None, :], w)[0, -1])
    return None if winner < 0 else names[winner]
