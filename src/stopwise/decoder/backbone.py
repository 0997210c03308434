"""Run a frozen Hugging Face causal LM layer by layer, with its own modules, masks and KV cache.

Nothing here re-implements a transformer: embeddings, decoder layers, rotary embedding, final norm,
LM head, the causal-mask builder and the ``DynamicCache`` are the model's and transformers' own.
What we add is the ability to run a *range* of layers, so that a draft can stop at layer L and a
verifier can resume from layer L, while every layer's cache may hold a different number of tokens
(``create_causal_mask(..., layer_idx=i)`` sizes the mask against layer i's cache).

The one thing we compute ourselves is CALM's state propagation: the keys and values a skipped
layer would have cached, computed from the exited hidden state with that layer's own projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch

from stopwise.core.errors import StopwiseError

#: model_type values whose modules follow LLaMA's layout (model.model.layers, rotary_emb, norm).
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GPT2_FAMILY = ("gpt2",)
SUPPORTED = LLAMA_FAMILY + GPT2_FAMILY


def check_supported(model: Any) -> str:
    """The family of ``model`` ("llama" or "gpt2"), or a StopwiseError naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        family = "llama"
    elif model_type in GPT2_FAMILY:
        family = "gpt2"
    else:
        raise StopwiseError(
            f"stopwise.decoder supports causal LMs of types {list(SUPPORTED)} (LLaMA family and GPT-2). "
            f"Got {type(model).__name__} with model_type {model_type!r} instead."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise StopwiseError(f"stopwise.decoder needs a decoder-only model. Got encoder-decoder {type(model).__name__}.")
    if family == "llama" and getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True) \
            and model_type != "llama":
        raise StopwiseError(f"Sliding-window attention ({model_type}) is not supported by stopwise.decoder yet.")
    return family


@dataclass
class State:
    """Decoding state of a batch: one KV cache, and which cached positions are real tokens.

    ``attn`` is (B, T) with 1 for real tokens and 0 for left padding, T the tokens seen by layer 0.
    Deeper layers may have seen fewer (self-speculative drafts) or the same number of tokens.
    """

    cache: Any
    attn: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def seen(self, layer: int) -> int:
        return int(self.cache.get_seq_length(layer))

    def crop(self, layer: int, keep: int) -> None:
        """Keep the first ``keep`` cached tokens of one layer."""
        drop = self.seen(layer) - keep
        if drop > 0:
            self.cache.layers[layer].crop(-drop)

    def drop_last(self, count: int) -> None:
        """Forget the last ``count`` positions: every layer's cache and the validity mask."""
        if count > 0:
            for i in range(len(self.cache.layers)):
                self.crop(i, self.seen(i) - count)
            self.attn = self.attn[:, : self.attn.shape[1] - count]


