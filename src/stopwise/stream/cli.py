"""`stopwise stream ...`: list aeon's bundled sets, and fit / certify / evaluate an early classifier
on one of them. Nothing heavy is imported until a command runs."""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_datasets(args: argparse.Namespace) -> int:
    from stopwise.stream.data import bundled_sets

    names = bundled_sets()
    print(json.dumps({"datasets": names}, indent=2) if args.json else "\n".join(names))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from stopwise.stream.data import load_pooled, stratified_split
    from stopwise.stream.metrics import summary
    from stopwise.stream.model import EarlyStreamClassifier
    from stopwise.stream.prefix import SeriesPrefixes

    X, y = load_pooled(args.dataset)
    tr, cal, te = stratified_split(y, (0.4, 0.4, 0.2), seed=args.seed)
    prefixes = SeriesPrefixes(n_stages=args.stages).fit(X[tr], y[tr])
    model = EarlyStreamClassifier(prefixes, rule=args.rule, epsilon=args.epsilon, delta=args.delta,
                                  method=args.method, seed=args.seed)
    model.calibrate(X[cal], y[cal])
    d = model.decide(X[te])
    full = model.prefixes.stage_probs(model.prefixes.n_stages - 1, X[te]).argmax(axis=1)
    out: dict[str, Any] = {
        "dataset": args.dataset, "n_train": int(tr.size), "n_calibration": int(cal.size), "n_test": int(te.size),
        **summary(y[te], d.labels, d.earliness),
        "gap": float(np.mean(model.classes_[full] != d.labels)),
        "certificate": model.certificate_.to_dict(),
        "calibration_errors": model.calibration_errors_,
    }
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        cert = model.certificate_
        print(f"{args.dataset}: accuracy {out['accuracy']:.3f}, earliness {out['earliness']:.3f}, "
              f"harmonic mean {out['harmonic_mean']:.3f}, gap {out['gap']:.3f} "
              f"({'certified' if cert.certified else 'NOT CERTIFIED'}: {cert.guarantee})")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `stopwise stream ...` to the main parser."""
    st = subparsers.add_parser("stream", help="certified early classification of time series (aeon data)")
    sub = st.add_subparsers(dest="stream_command", required=True)
    p = sub.add_parser("datasets", help="list the classification sets bundled with aeon")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)
    p = sub.add_parser("run", help="fit prefix classifiers, certify a rule, report accuracy and earliness")
    p.add_argument("dataset", help="a name from `stopwise stream datasets`")
    p.add_argument("--rule", default="max_prob", help="max_prob | margin | stability | combined")
    p.add_argument("--method", default="ltt", help="ltt | conditional")
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--stages", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)
