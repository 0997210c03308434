"""A frozen transformer with one exit head per layer: inputs, pooled states, identity and features.

:class:`~stopwise.encoder.model.EarlyExitClassifier` builds on this class (through
:class:`~stopwise.encoder.predict.EarlyExitPredictor`, the online early-exit loop).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_choice, check_int
from stopwise.core.rules import Rule
from stopwise.encoder.backbone import Backbone, BatchState, mean_weights
from stopwise.encoder.batches import Encoded, check_class_names, check_texts, running_mean, unpadded_batch
from stopwise.encoder.heads import HEAD_TYPES, ExitHeads

POOLINGS = ("mean", "cls", "last")
#: What exit k reads: its own layer's pooled state, or the mean of layers 1..k's (a running mean:
#: every exit, the final one included, then sees all the layers run so far).
EXIT_INPUTS = ("layer", "mean")


def fingerprint_model(model: torch.nn.Module) -> str:
    """A short hash of the first weights: tells two checkpoints of the same shape apart."""
    h = hashlib.sha256()
    for name, p in list(model.state_dict().items())[:4]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:12]


class ExitsOnBackbone:
    """Exit heads on a frozen transformer, and what every use of them shares."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, class_names: Sequence[str], base_name: str,
                 pooling: str | None = None, head: str = "linear", mlp_hidden: int = 256,
                 max_length: int | None = None, exit_input: str = "layer") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.backbone = Backbone(model)
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.class_names = check_class_names(class_names)
        default_pool = "last" if self.backbone.decoder else "mean"
        self.pooling = check_choice(pooling or default_pool, "pooling", "EarlyExitClassifier", POOLINGS)
        self.head_kind = check_choice(head, "head", "EarlyExitClassifier", HEAD_TYPES)
        self.mlp_hidden = int(mlp_hidden)
        self.exit_input = check_choice(exit_input, "exit_input", "EarlyExitClassifier", EXIT_INPUTS)
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
        self.base_id = f"{self.backbone.model_type}-{self.n_layers}x{self.hidden_size}-{fingerprint_model(model)}"
        self._layer_params = sum(p.numel() for p in self.backbone.layers[0].parameters())
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
        if self.exit_input != "layer":
            # The same weights read other inputs: another model, so another id (the default's is unchanged).
            h.update(f"exit_input={self.exit_input}".encode())
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
        texts = check_texts(texts)
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
                yield unpadded_batch(rows, seqs)
                continue
            pad = 0 if self.tokenizer.pad_token_id is None else int(self.tokenizer.pad_token_id)
            ids = torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long)
            yield rows, ids, mask, False

    # -- pooled states and features ----------------------------------------------------------
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
    def exit_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the heads read from cached :meth:`features` (n, L, hidden): the features
        themselves, or with ``exit_input="mean"`` their running mean over layers, computed by
        the same function as the online path."""
        if self.exit_input == "layer":
            return features
        out = torch.empty(features.shape, dtype=torch.float32)
        total = None
        for k in range(features.shape[1]):
            total, out[:, k] = running_mean(total, features[:, k], k)
        return out

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
    def _layer_flops(self, n_tokens: np.ndarray) -> np.ndarray:
        """Approximate FLOPs of one layer per row: weights (2 per parameter per token) + attention."""
        t = n_tokens.astype(np.float64)
        flops: np.ndarray = (2.0 * self._layer_params * t + 4.0 * t * t * self.hidden_size) / 1e9
        return flops
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
