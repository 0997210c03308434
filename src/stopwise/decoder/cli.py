"""`stopwise decoder train|calibrate|generate|bench` (torch is imported only when a command runs)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_HEADS = "~/.cache/stopwise/heads/smollm2"


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser("decoder", help="exit heads, self-speculative and early-exit decoding for causal LMs")
    sub = parser.add_subparsers(dest="decoder_command", required=True)

    p = sub.add_parser("train", help="train exit heads on the frozen model (self-distillation)")
    _model_args(p)
    p.add_argument("--out", default=DEFAULT_HEADS, help="directory for the heads (default: %(default)s)")
    p.add_argument("--layers", default=None, help="comma-separated layer counts (default: all)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=60, help="train-split prompts")
    p.add_argument("--generate-tokens", type=int, default=48, help="greedy tokens generated per prompt as training text")
    p.add_argument("--news-articles", type=int, default=0,
                   help="whole train-split BBC News articles added as (teacher-forced) training text")
    p.add_argument("--max-tokens", type=int, default=4096, help="positions kept for training")
    p.add_argument("--epochs", type=int, default=2)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="certify an early-exit threshold (sequence-level LTT)")
    _model_args(p, heads=True)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--rule", default="max_prob", choices=["max_prob", "saturation"])
    p.add_argument("--prompts", type=int, default=40, help="calibration-split prompts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="generate text, streaming tokens to stdout")
    _model_args(p, heads=True)
    p.add_argument("prompt", help="a text to continue; with --chat, a user message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    p.add_argument("--mode", default="full", choices=["full", "speculative", "early_exit"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookup", type=int, default=None,
                   help="speculative: longest n-gram matched to draft from the context (default 3; 0: exit heads only)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="run benchmarks/decoder.py-style timing on a few prompts")
    _model_args(p, heads=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_bench)


def _model_args(p: argparse.ArgumentParser, *, heads: bool = False) -> None:
    p.add_argument("--model", default="smollm2", help="bundled name or local model directory (default: %(default)s)")
    if heads:
        p.add_argument("--heads", default=DEFAULT_HEADS, help="exit-head directory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print JSON")


def _setup(args: argparse.Namespace, *, heads: bool = True) -> Any:
    import os

    import torch

    from stopwise.decoder.api import Decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    path = os.path.expanduser(args.heads) if heads and getattr(args, "heads", None) else None
    if path is not None and not os.path.isdir(path):
        path = None
    return Decoder.from_pretrained(args.model, heads=path)


def _print(payload: dict[str, Any], args: argparse.Namespace, text: str) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from stopwise.decoder.train import train_heads, training_sequences

    dec = _setup(args, heads=False)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    def log(msg: str) -> None:
        print(msg, file=sys.stderr)
    seqs = training_sequences(dec, n_prompts=args.prompts, generate_tokens=args.generate_tokens,
                              news_articles=args.news_articles)
    heads = train_heads(dec.backbone, seqs, layers=layers, rank=args.rank, draft_vocab_size=args.draft_vocab,
                        max_tokens=args.max_tokens, epochs=args.epochs, eos=dec.eos_ids(), log=log)
    out = heads.save(os.path.expanduser(args.out))
    _print({"heads": str(out), **heads.training_info}, args, f"saved exit heads to {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import os

    from stopwise.core.errors import StopwiseError
    from stopwise.decoder.calibrate import calibrate_early_exit
    from stopwise.decoder.data import prompts

    dec = _setup(args)
    if dec.heads is None:
        raise StopwiseError(f"No exit heads in {args.heads}: run `stopwise decoder train` first.")
    ps = [p["prompt"] for p in prompts("calib", n=args.prompts)]
    cert = calibrate_early_exit(dec, ps, epsilon=args.epsilon, delta=args.delta, rule=args.rule,
                                max_new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
    dec.heads.save(os.path.expanduser(args.heads))
    _print(cert.to_dict(), args, str(cert))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from stopwise.core.errors import StopwiseError

    if args.lookup is not None and args.mode != "speculative":
        raise StopwiseError(f"--lookup applies to --mode speculative only. Got --mode {args.mode}.")
    dec = _setup(args)
    options: dict[str, Any] = {} if args.lookup is None else {"lookup": args.lookup}
    if args.mode == "speculative" and dec.heads is None:
        print(f"[no exit heads at {args.heads}: drafts come from the context only]", file=sys.stderr)
    prompt: Any = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    if args.json:
        out = dec.generate(prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, seed=args.seed, **options)
        _print({"text": out.text, "stats": out.stats}, args, out.text)
        return 0
    for piece in dec.stream(prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed, **options):
        print(piece, end="", flush=True)
    stats = dec.last.stats
    print(f"\n[{stats['tokens_per_second']:.1f} tok/s, acceptance {stats['acceptance_rate']}, "
          f"layers/token {stats['layers_per_token']:.1f}]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from stopwise.decoder.data import prompts

    dec = _setup(args)
    ps = [p["prompt"] for p in prompts("test", n=args.prompts)]
    modes = ["full", "speculative"]  # without heads, speculative drafts from the context only
    if dec.heads is not None and dec.heads.certificate is not None:
        modes.append("early_exit")
    result: dict[str, Any] = {}
    for mode in modes:
        tokens, seconds, acc = 0, 0.0, []
        for p in ps:
            out = dec.generate(p, mode=mode, max_new_tokens=args.max_new_tokens)
            tokens += sum(out.stats["new_tokens"])
            seconds += out.stats["seconds"]
            if out.stats["acceptance_rate"] is not None:
                acc.append(out.stats["acceptance_rate"])
        result[mode] = {"tokens_per_second": tokens / seconds if seconds else 0.0,
                        "acceptance_rate": sum(acc) / len(acc) if acc else None}
    _print(result, args, "\n".join(f"{m}: {v['tokens_per_second']:.1f} tok/s" for m, v in result.items()))
    return 0
