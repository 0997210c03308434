"""The pieces every decoding loop shares (prefill, token choice, bookkeeping), and the full-model
loop that the others are measured against."""

from __future__ import annotations

import time
from typing import Any

import torch

from stopwise.core.errors import StopwiseError
from stopwise.decoder.backbone import Backbone, State, append_tokens
from stopwise.decoder.heads import ExitHeads
from stopwise.decoder.rows import OnToken, Rows, Stats, pad_block
from stopwise.decoder.verify import sample, tempered_probs


class EngineBase:
    """One backbone and (optionally) its exit heads, with the loop pieces shared by every mode."""

    def __init__(self, backbone: Backbone, heads: ExitHeads | None = None, *, pad_token_id: int = 0) -> None:
        self.bb = backbone
        self.heads = heads
        self.pad = pad_token_id
        self._last_cost = 0.0
        self._costs: dict[tuple[int, int], list[float]] = {}
        # Per head set and probe settings: exit-head acceptance per layer and the probe interval,
        # carried from one speculative call to the next (see speculative()).
        self._memory: dict[tuple[Any, ...], tuple[dict[int, float], int]] = {}
        self.device = backbone.lm_head.weight.device
        # Cost model for choosing an exit layer: fraction of a full step spent by a draft at layer l.
        d, _n = backbone.hidden_size, backbone.n_layers
        self.layer_params = sum(p.numel() for p in backbone.layers[0].parameters())
        self.head_params = backbone.vocab_size * d

    # -- shared pieces ----------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]]) -> tuple[State, torch.Tensor]:
        """Run the (left-padded) prompts through all layers; return state and last-position states."""
        ids, valid = pad_block(prompts, self.pad, self.device)
        state = self.bb.new_state(len(prompts))
        pos = append_tokens(state, valid)
        h = self.bb.run(self.bb.embed(ids, pos), state, start=0, stop=self.bb.n_layers, positions=pos)
        return state, h[:, -1:]

    def _pick(self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        return sample(tempered_probs(logits, temperature), generator=generator)

    def _check_room(self, prompts: list[list[int]], max_new: int, extra: int = 0) -> None:
        limit = self.bb.max_positions
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new + extra > limit:
            raise StopwiseError(
                f"The prompt ({longest} tokens) plus max_new_tokens ({max_new}) exceeds the model's context of "
                f"{limit} positions. Shorten the prompt or lower max_new_tokens."
            )

    # -- full model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def full(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             generator: torch.Generator | None = None, eos: set[int] | None = None, on_token: OnToken | None = None) -> Stats:
        """Plain decoding with every layer (stopping disabled): the reference."""
        self._check_room(prompts, max_new_tokens)
        t0 = time.perf_counter()
        rows = Rows([[] for _ in prompts], [[] for _ in prompts], [False] * len(prompts), max_new_tokens, eos or set(), on_token)
        state, h = self.prefill(prompts)
        stats = Stats(mode="full", new_tokens=[])
        while True:
            nxt = self._pick(self.bb.logits(h)[:, -1], temperature, generator)
            for r in range(len(prompts)):
                rows.commit(r, [int(nxt[r])])
            stats.steps += 1
            if rows.all_done:
                break
            pos = append_tokens(state, torch.ones_like(nxt[:, None]))
            h = self.bb.run(self.bb.embed(nxt[:, None], pos), state, start=0, stop=self.bb.n_layers, positions=pos)
        stats.layers = float(self.bb.n_layers * stats.steps * len(prompts))
        return self._finish(stats, rows, t0)

    def _finish(self, stats: Stats, rows: Rows, t0: float) -> Stats:
        stats.seconds = time.perf_counter() - t0
        stats.new_tokens = [len(o) for o in rows.out]
        stats.extra_outputs = rows.out
        return stats
    def _drop_finished(self, state: State, rows: Rows, alive: list[int]) -> list[int]:
        """Remove finished rows from the batch (cache and mask): later steps run on fewer rows."""
        keep = [b for b, r in enumerate(alive) if not rows.done[r]]
        if keep and len(keep) < len(alive):
            index = torch.tensor(keep, device=self.device)
            state.cache.batch_select_indices(index)
            state.attn = state.attn[index]
            return [alive[b] for b in keep]
        return alive
