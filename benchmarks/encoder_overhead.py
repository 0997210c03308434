"""Where batch-1 early exit loses to its ideal: the cost predict adds around the backbone's layers.

MiniLM-L6 on BBC News articles (48 tokens, the encoder benchmark's setting), certified max_prob
rules at ε in {0.005, 0.01, 0.02} (accuracy drop, δ = 0.1). For each test row, alone, five calls
rotate R times and each keeps its best: ``predict`` with the full model, ``predict`` with the
certificate, the same rule through the general path, and the bare backbone (embeddings, then
layers, nothing else) for all layers and for the layers that row's early exit ran. So:

- ``full_overhead_us``: predict's full model minus the bare layers, per row (tokens in, probs out:
  checks, batching, pooling, the final head);
- ``early_overhead_us``: predict with early exit minus the bare layers it ran, per row;
  ``early_overhead_per_layer_us`` divides it by the mean layers run (one head and one rule step each);
- ``wall_over_ideal``: wall speedup / (layers / mean layers); ``bare_wall_over_ideal``: the same for
  the bare backbone, the ceiling when predict adds nothing but its layers;
- ``wall_over_ideal_via_stopper``: the same early exit decided through a StageBatch and a Stopper
  step after every layer (the general path; a lone row under max_prob decides on the head's
  tensor instead);
- ``cold_op_us`` vs ``warm_op_us``: a tiny numpy call right after a layer (20 per layer, against none) (each layer's weights
  push the interpreter's and numpy's working set out of the caches) vs the same call in a tight
  loop. The head and the rule step are a dozen such calls, which is why they cost far more per
  layer inside predict than any micro-benchmark of them says.

    PYTHONPATH=src python benchmarks/encoder_overhead.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

EPSILONS = (0.005, 0.01, 0.02)


_TINY = np.zeros((1, 5))


def _bare(clf: Any, enc: Any, k: int, *, calls_after_each: int = 0) -> None:
    """Embeddings and the first ``k`` layers of one row, nothing else; ``calls_after_each`` tiny
    numpy calls after every layer (for ``cold_op_us``)."""
    _, ids, mask, unpadded = next(iter(clf._batches(enc, 1, True)))
    state = clf.backbone.start(ids, mask, unpadded=unpadded)
    for j in range(k):
        clf.backbone.layer(j, state)
        for _ in range(calls_after_each):
            _TINY.max(axis=1)


def _via_stopper(lam: float) -> Any:
    """max_prob at ``lam`` decided through the general path (StageBatch and Stopper after every
    layer), which a lone row skips for rules that stop on the top probability alone."""
    from stopwise.rules import MaxProb

    class ViaStopper(MaxProb):
        def top_prob_band(self, n_classes: int, lam: float | None = None) -> tuple[float, float] | None:
            return None

    return ViaStopper(lam=lam)


def _per_row(clf: Any, rows: list[Any], cert: Any, repeats: int) -> dict[str, Any]:
    import torch

    exits = np.array([int(clf.predict(r, batch_size=1, certificate=cert).exit_layer[0]) for r in rows])
    general = _via_stopper(cert.lam)
    best = np.full((len(rows), 5), np.inf)
    for i, row in enumerate(rows):
        calls = (lambda r=row: clf.predict(r, batch_size=1), lambda r=row: clf.predict(r, batch_size=1, certificate=cert),
                 lambda r=row: _bare(clf, r, clf.n_layers), lambda r=row, k=int(exits[i]): _bare(clf, r, k),
                 lambda r=row: clf.predict(r, batch_size=1, rule=general))
        with torch.inference_mode():
            for _ in range(repeats):
                for j, call in enumerate(calls):
                    t0 = time.perf_counter()
                    call()
                    best[i, j] = min(best[i, j], time.perf_counter() - t0)
    full, early, bare_all, bare_k, via_stopper = (1e6 * best).T
    ideal = clf.n_layers / exits.mean()
    return {
        "lam": cert.lam, "mean_layers": float(exits.mean()), "ideal_speedup": float(ideal),
        "full_us": float(full.mean()), "early_us": float(early.mean()),
        "full_overhead_us": float(np.mean(full - bare_all)), "early_overhead_us": float(np.mean(early - bare_k)),
        "early_overhead_per_layer_us": float(np.mean(early - bare_k) / exits.mean()),
        "wall_over_ideal": float(full.sum() / early.sum() / ideal),
        "bare_wall_over_ideal": float(bare_all.sum() / bare_k.sum() / ideal),
        "early_via_stopper_us": float(via_stopper.mean()),
        "wall_over_ideal_via_stopper": float(full.sum() / via_stopper.sum() / ideal),
    }


def _op_costs(clf: Any, row: Any, ops: int = 20, rounds: int = 15) -> dict[str, float]:
    """``ops`` tiny numpy calls after each layer vs none, the two rotating ``rounds`` times (best
    of each kept); and the same call in a tight loop. µs per call."""
    import torch

    best = {0: np.inf, ops: np.inf}
    with torch.inference_mode():
        for r in range(rounds):
            for extra in ((0, ops) if r % 2 else (ops, 0)):
                t0 = time.perf_counter()
                _bare(clf, row, clf.n_layers, calls_after_each=extra)
                best[extra] = min(best[extra], time.perf_counter() - t0)
    warm = min(timeit.repeat(lambda: _TINY.max(axis=1), number=10_000, repeat=5)) / 10_000
    return {"cold_op_us": 1e6 * (best[ops] - best[0]) / (ops * clf.n_layers), "warm_op_us": 1e6 * warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--rows", type=int, default=48, help="test rows timed, each alone")
    parser.add_argument("--repeats", type=int, default=8, help="rotations of the five calls per row (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import encoder as bench

    import stopwise as sw
    from stopwise.encoder.model import Encoded

    t0 = time.perf_counter()
    prep = bench.prepare_minilm("bbc_articles", threads=args.threads)
    clf, cal = prep.clf, prep.trace("cal")
    enc = clf.tokenize(prep.texts("test"))
    rows = [Encoded([ids]) for ids in enc.ids[: args.rows]]
    results = []
    for eps in EPSILONS:
        cert = sw.calibrate(cal, sw.make_rule("max_prob"), epsilon=eps, delta=0.1, risk="accuracy_drop")
        results.append({"epsilon": eps, **_per_row(clf, rows, cert, args.repeats)})
    out = {"benchmark": "encoder_overhead", "backbone": "minilm", "task": "bbc_articles", "max_length": 48,
           "rows": len(rows), "repeats": args.repeats, "threads": args.threads, "results": results,
           **_op_costs(clf, rows[0]), "seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=None if args.json else 2, sort_keys=True))


if __name__ == "__main__":
    main()
