"""Where batch-32 early exit loses to its ideal: predict's time split into its parts.

MiniLM-L6 or SmolLM2-135M (``--backbone``; 48 tokens, the encoder benchmark's setting and rows)
on one task, one certified rule (default: BBC articles, max_prob, accuracy drop at ε = 0.02,
δ = 0.1, among the rows that read lowest at batch 32 in ``benchmarks/results/encoder_minilm.json``).
The timed rows are cut into the slices
of predict's in_flight as in ``encoder.py``; one pass times every slice once with one setting, and
the passes alternate full, early, early, full, ... so a drift of the machine hits neither side
alone. Each side's fastest pass is reported, split by timers around the backbone's calls and
predict's own steps:

- ``start_ms``: embeddings and masks; ``layers_ms``: the layer calls; ``heads_ms``: exit heads
  (pooling, linear, softmax); ``shrink_ms``: dropping and re-packing rows that stopped;
  ``rest_ms``: everything else (the stopper, numpy, bookkeeping);
- ``ms_per_row_layer``: ``layers_ms`` / rows summed over layer calls: what a row's layer costs on
  each side (the ideal assumes the same);
- ``wall_over_ideal``: (full / early) / (layers / mean layers); ``layers_over_ideal``: the same
  from ``layers_ms`` alone, the ceiling if predict's other steps cost nothing.

    PYTHONPATH=src python benchmarks/encoder_breakdown.py --json
    PYTHONPATH=src python benchmarks/encoder_breakdown.py --json --backbone smollm2 --task bbc_sentences --rule entropy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("start", "layers", "heads", "shrink")


def _timed(fn: Callable[..., Any], part: str, clock: dict[str, float], rows: list[int] | None = None) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        clock[part] += time.perf_counter() - t0
        if rows is not None:
            rows.append(int(args[1].hidden.shape[0]))  # layer(k, state)
        return out

    return wrapper


def _instrument(clf: Any, clock: dict[str, float], rows: list[int]) -> None:
    """Timers on the instance only: the class and every other classifier stay as they are."""
    bb = clf.backbone
    bb.start = _timed(bb.start, "start", clock)
    bb.layer = _timed(bb.layer, "layers", clock, rows)
    clf._shrink = _timed(clf._shrink, "shrink", clock)
    head_fn = clf._head_fn
    clf._head_fn = lambda key: _timed(head_fn(key), "heads", clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object, no indentation")
    parser.add_argument("--task", default="bbc_articles", choices=("bbc_articles", "bbc_sentences", "champ_steps"))
    parser.add_argument("--rule", default="max_prob", choices=("max_prob", "entropy", "patience"))
    parser.add_argument("--risk", default="accuracy_drop", choices=("accuracy_drop", "gap"))
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument("--backbone", default="minilm", choices=("minilm", "smollm2"))
    parser.add_argument("--rows", type=int, default=None,
                        help="timed test rows (default: as encoder.py times at batch 32, 256 MiniLM, 128 SmolLM2)")
    parser.add_argument("--passes", type=int, default=12, help="timed passes per side")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import encoder as bench

    import stopwise as sw
    from stopwise.encoder.model import Encoded

    n_rows = bench.N_TIME32[args.backbone] if args.rows is None else args.rows
    prep = bench.prepare_backbone(args.backbone, args.task, threads=args.threads)
    clf = prep.clf
    cert = sw.calibrate(prep.trace("cal"), sw.make_rule(args.rule), epsilon=args.epsilon, delta=0.1, risk=args.risk)
    if not cert.certified:
        parser.error(f"--epsilon {args.epsilon} certifies no λ for {args.rule} on {args.task}; pick a larger one.")
    enc = Encoded(clf.tokenize(prep.texts("test")).ids[:n_rows])
    units = bench._units(enc, 32)
    exit_layer = clf.predict(enc, batch_size=32, certificate=cert).exit_layer
    clock: dict[str, float] = defaultdict(float)
    rows: list[int] = []
    _instrument(clf, clock, rows)
    best: dict[str, dict[str, Any]] = {}
    for c in range(2 * args.passes):
        side = bench._side(c, 1)
        clock.clear()
        rows.clear()
        t0 = time.perf_counter()
        for unit in units:
            clf.predict(unit, batch_size=32, **({"certificate": cert} if side == "early" else {}))
        total = time.perf_counter() - t0
        if side not in best or total < best[side]["total_ms"] / 1e3:
            parts = {f"{p}_ms": clock[p] * 1e3 for p in PARTS}
            best[side] = {"total_ms": total * 1e3, **parts, "rest_ms": total * 1e3 - sum(parts.values()),
                          "layer_calls": len(rows), "row_layers": sum(rows),
                          "ms_per_row_layer": clock["layers"] * 1e3 / sum(rows)}
    ideal = clf.n_layers / float(exit_layer.mean())
    full, early = best["full"], best["early"]
    out = {
        "benchmark": "encoder_breakdown", "backbone": args.backbone, "task": args.task, "rule": args.rule, "risk": args.risk,
        "epsilon": args.epsilon, "lam": cert.lam, "rows": len(enc), "passes": args.passes, "threads": args.threads,
        "mean_layers": float(exit_layer.mean()), "ideal_speedup": ideal, "full": full, "early": early,
        "wall_over_ideal": full["total_ms"] / early["total_ms"] / ideal,
        "layers_over_ideal": full["layers_ms"] / early["layers_ms"] / ideal,
        "row_layer_cost_early_over_full": early["ms_per_row_layer"] / full["ms_per_row_layer"],
        "exit_layer_counts": np.bincount(exit_layer, minlength=clf.n_layers + 1)[1:].tolist(),
    }
    print(json.dumps(out, indent=None if args.json else 2, sort_keys=True))


if __name__ == "__main__":
    main()
