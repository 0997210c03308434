"""Early-exit classification on a frozen pretrained transformer (DeeBERT / PABEE / FastBERT style).

``EarlyExitClassifier`` attaches one exit head per layer to any supported Hugging Face model
(encoders, or decoder LLMs as classifier backbones), trains the heads on cached hidden states,
records :class:`~stopwise.Trace` objects for calibration, and predicts with real early exit:
rows that stop leave the batch, so later layers run on fewer rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from stopwise._errors import StopwiseError, check_choice, check_int
from stopwise._version import __version__
from stopwise.certificate import Certificate
from stopwise.encoder.backbone import Backbone, BatchState, mean_weights
from stopwise.encoder.heads import HEAD_TYPES, ExitHeads, train_heads
from stopwise.rules import Rule, make_rule
from stopwise.trace import StageBatch, Trace

CONFIG_NAME = "stopwise_heads.json"
WEIGHTS_NAME = "heads.safetensors"
CERTIFICATE_NAME = "certificate.json"
FORMAT = "stopwise.encoder.heads"
POOLINGS = ("mean", "cls", "last")
#: Batches that advance layer by layer together in predict by default (in_flight = this × batch_size).
IN_FLIGHT_BATCHES = 4
COSTS = ("layers", "flops")
#: Keys a heads config may hold; others are warned about (written by a newer stopwise?).
CONFIG_KEYS = frozenset({
    "format", "stopwise_version", "base_model", "base_name", "model_type", "n_layers", "hidden_size",
    "pooling", "head", "mlp_hidden", "n_classes", "class_names", "max_length", "heads_sha", "training",
})


@dataclass(frozen=True)
class Encoded:
    """Token ids per text (no padding), as :meth:`EarlyExitClassifier.tokenize` returns them."""

    ids: list[list[int]]
    n_truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Prediction:
    """What :meth:`EarlyExitClassifier.predict` returns, one entry per input row."""

    predictions: np.ndarray  # (n,) class ids
    probs: np.ndarray  # (n, C) probabilities of the head that answered
    exit_layer: np.ndarray  # (n,) 1-based layer whose head answered
    cost: np.ndarray  # (n,) layers run, or GFLOPs with cost="flops"
    class_names: tuple[str, ...]
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.predictions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictions": self.labels,
            "class_ids": self.predictions.tolist(),
            "probs": np.round(self.probs, 6).tolist(),
            "exit_layer": self.exit_layer.tolist(),
            "cost": self.cost.tolist(),
            "seconds": self.seconds,
        }


def _resolve_base(base: Any) -> tuple[str, str]:
    """(loadable path or hub id, short name) for a bundled name, a directory or a hub id."""
    from stopwise.hf import bundled

    if isinstance(base, (str, Path)) and str(base) in bundled.BUNDLED:
        return str(bundled.model_path(str(base))), str(base)
    if isinstance(base, (str, Path)):
        return str(base), Path(str(base)).name or str(base)
    raise StopwiseError(f"The 'base' parameter must be a bundled name {sorted(bundled.BUNDLED)}, a model directory or a model id. Got {base!r} instead.")


def _fingerprint_model(model: torch.nn.Module) -> str:
    """A short hash of the first weights: tells two checkpoints of the same shape apart."""
    h = hashlib.sha256()
    for name, p in list(model.state_dict().items())[:4]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:12]


class EarlyExitClassifier:
    """Exit heads on a frozen transformer; see the module docstring.

    Build with :meth:`from_base` (new heads) or :meth:`from_pretrained` (saved heads).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, class_names: Sequence[str], base_name: str,
                 pooling: str | None = None, head: str = "linear", mlp_hidden: int = 256,
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.backbone = Backbone(model)
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.class_names = _check_class_names(class_names)
        default_pool = "last" if self.backbone.decoder else "mean"
        self.pooling = check_choice(pooling or default_pool, "pooling", "EarlyExitClassifier", POOLINGS)
        self.head_kind = check_choice(head, "head", "EarlyExitClassifier", HEAD_TYPES)
        self.mlp_hidden = int(mlp_hidden)
        limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512),
                    int(getattr(model.config, "max_position_embeddings", 512) or 512), 4096)
        self.max_length = limit if max_length is None else check_int(max_length, "max_length", "EarlyExitClassifier", minimum=2)
        if self.max_length > limit:
            raise StopwiseError(f"The 'max_length' parameter of EarlyExitClassifier must be at most the model limit {limit}. Got {max_length} instead.")
        self.heads = ExitHeads(self.n_layers, self.hidden_size, len(self.class_names), kind=self.head_kind, mlp_hidden=self.mlp_hidden)
        self.fitted = False
        self.certificate: Certificate | None = None
        self.training_info: dict[str, Any] = {}
        self._heads_id: tuple[tuple[int, ...], str] | None = None
        # The last predict call's certificate rule and head function, with what they were made
        # from (see _stopper_rule and _head_fn).
        self._cert_rule: tuple[Certificate, tuple[Any, ...], ExitHeads, tuple[int, ...], Rule] | None = None
        self._head: tuple[ExitHeads, tuple[int, ...], Callable[[int, BatchState], torch.Tensor]] | None = None
        # The certificate rule's lone-row decider (see _lone_decider).
        self._lone: tuple[Rule, Callable[[torch.Tensor], np.ndarray | None] | None] | None = None
        self._unpadded_weights: dict[tuple[Any, ...], torch.Tensor] = {}
        self.base_id = f"{self.backbone.model_type}-{self.n_layers}x{self.hidden_size}-{_fingerprint_model(model)}"
        self._layer_params = sum(p.numel() for p in self.backbone.layers[0].parameters())

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: Any = "minilm", *, class_names: Sequence[str], pooling: str | None = None,
                  head: str = "linear", mlp_hidden: int = 256, max_length: int | None = None) -> EarlyExitClassifier:
        """New (untrained) heads on a bundled model name, a local directory, or a loaded model.

        ``base`` may also be a ``(model, tokenizer)`` pair already loaded with ``AutoModel``.
        """
        if isinstance(base, tuple) and len(base) == 2:
            model, tok = base
            name = str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
        else:
            from transformers import AutoModel, AutoTokenizer

            path, name = _resolve_base(base)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        return cls(model, tok, class_names=class_names, base_name=name, pooling=pooling, head=head,
                   mlp_hidden=mlp_hidden, max_length=max_length)

    @property
    def n_layers(self) -> int:
        return self.backbone.n_layers

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def heads_id(self) -> str:
        """A hash of the heads' weights, checked against a certificate on every predict call: at
        batch 1 hashing them each time cost about as much as a layer, so the hash is kept until a
        head tensor changes (in-place version counters and storage, as for the folded weights)."""
        return self._heads_digest(self.heads.state_key())

    def _heads_digest(self, state_key: tuple[int, ...]) -> str:
        key = (id(self.heads), *state_key)
        if self._heads_id is not None and self._heads_id[0] == key:
            return self._heads_id[1]
        h = hashlib.sha256()
        for name, t in sorted(self.heads.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
        digest = h.hexdigest()[:16]
        self._heads_id = (key, digest)
        return digest

    def identity(self) -> dict[str, Any]:
        """What traces and certificates record about this computation."""
        return {"model": self.base_id, "base_model": self.base_id, "heads": self.heads_id, "pooling": self.pooling,
                "head_type": self.head_kind, "n_layers": self.n_layers, "classes": "|".join(self.class_names),
                "base_name": self.base_name}

    # -- inputs ------------------------------------------------------------------------------
    def tokenize(self, texts: Any) -> Encoded:
        """Validate and tokenize; texts longer than ``max_length`` tokens are truncated (one warning)."""
        if isinstance(texts, Encoded):
            return texts
        texts = _check_texts(texts)
        limit = self.max_length
        # One token over the limit tells "was longer" without tokenizing whole long documents.
        enc = self.tokenizer(texts, truncation=True, max_length=limit + 1, add_special_tokens=True)["input_ids"]
        n_long = sum(len(ids) > limit for ids in enc)
        if n_long:
            warnings.warn(f"{n_long} of {len(enc)} texts are longer than {limit} tokens and were truncated.",
                          UserWarning, stacklevel=3)
            enc = self.tokenizer(texts, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]
        return Encoded(ids=[list(x) for x in enc], n_truncated=n_long)

    def _labels(self, labels: Any, n: int) -> np.ndarray:
        arr = list(labels)
        if len(arr) != n:
            raise StopwiseError(f"Got {n} texts but {len(arr)} labels.")
        index = {c: i for i, c in enumerate(self.class_names)}
        out = np.empty(n, dtype=np.int64)
        for i, y in enumerate(arr):
            if isinstance(y, str):
                if y not in index:
                    raise StopwiseError(f"Label {y!r} (row {i}) is not one of the head's classes {list(self.class_names)}.")
                out[i] = index[y]
            elif isinstance(y, (int, np.integer)) and not isinstance(y, bool) and 0 <= int(y) < len(self.class_names):
                out[i] = int(y)
            else:
                raise StopwiseError(f"Label {y!r} (row {i}) must be a class name or an id in [0, {len(self.class_names) - 1}] for classes {list(self.class_names)}.")
        return out

    def _batches(self, enc: Encoded, batch_size: int, sort: bool) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]]:
        """Right-padded batches, sorted by length so little compute goes to padding, each with
        whether it is unpadded (all rows equally long), which the lengths tell for free."""
        n = len(enc)
        order = np.argsort([-len(x) for x in enc.ids], kind="stable") if sort and n > 1 else np.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            seqs = [enc.ids[i] for i in rows]
            lens = [len(s) for s in seqs]
            width = max(lens)
            # An unpadded batch (every batch of one row) skips the padding and the mask's values.
            if min(lens) == width:
                yield _unpadded_batch(rows, seqs)
                continue
            pad = 0 if self.tokenizer.pad_token_id is None else int(self.tokenizer.pad_token_id)
            ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
            yield rows, ids, mask, False

    # -- features and training ---------------------------------------------------------------
    def _pooled(self, k: int, state: BatchState) -> torch.Tensor:
        """Layer k's pooled output; the final layer's op for op as the bare model's (see
        :meth:`Backbone.pooled`), the others' by the cheapest equal function."""
        if self.pooling == "mean" and state.mean_weights is None:
            state.mean_weights = self._mean_weights(state, state.hidden.dtype)
        return self.backbone.pooled(state, self.pooling, weights=state.mean_weights, exact=k == self.n_layers - 1)

    def _mean_weights(self, state: BatchState, dtype: torch.dtype) -> torch.Tensor:
        if not state.unpadded:
            return mean_weights(state.mask2d, dtype)
        # Without padding the weights depend on the batch's shape alone, so they are built once
        # per shape: right after a layer has filled the caches, building them took 25-40 µs, a
        # third of a batch-1 exit head (benchmarks/encoder_overhead.py). Built outside inference
        # mode so that any later call may read them; nothing writes to them.
        key = (*state.mask2d.shape, dtype, state.mask2d.device)
        weights = self._unpadded_weights.get(key)
        if weights is None:
            with torch.inference_mode(False):
                weights = mean_weights(state.mask2d, dtype, unpadded=True)
            if len(self._unpadded_weights) >= 1024:  # one per (rows, tokens): bounded by batch x length
                self._unpadded_weights.clear()
            self._unpadded_weights[key] = weights
        return weights

    @torch.inference_mode()
    def features(self, texts: Any, *, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        """Pooled hidden state of every layer: (n, n_layers, hidden), one forward pass."""
        from tqdm.auto import tqdm

        enc = self.tokenize(texts)
        out = torch.empty((len(enc), self.n_layers, self.hidden_size), dtype=torch.float32)
        bar = tqdm(total=len(enc), desc=f"{self.base_name} layers", unit="text", disable=not progress)
        for rows, ids, mask, unpadded in self._batches(enc, check_int(batch_size, "batch_size", "features", minimum=1), True):
            state = self.backbone.start(ids, mask, unpadded=unpadded)
            idx = torch.as_tensor(rows)
            for k in range(self.n_layers):
                self.backbone.layer(k, state)
                out[idx, k] = self._pooled(k, state).float()
            bar.update(len(rows))
        bar.close()
        return out

    def fit(self, texts: Any = None, labels: Any = None, *, features: torch.Tensor | None = None,
            objective: str = "labels", optimizer: str = "adam", epochs: int = 100, lr: float = 1e-2,
            weight_decay: float = 1e-2, head_batch_size: int | None = None, batch_size: int = 32,
            seed: int = 0, progress: bool = True) -> EarlyExitClassifier:
        """Train all heads with the backbone frozen (pass ``features`` to reuse a cached pass)."""
        if features is None:
            if texts is None:
                raise StopwiseError("EarlyExitClassifier.fit needs texts or cached features.")
            features = self.features(texts, batch_size=batch_size, progress=progress)
        y = None if labels is None else torch.as_tensor(self._labels(labels, features.shape[0]))
        if labels is None and not self.fitted:
            raise StopwiseError("Self-distillation without labels needs a trained final head: fit with labels first, or load trained heads.")
        torch.manual_seed(seed)
        info = train_heads(self.heads, features, y, objective=objective, optimizer=optimizer, epochs=epochs, lr=lr,
                           weight_decay=weight_decay, batch_size=head_batch_size, seed=seed)
        self.fitted = True
        self.certificate = None  # new heads: an old certificate no longer applies
        self.training_info = {"objective": objective, "optimizer": optimizer, "epochs": epochs, "lr": lr,
                              "seed": seed, "n_train": int(features.shape[0]), **info}
        return self

    @torch.inference_mode()
    def probs_from_features(self, features: torch.Tensor) -> np.ndarray:
        """(n, L, C) float32 probabilities of every head on cached features."""
        out: np.ndarray = np.stack([F.softmax(self.heads.logits(k, features[:, k]), dim=-1).numpy()
                                    for k in range(self.n_layers)], axis=1)
        return out

    def _layer_flops(self, n_tokens: np.ndarray) -> np.ndarray:
        """Approximate FLOPs of one layer per row: weights (2 per parameter per token) + attention."""
        t = n_tokens.astype(np.float64)
        flops: np.ndarray = (2.0 * self._layer_params * t + 4.0 * t * t * self.hidden_size) / 1e9
        return flops

    def trace_from_features(self, features: torch.Tensor, labels: Any = None, *, n_tokens: np.ndarray | None = None,
                            cost: str = "layers", meta: dict[str, Any] | None = None) -> Trace:
        """A trace from cached features (what :meth:`record` does after its forward pass)."""
        self._require_fitted()
        cost = check_choice(cost, "cost", "EarlyExitClassifier.record", COSTS)
        probs = self.probs_from_features(features)
        n = probs.shape[0]
        if cost == "flops":
            if n_tokens is None:
                raise StopwiseError("cost='flops' needs the token count of every row.")
            per_layer = self._layer_flops(np.asarray(n_tokens))
            cost_arr = np.cumsum(np.repeat(per_layer[:, None], self.n_layers, axis=1), axis=1)
        else:
            cost_arr = np.arange(1, self.n_layers + 1, dtype=np.float64)
        return Trace(
            predictions=probs.argmax(axis=2).astype(np.int64),
            probs=probs,
            cost=cost_arr,
            labels=None if labels is None else self._labels(labels, n),
            stage_names=tuple(f"layer_{k + 1}" for k in range(self.n_layers)),
            meta={**self.identity(), "cost": cost, **(meta or {})},
        )

    def record(self, texts: Any, labels: Any = None, *, batch_size: int = 32, cost: str = "layers",
               progress: bool = True, meta: dict[str, Any] | None = None) -> Trace:
        """Every exit for every text: probs per layer, predictions, cost; reference = final head."""
        self._require_fitted()
        enc = self.tokenize(texts)
        if labels is not None:
            self._labels(labels, len(enc))  # fail before the forward pass
        feats = self.features(enc, batch_size=batch_size, progress=progress)
        n_tokens = np.array([len(x) for x in enc.ids])
        return self.trace_from_features(feats, labels, n_tokens=n_tokens, cost=cost, meta=meta)

    # -- online early exit -------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not self.fitted:
            raise StopwiseError("The exit heads are not trained: call fit(...) or load heads with from_pretrained(...).")

    def check_certificate(self, certificate: Certificate) -> None:
        """Refuse a certificate made for another base model or another head set."""
        self._check_certificate(certificate, self.heads_id)

    def _check_certificate(self, certificate: Certificate, heads_id: str) -> None:
        if certificate.n_stages != self.n_layers:
            raise StopwiseError(f"The certificate was made for {certificate.n_stages} exits; this model has {self.n_layers} layers. It cannot vouch for another model or head set.")
        mine = {"base_model": self.base_id, "heads": heads_id}
        for key in ("base_model", "heads"):
            theirs = certificate.source.get(key)
            if theirs is not None and theirs != mine[key]:
                raise StopwiseError(
                    f"The certificate was made for {key} = {theirs!r}; this classifier has {key} = {mine[key]!r}. "
                    "Record new calibration traces with these heads and calibrate again."
                )

    def _stopper_rule(self, rule: Any, certificate: Certificate | None, heads_key: tuple[int, ...]) -> Rule | None:
        if certificate is not None:
            if rule is not None:
                raise StopwiseError("Pass either 'rule' or 'certificate' to predict, not both.")
            # Checked and turned into a rule once while neither the certificate's fields nor the
            # heads change: after a call's layers have filled the caches, rebuilding the rule from
            # its config cost more than the two exit heads of a row that exits at MiniLM's second layer.
            snap = _snapshot(certificate)
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
                trace_calls: list[int] | None = None) -> Prediction:
        """Classify with early exit: after each layer the rule's online stopper decides for the rows
        still running; rows that stop leave the batch. ``rule=None`` runs the full model.

        ``batch_size`` rows go through a layer per call. Up to ``in_flight`` rows (default
        4 × ``batch_size``) advance layer by layer together, and when exits leave their batches
        part-empty, the survivors are re-packed into fewer full batches: a layer on a few rows
        costs far more per row than on a full batch, so without re-packing the last rows of each
        batch would eat much of what early exit saves. The hidden states of all ``in_flight`` rows
        are held at once (rows × tokens × hidden size floats). ``trace_calls``, if given, receives the
        number of rows each layer call ran on.
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
        t0 = time.perf_counter()
        if n == 1 and not progress:
            # One request per call, as a server sees them: one batch of one row, nothing to sort,
            # group or show. At batch 1 every call predict makes before the first layer runs on
            # cold caches; this path makes as few as it can.
            self._predict_group([_unpadded_batch(_ROW0, enc.ids)], stop_rule, head, out, batch_size, trace_calls)
        else:
            self._predict_batches(enc, stop_rule, head, out, batch_size, in_flight, sort, progress, trace_calls)
        seconds = time.perf_counter() - t0
        preds, probs, exit_layer = out
        per_row = (exit_layer.astype(np.float64) if cost == "layers"
                   else self._layer_flops(np.array([len(x) for x in enc.ids])) * exit_layer)
        return Prediction(predictions=preds, probs=probs, exit_layer=exit_layer, cost=per_row,
                          class_names=self.class_names, seconds=seconds)

    def _predict_batches(self, enc: Encoded, rule: Rule | None, head: Callable[[int, BatchState], torch.Tensor],
                         out: tuple[np.ndarray, np.ndarray, np.ndarray], batch_size: int, in_flight: int, sort: bool,
                         progress: bool, calls: list[int] | None) -> None:
        batches = list(self._batches(enc, batch_size, sort))
        per_group = in_flight // batch_size
        # No bar object at all unless asked for: even a disabled one costs a head's worth at batch 1.
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(enc), desc="predict")
        for g in range(0, len(batches), per_group):
            group = batches[g : g + per_group]
            self._predict_group(group, rule, head, out, batch_size, calls)
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

        def head(k: int, state: BatchState) -> torch.Tensor:
            pooled = self._pooled(k, state)
            if folded is None:
                logits = self.heads.logits(k, pooled)
            else:
                logits = F.linear(pooled if pooled.dtype == dtype else pooled.to(dtype), *folded[k])
            return F.softmax(logits, dim=-1)

        self._head = (self.heads, heads_key, head)
        return head

    def _predict_group(self, group: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]], rule: Rule | None,
                       head: Callable[[int, BatchState], torch.Tensor], out: tuple[np.ndarray, np.ndarray, np.ndarray],
                       batch_size: int, calls: list[int] | None) -> None:
        """Batches advancing layer by layer together; one stopper over all their rows, which sees
        them in the order of ``lives`` concatenated (kept through every select and re-pack)."""
        if rule is not None and len(group) == 1 and len(group[0][0]) == 1:
            decide = self._lone_decider(rule)
            if decide is not None:
                self._predict_row(group[0], decide, head, out, calls)
                return
        preds, probs, exit_layer = out
        states = [self.backbone.start(ids, mask, unpadded=unpadded) for _, ids, mask, unpadded in group]
        lives = [np.asarray(rows) for rows, *_ in group]
        last = self.n_layers - 1
        stopper = None if rule is None else rule.stopper(sum(len(live) for live in lives))
        for k in range(self.n_layers):
            for state, live in zip(states, lives, strict=True):
                self.backbone.layer(k, state)
                if calls is not None:
                    calls.append(len(live))
            if stopper is None and k < last:
                continue  # full model: only the final head is read
            # One batch (always so at batch 1): no concatenation, each is a copy and an op.
            p = _numpy(head(k, states[0])) if len(states) == 1 else np.concatenate([_numpy(head(k, st)) for st in states])
            live_all = lives[0] if len(lives) == 1 else np.concatenate(lives)
            stop = np.ones(len(live_all), bool) if stopper is None else stopper.step(
                StageBatch(index=k, predictions=p.argmax(axis=1), probs=p), last=k == last)
            if stop.all():
                preds[live_all], probs[live_all], exit_layer[live_all] = p.argmax(axis=1), p, k + 1
                return
            if stop.any():
                gone = live_all[stop]
                preds[gone], probs[gone], exit_layer[gone] = p[stop].argmax(axis=1), p[stop], k + 1
                states, lives = self._shrink(states, lives, ~stop, batch_size)

    def _lone_decider(self, rule: Rule) -> Callable[[torch.Tensor], np.ndarray | None] | None:
        """:func:`_lone_row_decider`, kept for the certificate's rule: that rule is made by
        _stopper_rule and never handed out, so it stays as it was. Making a decider asks the rule
        for its band and probes its statistic, which at batch 1 on cold caches cost about as much
        as deciding a row's layers."""
        kept = self._lone
        if kept is not None and kept[0] is rule:
            return kept[1]
        decide = _lone_row_decider(rule, len(self.class_names))
        if self._cert_rule is not None and rule is self._cert_rule[4]:
            self._lone = (rule, decide)
        return decide

    def _predict_row(self, batch: tuple[np.ndarray, torch.Tensor, torch.Tensor, bool],
                     decide: Callable[[torch.Tensor], np.ndarray | None],
                     head: Callable[[int, BatchState], torch.Tensor], out: tuple[np.ndarray, np.ndarray, np.ndarray],
                     calls: list[int] | None) -> None:
        """One row alone under a rule that decides on each stage's probabilities alone. At batch
        1 a StageBatch and a Stopper step after every layer cost more than the head, so
        ``decide`` (see :func:`_lone_row_decider`) takes the head's tensor and returns the
        float64 probabilities when the row stops there, None when it runs on."""
        preds, probs, exit_layer = out
        rows, ids, mask, unpadded = batch
        state = self.backbone.start(ids, mask, unpadded=unpadded)
        last = self.n_layers - 1
        for k in range(self.n_layers):
            self.backbone.layer(k, state)
            if calls is not None:
                calls.append(1)
            p = head(k, state)
            p64 = _numpy(p) if k == last else decide(p)
            if p64 is not None:
                preds[rows], probs[rows], exit_layer[rows] = p64.argmax(axis=1), p64, k + 1
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

    # -- persistence -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "stopwise_version": __version__, "base_model": self.base_id, "base_name": self.base_name,
            "model_type": self.backbone.model_type, "n_layers": self.n_layers, "hidden_size": self.hidden_size,
            "pooling": self.pooling, "head": self.head_kind, "mlp_hidden": self.mlp_hidden,
            "n_classes": len(self.class_names), "class_names": list(self.class_names), "max_length": self.max_length,
            "heads_sha": self.heads_id, "training": self.training_info,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the heads only (safetensors), a sorted JSON config and the certificate if any."""
        from safetensors.torch import save_file

        self._require_fitted()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT, "base_model": self.base_id})
        (path / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
        cert_path = path / CERTIFICATE_NAME
        if self.certificate is not None:
            self.certificate.save(cert_path)
        elif cert_path.exists():
            cert_path.unlink()  # a stale certificate would vouch for other heads
        return path

    @classmethod
    def from_pretrained(cls, base: Any, directory: str | Path, *, strict: bool = True) -> EarlyExitClassifier:
        """Load heads saved by :meth:`save_pretrained` onto ``base`` (None: the base named in the config).

        Refuses heads made for another base (other layer count, hidden size or model type; with
        ``strict``, other weights).
        """
        from safetensors.torch import load_file

        path = Path(directory)
        cfg = _read_config(path)
        model = cls.from_base(cfg.get("base_name") if base is None else base, class_names=cfg["class_names"],
                              pooling=cfg.get("pooling"), head=cfg.get("head", "linear"),
                              mlp_hidden=int(cfg.get("mlp_hidden", 256)), max_length=cfg.get("max_length"))
        for key, mine in (("model_type", model.backbone.model_type), ("n_layers", model.n_layers), ("hidden_size", model.hidden_size)):
            if cfg.get(key) is not None and cfg[key] != mine:
                raise StopwiseError(
                    f"The heads in '{path}' were trained for a base with {key} = {cfg[key]!r}; the base model "
                    f"{model.base_name!r} has {key} = {mine!r}. Load them on the base they were made for ({cfg.get('base_name')!r})."
                )
        if cfg.get("base_model") not in (None, model.base_id):
            msg = (f"The heads in '{path}' were trained on base {cfg['base_model']!r}; this base is {model.base_id!r} "
                   "(same shape, other weights).")
            if strict:
                raise StopwiseError(msg + " Pass strict=False to load them anyway.")
            warnings.warn(msg, UserWarning, stacklevel=2)
        state = load_file(str(path / WEIGHTS_NAME))
        try:
            model.heads.load_state_dict(state)
        except RuntimeError as exc:
            raise StopwiseError(f"The heads in '{path}' do not fit this base model: {exc}") from None
        model.fitted = True
        model.training_info = dict(cfg.get("training") or {})
        cert = path / CERTIFICATE_NAME
        if cert.is_file():
            certificate = Certificate.load(cert)
            model.check_certificate(certificate)
            model.certificate = certificate
        return model

    def calibrate(self, trace: Trace, rule: Rule | str = "max_prob", **kwargs: Any) -> Certificate:
        """Calibrate ``rule`` on traces recorded with these heads; the certificate is kept for
        :meth:`predict` (``certificate=self.certificate``) and :meth:`save_pretrained`."""
        from stopwise.calibrate import calibrate

        if trace.meta.get("heads") not in (None, self.heads_id):
            raise StopwiseError(f"The trace was recorded with heads {trace.meta.get('heads')!r}; these heads are {self.heads_id!r}.")
        rule_obj = make_rule(rule) if isinstance(rule, str) else rule
        self.certificate = calibrate(trace, rule_obj, **kwargs)
        return self.certificate


#: The rows of a lone row's batch (read only).
_ROW0 = np.zeros(1, dtype=np.int64)
_ROW0.flags.writeable = False


#: Two-class probabilities that ask a rule whether it has a stage statistic.
_PROBE = np.full((1, 2), 0.5)
_PROBE.flags.writeable = False

#: Softmax outputs a rule's top_prob_band holds for.
_BAND_DTYPES = (torch.float32, torch.float64)


def _snapshot(certificate: Certificate) -> tuple[Any, ...]:
    """What a certificate's rule and its check against a model are made from."""
    return (certificate.certified, certificate.lam, certificate.n_stages, certificate.rule, certificate.thresholds,
            certificate.source.get("base_model"), certificate.source.get("heads"))


