"""`stopwise encoder train|record|calibrate|predict`: exit heads from the command line.

Texts come from a file: one text per line, or JSONL objects with "text" (and "label"). Results are
JSON on stdout (or -o). Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _emit(payload: dict[str, Any], output: str | None) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True)
    if output:
        Path(output).write_text(text + "\n")
    print(text)


def _load(args: argparse.Namespace) -> Any:
    from stopwise.encoder.model import EarlyExitClassifier

    return EarlyExitClassifier.from_pretrained(args.base, args.heads)


def cmd_train(args: argparse.Namespace) -> int:
    from stopwise.core.errors import StopwiseError
    from stopwise.encoder.data import read_texts
    from stopwise.encoder.model import EarlyExitClassifier

    texts, labels = read_texts(args.texts)
    if labels is None:
        raise StopwiseError(f"Training needs labels: write '{args.texts}' as JSONL lines {{\"text\": ..., \"label\": ...}}.")
    classes = args.classes.split(",") if args.classes else sorted({str(y) for y in labels})
    clf = EarlyExitClassifier.from_base(args.base or "minilm", class_names=classes, pooling=args.pooling,
                                        head=args.head, max_length=args.max_length)
    clf.fit(texts, [str(y) for y in labels], objective=args.objective, optimizer=args.optimizer, epochs=args.epochs,
            seed=args.seed, batch_size=args.batch_size, progress=sys.stderr.isatty())
    clf.save_pretrained(args.out)
    _emit({"heads": str(args.out), "config": clf.config()}, None)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from stopwise.encoder.data import read_texts

    clf = _load(args)
    texts, labels = read_texts(args.texts)
    trace = clf.record(texts, None if labels is None else [str(y) for y in labels] if isinstance(labels[0], str) else labels,
                       batch_size=args.batch_size, cost=args.cost, progress=sys.stderr.isatty())
    trace.save(args.output)
    _emit({"trace": str(args.output), "n": trace.n, "n_stages": trace.n_stages, "meta": dict(trace.meta)}, None)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from stopwise.cli import parse_params
    from stopwise.core.rules import make_rule
    from stopwise.core.trace import Trace

    clf = _load(args)
    trace = Trace.load(args.trace)
    cert = clf.calibrate(trace, make_rule(args.rule, **parse_params(args.param)), epsilon=args.epsilon,
                         delta=args.delta, risk=args.risk)
    clf.save_pretrained(args.heads)
    _emit(cert.to_dict(), args.output)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from stopwise.cli import parse_params
    from stopwise.core.rules import make_rule
    from stopwise.encoder.data import read_texts

    clf = _load(args)
    texts, _ = read_texts(args.texts)
    rule, cert = None, None
    if args.rule:
        rule = make_rule(args.rule, **parse_params(args.param))
        rule = rule.with_lam(args.lam if args.lam is not None else rule.default_lam)
    elif not args.full:
        cert = clf.certificate  # the heads directory's certificate, if calibrated
    pred = clf.predict(texts, rule=rule, certificate=cert, batch_size=args.batch_size)
    payload = {"stopping": "certificate" if cert is not None else (repr(rule) if rule is not None else "off (full model)"),
               "mean_layers": float(pred.exit_layer.mean()), "n_layers": clf.n_layers, **pred.to_dict()}
    _emit(payload, args.output)
    return 0


def _common(p: argparse.ArgumentParser, *, heads: bool = True) -> None:
    if heads:
        p.add_argument("heads", help="directory of saved exit heads (save_pretrained)")
    p.add_argument("--base", default=None, help="base model: bundled name (minilm, smollm2), directory or id "
                   "(default: the one the heads were trained on; for train: minilm)")
    p.add_argument("--batch-size", type=int, default=32)


def register_cli(subparsers: Any) -> None:
    """Add `stopwise encoder ...` to the main parser."""
    enc = subparsers.add_parser("encoder", help="early-exit heads on Hugging Face encoders")
    sub = enc.add_subparsers(dest="encoder_command", required=True)

    p = sub.add_parser("train", help="train exit heads (backbone frozen) on labelled JSONL texts")
    p.add_argument("texts", help="JSONL with text and label per line")
    p.add_argument("--out", required=True, help="directory to write the heads to")
    p.add_argument("--classes", help="comma-separated class names (default: sorted labels)")
    p.add_argument("--head", default="linear", help="linear | mlp")
    p.add_argument("--pooling", default=None, help="mean | cls | last (default: mean for encoders, last for decoders)")
    p.add_argument("--objective", default="labels", help="labels | distill | both")
    p.add_argument("--optimizer", default="adam", help="adam | lbfgs")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    _common(p, heads=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("record", help="record every exit of texts into a trace file")
    _common(p)
    p.add_argument("--texts", required=True, help="text file (lines or JSONL, labels optional)")
    p.add_argument("-o", "--output", required=True, help="trace .npz to write")
    p.add_argument("--cost", default="layers", help="layers | flops")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("calibrate", help="certify a rule on a recorded trace; store certificate.json with the heads")
    _common(p)
    p.add_argument("trace")
    p.add_argument("--rule", default="max_prob")
    p.add_argument("--param", action="append", metavar="NAME=VALUE")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--risk", default="gap")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="classify texts with early exit (the heads' certificate by default)")
    _common(p)
    p.add_argument("--texts", required=True)
    p.add_argument("--rule", help="use this rule instead of the certificate")
    p.add_argument("--param", action="append", metavar="NAME=VALUE")
    p.add_argument("--lam", type=float, help="λ for --rule (default: the rule's default)")
    p.add_argument("--full", action="store_true", help="no early exit")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_predict)