class Backbone:
    """A frozen causal LM seen as embed -> layers[0..N) -> norm -> LM head."""

    def __init__(self, model: Any) -> None:
        self.family = check_supported(model)
        self.model = model.eval()
        self.config = model.config
        for p in model.parameters():
            p.requires_grad_(False)
        if self.family == "llama":
            self.inner = model.model
            self.layers = list(model.model.layers)
            self.norm = model.model.norm
        else:
            self.inner = model.transformer
            self.layers = list(model.transformer.h)
            self.norm = model.transformer.ln_f
        self.lm_head = model.lm_head
        self.n_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 0) or getattr(self.config, "n_positions", 0) or 0)
        self._rope_fn = None
        if self.family == "llama":
            self._rope_fn = _rope_function(model)

    # -- state ----------------------------------------------------------------------------
    def new_state(self, batch_size: int) -> State:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        attn = torch.zeros((batch_size, 0), dtype=torch.long, device=self.lm_head.weight.device)
        return State(cache=cache, attn=attn)

    # -- pieces ---------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.family == "llama":
            return cast(torch.Tensor, self.inner.embed_tokens(ids))
        h = self.inner.wte(ids) + self.inner.wpe(positions)
        return cast(torch.Tensor, self.inner.drop(h))

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> Any:
        if self.family != "llama":
            return None
        return self.inner.rotary_emb(h, position_ids=positions)

    def mask(self, h: torch.Tensor, state: State, layer: int, positions: torch.Tensor) -> Any:
        """The model's own causal mask for layer ``layer``'s cache length (None when sdpa can skip it)."""
        from transformers.masking_utils import create_causal_mask

        q = h.shape[1]
        kv = state.seen(layer) + q
        return create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=state.attn[:, :kv], cache=state.cache,
            position_ids=positions, layer_idx=layer,
        )

    def run(self, h: torch.Tensor, state: State, *, start: int, stop: int, positions: torch.Tensor,
            emb: Any = None) -> torch.Tensor:
        """Layers ``start..stop-1`` on hidden states ``h`` (B, q, d) at ``positions`` (B, q)."""
        if start >= stop:
            return h
        emb = self.rope(h, positions) if emb is None else emb
        mask, mask_seen = None, -1
        for i in range(start, stop):
            seen = state.seen(i)
            if seen != mask_seen:  # layers with equal cache lengths share one mask
                mask, mask_seen = self.mask(h, state, i, positions), seen
            h = self._layer(i, h, mask, positions, emb, state.cache)
        return h

    def _layer(self, i: int, h: torch.Tensor, mask: Any, positions: torch.Tensor, emb: Any, cache: Any) -> torch.Tensor:
        layer = self.layers[i]
        if self.family == "llama":
            out = layer(h, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, position_embeddings=emb)
        else:
            out = layer(h, cache, mask, None, use_cache=True, position_ids=positions)
        return cast(torch.Tensor, out[0] if isinstance(out, tuple) else out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self.norm(h)))

    # -- CALM state propagation -------------------------------------------------------------
    def propagate(self, h: torch.Tensor, state: State, *, start: int, positions: torch.Tensor,
                  emb: Any = None) -> None:
        """Fill the caches of layers ``start..N-1`` with K/V computed from the exited state ``h``.

        CALM (Schuster et al. 2022): a token that exits at layer L copies its hidden state to the
        skipped layers, so later tokens can attend to it there. Only each layer's K/V projections
        run (about 6% of a LLaMA layer), not attention or MLP.
        """
        if start >= self.n_layers:
            return
        emb = self.rope(h, positions) if emb is None else emb
        for i in range(start, self.n_layers):
            k, v = self._kv(i, h, emb)
            state.cache.update(k, v, i)

    def _kv(self, i: int, h: torch.Tensor, emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[i]
        if self.family == "llama":
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            cos, sin = emb
            assert self._rope_fn is not None
            _, k = self._rope_fn(k, k, cos, sin)
            return k, v
        attn = layer.attn
        x = layer.ln_1(h)
        _, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
        shape = (*k.shape[:-1], -1, attn.head_dim)
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


def _rope_function(model: Any) -> Any:
    """The modeling module's own ``apply_rotary_pos_emb``."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is None:
        raise StopwiseError(f"{type(model).__name__}'s modeling module has no apply_rotary_pos_emb; cannot propagate states.")
    return fn


def append_tokens(state: State, valid: torch.Tensor) -> torch.Tensor:
    """Record ``q`` new sequence slots (B, q) (1 = real token, 0 = padding); return their position ids.

    Positions count real tokens only (as ``generate`` does for left padding), so a row padded in
    the middle of its sequence keeps consecutive positions."""
    state.attn = torch.cat([state.attn, valid.to(state.attn.dtype)], dim=1)
    return positions(state, state.attn.shape[1] - valid.shape[1], state.attn.shape[1])


def positions(state: State, start: int, stop: int) -> torch.Tensor:
    """Position ids of sequence slots ``start..stop-1``."""
    return (state.attn[:, :stop].cumsum(dim=1) - 1).clamp(min=0)[:, start:stop]
