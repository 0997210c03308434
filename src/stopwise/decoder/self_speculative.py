"""Self-speculative decoding (LayerSkip, Elhoushi et al. 2024) with adaptive draft length
(SpecDec++, Huang et al. 2024), exit layer (DEL) and drafts copied from the context (prompt lookup).

Drafts come from layers < L and an exit head, or from the row's own context; layers L..N verify them
in one pass that reuses the draft's KV cache for layers < L. Greedy output equals full greedy output;
sampling uses the min(1, p/q) acceptance (:mod:`stopwise.decoder.verify`), so the output
distribution equals the full model's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from stopwise.core.errors import StopwiseError
from stopwise.decoder.backbone import State, append_tokens, positions
from stopwise.decoder.draft_costs import DraftCosts, check_costs
from stopwise.decoder.lookup import Acceptance, best_block, check_lookup, context_draft
from stopwise.decoder.rows import OnToken, Rows, Stats, pad_block
from stopwise.decoder.verify import accept_or_resample, sample, tempered_probs, verify_fixed


class SelfSpeculative(DraftCosts):
    """The ``speculative`` decoding loop; see the module docstring."""

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
                     else check_costs(block_costs))
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
    def forget(self) -> None:
        """Drop what speculative calls learned about the exit heads (acceptance, probe interval)."""
        self._memory.clear()
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
        ids, valid = pad_block(pending_in, self.pad, self.device)
        m = ids.shape[1]
        lengths = [len(p) for p in props]
        # Rows with shorter drafts are filled up to k; the filler is fed but never accepted, and
        # drop_last below forgets it (every row's accepted count is <= its own draft length).
        drafts = torch.tensor([p + [p[-1] if p else self.pad] * (k - len(p)) for p in props], dtype=torch.long,
                              device=self.device).reshape(n, k)
        block = torch.cat([ids, drafts], dim=1)
        pos = append_tokens(state, torch.cat([valid, torch.ones_like(drafts)], dim=1))
        h = bb.run(bb.embed(block, pos), state, start=0, stop=bb.n_layers, positions=pos)
        new, n_acc = verify_fixed(bb.logits(h[:, m - 1:]), drafts, lengths, temperature, generator)
        a_min = min(n_acc)
        state.drop_last(k - a_min)
        self._last_cost = float(n * bb.n_layers * (m + k))
        return n_acc, new, [new[r][a_min:] for r in range(n)]
    def _spec_step(self, state: State, pending_in: list[list[int]], layer: int, k_max: int, draft_stop: float, reduced: bool,
                   temperature: float, generator: torch.Generator | None, probe: list[int] | None
                   ) -> tuple[list[int], int, list[list[int]], list[list[int]], dict[int, float]]:
        heads, bb = self.heads, self.bb
        assert heads is not None
        n = len(pending_in)
        ids, valid = pad_block(pending_in, self.pad, self.device)
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
                p = tempered_probs(logits, temperature)
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
            return verify_fixed(target_logits, d, [k] * n, temperature, generator)
        heads = self.heads
        assert heads is not None
        new: list[list[int]] = [[] for _ in range(n)]
        n_acc = [0] * n
        open_ = torch.ones(n, dtype=torch.bool, device=self.device)
        for j in range(k):
            p = tempered_probs(target_logits[:, j], temperature)
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
        bonus = sample(tempered_probs(target_logits[:, k], temperature), generator=generator)
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


def _context_drafts(prompts: list[list[int]], rows: Rows, alive: list[int], max_ngram: int,
                    lookup_len: int) -> list[tuple[list[int], int]]:
    """Each running row's draft copied from its context and the n-gram length matched ([], 0: none)."""
    if not max_ngram:
        return [([], 0) for _ in alive]
    return [context_draft(prompts[r] + rows.out[r], max_ngram=max_ngram,
                          length=min(lookup_len, rows.max_new - len(rows.out[r]) - 1)) for r in alive]
