"""Run a Hugging Face model layer by layer with its own modules, on a batch that can shrink.

We never copy transformers' forward code: we find the model's embedding module, its stack of
layers (a ``ModuleList``) and, for decoders, its rotary embedding and final norm, then call them
in the order the model's own ``forward`` does. Attention masks come from transformers' own
``masking_utils`` helpers, which build exactly the mask the model builds for itself (same
attention implementation, same dtype), so with nothing removed the hidden states are bit-identical
to ``model(input_ids, attention_mask).last_hidden_state``.

Rows are right-padded. When rows leave the batch, :meth:`Backbone.select` index-selects the hidden
states and the 2-D attention mask, trims padding columns no remaining row needs, and rebuilds the
4-D mask: later layers really run on fewer rows and fewer columns. :meth:`Backbone.repack` merges
the survivors of several batches into fewer, full ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stopwise.core.errors import StopwiseError

#: Encoder families (bidirectional attention, called as layer(hidden, mask)).
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
#: Decoder LLM families (causal attention, rotary position embeddings passed to each layer).
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TYPES = ENCODER_TYPES + DECODER_TYPES

#: Where the layer stack lives, tried in order (attribute paths relative to the base model).
LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "h", "encoder.layers")
EMBED_PATHS = ("embeddings", "embed_tokens")
NORM_PATHS = ("norm", "final_layer_norm", "ln_f")


def _get(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unsupported(model_type: str, why: str) -> StopwiseError:
    return StopwiseError(
        f"The model type {model_type!r} is not supported by stopwise.encoder ({why}). "
        f"Supported model types: {list(SUPPORTED_TYPES)}."
    )


@dataclass
class BatchState:
    """Hidden states and masks for the rows still running (right-padded)."""

    hidden: torch.Tensor  # (B, T, H)
    mask2d: torch.Tensor  # (B, T) long, 1 = token
    mask4d: Any  # what the layers take: a 4-D tensor, or None when no row is padded
    position_ids: torch.Tensor | None  # (1, T) for decoders
    position_embeddings: Any  # (cos, sin) for rotary decoders, else None
    mean_weights: torch.Tensor | None = None  # (B, 1, T) for mean pooling, built once per batch shape
    unpadded: bool = False  # no row has padding (known once the 4-D mask is built)


class Backbone:
    """The model's own modules, found generically, and the loop that calls them."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        model_type = str(getattr(config, "model_type", type(model).__name__))
        # A *ForCausalLM / *ForSequenceClassification wrapper: use its base model.
        base = getattr(model, "base_model", model)
        if not isinstance(base, nn.Module):
            base = model
        self.model = base
        self.config = config
        self.model_type = model_type
        if model_type not in SUPPORTED_TYPES:
            raise _unsupported(model_type, "no layer-by-layer recipe for it")
        self.decoder = model_type in DECODER_TYPES
        self.layers = self._find(LAYER_PATHS, "layer stack", lambda m: isinstance(m, nn.ModuleList) and len(m) > 0)
        self.embeddings = self._find(EMBED_PATHS, "embedding module", lambda m: isinstance(m, nn.Module))
        self.norm = _first(base, NORM_PATHS) if self.decoder else None
        self._rms_eps = _rms_norm_eps(self.norm)
        self.rotary: Any = getattr(base, "rotary_emb", None) if self.decoder else None
        if self.decoder and self.rotary is None:
            raise _unsupported(model_type, "no 'rotary_emb' module found")
        n_cfg = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
        self.n_layers = int(n_cfg) if n_cfg else len(self.layers)
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        if hidden is None:
            raise _unsupported(model_type, "config has no hidden size")
        self.hidden_size = int(hidden)
        self._embed_params = set(inspect.signature(self.embeddings.forward).parameters)
        self._maskless: set[tuple[Any, ...]] = set()

    def _find(self, paths: tuple[str, ...], what: str, ok: Any) -> Any:
        for path in paths:
            obj = _get(self.model, path)
            if obj is not None and ok(obj):
                return obj
        raise _unsupported(self.model_type, f"could not find its {what} under {list(paths)}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- one batch ----------------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, mask2d: torch.Tensor, *, unpadded: bool | None = None) -> BatchState:
        """Embed a right-padded batch and build its masks and position embeddings. ``unpadded``:
        the caller knows whether any row has padding (None: read it off ``mask2d``)."""
        kwargs: dict[str, Any] = {}
        if "input_ids" in self._embed_params:
            kwargs["input_ids"] = input_ids
            hidden = self.embeddings(**kwargs)
        else:  # nn.Embedding (decoders)
            hidden = self.embeddings(input_ids)
        state = BatchState(hidden=hidden, mask2d=mask2d, mask4d=None, position_ids=None, position_embeddings=None)
        if self.decoder:
            # What LlamaModel.forward does without a cache: positions 0..T-1, shared by all rows.
            state.position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            state.position_embeddings = self.rotary(hidden, position_ids=state.position_ids)
        self._build_mask(state, unpadded)
        return state

    def _build_mask(self, state: BatchState, unpadded: bool | None = None) -> None:
        # A batch without padding often needs no mask at all (SDPA); whether it does depends only
        # on its shape and the model's settings, so the answer is remembered: at batch 1 asking
        # transformers again costs as much as an exit head. Only "no mask" is kept (a set of
        # shapes, never a tensor), and a batch with padding asks transformers as before.
        state.unpadded = bool(state.mask2d.all()) if unpadded is None else unpadded
        key = (*state.hidden.shape[:2], state.hidden.dtype, state.hidden.device,
               getattr(self.config, "_attn_implementation", None)) if state.unpadded else None
        if key is not None and key in self._maskless:
            state.mask4d = None
            return
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        if self.decoder:
            state.mask4d = create_causal_mask(
                config=self.config, inputs_embeds=state.hidden, attention_mask=state.mask2d,
                cache=None, position_ids=state.position_ids,
            )
        else:
            state.mask4d = create_bidirectional_mask(
                config=self.config, inputs_embeds=state.hidden, attention_mask=state.mask2d,
            )
        if key is not None and state.mask4d is None:
            self._maskless.add(key)

    def layer(self, index: int, state: BatchState) -> None:
        """Run layer ``index`` in place on the batch."""
        module = self.layers[index]
        if self.decoder:
            out = module(state.hidden, attention_mask=state.mask4d, position_embeddings=state.position_embeddings,
                         position_ids=state.position_ids)
        else:
            out = module(state.hidden, state.mask4d)
        state.hidden = out[0] if isinstance(out, tuple) else out

    def output(self, state: BatchState) -> torch.Tensor:
        """Hidden states as the model would return them after this layer (decoders: final norm)."""
        return self.norm(state.hidden) if self.norm is not None else state.hidden

    def pooled(self, state: BatchState, how: str, *, weights: torch.Tensor | None = None,
               exact: bool = True) -> torch.Tensor:
        """:func:`pool` of :meth:`output`. ``exact``: as written, op for op (what the final head
        needs to equal the bare model bit for bit). Otherwise a decoder's final norm, which is per
        token, is taken after pooling where that is the same function: on the one pooled token
        (cls, last), or, for an RMSNorm and mean pooling, folded into the pooling weights, since
        mean_t(w * h_t / r_t) = w * sum_t (m_t / r_t) h_t. Norming every token after every layer
        cost SmolLM2's exit heads 84% of their time (2.3% of early exit's, BBC sentences); the
        folded form reads the hidden states twice instead of about six times, and differs from the
        written one by rounding alone (~1e-7)."""
        if self.norm is None or exact or (how == "mean" and self._rms_eps is None):
            return pool(self.output(state), state.mask2d, how, weights=weights)
        if how != "mean":
            one: torch.Tensor = self.norm(pool(state.hidden, state.mask2d, how))
            return one
        hidden = state.hidden.float()  # the norm's own precision
        w = mean_weights(state.mask2d, hidden.dtype) if weights is None else weights.float()
        inv = torch.rsqrt(torch.linalg.vector_norm(hidden, dim=-1).square_().div_(hidden.shape[-1]).add_(self._rms_eps))
        pooled: torch.Tensor = torch.bmm(w * inv.unsqueeze(1), hidden).squeeze(1) * self.norm.weight.float()
        return pooled.to(state.hidden.dtype)

    def select(self, state: BatchState, keep: torch.Tensor) -> BatchState:
        """Keep some rows (a bool mask or index tensor); drop padding columns nobody needs."""
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
        mask2d = state.mask2d.index_select(0, idx)
        if state.unpadded:  # every row is full length: nothing to trim, and no padding to find
            return self._batch(state, state.hidden.index_select(0, idx), mask2d, mask2d.shape[1], unpadded=True)
        width = int(mask2d.sum(dim=1).max().item()) if idx.numel() else 0
        return self._batch(state, state.hidden.index_select(0, idx)[:, :width], mask2d[:, :width], width)

    def repack(self, states: list[BatchState], keeps: list[torch.Tensor], batch_size: int) -> list[BatchState]:
        """The kept rows of several batches (bool masks), in order, packed into batches of
        ``batch_size``, each as wide as its longest row. Each new batch gathers its rows straight
        from the batches they were in (one index_select per source, and a concatenation when it
        draws on several), with no merged tensor of all survivors in between. Hidden states move
        as they are: a row's padding columns are masked, so what they hold does not reach its
        real tokens."""
        parts = [(st, keep.nonzero().flatten()) for st, keep in zip(states, keeps, strict=True)]
        parts = [(st, idx) for st, idx in parts if idx.numel()]
        total = sum(idx.numel() for _, idx in parts)
        out: list[BatchState] = []
        for start in range(0, total, batch_size):
            pieces, at = [], 0
            for st, idx in parts:  # the sources' rows that fall in [start, start + batch_size)
                lo, hi = max(start - at, 0), min(start + batch_size - at, idx.numel())
                if lo < hi:
                    pieces.append((st, idx[lo:hi]))
                at += idx.numel()
            out.append(self._gather(pieces))
        return out

    def _gather(self, pieces: list[tuple[BatchState, torch.Tensor]]) -> BatchState:
        """One batch of the given rows of some batches, trimmed to its longest row."""
        if len(pieces) == 1:
            return self.select(*pieces[0])
        if all(st.unpadded for st, _ in pieces) and len({st.hidden.shape[1] for st, _ in pieces}) == 1:
            # Equally long rows without padding (as a group of length-sorted batches mostly holds):
            # the rows join as they are, and the batch is unpadded too.
            hidden = torch.cat([st.hidden.index_select(0, idx) for st, idx in pieces])
            mask2d = torch.cat([st.mask2d.index_select(0, idx) for st, idx in pieces])
            return self._batch(pieces[0][0], hidden, mask2d, hidden.shape[1], unpadded=True)
        widest = max((st for st, _ in pieces), key=lambda st: st.hidden.shape[1])
        n, t = sum(idx.numel() for _, idx in pieces), widest.hidden.shape[1]
        hidden = widest.hidden.new_zeros((n, t, widest.hidden.shape[2]))
        mask2d = widest.mask2d.new_zeros((n, t))
        at = 0
        for st, idx in pieces:
            m, w = idx.numel(), st.hidden.shape[1]
            hidden[at : at + m, :w] = st.hidden.index_select(0, idx)
            mask2d[at : at + m, :w] = st.mask2d.index_select(0, idx)
            at += m
        width = int(mask2d.sum(dim=1).max().item())
        return self._batch(widest, hidden[:, :width], mask2d[:, :width], width)

    def _batch(self, like: BatchState, hidden: torch.Tensor, mask2d: torch.Tensor, width: int, *,
               unpadded: bool | None = None) -> BatchState:
        """A batch of these rows, ``width`` columns wide, with ``like``'s positions (at least as wide)."""
        new = BatchState(
            hidden=hidden, mask2d=mask2d, mask4d=None,
            position_ids=None if like.position_ids is None else like.position_ids[:, :width],
            position_embeddings=None,
        )
        if like.position_embeddings is not None:
            # Rotary tables depend on positions only (shape (1, T, d)): slicing equals recomputing.
            new.position_embeddings = tuple(t[:, :width] for t in like.position_embeddings)
        if hidden.shape[0]:
            self._build_mask(new, unpadded)
        return new


def _first(module: nn.Module, paths: tuple[str, ...]) -> Any:
    for path in paths:
        obj = _get(module, path)
        if isinstance(obj, nn.Module):
            return obj
    return None


def _rms_norm_eps(norm: Any) -> float | None:
    """Its eps when ``norm`` computes weight * x / sqrt(mean(x²) + eps) over the last axis
    (LLaMA's, Mistral's, Qwen's RMSNorm), else None. Told by its attributes, then checked on a
    probe, so a variant with another formula (Gemma's 1 + weight, a LayerNorm) is never folded."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(norm, nn.Module) or not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return None
    if weight.dim() != 1:
        return None
    scale = weight.detach().float()
    probe = torch.randn((2, 3, scale.numel()), generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        want = norm(probe).float()
    x = probe.float()
    got = scale * x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return eps if torch.allclose(got, want, rtol=1e-3, atol=1e-5) else None


def mean_weights(mask2d: torch.Tensor, dtype: torch.dtype, *, unpadded: bool = False) -> torch.Tensor:
    """(B, T) mask -> (B, 1, T): each row's 1 / (number of tokens) on its tokens, 0 on padding.

    ``unpadded`` (every row has T tokens, as the caller knows from building the mask): one fill
    instead of four ops, which at batch 1 is most of what pooling costs. In float32 the fill value
    is the same correctly rounded 1 / T that the division below gives, so the weights are equal.
    """
    if unpadded and dtype == torch.float32:
        b, t = mask2d.shape
        return torch.full((b, 1, t), float(np.float32(1.0) / np.float32(t)), dtype=dtype, device=mask2d.device)
    m = mask2d.to(dtype)
    return (m / m.sum(dim=1, keepdim=True).clamp(min=1.0)).unsqueeze(1)


def pool(hidden: torch.Tensor, mask2d: torch.Tensor, how: str, *, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, H) -> (B, H): mean over tokens, first token (CLS) or last real token.

    ``weights``: :func:`mean_weights` of ``mask2d``, when the caller keeps them across layers
    (one batched matmul then pools, instead of five element-wise ops per layer).
    """
    if how == "mean":
        w = mean_weights(mask2d, hidden.dtype) if weights is None else weights
        return torch.bmm(w, hidden).squeeze(1)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask2d.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise StopwiseError(f"The 'pooling' parameter must be one of ['cls', 'last', 'mean']. Got {how!r} instead.")
