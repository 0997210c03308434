"""Exit heads on a frozen causal LM: the model's own final norm and tied LM head, behind a small
trained adapter, at chosen layers; saved and loaded like PEFT adapters.

Head at layer ``l`` (``l`` = number of decoder layers run, 1..N-1) maps the residual stream after
``l`` layers to next-token logits: ``lm_head(norm(h + up(down(h))))``. ``up`` starts at zero, so
an untrained head is the plain "early exit through the model's own head" of LayerSkip. Only the
adapters (and the draft vocabulary) are new weights; the backbone is never modified.

A draft head may score only a reduced vocabulary (the most frequent tokens): the tied LM head is
about a fifth of SmolLM2-135M's compute, and verification against the full model keeps decoding
exact whatever the draft proposes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from stopwise._version import __version__
from stopwise.core.errors import StopwiseError
from stopwise.core.jsonfile import read_tagged_json
from stopwise.decoder.backbone import Backbone

FORMAT = "stopwise.decoder.heads"
CONFIG_NAME = "stopwise_heads.json"
WEIGHTS_NAME = "stopwise_heads.safetensors"
CERTIFICATE_NAME = "certificate.json"
CONFIG_KEYS = {
    "format", "base_model", "base_fingerprint", "model_type", "n_layers", "hidden_size", "vocab_size", "layers",
    "rank", "draft_vocab_size", "stopwise_version", "training",
}


def base_identity(backbone: Backbone) -> dict[str, Any]:
    """What a head set must match: architecture sizes and a fingerprint of the embedding weights."""
    w = backbone.lm_head.weight.detach()
    sample = w[:: max(1, w.shape[0] // 64)].to(torch.float32).contiguous().cpu().numpy().tobytes()
    cfg = backbone.config
    return {
        "base_model": str(getattr(cfg, "_name_or_path", "") or type(backbone.model).__name__),
        "base_fingerprint": hashlib.sha256(sample).hexdigest()[:16],
        "model_type": str(cfg.model_type),
        "n_layers": backbone.n_layers,
        "hidden_size": backbone.hidden_size,
        "vocab_size": backbone.vocab_size,
    }


class LowRank(nn.Module):
    """h + up(down(h)), identity at initialisation."""

    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, d, bias=False)
        nn.init.normal_(self.down.weight, std=d**-0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, h + self.up(self.down(h)))


class ExitHeads(nn.Module):
    """Adapters at ``layers`` plus an optional reduced draft vocabulary (token ids)."""

    def __init__(self, backbone: Backbone, *, layers: list[int] | None = None, rank: int = 32,
                 draft_vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        n = backbone.n_layers
        layers = list(range(1, n)) if layers is None else sorted(set(int(x) for x in layers))
        bad = [x for x in layers if not 1 <= x < n]
        if bad or not layers:
            raise StopwiseError(
                f"The 'layers' parameter of ExitHeads must be layer counts in [1, {n - 1}] for this {n}-layer "
                f"model. Got {layers!r} instead."
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise StopwiseError(f"The 'rank' parameter of ExitHeads must be an int >= 0. Got {rank!r} instead.")
        self.backbone = [backbone]  # a list: keep the frozen model out of this module's parameters
        self.layers = layers
        self.rank = rank
        self.identity = base_identity(backbone)
        self.adapters = nn.ModuleDict({str(x): LowRank(backbone.hidden_size, rank) for x in layers} if rank else {})
        w = backbone.lm_head.weight
        self.adapters.to(device=w.device, dtype=w.dtype)
        self.certificate: Any = None
        self.training_info: dict[str, Any] = {}
        self.set_draft_vocab(draft_vocab)

    # -- vocabulary -------------------------------------------------------------------------
    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        bb = self.backbone[0]
        if ids is None:
            self.draft_vocab: torch.Tensor | None = None
            self._draft_weight: torch.Tensor | None = None
            self._draft_bias: torch.Tensor | None = None
            return
        ids = torch.unique(torch.as_tensor(ids, dtype=torch.long))
        if ids.numel() < 2 or int(ids.max()) >= bb.vocab_size or int(ids.min()) < 0:
            raise StopwiseError(f"The draft vocabulary must hold >= 2 token ids in [0, {bb.vocab_size}).")
        self.draft_vocab = ids.to(bb.lm_head.weight.device)
        self._draft_weight = bb.lm_head.weight.detach()[self.draft_vocab].contiguous()
        bias = getattr(bb.lm_head, "bias", None)
        self._draft_bias = None if bias is None else bias.detach()[self.draft_vocab].contiguous()

    # -- scoring ----------------------------------------------------------------------------
    def adapt(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        key = str(layer)
        return self.adapters[key](h) if key in self.adapters else h

    def logits(self, h: torch.Tensor, layer: int, *, reduced: bool = False) -> torch.Tensor:
        """Next-token logits from the state after ``layer`` layers; the full model at layer N.

        ``reduced=True`` scores only the draft vocabulary (column j is token ``draft_vocab[j]``)."""
        bb = self.backbone[0]
        if layer >= bb.n_layers:
            x = bb.norm(h)
        else:
            if layer not in self.layers:
                raise StopwiseError(f"No exit head at layer {layer}; heads exist at layers {self.layers}.")
            x = bb.norm(self.adapt(h, layer))
        if reduced and self._draft_weight is not None:
            return nn.functional.linear(x, self._draft_weight, self._draft_bias)
        return cast(torch.Tensor, bb.lm_head(x))

    def to_token_ids(self, index: torch.Tensor, *, reduced: bool) -> torch.Tensor:
        """Map column indices of :meth:`logits` back to token ids."""
        if reduced and self.draft_vocab is not None:
            return self.draft_vocab[index]
        return index

    # -- persistence ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **self.identity,
            "layers": self.layers,
            "rank": self.rank,
            "draft_vocab_size": None if self.draft_vocab is None else int(self.draft_vocab.numel()),
            "stopwise_version": __version__,
            "training": self.training_info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write only the added weights (safetensors), a sorted JSON config, and the certificate."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"adapters.{k}.{name}": p.detach().contiguous().cpu() for k, m in self.adapters.items()
                   for name, p in m.state_dict().items()}
        if self.draft_vocab is not None:
            tensors["draft_vocab"] = self.draft_vocab.cpu()
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
        if self.certificate is not None:
            self.certificate.save(path / CERTIFICATE_NAME)
        return path

    @classmethod
    def load(cls, directory: str | Path, backbone: Backbone) -> ExitHeads:
        """Load heads saved by :meth:`save`, refusing heads trained for another base model."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise StopwiseError(f"'{path}' holds no stopwise exit heads (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
        config = read_tagged_json(path / CONFIG_NAME, fmt=FORMAT, what="a stopwise exit-head config")
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            warnings.warn(f"Ignoring unknown exit-head config keys {unknown} (written by a newer stopwise?).", stacklevel=2)
        _check_base(config, base_identity(backbone), path)
        tensors = load_file(str(path / WEIGHTS_NAME))
        heads = cls(backbone, layers=config["layers"], rank=int(config["rank"]), draft_vocab=tensors.get("draft_vocab"))
        state = {k[len("adapters."):]: v for k, v in tensors.items() if k.startswith("adapters.")}
        heads.adapters.load_state_dict(state)
        heads.training_info = dict(config.get("training") or {})
        if (path / CERTIFICATE_NAME).is_file():
            from stopwise.core.certificate import Certificate

            heads.certificate = Certificate.load(path / CERTIFICATE_NAME)
        return heads


def _check_base(config: dict[str, Any], mine: dict[str, Any], path: Path) -> None:
    for key in ("model_type", "n_layers", "hidden_size", "vocab_size", "base_fingerprint"):
        if config.get(key) != mine[key]:
            raise StopwiseError(
                f"The exit heads in '{path}' were trained for another base model: {key} = {config.get(key)!r} "
                f"(base {config.get('base_model')!r}), but this model has {key} = {mine[key]!r} "
                f"(base {mine['base_model']!r}). Train heads for this model with `stopwise decoder train`."
            )
