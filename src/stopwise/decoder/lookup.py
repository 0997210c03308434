"""Draft tokens from the context itself (prompt lookup decoding, Saxena 2023; also REST, He et al. 2024).

Small LMs decoding greedily copy spans of the prompt and loop over their own output. When the last
n tokens of a row already occurred earlier in its context, the tokens that followed that earlier
occurrence are a free draft: verifying it costs one forward pass over the drafted positions,
and nothing else is run to make it. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from stopwise.core.errors import StopwiseError


def check_lookup(max_ngram: object, length: object) -> tuple[int, int]:
    """Validate the ``lookup`` (longest n-gram matched, 0 = off) and ``lookup_draft`` options."""
    for name, value, low in (("lookup", max_ngram, 0), ("lookup_draft", length, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StopwiseError(f"The '{name}' parameter of speculative decoding must be an int >= {low}. Got {value!r} instead.")
    return int(max_ngram), int(length)  # type: ignore[call-overload]


def context_draft(context: Sequence[int], *, max_ngram: int, length: int) -> tuple[list[int], int]:
    """(up to ``length`` tokens that followed the latest earlier occurrence of the context's last
    n tokens, n) for the longest n in ``max_ngram..1`` that occurs; ([], 0) when none does.

    Longer n-grams first, because a longer match is more likely to continue the same way; the
    latest occurrence first, because a loop repeats its most recent turn.
    """
    ctx = list(context)
    for n in range(min(max_ngram, len(ctx) - 1), 0, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start : start + n] == tail:
                return ctx[start + n : start + n + length], n
    return [], 0


class Acceptance:
    """Per-token acceptance of context drafts, estimated per match length n.

    Draft tokens are accepted up to the first rejection, so a step that accepted A of its drafts
    saw A acceptances and, if A fell short of the draft, one rejection; counts decay by ``decay``
    per step (a generation drifts in and out of loops). Starts at 1/2 (one of each, a Laplace prior).
    """

    def __init__(self, *, decay: float = 0.8) -> None:
        self.decay = decay
        self.counts: dict[int, list[float]] = {}

    def rate(self, n: int) -> float:
        acc, rej = self.counts.get(n, (0.0, 0.0))
        return (acc + 1.0) / (acc + rej + 2.0)

    def update(self, observed: Sequence[tuple[int, int, int]]) -> None:
        """``observed``: (n, drafted, accepted) per row that drafted this step."""
        for c in self.counts.values():
            c[0] *= self.decay
            c[1] *= self.decay
        for n, drafted, accepted in observed:
            c = self.counts.setdefault(n, [0.0, 0.0])
            c[0] += accepted
            c[1] += float(accepted < drafted)


def best_block(m: int, drafts: Sequence[tuple[int, float]], costs: Sequence[float]) -> int:
    """How many draft positions k to verify in one pass after ``m`` pending positions: the k that
    maximises expected tokens per unit of time, sum over rows of E[tokens | min(k, len), rate]
    over ``costs[m + k - 1]`` (the measured relative time of a block of m + k positions).

    ``drafts``: (draft length, per-token acceptance) per row. A row makes 1 + a + ... + a^j tokens
    in expectation from j drafted tokens accepted up to the first rejection. k may exceed every
    draft when a larger block runs faster (CPU kernels are not monotone in the block size); the
    extra positions hold filler that is never accepted. Returns 0 when drafting does not pay.
    """
    best_k, best_value = 0, -1.0
    for k in range(0, len(costs) - m + 1):
        expected = 0.0
        for length, a in drafts:
            j = min(k, length)
            expected += float(j + 1) if a >= 1.0 else (1.0 - a ** (j + 1)) / (1.0 - a)
        value = expected / costs[m + k - 1]
        if value > best_value + 1e-12:
            best_k, best_value = k, value
    return best_k
