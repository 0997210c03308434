"""Re-packing survivors in batched early exit: wall time of the same certified early exit with
batches kept apart (``in_flight = batch_size``) and with survivors of several batches re-packed
into full ones (the default, ``in_flight = 4 × batch_size``), against the full model, in one run.

MiniLM-L6 on whole BBC articles (the benchmark's split and heads), rules certified for accuracy
drop at ε = 0.02, δ = 0.1; 256 test rows at batch 32, interleaved and best of ``--repeats``.

    PYTHONPATH=src python benchmarks/encoder_packing.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
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
    args = parser.parse_args()
    import numpy as np
    import torch
    from encoder import _subsample

    import stopwise as sw
    from stopwise.encoder import data, recipes

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    prep = recipes.prepare(_subsample(data.bbc_news(), 2400, seed=0), base="minilm", max_length=48, progress=False)
    clf, cal = prep.clf, prep.trace("cal")
    enc = clf.tokenize(prep.texts("test")[: args.rows])
    bs = args.batch_size
    sides: dict[str, dict[str, Any]] = {"full": {}}
    for rule in ("max_prob", "entropy"):
        cert = sw.calibrate(cal, sw.make_rule(rule), epsilon=0.02, delta=0.1, risk="accuracy_drop")
        sides[f"{rule}_apart"] = {"certificate": cert, "in_flight": bs}
        sides[f"{rule}_repacked"] = {"certificate": cert, "in_flight": 4 * bs}
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
        apart, packed = preds[f"{rule}_apart"], preds[f"{rule}_repacked"]
        assert np.array_equal(apart.exit_layer, packed.exit_layer)
        ideal = L / float(packed.exit_layer.mean())
        rows[rule] = {
            "lam": sides[f"{rule}_apart"]["certificate"].lam, "mean_layers": float(packed.exit_layer.mean()),
            "ideal_speedup": ideal,
            "wall_speedup_apart": best["full"] / best[f"{rule}_apart"],
            "wall_speedup_repacked": best["full"] / best[f"{rule}_repacked"],
            "wall_over_ideal_apart": best["full"] / best[f"{rule}_apart"] / ideal,
            "wall_over_ideal_repacked": best["full"] / best[f"{rule}_repacked"] / ideal,
            "repacked_vs_apart": best[f"{rule}_apart"] / best[f"{rule}_repacked"],
        }
    out = {"benchmark": "encoder_packing", "backbone": "minilm", "task": "bbc_articles", "rows": args.rows,
           "batch_size": bs, "repeats": args.repeats, "seconds_best": best, "rules": rows,
           "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=None if args.json else 2, sort_keys=True))


if __name__ == "__main__":
    main()
