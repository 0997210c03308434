"""Re-packing survivors in batched early exit: wall time of the same certified early exit with
batches kept apart (``in_flight = batch_size``) and with the survivors of several batches
re-packed into full ones (``in_flight`` = 4 and 8 batches; the default is
``stopwise.encoder.model.IN_FLIGHT_BATCHES``), against the full model, in one run.

More batches in flight pack the few rows that run on into fuller batches, and each layer's
weights, once read from memory, serve more rows: MiniLM's six layers (~42 MB) do not stay in a
32 MB L3 cache, so a layer call on the survivors of one group pays for fetching that layer again.

MiniLM-L6 on whole BBC articles (the benchmark's split and heads), rules certified for accuracy
drop at ε = 0.02, δ = 0.1; 256 test rows at batch 32, the settings' order alternating, best of
``--repeats``.

    PYTHONPATH=src python benchmarks/encoder_packing.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--in-flight", default="1,4,8", help="batches in flight to compare (comma-separated)")
    args = parser.parse_args()
    import encoder as bench
    import numpy as np

    import stopwise as sw

    t0 = time.perf_counter()
    prep = bench.prepare_minilm("bbc_articles", threads=2)
    clf, cal = prep.clf, prep.trace("cal")
    enc = clf.tokenize(prep.texts("test")[: args.rows])
    bs = args.batch_size
    sides: dict[str, dict[str, Any]] = {"full": {}}
    flights = sorted({int(x) for x in args.in_flight.split(",")})
    if not flights or flights[0] < 1:
        parser.error(f"--in-flight must be positive batch counts. Got {args.in_flight!r} instead.")
    certs = {}
    for rule in ("max_prob", "entropy"):
        certs[rule] = sw.calibrate(cal, sw.make_rule(rule), epsilon=0.02, delta=0.1, risk="accuracy_drop")
        for f in flights:
            sides[f"{rule}_x{f}"] = {"certificate": certs[rule], "in_flight": f * bs}
    best = {name: float("inf") for name in sides}
    preds: dict[str, Any] = {}
    names = list(sides)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order: no side always runs first
            t = time.perf_counter()
            preds[name] = clf.predict(enc, batch_size=bs, **sides[name])
            best[name] = min(best[name], time.perf_counter() - t)
    L = clf.n_layers
    rows = {}
    for rule in ("max_prob", "entropy"):
        first = preds[f"{rule}_x{flights[0]}"]
        for f in flights:
            assert np.array_equal(preds[f"{rule}_x{f}"].exit_layer, first.exit_layer)
        ideal = L / float(first.exit_layer.mean())
        rows[rule] = {
            "lam": certs[rule].lam, "mean_layers": float(first.exit_layer.mean()), "ideal_speedup": ideal,
            **{f"wall_speedup_x{f}": best["full"] / best[f"{rule}_x{f}"] for f in flights},
            **{f"wall_over_ideal_x{f}": best["full"] / best[f"{rule}_x{f}"] / ideal for f in flights},
            **{f"x{f}_vs_x{flights[0]}": best[f"{rule}_x{flights[0]}"] / best[f"{rule}_x{f}"] for f in flights[1:]},
        }
    out = {"benchmark": "encoder_packing", "backbone": "minilm", "task": "bbc_articles", "rows": args.rows,
           "batch_size": bs, "in_flight_batches": flights, "repeats": args.repeats, "seconds_best": best, "rules": rows,
           "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=None if args.json else 2, sort_keys=True))


if __name__ == "__main__":
    main()
