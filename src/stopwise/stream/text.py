"""Texts read as word streams: stage k holds the first ``words_per_stage * (k + 1)`` words.

The classifier is any function from texts to class probabilities; for the encoder adapter's
MiniLM heads, the full model's: ``lambda texts: clf.predict(texts).probs`` (this module does not
import the encoder: adapters stay independent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stopwise._errors import StopwiseError, check_int
from stopwise.trace import FloatArray, IntArray

_WORDS = Callable[[list[str]], Any]


class TextPrefixes:
    """Texts read word by word: stage k shows the first ``words_per_stage * (k + 1)`` words, for
    ``n_stages`` stages at most; a text's last stage shows all of it (or the first
    ``words_per_stage * n_stages`` words of a longer one). ``predict_proba`` maps a list of texts
    to (n, C) class probabilities, columns in the order of ``classes``."""

    kind = "text"

    def __init__(self, predict_proba: _WORDS, *, classes: Sequence[Any], words_per_stage: int = 16,
                 n_stages: int = 16) -> None:
        if not callable(predict_proba):
            raise StopwiseError(f"The 'predict_proba' parameter of TextPrefixes must be callable. Got {predict_proba!r} instead.")
        self.predict_proba = predict_proba
        self.classes_ = np.asarray(list(classes))
        self.words_per_stage = check_int(words_per_stage, "words_per_stage", "TextPrefixes", minimum=1)
        self.n_stages = check_int(n_stages, "n_stages", "TextPrefixes", minimum=1)
        self.fitted = True

    def encode(self, y: Any) -> IntArray:
        labels = np.asarray(y)
        if np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(self.classes_.dtype, np.integer):
            out: IntArray = labels.astype(np.int64)  # already class indices
            if (out < 0).any() or (out >= self.classes_.size).any():
                raise StopwiseError(f"Label index out of range 0..{self.classes_.size - 1}.")
            return out
        lookup = {c: i for i, c in enumerate(self.classes_.tolist())}
        try:
            return np.asarray([lookup[v] for v in labels.tolist()], dtype=np.int64)
        except KeyError as exc:
            raise StopwiseError(f"Label {exc.args[0]!r} is not one of {self.classes_.tolist()}.") from None

    def prepare(self, X: Any, *, owner: str) -> list[list[str]]:
        if isinstance(X, str) or not isinstance(X, Sequence) or not all(isinstance(t, str) for t in X):
            raise StopwiseError(f"The 'X' parameter of {owner} must be a list of strings. Got {type(X).__name__} instead.")
        words = [t.split() for t in X]
        empty = [i for i, w in enumerate(words) if not w]
        if empty:
            raise StopwiseError(f"The 'X' parameter of {owner} holds an empty text (row {empty[0]}).")
        return words

    def take(self, data: list[list[str]], rows: IntArray) -> list[list[str]]:
        return [data[int(i)] for i in rows]

    def stage_counts(self, data: list[list[str]]) -> IntArray:
        return np.asarray([min(self.n_stages, math.ceil(len(w) / self.words_per_stage)) for w in data], dtype=np.int64)

    def stage_probs(self, k: int, data: list[list[str]]) -> FloatArray:
        end = self.words_per_stage * (k + 1)
        p = np.asarray(self.predict_proba([" ".join(w[:end]) for w in data]), dtype=np.float64)
        if p.shape != (len(data), self.classes_.size):
            raise StopwiseError(f"TextPrefixes: predict_proba returned shape {p.shape}; expected ({len(data)}, {self.classes_.size}).")
        return p

    def seen(self, data: list[list[str]], stages: IntArray) -> tuple[FloatArray, FloatArray]:
        total = np.asarray([len(w) for w in data], dtype=np.float64)
        amount = np.minimum(self.words_per_stage * (stages + 1.0), total)
        return amount, amount / total

    def stage_costs(self, data: list[list[str]]) -> FloatArray:
        """(n, K) share of each text read by each stage (1 beyond a text's last stage)."""
        total = np.asarray([len(w) for w in data], dtype=np.float64)[:, None]
        read = self.words_per_stage * np.arange(1.0, self.n_stages + 1.0)[None, :]
        out: FloatArray = np.minimum(read / total, 1.0)
        return out

    def start_stream(self) -> TextBuffer:
        return TextBuffer(self)


class TextBuffer:
    """Words of one text received so far (chunks are strings); :meth:`close` ends the text."""

    def __init__(self, model: TextPrefixes) -> None:
        self.model = model
        self.words: list[str] = []
        self.closed = False

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, str) or not chunk.split():
            raise StopwiseError(f"The 'chunk' parameter of Stream.update must be a string with at least one word. "
                                f"Got {chunk!r} instead.")
        self.words.extend(chunk.split())

    def complete_stages(self) -> int:
        full = len(self.words) // self.model.words_per_stage
        if self.closed and len(self.words) % self.model.words_per_stage:
            full += 1  # the text's partial last chunk is its last stage
        return min(full, self.model.n_stages)

    def final_stage(self) -> int | None:
        if self.closed:
            return max(self.complete_stages() - 1, 0)
        return self.model.n_stages - 1

    def close(self) -> None:
        if not self.words:
            raise StopwiseError("Stream.close: the text is empty; send at least one word before closing.")
        self.closed = True

    def view(self) -> list[list[str]]:
        return [self.words]

    def amount(self) -> int:
        return len(self.words)
