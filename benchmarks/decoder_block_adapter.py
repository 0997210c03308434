"""Probe for self-speculative drafts: does a one-layer attention adapter (Kangaroo, Liu et al. 2024) on layer-L states agree with
SmolLM2's final layer far more often than the low-rank per-position adapter stopwise trains now?

Held-out top-1 agreement with the final layer's argmax, per exit layer L, for:
  lowrank: h + up(down(h)), rank 128 (what stopwise.decoder trains)
  block:   a trainable copy of decoder layer L (attention over the sequence + MLP), initialised from
           the model's own layer L, then norm + tied LM head (Kangaroo's adapter, with the MLP)
Both trained by KL(final || head) on the 8192-token draft vocabulary, same data, same epochs.
A measurement only: the block adapter is not part of stopwise.decoder (see the README's decoder row).

    PYTHONPATH=src python benchmarks/decoder_block_adapter.py --layers 4 --epochs 5 --lr 1e-3
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from stopwise.decoder import train  # noqa: E402
from stopwise.decoder.api import Decoder  # noqa: E402
from stopwise.decoder.heads import LowRank  # noqa: E402
from stopwise.decoder.train import draft_vocabulary, training_sequences  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--layers", default="4", help="comma-separated exit layers")
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the block adapter (low-rank: 2e-3)")
args = parser.parse_args()
LAYERS = [int(x) for x in args.layers.split(",")]
EPOCHS = args.epochs
t0 = time.time()
dec = Decoder.from_pretrained("smollm2")
bb = dec.backbone
seqs = training_sequences(dec, n_prompts=48, generate_tokens=48, news_articles=160, article_tokens=160)
seqs = [s[:192] for s in seqs if len(s) >= 8]
print(f"{len(seqs)} sequences, {sum(map(len, seqs))} tokens, {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


def collect():
    """Every position of every sequence (the adapter attends over whole sequences): the project's
    collector, one sequence per call with room for all its tokens."""
    out = []
    counts = torch.zeros(bb.vocab_size, dtype=torch.long)
    for s in seqs:
        got = train.collect(bb, [s], layers=LAYERS, max_tokens=len(s), max_length=len(s))
        out.append(({**got["states"], bb.n_layers: got["final"]}, got["argmax"]))
        counts += got["counts"]
    return out, counts


data, counts = collect()
print(f"collected {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
vocab = draft_vocabulary(counts, 8192)
W = bb.lm_head.weight.detach()[vocab].clone()
norm = bb.norm
order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
n_hold = len(data) // 8
hold, fit = order[:n_hold].tolist(), order[n_hold:].tolist()


def teacher(final):
    with torch.no_grad():
        return torch.log_softmax(norm(final) @ W.T, dim=-1)


def run_block(block, h):
    T = h.shape[0]
    pos = torch.arange(T)[None]
    emb = bb.rope(h[None], pos)
    out = block(h[None], attention_mask=None, position_ids=pos, position_embeddings=emb, use_cache=False)
    return (out[0] if isinstance(out, tuple) else out)[0]


def agreement(fn, L):
    agree = total = 0
    with torch.no_grad():
        for i in hold:
            got, top = data[i]
            guess = vocab[(norm(fn(got[L])) @ W.T).argmax(-1)]
            agree += int((guess == top).sum())
            total += top.numel()
    return agree / total


res = {}
for L in LAYERS:
    res[L] = {"plain": agreement(lambda h: h, L)}
    for kind in ("lowrank", "block"):
        if kind == "lowrank":
            mod = LowRank(bb.hidden_size, 128)
            fn = mod
        else:
            mod = copy.deepcopy(bb.layers[L])
            for p in mod.parameters():
                p.requires_grad_(True)
            fn = lambda h, m=mod: run_block(m, h)  # noqa: E731
        opt = torch.optim.AdamW(mod.parameters(), lr=2e-3 if kind == "lowrank" else args.lr, weight_decay=0.0)
        t1 = time.time()
        for _ep in range(EPOCHS):
            for j in torch.randperm(len(fit)).tolist():
                got, _top = data[fit[j]]
                h, final = got[L].clone(), got[bb.n_layers].clone()
                logp = torch.log_softmax(norm(fn(h)) @ W.T, dim=-1)
                t = teacher(final)
                loss = (t.exp() * (t - logp)).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        res[L][kind] = agreement(fn, L)
        print(L, kind, f"{res[L][kind]:.3f}", f"train {time.time() - t1:.0f}s", file=sys.stderr, flush=True)
print(json.dumps({"layers": res, "tokens": sum(map(len, seqs)), "epochs": EPOCHS, "lr_block": args.lr, "seconds": round(time.time() - t0)}))
