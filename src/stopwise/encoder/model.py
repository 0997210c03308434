"""Early-exit classification on a frozen pretrained transformer (DeeBERT / PABEE / FastBERT style).

``EarlyExitClassifier`` attaches one exit head per layer to any supported Hugging Face model
(encoders, or decoder LLMs as classifier backbones), trains the heads on cached hidden states,
records :class:`~stopwise.Trace` objects for calibration, and predicts with real early exit:
rows that stop leave the batch, so later layers run on fewer rows.

The class is built in layers: :mod:`~stopwise.encoder.exits` (heads on the frozen backbone, inputs,
features), :mod:`~stopwise.encoder.predict` (the online early-exit loop) and this module (training,
recording, calibration and persistence; file formats in :mod:`~stopwise.encoder.persistence`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

import stopwise.encoder.gate  # noqa: F401  (registers the "exit_gate" rule that saved certificates may name)
from stopwise._version import __version__
from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_choice
from stopwise.core.rules import Rule, make_rule
from stopwise.core.trace import Trace
from stopwise.encoder.batches import Encoded, Prediction, saturation, to_numpy
from stopwise.encoder.exits import POOLINGS
from stopwise.encoder.heads import train_heads
from stopwise.encoder.persistence import (
    CERTIFICATE_NAME,
    CONFIG_KEYS,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    read_config,
    resolve_base,
)
from stopwise.encoder.predict import COSTS, IN_FLIGHT_BATCHES, EarlyExitPredictor

__all__ = [
    "CERTIFICATE_NAME", "CONFIG_KEYS", "CONFIG_NAME", "COSTS", "FORMAT", "IN_FLIGHT_BATCHES", "POOLINGS",
    "WEIGHTS_NAME", "EarlyExitClassifier", "Encoded", "Prediction",
]


class EarlyExitClassifier(EarlyExitPredictor):
    """Exit heads on a frozen transformer; see the module docstring.

    Build with :meth:`from_base` (new heads) or :meth:`from_pretrained` (saved heads).
    """

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: Any = "minilm", *, class_names: Sequence[str], pooling: str | None = None,
                  head: str = "linear", mlp_hidden: int = 256, max_length: int | None = None,
                  exit_input: str = "layer") -> EarlyExitClassifier:
        """New (untrained) heads on a bundled model name, a local directory, or a loaded model.

        ``base`` may also be a ``(model, tokenizer)`` pair already loaded with ``AutoModel``.
        ``exit_input`` says what exit k reads: ``"layer"``, its layer's pooled state (DeeBERT /
        PABEE), or ``"mean"``, the mean of the pooled states of layers 1..k, so that the final
        head too reads every layer (on MiniLM's CHAMP steps it raised the full model's accuracy
        from 0.67 to 0.73 and the early exits' agreement with it; ``benchmarks/encoder_gate.py``).
        """
        if isinstance(base, tuple) and len(base) == 2:
            model, tok = base
            name = str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
        else:
            from transformers import AutoModel, AutoTokenizer

            path, name = resolve_base(base)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        return cls(model, tok, class_names=class_names, base_name=name, pooling=pooling, head=head,
                   mlp_hidden=mlp_hidden, max_length=max_length, exit_input=exit_input)
    def fit(self, texts: Any = None, labels: Any = None, *, features: torch.Tensor | None = None,
            objective: str = "labels", optimizer: str = "adam", epochs: int = 100, lr: float = 1e-2,
            weight_decay: float = 1e-2, head_batch_size: int | None = None, batch_size: int = 32,
            seed: int = 0, progress: bool = True, temperature: float = 1.0) -> EarlyExitClassifier:
        """Train all heads with the backbone frozen (pass ``features`` to reuse a cached pass).

        ``temperature`` softens the final head's probabilities that ``objective="distill"`` or
        ``"both"`` distil from (Hinton et al., 2015; FastBERT uses 1)."""
        if features is None:
            if texts is None:
                raise StopwiseError("EarlyExitClassifier.fit needs texts or cached features.")
            features = self.features(texts, batch_size=batch_size, progress=progress)
        y = None if labels is None else torch.as_tensor(self._labels(labels, features.shape[0]))
        if labels is None and not self.fitted:
            raise StopwiseError("Self-distillation without labels needs a trained final head: fit with labels first, or load trained heads.")
        torch.manual_seed(seed)
        info = train_heads(self.heads, self.exit_inputs(features), y, objective=objective, optimizer=optimizer, epochs=epochs, lr=lr,
                           weight_decay=weight_decay, batch_size=head_batch_size, temperature=temperature, seed=seed)
        self.fitted = True
        self.certificate = None  # new heads: an old certificate no longer applies
        self.training_info = {"objective": objective, "optimizer": optimizer, "epochs": epochs, "lr": lr,
                              "seed": seed, **({"temperature": temperature} if temperature != 1.0 else {}), "n_train": int(features.shape[0]), **info}
        return self

    @torch.inference_mode()
    def probs_from_features(self, features: torch.Tensor) -> np.ndarray:
        """(n, L, C) float32 probabilities of every head on cached features."""
        inputs = self.exit_inputs(features)
        out: np.ndarray = np.stack([F.softmax(self.heads.logits(k, inputs[:, k]), dim=-1).numpy()
                                    for k in range(self.n_layers)], axis=1)
        return out
    @staticmethod
    @torch.inference_mode()
    def saturation_from_features(features: torch.Tensor) -> np.ndarray:
        """(n, L) float64 saturation of cached features (see :meth:`trace_from_features`): one
        cosine per row and layer, layer by layer as :meth:`predict` computes it."""
        out = np.zeros(features.shape[:2], dtype=np.float64)
        for k in range(1, features.shape[1]):
            out[:, k] = to_numpy(saturation(features[:, k], features[:, k - 1]))
        return out

    def trace_from_features(self, features: torch.Tensor, labels: Any = None, *, n_tokens: np.ndarray | None = None,
                            cost: str = "layers", meta: dict[str, Any] | None = None) -> Trace:
        """A trace from cached features (what :meth:`record` does after its forward pass).

        Besides the heads' probabilities it records ``signals["saturation"]`` (n, L) float64:
        the cosine between the pooled state of layer k and of layer k - 1 (CALM's saturation,
        Schuster et al., 2022), 0.0 at layer 1, which has no previous state. :meth:`predict`
        passes the same values online to a rule that reads them (:func:`~stopwise.encoder.predict.reads_signal`)."""
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
            signals={"saturation": self.saturation_from_features(features)},
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
    # -- persistence -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "stopwise_version": __version__, "base_model": self.base_id, "base_name": self.base_name,
            "model_type": self.backbone.model_type, "n_layers": self.n_layers, "hidden_size": self.hidden_size,
            "pooling": self.pooling, "head": self.head_kind, "mlp_hidden": self.mlp_hidden, "exit_input": self.exit_input,
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
        cfg = read_config(path)
        model = cls.from_base(cfg.get("base_name") if base is None else base, class_names=cfg["class_names"],
                              pooling=cfg.get("pooling"), head=cfg.get("head", "linear"),
                              mlp_hidden=int(cfg.get("mlp_hidden", 256)), max_length=cfg.get("max_length"),
                              exit_input=cfg.get("exit_input", "layer"))
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
        from stopwise.core.calibrate import calibrate

        if trace.meta.get("heads") not in (None, self.heads_id):
            raise StopwiseError(f"The trace was recorded with heads {trace.meta.get('heads')!r}; these heads are {self.heads_id!r}.")
        rule_obj = make_rule(rule) if isinstance(rule, str) else rule
        self.certificate = calibrate(trace, rule_obj, **kwargs)
        return self.certificate
