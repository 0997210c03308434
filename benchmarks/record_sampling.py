"""Record SmolLM2-135M-Instruct answering `mathematics-dataset` problems, N samples each.

Resumable: the JSONL checkpoint is append-only; rerun to continue. Run niced, one thread:

    PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 19 python benchmarks/record_sampling.py

At the end (and with --convert at any time) the checkpoint is converted to a Trace .npz.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
CHECKPOINT = DATA / "sampling_math.jsonl"
TRACE = DATA / "sampling_math.npz"
SETTINGS = {"n": 16, "temperature": 0.7, "max_tokens": 64, "seed": 0}
SYSTEM = "You are a careful math tutor."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="record at most this many new problems")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-questions", type=int, default=2)
    parser.add_argument("--convert", action="store_true", help="only convert the checkpoint to the .npz trace")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from stopwise.sampling.record import convert, record

    if not args.convert:
        from stopwise.sampling.data import math_questions
        from stopwise.sampling.local import LocalBackend

        questions = math_questions(args.problems, seed=0)
        backend = LocalBackend("smollm2", system=SYSTEM, threads=args.threads, max_batch_rows=32)
        status = record(questions, backend, CHECKPOINT, model="smollm2-135m-instruct", extract="number",
                        batch_questions=args.batch_questions, limit=args.limit, **SETTINGS)
        print(status, file=sys.stderr)
    trace = convert(CHECKPOINT, TRACE, n_samples=SETTINGS["n"])
    print(f"{trace!r} -> {TRACE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
