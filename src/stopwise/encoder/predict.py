"""Online early exit: the layer loop of :meth:`~stopwise.encoder.EarlyExitClassifier.predict`.

Batches advance layer by layer together under one stopper; rows that stop leave their batch, and
survivors are re-packed into fewer full batches; a lone row decides without a Stopper
(:mod:`stopwise.encoder.decider`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_choice, check_int
from stopwise.core.rules import Rule, make_rule
from stopwise.core.trace import StageBatch
from stopwise.encoder.backbone import BatchState
from stopwise.encoder.batches import LONE_ROW, Encoded, Prediction, running_mean, saturation, to_numpy, unpadded_batch
from stopwise.encoder.decider import lone_row_decider, snapshot
from stopwise.encoder.exits import ExitsOnBackbone
from stopwise.encoder.progress import CancellablePrediction, ExitedRows, Watch, drop_stopper_rows

#: Batches that advance layer by layer together in predict by default (in_flight = this × batch_size).
IN_FLIGHT_BATCHES = 4
COSTS = ("layers", "flops")
#: The per-stage signal predict computes online (see :func:`reads_signal`).
SATURATION = "saturation"


def reads_signal(rule: Rule, name: str) -> bool:
    """Whether ``rule`` declares that it reads the signal ``name``: a ``signal`` attribute equal
    to it (:class:`~stopwise.Signal`, :class:`~stopwise.Saturation`) or a ``signals`` list
    holding it (:class:`~stopwise.encoder.gate.ExitGate`), itself or in the rules it wraps
    (``rules``, ``rule``: AnyOf, AllOf, MinStage, StageThresholds). Predict computes the
    saturation cosine only for such a rule, so that one reading none does not pay for it."""
    if getattr(rule, "signal", None) == name:
        return True
    declared = getattr(rule, "signals", None)
    if isinstance(declared, (list, tuple, set, frozenset)) and name in declared:
        return True
    inner = [*getattr(rule, "rules", ()), getattr(rule, "rule", None)]
    return any(isinstance(r, Rule) and reads_signal(r, name) for r in inner)


class EarlyExitPredictor(ExitsOnBackbone):
    """The ``predict`` loop over exit heads on a frozen transformer; see the module docstring."""

    #: The probabilities of head k from its pooled input, made by :meth:`_head_fn` with its head.
    _from_pooled: Callable[[int, torch.Tensor], torch.Tensor] | None = None

    def _stopper_rule(self, rule: Any, certificate: Certificate | None, heads_key: tuple[int, ...]) -> Rule | None:
        if certificate is not None:
            if rule is not None:
                raise StopwiseError("Pass either 'rule' or 'certificate' to predict, not both.")
            # Checked and turned into a rule once while neither the certificate's fields nor the
            # heads change: after a call's layers have filled the caches, rebuilding the rule from
            # its config cost more than the two exit heads of a row that exits at MiniLM's second layer.
            snap = snapshot(certificate)
            kept = self._cert_rule
            if (kept is not None and kept[0] is certificate and kept[2] is self.heads and kept[3] == heads_key
                    and kept[1] == snap):
                return kept[4]
            self._check_certificate(certificate, self._heads_digest(heads_key))
            made = certificate.make_rule()
            self._cert_rule = (certificate, copy.deepcopy(snap), self.heads, heads_key, made)
            return made
        if rule is None:
            return None
        if isinstance(rule, str):
            rule = make_rule(rule)
            rule = rule.with_lam(rule.default_lam)
        if not isinstance(rule, Rule):
            raise StopwiseError(f"The 'rule' parameter of predict must be a stopwise Rule, a rule name, or None. Got {rule!r} instead.")
        return rule

    @torch.inference_mode()
    def predict(self, texts: Any, *, rule: Any = None, certificate: Certificate | None = None, batch_size: int = 32,
                in_flight: int | None = None, cost: str = "layers", sort: bool = True, progress: bool = False,
                trace_calls: list[int] | None = None, on_exit: Callable[[ExitedRows], Any] | None = None,
                cancelled: Callable[[], Iterable[int]] | None = None) -> Prediction:
        """Classify with early exit: after each layer the rule's online stopper decides for the rows
        still running; rows that stop leave the batch. ``rule=None`` runs the full model.

        ``batch_size`` rows go through a layer per call. Up to ``in_flight`` rows (default
        4 × ``batch_size``) advance layer by layer together, and when exits leave their batches
        part-empty, the survivors are re-packed into fewer full batches: a layer on a few rows
        costs far more per row than on a full batch, so without re-packing the last rows of each
        batch would eat much of what early exit saves. The hidden states of all ``in_flight`` rows
        are held at once (rows × tokens × hidden size floats). ``trace_calls``, if given, receives the
        number of rows each layer call ran on.

        For a server answering many clients from one batch: ``on_exit``, if given, is called (in the
        calling thread, between layers) with an :class:`~stopwise.encoder.progress.ExitedRows` each
        time rows leave, once per row, with exactly the values returned for them. ``cancelled``, if
        given, is called before each layer and returns the row indices (into ``texts``) to drop: those
        rows leave their batch uncomputed further, get no answer and no ``on_exit`` call, and the result
        is a :class:`~stopwise.encoder.progress.CancellablePrediction` marking them. With neither, the
        outputs are the same, and the loop's added work is one ``is None`` test per layer.
        """
        self._require_fitted()
        cost = check_choice(cost, "cost", "EarlyExitClassifier.predict", COSTS)
        batch_size = check_int(batch_size, "batch_size", "predict", minimum=1)
        in_flight = IN_FLIGHT_BATCHES * batch_size if in_flight is None else check_int(in_flight, "in_flight", "predict", minimum=batch_size)
        # One look at the head tensors per call, shared by the certificate check and the folded heads.
        heads_key = self.heads.state_key()
        stop_rule = self._stopper_rule(rule, certificate, heads_key)
        if stop_rule is not None and stop_rule.earliest_stop() >= self.n_layers - 1:
            # It cannot stop a row before the last layer (an uncertified certificate, patience
            # calibrated to its largest λ): that is the full model, so no head is read on the way.
            stop_rule = None
        enc = self.tokenize(texts)
        n, c = len(enc), len(self.class_names)
        out = (np.empty(n, dtype=np.int64), np.empty((n, c), dtype=np.float64), np.empty(n, dtype=np.int64))
        head = self._head_fn(heads_key)
        watch = None
        if on_exit is not None or cancelled is not None:
            unit = None if cost == "layers" else self._layer_flops(np.array([len(x) for x in enc.ids]))
            watch = Watch(n, c, unit, on_exit, cancelled)
        t0 = time.perf_counter()
        if n == 1 and not progress:
            # One request per call, as a server sees them: one batch of one row, nothing to sort,
            # group or show. At batch 1 every call predict makes before the first layer runs on
            # cold caches; this path makes as few as it can.
            self._predict_group([unpadded_batch(LONE_ROW, enc.ids)], stop_rule, head, out, batch_size, trace_calls,
                                watch)
        else:
            self._predict_batches(enc, stop_rule, head, out, batch_size, in_flight, sort, progress, trace_calls, watch)
        seconds = time.perf_counter() - t0
        preds, probs, exit_layer = out
        per_row = (exit_layer.astype(np.float64) if cost == "layers"
                   else self._layer_flops(np.array([len(x) for x in enc.ids])) * exit_layer)
        if cancelled is not None and watch is not None:
            watch.finish(out, per_row)
            return CancellablePrediction(predictions=preds, probs=probs, exit_layer=exit_layer, cost=per_row,
                                         class_names=self.class_names, seconds=seconds, cancelled=watch.dropped)
        return Prediction(predictions=preds, probs=probs, exit_layer=exit_layer, cost=per_row,
                          class_names=self.class_names, seconds=seconds)

    def _predict_batches(self, enc: Encoded, rule: Rule | None, head: Callable[[int, BatchState], torch.Tensor],
                         out: tuple[np.ndarray, np.ndarray, np.ndarray], batch_size: int, in_flight: int, sort: bool,
                         progress: bool, calls: list[int] | None, watch: Watch | None = None) -> None:
        batches = list(self._batches(enc, batch_size, sort))
        per_group = in_flight // batch_size
        # No bar object at all unless asked for: even a disabled one costs a head's worth at batch 1.
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(enc), desc="predict")
        for g in range(0, len(batches), per_group):
            group = batches[g : g + per_group]
            self._predict_group(group, rule, head, out, batch_size, calls, watch)
            if bar is not None:
                bar.update(sum(len(rows) for rows, *_ in group))
        if bar is not None:
            bar.close()

    def _head_fn(self, heads_key: tuple[int, ...]) -> Callable[[int, BatchState], torch.Tensor]:
        """Probabilities of head k on the batch (the head's dtype), for one predict call. Linear
        heads multiply by their folded weights directly (the same tensors and op as
        :meth:`ExitHeads.logits`, so online and recorded probabilities agree bit for bit). The
        function is kept while the head tensors are unchanged."""
        kept = self._head
        if kept is not None and kept[0] is self.heads and kept[1] == heads_key:
            return kept[2]
        folded = self.heads.folded(heads_key)
        dtype = self.heads.dtype

        def from_pooled(k: int, pooled: torch.Tensor) -> torch.Tensor:
            if folded is None:
                logits = self.heads.logits(k, pooled)
            else:
                logits = F.linear(pooled if pooled.dtype == dtype else pooled.to(dtype), *folded[k])
            return F.softmax(logits, dim=-1)

        def head(k: int, state: BatchState) -> torch.Tensor:
            return from_pooled(k, self._pooled(k, state))

        self._head = (self.heads, heads_key, head)
        self._from_pooled = from_pooled
        return head

    def _predict_group(self, group: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]], rule: Rule | None,
                       head: Callable[[int, BatchState], torch.Tensor], out: tuple[np.ndarray, np.ndarray, np.ndarray],
                       batch_size: int, calls: list[int] | None, watch: Watch | None = None) -> None:
        """Batches advancing layer by layer together; one stopper over all their rows, which sees
        them in the order of ``lives`` concatenated (kept through every select and re-pack).
        ``watch`` (a server's callbacks) hears of every exit and drops cancelled rows before a layer."""
        mean = self.exit_input == "mean"
        if rule is not None and len(group) == 1 and len(group[0][0]) == 1 and not mean:
            decide = self._lone_decider(rule)
            if decide is not None:
                self._predict_row(group[0], decide, head, out, calls, watch)
                return
        preds, probs, exit_layer = out
        states = [self.backbone.start(ids, mask, unpadded=unpadded) for _, ids, mask, unpadded in group]
        lives = [np.asarray(rows) for rows, *_ in group]
        last = self.n_layers - 1
        stopper = None if rule is None else rule.stopper(sum(len(live) for live in lives))
        # The previous layer's pooled states of the live rows (in the stopper's order), kept only
        # for a rule that reads the saturation signal.
        sat = rule is not None and reads_signal(rule, SATURATION)
        prev: torch.Tensor | None = None
        # With exit_input="mean": the running sum of the live rows' pooled states.
        total: torch.Tensor | None = None
        for k in range(self.n_layers):
            keep = None if watch is None else watch.keep_mask(lives, k)
            if keep is not None:
                if not keep.any():
                    return
                if stopper is not None:
                    drop_stopper_rows(stopper, keep)
                prev, total = _rows(prev, keep), _rows(total, keep)
                states, lives = self._shrink(states, lives, keep, batch_size)
            for state, live in zip(states, lives, strict=True):
                self.backbone.layer(k, state)
                if calls is not None:
                    calls.append(len(live))
            if stopper is None and k < last and not mean:
                continue  # full model: only the final head is read
            signals: dict[str, np.ndarray] = {}
            if mean or sat:
                # With exit_input="mean" every layer adds to the running mean, even where no head is read.
                p, prev, total, cos = self._pooled_step(k, states, prev, total, probs=stopper is not None or k == last,
                                                        sat=sat, mean=mean)
                if stopper is None and k < last:
                    continue
                if cos is not None:
                    signals[SATURATION] = cos
            else:
                # One batch (always so at batch 1): no concatenation, each is a copy and an op.
                p = to_numpy(head(k, states[0])) if len(states) == 1 else np.concatenate([to_numpy(head(k, st)) for st in states])
            live_all = lives[0] if len(lives) == 1 else np.concatenate(lives)
            stop = np.ones(len(live_all), bool) if stopper is None else stopper.step(
                StageBatch(index=k, predictions=p.argmax(axis=1), probs=p, signals=signals), last=k == last)
            if stop.all():
                preds[live_all], probs[live_all], exit_layer[live_all] = p.argmax(axis=1), p, k + 1
                if watch is not None:
                    watch.exited(live_all, preds[live_all], probs[live_all], k + 1)
                return
            if stop.any():
                gone = live_all[stop]
                preds[gone], probs[gone], exit_layer[gone] = p[stop].argmax(axis=1), p[stop], k + 1
                if watch is not None:
                    watch.exited(gone, preds[gone], probs[gone], k + 1)
                prev, total = _rows(prev, ~stop), _rows(total, ~stop)
                states, lives = self._shrink(states, lives, ~stop, batch_size)

    def _pooled_step(self, k: int, states: list[BatchState], prev: torch.Tensor | None, total: torch.Tensor | None, *,
                     probs: bool, sat: bool, mean: bool
                     ) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None, np.ndarray | None]:
        """Layer k from the live rows' pooled states, as the recorded traces compute it
        (:meth:`~stopwise.encoder.EarlyExitClassifier.trace_from_features`): the probabilities
        (empty unless ``probs``), the pooled states kept for the next saturation (None unless
        ``sat``), the running sum of pooled states (with ``mean``, by
        :func:`~stopwise.encoder.batches.running_mean`; else None) and the saturation signal
        (None unless ``sat``; 0.0 at the first layer)."""
        from_pooled = self._from_pooled
        assert from_pooled is not None  # made with the head that _predict_group was given
        pooled = [self._pooled(k, st) for st in states]
        now = pooled[0] if len(pooled) == 1 else torch.cat(pooled)
        p = np.empty((0, 0))
        if mean:
            total, inputs = running_mean(total, now, k)
            if probs:
                p = to_numpy(from_pooled(k, inputs))
        elif probs:
            p = np.concatenate([to_numpy(from_pooled(k, x)) for x in pooled])
        cos = None if not sat else (np.zeros(len(now)) if prev is None else to_numpy(saturation(now, prev)))
        return p, now if sat else None, total, cos

    def _lone_decider(self, rule: Rule) -> Callable[[torch.Tensor], np.ndarray | None] | None:
        """:func:`lone_row_decider`, kept for the certificate's rule: that rule is made by
        _stopper_rule and never handed out, so it stays as it was. Making a decider asks the rule
        for its band and probes its statistic, which at batch 1 on cold caches cost about as much
        as deciding a row's layers."""
        kept = self._lone
        if kept is not None and kept[0] is rule:
            return kept[1]
        decide = lone_row_decider(rule, len(self.class_names))
        if self._cert_rule is not None and rule is self._cert_rule[4]:
            self._lone = (rule, decide)
        return decide

    def _predict_row(self, batch: tuple[np.ndarray, torch.Tensor, torch.Tensor, bool],
                     decide: Callable[[torch.Tensor], np.ndarray | None],
                     head: Callable[[int, BatchState], torch.Tensor], out: tuple[np.ndarray, np.ndarray, np.ndarray],
                     calls: list[int] | None, watch: Watch | None = None) -> None:
        """One row alone under a rule that decides on each stage's probabilities alone. At batch
        1 a StageBatch and a Stopper step after every layer cost more than the head, so
        ``decide`` (see :func:`lone_row_decider`) takes the head's tensor and returns the
        float64 probabilities when the row stops there, None when it runs on."""
        preds, probs, exit_layer = out
        rows, ids, mask, unpadded = batch
        state = self.backbone.start(ids, mask, unpadded=unpadded)
        last = self.n_layers - 1
        for k in range(self.n_layers):
            if watch is not None and watch.keep_mask([rows], k) is not None:
                return  # its one row was cancelled
            self.backbone.layer(k, state)
            if calls is not None:
                calls.append(1)
            p = head(k, state)
            p64 = to_numpy(p) if k == last else decide(p)
            if p64 is not None:
                preds[rows], probs[rows], exit_layer[rows] = p64.argmax(axis=1), p64, k + 1
                if watch is not None:
                    watch.exited(rows, preds[rows], probs[rows], k + 1)
                return

    def _shrink(self, states: list[BatchState], lives: list[np.ndarray], keep: np.ndarray,
                batch_size: int) -> tuple[list[BatchState], list[np.ndarray]]:
        """Drop the rows that stopped; re-pack the rest when they fit in fewer batches."""
        bounds = np.cumsum([0] + [len(live) for live in lives])
        keeps = [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        n_keep = int(keep.sum())
        if -(-n_keep // batch_size) < sum(1 for m in keeps if m.any()):
            survivors = np.concatenate(lives)[keep]
            packed = self.backbone.repack(states, [torch.as_tensor(m) for m in keeps], batch_size)
            return packed, [survivors[i : i + batch_size] for i in range(0, n_keep, batch_size)]
        pairs = [(state if m.all() else self.backbone.select(state, torch.as_tensor(m)), live[m])
                 for state, live, m in zip(states, lives, keeps, strict=True) if m.any()]
        return [s for s, _ in pairs], [live for _, live in pairs]


def _rows(kept: torch.Tensor | None, mask: np.ndarray) -> torch.Tensor | None:
    """The rows of a per-live-row tensor that stay (None stays None)."""
    return None if kept is None else kept[torch.as_tensor(mask)]