def _lone_row_decider(rule: Rule, n_classes: int) -> Callable[[torch.Tensor], np.ndarray | None] | None:
    """How a lone row decides without a Stopper, or None when the rule needs one (it keeps state
    or reads signals). Each decides on exactly the floats the Stopper compares, so the row stops
    at the same layer; NaN never fires (the comparison is False), as in the Stopper."""
    band = rule.top_prob_band(n_classes)
    if band is not None and band[0] == band[1]:
        top = band[0]

        # The head's largest value, converted to float64, is the Stopper's statistic: only the
        # answering head's probabilities are converted to numpy.
        def on_top(p: torch.Tensor) -> np.ndarray | None:
            return _numpy(p) if float(p.max()) >= top else None

        return on_top
    # A user's rule may override stage_statistic and still answer None ("any other rule").
    if type(rule).stage_statistic is Rule.stage_statistic or rule.stage_statistic(_PROBE) is None:
        return None
    t, stat, neg = rule.threshold(), rule.stage_statistic, rule.direction < 0
    if t == np.inf:
        return lambda p: None  # +inf never fires, even on a statistic of +inf (as in the Stopper)
    lo, hi = (-np.inf, np.inf) if band is None else band

    def on_statistic(p: torch.Tensor) -> np.ndarray | None:
        if p.dtype in _BAND_DTYPES and p.shape[-1] == n_classes:
            # Outside the band the head's top value settles it (entropy: one max instead of a
            # float64 copy and four numpy calls after every layer). NaN falls through both.
            top = float(p.max())
            if top < lo:
                return None
            if top >= hi:
                return _numpy(p)
        p64 = _numpy(p)
        s = stat(p64)[0]  # type: ignore[index]
        return p64 if (s <= -t if neg else s >= t) else None

    return on_statistic


