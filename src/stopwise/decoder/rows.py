"""Bookkeeping of a batched decoding run: each row's output and pending tokens (:class:`Rows`),
what the run did (:class:`Stats`), and left-padding pending tokens into one block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

OnToken = Callable[[int, int], None]  # (row, token id)


@dataclass
class Stats:
    """What a decoding run did."""

    mode: str
    new_tokens: list[int]
    seconds: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    layers: float = 0.0  # decoder layers run per generated token (verification counted in full)
    exit_layers: list[int] = field(default_factory=list)
    exit_layer_trace: list[int] = field(default_factory=list)
    # Speculative steps whose drafts came from the context (prompt lookup), and their tokens.
    lookup_steps: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0
    extra_outputs: list[list[int]] = field(default_factory=list)  # generated token ids per row
    # Early exit: decoder layers each row ran per token it generated (its prompt's prefill counted
    # as the first token's N layers; steps after a row finished are not counted).
    row_layers_per_token: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_second(self) -> float:
        total = sum(self.new_tokens)
        return total / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        total = max(1, sum(self.new_tokens))
        return {
            "mode": self.mode, "new_tokens": self.new_tokens, "seconds": self.seconds, "steps": self.steps,
            "tokens_per_second": self.tokens_per_second, "acceptance_rate": self.acceptance_rate,
            "drafted": self.drafted, "accepted": self.accepted,
            "mean_draft_length": self.drafted / (self.steps - self.lookup_steps) if self.drafted else None,
            "layers_per_token": self.layers / total,
            "exit_layer_histogram": _histogram(self.exit_layers), "exit_layer_trace": self.exit_layer_trace,
            "lookup_steps": self.lookup_steps, "lookup_drafted": self.lookup_drafted,
            "lookup_accepted": self.lookup_accepted,
            **({"row_layers_per_token": self.row_layers_per_token} if self.row_layers_per_token else {}),
        }


def _histogram(values: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


@dataclass
class Rows:
    """Per-row bookkeeping: output so far, pending tokens, done flags."""

    out: list[list[int]]
    pending: list[list[int]]
    done: list[bool]
    max_new: int
    eos: set[int]
    on_token: OnToken | None

    def commit(self, row: int, tokens: list[int]) -> list[int]:
        """Append tokens to a row's output until EOS or the budget; returns what was kept."""
        kept = []
        for t in tokens:
            if self.done[row]:
                break
            self.out[row].append(t)
            kept.append(t)
            if self.on_token is not None:
                self.on_token(row, t)
            # Stop condition 1: end of sequence token.  Stop condition 2: token budget spent.
            if t in self.eos or len(self.out[row]) >= self.max_new:
                self.done[row] = True
        return kept

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def remaining(self) -> int:
        return max(self.max_new - len(o) for o, d in zip(self.out, self.done, strict=False) if not d) if not self.all_done else 0


def pad_block(pending: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad rows of pending tokens into (B, m) ids and validity."""
    m = max(len(p) for p in pending)
    ids = torch.full((len(pending), m), pad, dtype=torch.long, device=device)
    valid = torch.zeros((len(pending), m), dtype=torch.long, device=device)
    for r, p in enumerate(pending):
        if p:
            ids[r, m - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[r, m - len(p):] = 1
    return ids, valid
