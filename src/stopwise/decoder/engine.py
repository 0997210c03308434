"""Decoding loops on a frozen causal LM: full greedy/sampling, self-speculative, early exit.

All loops share one shape: a batch of rows, each with *pending* tokens that are committed but not
yet fed to the model; a step feeds them, picks the next tokens, and streams what each row commits.

- ``full``: one token per step through all layers (the reference; bit-identical to ``generate``).
- ``speculative`` (LayerSkip, Elhoushi et al. 2024): draft with layers < L and an exit head, verify
  the drafts with layers L..N in one pass that reuses the draft's KV cache for layers < L.
  Greedy output equals full greedy output; sampling uses the min(1, p/q) acceptance so the output
  distribution equals the full model's. Draft length stops adaptively on the draft's confidence
  (SpecDec++, Huang et al. 2024) and the exit layer follows measured acceptance (DEL). Where a
  row's context repeats itself, its draft is copied from the context instead (prompt lookup,
  ``stopwise.decoder.lookup``), which costs no layer at all; the same verification keeps it exact.
- ``early_exit`` (CALM, Schuster et al. 2022): each token leaves at the first candidate layer
  where a stopwise rule fires; skipped layers get K/V from the exited state (state propagation).
  ``schedule`` gives SkipDecode's batch-friendly alternative: one non-increasing exit layer per
  position, shared by the whole batch, so no cache entry is ever missing. ``lams`` gives every row
  its own λ (one prompt decoded at several thresholds in one batch, as calibration does).

The loops live in :mod:`~stopwise.decoder.loop` (shared pieces, ``full``),
:mod:`~stopwise.decoder.self_speculative` (with :mod:`~stopwise.decoder.draft_costs` and
:mod:`~stopwise.decoder.verify`) and :mod:`~stopwise.decoder.early_exit`; :class:`Engine` has them all.
"""

from __future__ import annotations

from stopwise.decoder.early_exit import EarlyExit, skip_schedule
from stopwise.decoder.rows import OnToken, Rows, Stats
from stopwise.decoder.self_speculative import SelfSpeculative

__all__ = ["Engine", "OnToken", "Rows", "Stats", "skip_schedule"]


class Engine(SelfSpeculative, EarlyExit):
    """Decoding loops over one backbone and (optionally) its exit heads."""
