"""Plain data passed between backends, the sampler and the recorder (no torch, no httpx)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stopwise.core.errors import StopwiseError


class GenerationCancelled(StopwiseError):
    """A generation was stopped through its ``cancel`` event (``stopwise serve``: the client disconnected)."""


@dataclass(frozen=True)
class Completion:
    """One sampled completion.

    ``logprobs`` are the log-probabilities of the generated tokens under the model (not the
    tempered sampling distribution), when the backend provides them.
    """

    text: str
    n_tokens: int
    logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def confidence(self) -> float:
        """Geometric-mean token probability (1.0 when no logprobs are known)."""
        return token_score(self.logprobs, "geometric") if self.logprobs else 1.0


SCORES = ("mean", "geometric", "min")


def token_score(logprobs: Sequence[float] | None, how: str = "mean") -> float:
    """Confidence from token log-probabilities: mean probability, geometric mean, or minimum.

    DEER (Yang et al. 2025) scores trial answers this way; an empty sequence scores 0.
    """
    if how not in SCORES:
        raise StopwiseError(f"The 'score' parameter must be one of {list(SCORES)}. Got {how!r} instead.")
    values = [float(x) for x in (logprobs or ()) if x is not None and not math.isnan(float(x))]
    if not values:
        return 0.0
    if how == "mean":
        return sum(math.exp(x) for x in values) / len(values)
    if how == "geometric":
        return math.exp(sum(values) / len(values))
    return math.exp(min(values))


def prompt_seed(seed: int, key: str | int) -> int:
    """A 63-bit seed for one prompt, stable across runs and batchings."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
