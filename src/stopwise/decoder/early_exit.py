"""Early-exit decoding: CALM (Schuster et al. 2022), each token leaving at the first candidate
layer where a stopwise rule fires, skipped layers filled by state propagation; and SkipDecode's
batch-friendly schedule (one non-increasing exit layer per position, shared by the batch)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stopwise.core.errors import StopwiseError
from stopwise.core.rules import Stopper
from stopwise.decoder.backbone import State, append_tokens
from stopwise.decoder.loop import EngineBase
from stopwise.decoder.rows import OnToken, Rows, Stats


class EarlyExit(EngineBase):
    """The ``early_exit`` decoding loop; see the module docstring."""

    @torch.inference_mode()
    def early_exit(self, prompts: list[list[int]], *, max_new_tokens: int, rule: Any = None,
                   exit_layers: list[int] | None = None, schedule: list[int] | None = None, temperature: float = 0.0,
                   generator: torch.Generator | None = None, eos: set[int] | None = None,
                   on_token: OnToken | None = None, lams: Sequence[float | None] | None = None) -> Stats:
        """CALM early-exit decoding with ``rule`` (a stopwise rule with λ set) over ``exit_layers``,
        or SkipDecode with ``schedule`` (exit layer per generated position, non-increasing).

        Stages seen by the rule are the candidate exit layers then the final layer; each gets the
        signals ``max_prob`` (draft-vocabulary softmax of that layer's head) and ``saturation``
        (cosine of the hidden state with the previous candidate's). The emitted token comes from
        the exit layer's head over the full vocabulary.

        ``lams`` (with ``rule``): one λ per prompt row, overriding the rule's own; None or +inf
        means that row never exits early (the full model; +inf whatever the rule's direction).
        Rows are independent, so row r decodes as ``rule.with_lam(lams[r])`` would alone (up to
        floating-point differences between batch sizes). ``Stats.row_layers_per_token`` gives each
        row's cost.
        """
        from stopwise.core.trace import StageBatch

        if self.heads is None:
            raise StopwiseError("Early-exit decoding needs exit heads: pass heads=... (train them with `stopwise decoder train`).")
        if (rule is None) == (schedule is None):
            raise StopwiseError("Early-exit decoding needs exactly one of 'rule' (CALM) or 'schedule' (SkipDecode).")
        bb, heads = self.bb, self.heads
        exits = sorted(exit_layers or heads.layers)
        if schedule is not None:
            schedule = self._check_schedule(schedule, max_new_tokens)
        row_t = None if lams is None else self._row_thresholds(lams, len(prompts), rule)
        if rule is not None and row_t is None and rule.earliest_stop() >= len(exits):
            # It cannot fire at any candidate exit (Never, an uncertified certificate): that is
            # the full model, so no exit head is read on the way.
            exits = []
        self._check_room(prompts, max_new_tokens)
        t0 = time.perf_counter()
        n = len(prompts)
        rows = Rows([[] for _ in prompts], [[] for _ in prompts], [False] * n, max_new_tokens, eos or set(), on_token)
        stats = Stats(mode="early_exit", new_tokens=[])
        state, h = self._prefill_once(prompts)
        nxt = self._pick(bb.logits(h)[:, -1], temperature, generator)
        stats.layers += bb.n_layers * n
        row_layers = [float(bb.n_layers)] * n  # per row: the prefill made its first token
        while True:
            for r in range(n):
                rows.commit(r, [int(nxt[r])])
            stats.steps += 1
            if rows.all_done:
                break
            if schedule is not None:
                exit_at = torch.full((n,), schedule[stats.steps], dtype=torch.long)
                nxt, used = self._skip_token(state, nxt, int(exit_at[0]), temperature, generator)
                row_used = [float(exit_at[0])] * n
            else:
                nxt, exit_at, used, row_used = self._calm_token(state, nxt, rule, exits, temperature, generator,
                                                                StageBatch, row_t)
            stats.layers += used
            # Rows not done now will commit the token this step made: it costs them row_used.
            for r in range(n):
                if not rows.done[r]:
                    row_layers[r] += row_used[r]
            stats.exit_layers.extend(int(x) for x, d in zip(exit_at.tolist(), rows.done, strict=False) if not d)
        stats = self._finish(stats, rows, t0)
        stats.row_layers_per_token = [c / max(1, k) for c, k in zip(row_layers, stats.new_tokens, strict=True)]
        return stats

    def _prefill_once(self, prompts: list[list[int]]) -> tuple[State, torch.Tensor]:
        """:meth:`prefill`, except that a batch of one prompt repeated (one prompt decoded at several
        λ) runs the prompt once and repeats its cache: the same values as a batch-1 prefill per
        row, at 1/n of the cost. Layer counts in the stats still charge every row its prefill."""
        n = len(prompts)
        if n == 1 or any(p != prompts[0] for p in prompts[1:]):
            return self.prefill(prompts)
        state, h = self.prefill(prompts[:1])
        state.cache.batch_repeat_interleave(n)
        state.attn = state.attn.repeat_interleave(n, dim=0)
        return state, h.repeat_interleave(n, dim=0)

    def _row_thresholds(self, lams: Sequence[float | None], n: int, rule: Any) -> np.ndarray:
        """The stopper thresholds of per-row λ for ``early_exit``, checked once before decoding."""
        if rule is None:
            raise StopwiseError("The 'lams' parameter of early_exit needs 'rule' (per-row λ of a CALM rule), not 'schedule'.")
        if isinstance(lams, Sequence) and not isinstance(lams, (str, bytes)):
            # +inf never exits whatever the rule's direction (for entropy, λ = inf would always exit).
            lams = [None if isinstance(lam, (int, float)) and lam == math.inf else lam for lam in lams]
        t: np.ndarray = rule.row_thresholds(n, lams, owner="early_exit")
        return t

    def _check_schedule(self, schedule: list[int], max_new: int) -> list[int]:
        sched = [int(x) for x in schedule]
        if len(sched) < max_new or any(b > a for a, b in zip(sched, sched[1:], strict=False)):
            raise StopwiseError(f"The 'schedule' parameter must give a non-increasing exit layer for each of the {max_new} positions.")
        assert self.heads is not None
        bad = sorted({x for x in sched if x != self.bb.n_layers and x not in self.heads.layers})
        if bad:
            raise StopwiseError(f"The schedule exits at layers {bad} that have no exit head (heads: {self.heads.layers}).")
        return sched

    def _emit(self, h: torch.Tensor, layer: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        assert self.heads is not None
        return self._pick(self.heads.logits(h, layer), temperature, generator)

    def _skip_token(self, state: State, tok: torch.Tensor, layer: int, temperature: float,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
        # Non-increasing exits: layers >= `layer` never run again, so their caches need no entry.
        bb = self.bb
        pos = append_tokens(state, torch.ones_like(tok[:, None]))
        h = bb.run(bb.embed(tok[:, None], pos), state, start=0, stop=layer, positions=pos)
        return self._emit(h[:, -1], layer, temperature, generator), float(layer * tok.shape[0])

    def _calm_token(self, state: State, tok: torch.Tensor, rule: Any, exits: list[int], temperature: float,
                    generator: torch.Generator | None, StageBatch: Any, row_t: np.ndarray | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, float, list[float]]:
        """One token per row; returns the tokens, exit layers, layers run (all rows) and per row."""
        bb, heads = self.bb, self.heads
        assert heads is not None
        n = tok.shape[0]
        pos = append_tokens(state, torch.ones_like(tok[:, None]))
        h = bb.embed(tok[:, None], pos)
        emb = bb.rope(h, pos)
        stopper = rule.stopper(n) if row_t is None else Stopper(rule, n, row_t)
        exit_at = torch.full((n,), bb.n_layers, dtype=torch.long)
        exit_h = torch.zeros_like(h)
        active = torch.ones(n, dtype=torch.bool)
        row_used = torch.zeros(n, dtype=torch.float64)
        prev = h
        start, used = 0, 0.0
        for stage, stop in enumerate([*exits, bb.n_layers]):
            for i in range(start, stop):
                if bool(active.all()):
                    h = bb.run(h, state, start=i, stop=i + 1, positions=pos, emb=emb)
                else:
                    h = self._layer_for_rows(state, i, h, active, exit_h, pos, emb)
                used += float(active.sum())
                row_used += active
            start = stop
            if stop == bb.n_layers:
                exit_h[active] = h[active]
                break
            idx = active.nonzero().squeeze(1)
            sub = h[idx, -1]
            probs = torch.softmax(heads.logits(sub, stop, reduced=True).to(torch.float64), dim=-1)
            top, arg = probs.max(dim=-1)
            sat = torch.nn.functional.cosine_similarity(sub, prev[idx, -1], dim=-1).to(torch.float64)
            batch = StageBatch(index=stage, predictions=heads.to_token_ids(arg, reduced=True).cpu().numpy(),
                               signals={"max_prob": top.cpu().numpy(), "saturation": sat.cpu().numpy()})
            fired = torch.from_numpy(stopper.step(batch))
            leaving = idx[fired]
            exit_at[leaving] = stop
            exit_h[leaving] = h[leaving]
            active[leaving] = False
            prev = h
            if not bool(active.any()):
                # Everyone left: propagate their states to the remaining layers (CALM).
                bb.propagate(exit_h, state, start=stop, positions=pos, emb=emb)
                break
        nxt = torch.empty(n, dtype=torch.long)
        for layer in torch.unique(exit_at).tolist():
            rows_ = (exit_at == layer).nonzero().squeeze(1)
            nxt[rows_] = self._emit(exit_h[rows_, -1], int(layer), temperature, generator)
        return nxt, exit_at, used, row_used.tolist()

    def _layer_for_rows(self, state: State, i: int, h: torch.Tensor, active: torch.Tensor, exit_h: torch.Tensor,
                        pos: torch.Tensor, emb: Any) -> torch.Tensor:
        """Layer i for the rows still running only, so exited rows cost nothing but their K/V.

        The layer runs on a sub-batch whose cache is this layer's cache restricted to the running
        rows (the model's own attention appends their new K/V to it); the exited rows' K/V for
        this position come from their exited states (CALM's propagation, the K/V projections
        only). Both are then appended to the whole batch's cache. Hidden states of exited rows
        are left as they were: nothing reads them again.
        """
        bb = self.bb
        rows, gone = active.nonzero().squeeze(1), (~active).nonzero().squeeze(1)
        layer = state.cache.layers[i]
        keys, values = layer.keys, layer.values
        layer.keys, layer.values = keys.index_select(0, rows), values.index_select(0, rows)
        try:
            sub = State(cache=state.cache, attn=state.attn.index_select(0, rows))
            h_rows = bb.run(h.index_select(0, rows), sub, start=i, stop=i + 1, positions=pos.index_select(0, rows),
                            emb=None if emb is None else tuple(e.index_select(0, rows) for e in emb))
            k_rows, v_rows = layer.keys[:, :, -1:], layer.values[:, :, -1:]
        finally:
            layer.keys, layer.values = keys, values
        k_gone, v_gone = bb._kv(i, exit_h.index_select(0, gone),
                                None if emb is None else tuple(e.index_select(0, gone) for e in emb))
        new_k = keys.new_empty((keys.shape[0], *k_rows.shape[1:]))
        new_v = values.new_empty((values.shape[0], *v_rows.shape[1:]))
        new_k[rows], new_k[gone], new_v[rows], new_v[gone] = k_rows, k_gone, v_rows, v_gone
        layer.keys, layer.values = torch.cat([keys, new_k], dim=-2), torch.cat([values, new_v], dim=-2)
        return h.index_copy(0, rows, h_rows)


def skip_schedule(*, n_layers: int, max_new_tokens: int, min_layer: int, max_layer: int | None = None) -> list[int]:
    """SkipDecode's linear decay: exit layer per generated position, non-increasing, from
    ``max_layer`` (default N) down to ``min_layer`` at the last position."""
    top = n_layers if max_layer is None else max_layer
    if not 1 <= min_layer <= top <= n_layers:
        raise StopwiseError(f"SkipDecode needs 1 <= min_layer <= max_layer <= {n_layers}. Got min_layer={min_layer}, max_layer={top}.")
    span = max(1, max_new_tokens - 1)
    return [int(round(top - (top - min_layer) * t / span)) for t in range(max_new_tokens)]
