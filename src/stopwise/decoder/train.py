"""Train exit heads by self-distillation with the backbone frozen (FastBERT, EE-Tuning, LayerSkip).

1. Text: prompts from the train split plus the model's own greedy continuations (what a draft
   will have to predict), optionally with whole train-split BBC News articles (human text, read
   with teacher forcing: no generation needed, so tens of thousands of tokens cost minutes).
2. One pass of the frozen model caches the hidden state after each head's layer and after the
   last layer on a random subset of positions. The final layer's next-token distribution is
   recomputed from its cached state per training batch: caching it would take vocab-size floats
   per token (196 KB for SmolLM2), 85 times the hidden state.
3. Each head's adapter minimises KL(final || head) over the draft vocabulary (the most frequent
   tokens of the final layer's predictions), which is all a reduced draft head ever scores.
4. Each head's agreement with the final layer's argmax on held-out positions is kept: it is the
   prior acceptance rate that picks the first exit layer of speculative decoding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import torch

from stopwise.core.errors import StopwiseError
from stopwise.decoder.backbone import Backbone, append_tokens
from stopwise.decoder.heads import ExitHeads


@torch.inference_mode()
def collect(backbone: Backbone, sequences: Sequence[Sequence[int]], *, layers: list[int], max_tokens: int = 4096,
            max_length: int = 256, seed: int = 0) -> dict[str, Any]:
    """Hidden states after each of ``layers`` and after the last layer at sampled positions, the final
    layer's argmax there, and token counts (inputs and final argmaxes) for the draft vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = max(1, max_tokens // max(1, len(sequences)))
    states: dict[int, list[torch.Tensor]] = {x: [] for x in layers}
    finals: list[torch.Tensor] = []
    argmax: list[torch.Tensor] = []
    counts = torch.zeros(backbone.vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.tensor([list(seq)[:max_length]], dtype=torch.long, device=backbone.lm_head.weight.device)
        if ids.shape[1] < 2:
            continue
        state = backbone.new_state(1)
        pos = append_tokens(state, torch.ones_like(ids))
        h = backbone.embed(ids, pos)
        emb = backbone.rope(h, pos)
        keep = torch.randperm(ids.shape[1], generator=gen)[:per_seq].sort().values
        start = 0
        for stop in [*layers, backbone.n_layers]:
            h = backbone.run(h, state, start=start, stop=stop, positions=pos, emb=emb)
            if stop in states:
                states[stop].append(h[0, keep].clone())
            start = stop
        top = backbone.logits(h[0]).argmax(-1)
        counts += torch.bincount(top.cpu(), minlength=backbone.vocab_size)
        counts += torch.bincount(ids[0].cpu(), minlength=backbone.vocab_size)
        finals.append(h[0, keep].clone())
        argmax.append(top[keep].clone())
    if not finals:
        raise StopwiseError("No training text of at least 2 tokens: cannot train exit heads.")
    return {"states": {x: torch.cat(v) for x, v in states.items()}, "final": torch.cat(finals),
            "argmax": torch.cat(argmax), "counts": counts}


def draft_vocabulary(counts: torch.Tensor, size: int, *, always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent token ids (plus ``always``, e.g. EOS)."""
    size = min(size, counts.numel())
    top = torch.topk(counts.to(torch.float64) + 1e-9 * torch.rand(counts.numel(), generator=torch.Generator().manual_seed(0)),
                     size).indices
    return cast(torch.Tensor, torch.unique(torch.cat([top, torch.tensor(list(always), dtype=torch.long)])))


def train_heads(backbone: Backbone, sequences: Sequence[Sequence[int]], *, layers: list[int] | None = None,
                rank: int = 32, draft_vocab_size: int | None = 8192, epochs: int = 2, lr: float = 2e-3,
                batch_size: int = 256, max_tokens: int = 4096, holdout: float = 0.1, eos: Sequence[int] = (),
                seed: int = 0, log: Any = None) -> ExitHeads:
    """Exit heads for ``backbone`` trained on token ``sequences``; see the module docstring."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    heads = ExitHeads(backbone, layers=layers, rank=rank)
    data = collect(backbone, sequences, layers=heads.layers, max_tokens=max_tokens, seed=seed)
    vocab = None
    if draft_vocab_size and draft_vocab_size < backbone.vocab_size:
        vocab = draft_vocabulary(data["counts"], draft_vocab_size, always=eos)
    heads.set_draft_vocab(vocab)
    # Out of inference mode: the cached tensors become ordinary tensors autograd may save.
    final = data["final"].clone()
    n = final.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(holdout * n)))
    hold, fit = perm[:n_hold], perm[n_hold:]
    target = data["argmax"].clone()
    agreement: dict[str, float] = {}
    for layer in heads.layers:
        h = data["states"][layer].clone()
        if rank:
            _fit_adapter(heads, layer, h[fit], final[fit], epochs=epochs, lr=lr, batch_size=batch_size)
        with torch.inference_mode():
            guess = heads.to_token_ids(heads.logits(h[hold], layer, reduced=True).argmax(-1), reduced=True)
        agreement[str(layer)] = float((guess == target[hold]).float().mean())
        if log is not None:
            log(f"layer {layer}: held-out agreement with the final layer {agreement[str(layer)]:.3f}")
    heads.training_info = {
        "agreement": agreement, "tokens": int(n), "holdout": int(n_hold), "epochs": epochs, "lr": lr,
        "sequences": len(sequences), "seconds": round(time.perf_counter() - t0, 1), "objective": "KL(final || head) on draft vocab", "rank": rank,
    }
    return heads


def _fit_adapter(heads: ExitHeads, layer: int, h: torch.Tensor, final: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int) -> None:
    adapter = heads.adapters[str(layer)]
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    n_final = heads.backbone[0].n_layers
    n = h.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logp = torch.log_softmax(heads.logits(h[idx], layer, reduced=True).float(), dim=-1)
            with torch.no_grad():  # the teacher: the final layer over the same (draft) vocabulary
                t = torch.log_softmax(heads.logits(final[idx], n_final, reduced=True).float(), dim=-1)
            loss = (t.exp() * (t - logp)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()


def training_sequences(decoder: Any, *, n_prompts: int = 60, generate_tokens: int = 48, batch_size: int = 8,
                       split: str = "train", news_articles: int = 0, article_tokens: int = 256) -> list[list[int]]:
    """Train-split prompts followed by the model's own greedy continuations (batched), then the first
    ``article_tokens`` tokens of ``news_articles`` whole train-split BBC News articles."""
    from stopwise.decoder.data import news_articles as articles
    from stopwise.decoder.data import prompts

    ids = [decoder.encode(p["prompt"]) for p in prompts(split, n=n_prompts)]
    ids = [s[-192:] for s in ids]  # long news/code prompts: the tail is what the continuation needs
    out = ids
    if generate_tokens > 0:
        out = []
        eos = set(decoder.eos_ids())
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            stats = decoder.engine.full(chunk, max_new_tokens=generate_tokens, eos=eos)
            out.extend(s + o for s, o in zip(chunk, stats.extra_outputs, strict=False))
    if news_articles > 0:
        out += [decoder.encode(text)[:article_tokens] for text in articles(split)[:news_articles]]
    return out