def _unpadded_batch(rows: np.ndarray, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, bool]:
    """A batch of equally long rows: no padding, and a mask of ones (one tensor call each: per-row
    tensor writes cost more than a head at batch 1)."""
    ids = torch.from_numpy(np.array(seqs, dtype=np.int64))
    return rows, ids, torch.ones(ids.shape, dtype=torch.long), True


def _numpy(probs: torch.Tensor) -> np.ndarray:
    """Head probabilities as traces hold them (float64)."""
    out: np.ndarray = probs.double().numpy()
    return out


def _check_class_names(names: Any) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) < 2:
        raise StopwiseError(f"The 'class_names' parameter must be a list of at least 2 class names. Got {names!r} instead.")
    out = tuple(str(x) for x in names)
    if len(set(out)) != len(out):
        raise StopwiseError(f"The 'class_names' parameter must hold distinct names. Got {list(out)} instead.")
    return out


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise StopwiseError("Texts must be a list of strings; got a single string. Wrap it in a list: [text].")
    try:
        items = list(texts)
    except TypeError:
        raise StopwiseError(f"Texts must be a list of strings. Got {type(texts).__name__} instead.") from None
    if not items:
        raise StopwiseError("Texts must be a non-empty list of strings. Got an empty list.")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise StopwiseError(f"Texts must be strings. Row {i} is {type(t).__name__}: {t!r:.60}.")
    empty = [i for i, t in enumerate(items) if not t.strip()]
    if empty:
        raise StopwiseError(f"Texts must not be empty or whitespace only. Rows {empty[:10]} are{' (and more)' if len(empty) > 10 else ''}.")
    return items


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise StopwiseError(f"'{path}' does not hold stopwise exit heads ({CONFIG_NAME} and {WEIGHTS_NAME}).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise StopwiseError(f"'{cfg_path}' is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise StopwiseError(f"'{cfg_path}' is not a stopwise heads config (format {cfg.get('format') if isinstance(cfg, dict) else None!r}).")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        warnings.warn(f"Ignoring unknown keys {unknown} in '{cfg_path}' (written by a newer stopwise?).", UserWarning, stacklevel=3)
    if "class_names" not in cfg:
        raise StopwiseError(f"'{cfg_path}' lacks 'class_names'.")
    return cfg
