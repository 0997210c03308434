"""Exit heads, one per layer, and how they are trained on cached pooled hidden states.

The backbone is frozen (DeeBERT's second stage; EE-Tuning): one forward pass caches the pooled
hidden state of every layer, then every head trains on its layer's features in seconds. Heads
standardise their input with the training features' mean and standard deviation (kept as
buffers), which makes one learning rate work for post-LN encoders and RMS-normed decoders alike.

Objectives: ``"labels"`` (cross-entropy), ``"distill"`` (KL to the final head's probabilities,
FastBERT's self-distillation, no labels needed once the final head exists) or ``"both"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stopwise.core.errors import StopwiseError, check_choice

HEAD_TYPES = ("linear", "mlp")
OBJECTIVES = ("labels", "distill", "both")
OPTIMIZERS = ("adam", "lbfgs")


def tensors_key(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Changes whenever one of ``tensors`` is modified in place (its version counter) or replaced
    (its storage): the cache key of values derived from weights."""
    ts = list(tensors)
    return (*(t._version for t in ts), *(t.data_ptr() for t in ts))


class ExitHead(nn.Module):
    """Standardise, then a linear layer or a one-hidden-layer MLP."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden_size: int, n_classes: int, *, kind: str = "linear", mlp_hidden: int = 256) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.net: nn.Linear | nn.Sequential
        if kind == "linear":
            self.net = nn.Linear(hidden_size, n_classes)
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, n_classes))
        self._fused: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    @property
    def linears(self) -> list[nn.Linear]:
        """The linear layers, input side first (one, or the MLP's two)."""
        return [m for m in self.net.modules() if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, nn.Linear):
            weight, bias = self._fused_linear()
            return F.linear(x, weight, bias)
        out: torch.Tensor = self.net((x - self.mean) / self.scale)
        return out

    def _fused_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardisation folded into the linear layer: W (x - m) / s + b = (W / s) x + (b - (W / s) m).

        A head runs after every layer of every batch, where one fused matmul instead of three
        element-wise ops and a matmul is a measurable share of a layer at batch 1. The fused
        weights are cached while gradients are off, keyed on the tensors' in-place version
        counters, so training or ``load_state_dict`` invalidates them.
        """
        lin = self.net
        assert isinstance(lin, nn.Linear)
        key = tensors_key((lin.weight, lin.bias, self.mean, self.scale))
        if self._fused is not None and self._fused[0] == key and not torch.is_grad_enabled():
            return self._fused[1], self._fused[2]
        weight = lin.weight / self.scale
        bias = lin.bias - weight @ self.mean
        if not torch.is_grad_enabled():
            self._fused = (key, weight, bias)
        return weight, bias


class ExitHeads(nn.Module):
    """``n_layers`` heads; head ``k`` reads the pooled output of layer ``k + 1``."""

    def __init__(self, n_layers: int, hidden_size: int, n_classes: int, *, kind: str = "linear", mlp_hidden: int = 256) -> None:
        super().__init__()
        self.kind = check_choice(kind, "head", "EarlyExitClassifier", HEAD_TYPES)
        self.mlp_hidden = int(mlp_hidden)
        self.n_classes = int(n_classes)
        self.heads = nn.ModuleList(
            [ExitHead(hidden_size, n_classes, kind=kind, mlp_hidden=mlp_hidden) for _ in range(n_layers)]
        )
        self._folded: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return len(self.heads)

    def head(self, layer: int) -> ExitHead:
        head = self.heads[layer]
        assert isinstance(head, ExitHead)
        return head

    @property
    def dtype(self) -> torch.dtype:
        return self.head(0).mean.dtype

    def logits(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        head = self.head(layer)
        out: torch.Tensor = head(pooled if pooled.dtype == head.mean.dtype else pooled.to(head.mean.dtype))
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer, read from the modules' own tables: ``parameters()`` builds
        qualified names and costs more than an exit head, on every batch-1 predict call."""
        out: list[torch.Tensor] = []
        _collect(self, out)
        return out

    def state_key(self) -> tuple[int, ...]:
        """Changes whenever a head tensor is edited in place or replaced (see :func:`tensors_key`)."""
        return tensors_key(self.tensors())

    def folded(self, key: tuple[int, ...] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every linear head's folded (weight, bias), the tensors :meth:`logits` multiplies by; None
        for MLP heads. Fetched once per inference call: at batch 1 the module call and cache check
        of :meth:`logits` cost five times the matmul itself, after every layer. The list is kept
        under one key for all heads (:meth:`state_key`, or ``key`` when the caller already has it),
        so a call checks it once, not once per head."""
        if self.kind != "linear":
            return None
        key = self.state_key() if key is None else key
        if self._folded is not None and self._folded[0] == key and not torch.is_grad_enabled():
            return self._folded[1]
        out = [self.head(k)._fused_linear() for k in range(len(self))]
        if not torch.is_grad_enabled():
            self._folded = (key, out)
        return out


def train_heads(
    heads: ExitHeads,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    objective: str = "labels",
    optimizer: str = "adam",
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    batch_size: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the heads on cached features (n, L, H); returns final training losses per layer.

    All heads of a phase train together as one stacked problem (their losses are independent, so
    this equals training them one by one, in a fraction of the optimizer calls). Phase 1 trains
    the final head on labels; phase 2 the others, against labels and/or the final head's
    probabilities. Seeded and deterministic on CPU.
    """
    objective = check_choice(objective, "objective", "EarlyExitClassifier.fit", OBJECTIVES)
    optimizer = check_choice(optimizer, "optimizer", "EarlyExitClassifier.fit", OPTIMIZERS)
    n_layers = len(heads)
    if features.ndim != 3 or features.shape[1] != n_layers:
        raise StopwiseError(f"Cached features must have shape (n, {n_layers}, hidden). Got {tuple(features.shape)}.")
    if labels is None and objective != "distill":
        raise StopwiseError(
            f"The 'objective' {objective!r} needs labels. Pass labels, or use objective='distill' "
            "with heads whose final head is already trained."
        )
    # A plain tensor: features cached under inference_mode cannot take part in autograd graphs.
    features = features.detach().float().clone()
    opts = {"optimizer": optimizer, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "batch_size": batch_size, "temperature": temperature}
    losses = [0.0] * n_layers
    threads = torch.get_num_threads()
    # Tiny matmuls: one thread is faster than several (no fork/join), and leaves cores to others.
    torch.set_num_threads(1)
    try:
        _train_phases(heads, features, labels, objective, seed, opts, losses)
    finally:
        torch.set_num_threads(threads)
    return {"loss_per_layer": [round(x, 6) for x in losses]}


def _train_phases(heads: ExitHeads, features: torch.Tensor, labels: torch.Tensor | None, objective: str, seed: int,
                  opts: dict[str, Any], losses: list[float]) -> None:
    last = len(heads) - 1
    temperature = opts["temperature"]
    if labels is not None:
        losses[last] = _fit_stack(heads, [last], features, hard=labels, soft=None, seed=seed, **opts)[0]
    with torch.no_grad():
        teacher = F.softmax(heads.logits(last, features[:, last]) / temperature, dim=-1)
    if last:
        hard = labels if objective in ("labels", "both") else None
        soft = teacher if objective in ("distill", "both") else None
        losses[:last] = _fit_stack(heads, list(range(last)), features, hard=hard, soft=soft, seed=seed + 1, **opts)


def _loss(logits: torch.Tensor, hard: torch.Tensor | None, soft: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Per-layer losses summed over layers; logits (n, L, C)."""
    total = torch.zeros((), dtype=logits.dtype)
    parts = 0
    if hard is not None:
        flat = logits.reshape(-1, logits.shape[-1])
        target = hard.repeat_interleave(logits.shape[1])
        total = total + F.cross_entropy(flat, target, reduction="sum") / logits.shape[0]
        parts += 1
    if soft is not None:
        logp = F.log_softmax(logits / temperature, dim=-1)
        kl = (soft[:, None, :] * (torch.log(soft.clamp(min=1e-12))[:, None, :] - logp)).sum()
        total = total + kl / logits.shape[0] * temperature**2
        parts += 1
    return total / parts


def _per_layer(logits: torch.Tensor, hard: torch.Tensor | None, soft: torch.Tensor | None, temperature: float) -> list[float]:
    return [float(_loss(logits[:, j : j + 1], hard, soft, temperature)) for j in range(logits.shape[1])]


def _init(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    bound = 1.0 / fan_in**0.5
    return (torch.rand(shape, generator=gen) * 2 - 1) * float(bound)


def _fit_stack(heads: ExitHeads, layers: list[int], x_all: torch.Tensor, *, hard: torch.Tensor | None,
               soft: torch.Tensor | None, optimizer: str, epochs: int, lr: float, weight_decay: float,
               batch_size: int | None, temperature: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    x = x_all[:, layers]  # (n, l, H)
    mean = x.mean(dim=0)
    scale = x.std(dim=0).clamp(min=1e-6)
    x = (x - mean) / scale
    n, nl, hid = x.shape
    c = heads.n_classes
    # Weights drawn from our own generator so training never depends on the global RNG.
    if heads.kind == "linear":
        params = [_init((nl, hid, c), hid, gen), torch.zeros(nl, c)]
    else:
        m = heads.mlp_hidden
        params = [_init((nl, hid, m), hid, gen), torch.zeros(nl, m), _init((nl, m, c), m, gen), torch.zeros(nl, c)]
    for p in params:
        p.requires_grad_(True)

    def forward(xb: torch.Tensor) -> torch.Tensor:
        if len(params) == 2:
            return torch.einsum("nlh,lhc->nlc", xb, params[0]) + params[1]
        z = F.gelu(torch.einsum("nlh,lhm->nlm", xb, params[0]) + params[1])
        return torch.einsum("nlm,lmc->nlc", z, params[2]) + params[3]

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            decay = sum((p**2).sum() for p in params[0::2])
            loss = _loss(forward(x), hard, soft, temperature) + weight_decay * decay
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
    else:
        adam = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        bs = n if not batch_size or batch_size >= n else int(batch_size)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen) if bs < n else None
            for start in range(0, n, bs):
                idx = slice(None) if order is None else order[start : start + bs]
                adam.zero_grad()
                loss = _loss(forward(x[idx]), None if hard is None else hard[idx],
                             None if soft is None else soft[idx], temperature)
                loss.backward()  # type: ignore[no-untyped-call]
                adam.step()
    with torch.no_grad():
        for j, k in enumerate(layers):
            head = heads.head(k)
            head.mean.copy_(mean[j])
            head.scale.copy_(scale[j])
            # params alternate weight (l, in, out), bias (l, out), one pair per linear layer.
            for lin, weight, bias in zip(head.linears, params[0::2], params[1::2], strict=True):
                lin.weight.copy_(weight[j].T)
                lin.bias.copy_(bias[j])
        return _per_layer(forward(x), hard, soft, temperature)


def _collect(module: nn.Module, out: list[torch.Tensor]) -> None:
    out += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    for child in module._modules.values():
        if child is not None:
            _collect(child, out)
