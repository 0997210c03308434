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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stopwise._errors import StopwiseError
from stopwise.decoder.backbone import Backbone, State, append_tokens, positions
from stopwise.decoder.heads import ExitHeads
from stopwise.decoder.lookup import Acceptance, best_block, check_lookup, context_draft
from stopwise.decoder.sampling import accept_or_resample, sample
from stopwise.rules.base import Stopper

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


def _pad_block(pending: list[list[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad rows of pending tokens into (B, m) ids and validity."""
    m = max(len(p) for p in pending)
    ids = torch.full((len(pending), m), pad, dtype=torch.long, device=device)
    valid = torch.zeros((len(pending), m), dtype=torch.long, device=device)
    for r, p in enumerate(pending):
        if p:
            ids[r, m - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[r, m - len(p):] = 1
    return ids, valid


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.to(torch.float64) / temperature, dim=-1)


class Engine:
    """Decoding loops over one backbone and (optionally) its exit heads."""

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
        ids, valid = _pad_block(prompts, self.pad, self.device)
        state = self.bb.new_state(len(prompts))
        pos = append_tokens(state, valid)
        h = self.bb.run(self.bb.embed(ids, pos), state, start=0, stop=self.bb.n_layers, positions=pos)
        return state, h[:, -1:]

    def _pick(self, logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        return sample(_probs(logits, temperature), generator=generator)

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

    # -- self-speculative -------------------------------------------------------------------
    def draft_cost(self, layer: int, reduced: bool) -> float:
        """A draft step at ``layer`` as a fraction of a full step (parameter count model)."""
        assert self.heads is not None
        v = self.heads.draft_vocab.numel() if reduced and self.heads.draft_vocab is not None else self.bb.vocab_size
        full = self.bb.n_layers * self.layer_params + self.head_params
        return float((layer * self.layer_params + v * self.bb.hidden_size) / full)

    def expected_speedup(self, alpha: float, gamma: float, cost: float) -> float:
        """LayerSkip/Leviathan: (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
        alpha = min(max(alpha, 1e-6), 1 - 1e-6)
        return float((1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * cost + 1)))

    @torch.inference_mode()
    def speculative(self, prompts: list[list[int]], *, max_new_tokens: int, exit_layer: int | None = None,
                    max_draft: int = 6, draft_stop: float = 0.6, adaptive_layer: bool = True,
                    candidate_layers: list[int] | None = None, probe_every: int = 8, reduced: bool = True,
                    lookup: int = 3, lookup_draft: int = 8, block_costs: Sequence[float] | None = None,
                    temperature: float = 0.0, generator: torch.Generator | None = None, eos: set[int] | None = None,
                    on_token: OnToken | None = None) -> Stats:
        """Self-speculative decoding; see the module docstring.

        ``draft_stop``: stop drafting when the draft's predicted probability that some drafted token
        is rejected, 1 - prod(draft confidence), exceeds it (SpecDec++); 1.0 always drafts
        ``max_draft`` tokens. ``adaptive_layer``: every ``probe_every`` layer-drafted steps, score
        every candidate layer's head on the verified tokens and move to the layer with the best
        expected speedup. ``lookup``: longest n-gram matched in a row's context to copy up to
        ``lookup_draft`` tokens from it (0: off). A step drafts from the context when that is
        expected to pay (:func:`~stopwise.decoder.lookup.best_block`, from each match length's
        running acceptance and ``block_costs``), else with the exit head. With ``lookup`` on, heads
        are optional: without them a step without a context draft is a plain full-model step.
        The engine carries each head set's measured acceptance per layer and its probe interval
        from one call to the next (DEL tracks acceptance over a session), so a head set that does
        not pay stops costing probes after the first generations; :meth:`forget` resets that.
        ``block_costs``: relative time of one pass over blocks of 1, 2, ... positions; None
        measures them once per engine and batch size, before the clock starts (about 5 s for
        SmolLM2 on 2 CPU threads, where the table is not always monotone).
        """
        max_ngram, lookup_len = check_lookup(lookup, lookup_draft)
        if self.heads is None and not max_ngram:
            raise StopwiseError("Speculative decoding needs exit heads: pass heads=... (train them with `stopwise decoder train`), "
                                "or draft from the context only with lookup >= 1.")
        heads, bb = self.heads, self.bb
        layer, candidates = self._spec_layers(exit_layer, candidate_layers, max_draft, reduced)
        self._check_room(prompts, max_new_tokens, max(max_draft, lookup_len if max_ngram else 0) + 1)
        costs: list[float] = []
        if max_ngram:
            costs = (self.block_costs(len(prompts), lookup_len + max_draft + 2) if block_costs is None
                     else _check_costs(block_costs))
        acceptance = Acceptance()
        t0 = time.perf_counter()
        n = len(prompts)
        rows = Rows([[] for _ in prompts], [[] for _ in prompts], [False] * n, max_new_tokens, eos or set(), on_token)
        stats = Stats(mode="speculative", new_tokens=[])
        info = {} if heads is None else heads.training_info.get("agreement", {})
        memory_key = (id(heads), tuple(candidates), probe_every, reduced, bool(costs))
        alpha, explore_every = self._memory.get(memory_key, ({}, probe_every))
        # explore_every: steps without exit-head drafts before one runs anyway, to probe.
        alpha = {x: alpha.get(x, float(info.get(str(x), 0.5))) for x in candidates}
        state, h = self.prefill(prompts)
        first = self._pick(bb.logits(h)[:, -1], temperature, generator)
        for r in range(n):
            rows.pending[r] = rows.commit(r, [int(first[r])])
        stats.layers += bb.n_layers * n
        alive = list(range(n))  # original row of each batch row; finished rows leave the batch
        layer_steps = plain_steps = 0  # steps drafted by an exit head; other steps since the last one
        while not rows.all_done:
            pending_in = [rows.pending[r] for r in alive]
            # Draft from the context where it repeats: no layer runs to make the draft, so it goes
            # first whenever its expected tokens per unit of verification time beat a plain step.
            found = _context_drafts(prompts, rows, alive, max_ngram, lookup_len)
            m = max(len(p) for p in pending_in)
            # At most lookup_draft positions, filler included: the room checked above.
            k = best_block(m, [(len(t), acceptance.rate(g)) for t, g in found], costs[: m + lookup_len]) \
                if m <= len(costs) else 0
            context = k > 0 and any(t for t, _ in found)
            gamma = stats.drafted / (layer_steps * len(alive)) if layer_steps else max_draft / 2
            # Exit-head drafts when they are expected to beat a plain step on this machine's block
            # costs, and after explore_every steps without them anyway, to re-measure (DEL).
            explore = bool(costs) and plain_steps >= explore_every
            use_heads = not context and heads is not None and (not costs or explore or self._heads_pay(
                alpha[layer], gamma, layer, reduced, m, costs))
            if not use_heads:  # context drafts, or a plain step
                new, pending = self._context_step(state, pending_in, found, k if context else 0, acceptance, stats,
                                                  temperature, generator)
                plain_steps += 1
                probes: dict[int, float] = {}
            else:
                # Draft with the exit head at `layer`.
                k_max = max(1, min(max_draft, rows.remaining() - 1)) if rows.remaining() > 1 else 0
                probe = adaptive_layer and len(candidates) > 1 and (layer_steps % probe_every == probe_every - 1 or explore)
                n_acc, k, new, pending, probes = self._spec_step(state, pending_in, layer, k_max, draft_stop, reduced,
                                                                 temperature, generator, candidates if probe else None)
                layer_steps += 1
                plain_steps = 0
                stats.drafted += k * len(alive)
                stats.accepted += sum(n_acc)
                stats.exit_layer_trace.append(layer)
            stats.steps += 1
            stats.layers += self._last_cost
            for b, r in enumerate(alive):
                rows.commit(r, new[b])
                rows.pending[r] = pending[b]
            alive = self._drop_finished(state, rows, alive)
            for x, agree in probes.items():
                alpha[x] = 0.7 * alpha[x] + 0.3 * agree  # EMA: contexts drift within a generation
            if probes:
                gamma = stats.drafted / max(1, layer_steps * len(alive))
                layer = max(candidates, key=lambda x: self.expected_speedup(alpha[x], gamma, self.draft_cost(x, reduced)))
            if explore and heads is not None:
                # Probes that keep finding no paying head come ever less often (a poor head set
                # would cost a share of every generation); one that pays resets the interval.
                pays = self._heads_pay(alpha[layer], gamma, layer, reduced, m, costs)
                explore_every = probe_every if pays else min(2 * explore_every, 64 * probe_every)
        if heads is not None:
            self._memory[memory_key] = (alpha, explore_every)
        return self._finish(stats, rows, t0)

    def _context_step(self, state: State, pending_in: list[list[int]], found: list[tuple[list[int], int]], k: int,
                      acceptance: Acceptance, stats: Stats, temperature: float,
                      generator: torch.Generator | None) -> tuple[list[list[int]], list[list[int]]]:
        """One step verifying the first ``k`` tokens of each row's context draft (0: a plain step);
        updates the acceptance per match length and the stats; (new tokens, pending) per row."""
        props = [t[:k] for t, _ in found] if k else [[] for _ in found]
        n_acc, new, pending = self._lookup_step(state, pending_in, props, k, temperature, generator)
        acceptance.update([(g, len(t), a) for (_, g), t, a in zip(found, props, n_acc, strict=True) if t])
        stats.lookup_steps += 1
        stats.lookup_drafted += sum(len(p) for p in props)
        stats.lookup_accepted += sum(n_acc)
        return new, pending

    def _drop_finished(self, state: State, rows: Rows, alive: list[int]) -> list[int]:
        """Remove finished rows from the batch (cache and mask): later steps run on fewer rows."""
        keep = [b for b, r in enumerate(alive) if not rows.done[r]]
        if keep and len(keep) < len(alive):
            index = torch.tensor(keep, device=self.device)
            state.cache.batch_select_indices(index)
            state.attn = state.attn[index]
            return [alive[b] for b in keep]
        return alive

    def forget(self) -> None:
        """Drop what speculative calls learned about the exit heads (acceptance, probe interval)."""
        self._memory.clear()

    def measured_block_costs(self) -> dict[tuple[int, int], list[float]]:
        """The block-cost tables measured so far, keyed by (batch size, positions measured)."""
        return {key: list(costs) for key, costs in self._costs.items()}

    @torch.inference_mode()
    def block_costs(self, batch_size: int, upto: int) -> list[float]:
        """Time of one pass of all layers over blocks of 1..``upto`` positions per row, relative
        to 1 position, measured once per (batch size, upto) on a 32-position context: best of 3."""
        key = (batch_size, upto)
        if key not in self._costs:
            bb = self.bb
            state = bb.new_state(batch_size)
            ids = torch.arange(32 * batch_size, device=self.device).reshape(batch_size, 32) % bb.vocab_size
            pos = append_tokens(state, torch.ones_like(ids))
            bb.run(bb.embed(ids, pos), state, start=0, stop=bb.n_layers, positions=pos)
            best = [math.inf] * upto
            for _rep in range(3):
                for m in range(1, upto + 1):
                    block = ids[:, :m]
                    t = time.perf_counter()
                    pos = append_tokens(state, torch.ones_like(block))
                    bb.run(bb.embed(block, pos), state, start=0, stop=bb.n_layers, positions=pos)
                    best[m - 1] = min(best[m - 1], time.perf_counter() - t)
                    state.drop_last(m)
            self._costs[key] = [b / best[0] for b in best]
        return self._costs[key]

    def _spec_layers(self, exit_layer: int | None, candidate_layers: list[int] | None, max_draft: int,
                     reduced: bool) -> tuple[int, list[int]]:
        """The starting exit layer and the candidates DEL may move to (none without heads)."""
        heads = self.heads
        if heads is None:
            if exit_layer is not None:
                raise StopwiseError("The 'exit_layer' parameter needs exit heads; none are loaded.")
            return 0, []
        candidates = sorted(candidate_layers or [x for x in heads.layers if x <= self.bb.n_layers * 2 // 3])
        layer = exit_layer or self._best_prior_layer(candidates, max_draft, reduced)
        if layer not in heads.layers:
            raise StopwiseError(f"The 'exit_layer' parameter must be a layer with an exit head {heads.layers}. Got {layer!r} instead.")
        return layer, sorted({*candidates, layer})

    def _lookup_step(self, state: State, pending_in: list[list[int]], props: list[list[int]], k: int, temperature: float,
                     generator: torch.Generator | None) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """Verify context drafts (each <= k tokens): pending tokens and k draft positions per row
        through all layers in one pass."""
        bb, n = self.bb, len(pending_in)
        ids, valid = _pad_block(pending_in, self.pad, self.device)
        m = ids.shape[1]
        lengths = [len(p) for p in props]
        # Rows with shorter drafts are filled up to k; the filler is fed but never accepted, and
        # drop_last below forgets it (every row's accepted count is <= its own draft length).
        drafts = torch.tensor([p + [p[-1] if p else self.pad] * (k - len(p)) for p in props], dtype=torch.long,
                              device=self.device).reshape(n, k)
        block = torch.cat([ids, drafts], dim=1)
        pos = append_tokens(state, torch.cat([valid, torch.ones_like(drafts)], dim=1))
        h = bb.run(bb.embed(block, pos), state, start=0, stop=bb.n_layers, positions=pos)
        new, n_acc = _verify_fixed(bb.logits(h[:, m - 1:]), drafts, lengths, temperature, generator)
        a_min = min(n_acc)
        state.drop_last(k - a_min)
        self._last_cost = float(n * bb.n_layers * (m + k))
        return n_acc, new, [new[r][a_min:] for r in range(n)]

    def _heads_pay(self, alpha: float, gamma: float, layer: int, reduced: bool, m: int, costs: list[float]) -> bool:
        """Whether an exit-head step (gamma drafts accepted at rate alpha) makes more tokens per unit
        of time than a plain step, with the measured cost of verifying a block of m + gamma."""
        g = max(1, round(gamma))
        a = min(max(alpha, 1e-6), 1 - 1e-6)
        tokens = (1 - a ** (g + 1)) / (1 - a)
        seconds = g * self.draft_cost(layer, reduced) + costs[min(m + g, len(costs)) - 1]
        return tokens / seconds > 1.0 / costs[min(m, len(costs)) - 1]

    def _best_prior_layer(self, candidates: list[int], max_draft: int, reduced: bool) -> int:
        assert self.heads is not None
        agreement = self.heads.training_info.get("agreement", {})
        if not agreement:
            return candidates[len(candidates) // 2]
        return max(candidates, key=lambda x: self.expected_speedup(
            float(agreement.get(str(x), 0.0)), max_draft / 2, self.draft_cost(x, reduced)))

    def _spec_step(self, state: State, pending_in: list[list[int]], layer: int, k_max: int, draft_stop: float, reduced: bool,
                   temperature: float, generator: torch.Generator | None, probe: list[int] | None
                   ) -> tuple[list[int], int, list[list[int]], list[list[int]], dict[int, float]]:
        heads, bb = self.heads, self.bb
        assert heads is not None
        n = len(pending_in)
        ids, valid = _pad_block(pending_in, self.pad, self.device)
        m = ids.shape[1]
        probe_lo = [x for x in (probe or []) if x < layer]
        saved: dict[int, list[torch.Tensor]] = {x: [] for x in probe_lo}

        def feed(tok: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
            pos = append_tokens(state, val)
            x = bb.embed(tok, pos)
            emb = bb.rope(x, pos)
            start = 0
            for stop in [*probe_lo, layer]:  # stop at probed layers to keep their states
                x = bb.run(x, state, start=start, stop=stop, positions=pos, emb=emb)
                if stop != layer:
                    saved[stop].append(x)
                start = stop
            return x

        # Draft: feed pending tokens, then each drafted token, through layers < L.
        h = feed(ids, valid)
        hs, drafts, qs = [h], [], []
        conf = torch.ones(n, dtype=torch.float64, device=self.device)
        for _j in range(k_max):
            logits = heads.logits(h[:, -1], layer, reduced=reduced)
            if temperature <= 0:
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                top, idx = p.max(dim=-1)
            else:
                p = _probs(logits, temperature)
                idx = sample(p, generator=generator)
                top = p.gather(1, idx[:, None]).squeeze(1)
                qs.append(p)
            drafts.append(heads.to_token_ids(idx, reduced=reduced))
            conf = conf * top
            # Stop drafting (SpecDec++): every live row more likely than draft_stop to see a rejection.
            stop = bool(((1 - conf) > draft_stop).all())
            h = feed(drafts[-1][:, None], torch.ones((n, 1), dtype=torch.long, device=self.device))
            hs.append(h)
            if stop:
                break
        k = len(drafts)
        # Verify: layers L..N on the pending block and the drafts in one pass.
        total = state.attn.shape[1]
        pos = positions(state, total - (m + k), total)
        hv = torch.cat(hs, dim=1)
        probe_hi = [x for x in (probe or []) if x > layer]
        start, hi_states = layer, {}
        emb = bb.rope(hv, pos)
        for end in [*probe_hi, bb.n_layers]:
            hv = bb.run(hv, state, start=start, stop=end, positions=pos, emb=emb)
            hi_states[end] = hv
            start = end
        target_logits = bb.logits(hv[:, m - 1:])  # (n, k+1, V): position m-1 predicts the first draft
        new, n_acc = self._verify(target_logits, drafts, qs, reduced, temperature, generator)
        # Keep the cache of what every row accepted; rows that accepted more re-feed the rest next step.
        a_min = min(n_acc)
        state.drop_last(k - a_min)
        pending = [new[r][a_min:] for r in range(n)]
        probes = self._probe(probe, layer, saved, hi_states, hs, m, target_logits, drafts, reduced) if probe else {}
        self._last_cost = float(n * bb.n_layers * (m + k))  # layer evaluations, all rows
        return n_acc, k, new, pending, probes

    def _verify(self, target_logits: torch.Tensor, drafts: list[torch.Tensor], qs: list[torch.Tensor], reduced: bool,
                temperature: float, generator: torch.Generator | None) -> tuple[list[list[int]], list[int]]:
        """Per row: accepted drafts plus one token from the full model (correction or bonus)."""
        n, k = target_logits.shape[0], len(drafts)
        d = torch.stack(drafts, dim=1) if drafts else torch.zeros((n, 0), dtype=torch.long, device=self.device)
        if temperature <= 0:  # greedy needs only the drafted tokens, as for context drafts
            return _verify_fixed(target_logits, d, [k] * n, temperature, generator)
        heads = self.heads
        assert heads is not None
        new: list[list[int]] = [[] for _ in range(n)]
        n_acc = [0] * n
        open_ = torch.ones(n, dtype=torch.bool, device=self.device)
        for j in range(k):
            p = _probs(target_logits[:, j], temperature)
            q = torch.zeros_like(p)
            if reduced and heads.draft_vocab is not None:
                q[:, heads.draft_vocab] = qs[j]
            else:
                q = qs[j]
            ok, tok = accept_or_resample(p, q, d[:, j], generator=generator)
            for r in range(n):
                if open_[r]:
                    new[r].append(int(tok[r]))
                    n_acc[r] += int(ok[r])
            open_ &= ok
            if not open_.any():
                break
        bonus = sample(_probs(target_logits[:, k], temperature), generator=generator)
        for r in range(n):
            if open_[r]:
                new[r].append(int(bonus[r]))
        return new, n_acc

    def _probe(self, probe: list[int], layer: int, saved: dict[int, list[torch.Tensor]], hi: dict[int, torch.Tensor],
               hs: list[torch.Tensor], m: int, target_logits: torch.Tensor, drafts: list[torch.Tensor], reduced: bool
               ) -> dict[int, float]:
        """Greedy agreement of each candidate layer's head with the full model on this step's positions (DEL)."""
        heads = self.heads
        assert heads is not None
        target = target_logits.argmax(dim=-1)  # (n, k+1)
        if reduced and heads.draft_vocab is not None:
            target_in = torch.isin(target, heads.draft_vocab)
        else:
            target_in = torch.ones_like(target, dtype=torch.bool)
        out = {}
        for x in probe:
            if x < layer:
                states = torch.cat(saved[x], dim=1)[:, m - 1:]
            elif x == layer:
                states = torch.cat(hs, dim=1)[:, m - 1:]
            else:
                states = hi[x][:, m - 1:]
            guess = heads.to_token_ids(heads.logits(states, x, reduced=reduced).argmax(dim=-1), reduced=reduced)
            out[x] = float(((guess == target) & target_in).to(torch.float64).mean())
        return out


    # -- early exit ---------------------------------------------------------------------------
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
        from stopwise.trace import StageBatch

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


def _context_drafts(prompts: list[list[int]], rows: Rows, alive: list[int], max_ngram: int,
                    lookup_len: int) -> list[tuple[list[int], int]]:
    """Each running row's draft copied from its context and the n-gram length matched ([], 0: none)."""
    if not max_ngram:
        return [([], 0) for _ in alive]
    return [context_draft(prompts[r] + rows.out[r], max_ngram=max_ngram,
                          length=min(lookup_len, rows.max_new - len(rows.out[r]) - 1)) for r in alive]


def _check_costs(costs: Sequence[float]) -> list[float]:
    out = [float(c) for c in costs] if isinstance(costs, (list, tuple)) else []
    if not out or not all(math.isfinite(c) and c > 0 for c in out):
        raise StopwiseError(f"The 'block_costs' parameter of speculative decoding must be a non-empty list of positive "
                            f"floats (relative time of blocks of 1, 2, ... positions). Got {costs!r} instead.")
    return out


def _verify_fixed(target_logits: torch.Tensor, drafts: torch.Tensor, lengths: list[int], temperature: float,
                  generator: torch.Generator | None) -> tuple[list[list[int]], list[int]]:
    """Per row: the accepted prefix of its first ``lengths[r]`` drafted tokens plus one token of
    the full model. The drafts are deterministic (q is one-hot), so with sampling a draft x is
    accepted with probability p(x) and a rejection redraws from p without x: exactly p."""
    n, k = drafts.shape
    if temperature <= 0:
        target = target_logits.argmax(dim=-1)  # (n, k+1)
        inside = torch.arange(k, device=drafts.device)[None, :] < torch.tensor(lengths, device=drafts.device)[:, None]
        n_acc = ((drafts == target[:, :k]) & inside).to(torch.long).cumprod(dim=1).sum(dim=1).tolist() if k else [0] * n
        return [drafts[r, : n_acc[r]].tolist() + [int(target[r, n_acc[r]])] for r in range(n)], n_acc
    new: list[list[int]] = [[] for _ in range(n)]
    n_acc, open_ = [0] * n, [True] * n
    for j in range(k + 1):
        p = _probs(target_logits[:, j], temperature)
        if any(open_[r] and j < lengths[r] for r in range(n)):
            q = torch.zeros_like(p)
            q[torch.arange(n), drafts[:, j]] = 1.0
            ok, tok = accept_or_resample(p, q, drafts[:, j], generator=generator)
            for r in range(n):
                if open_[r] and j < lengths[r]:
                    new[r].append(int(tok[r]))
                    n_acc[r] += int(ok[r])
                    open_[r] = bool(ok[r])
        if any(open_[r] and j == lengths[r] for r in range(n)):
            bonus = sample(p, generator=generator)
            for r in range(n):
                if open_[r] and j == lengths[r]:
                    new[r].append(int(bonus[r]))
                    open_[r] = False
    return new, n_acc


def skip_schedule(*, n_layers: int, max_new_tokens: int, min_layer: int, max_layer: int | None = None) -> list[int]:
    """SkipDecode's linear decay: exit layer per generated position, non-increasing, from
    ``max_layer`` (default N) down to ``min_layer`` at the last position."""
    top = n_layers if max_layer is None else max_layer
    if not 1 <= min_layer <= top <= n_layers:
        raise StopwiseError(f"SkipDecode needs 1 <= min_layer <= max_layer <= {n_layers}. Got min_layer={min_layer}, max_layer={top}.")
    span = max(1, max_new_tokens - 1)
    return [int(round(top - (top - min_layer) * t / span)) for t in range(max_new_tokens)]
