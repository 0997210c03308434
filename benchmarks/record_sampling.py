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
DEER_CHECKPOINT = DATA / "sampling_deer.jsonl"
DEER_SETTINGS = {"transitions": ("\n\n",), "max_think_tokens": 64, "trial_tokens": 8, "data_seed": 1, "decoding": "greedy-kv-session"}
SETTINGS = {"n": 16, "temperature": 0.7, "max_tokens": 64, "seed": 0}
SYSTEM = "You are a careful math tutor."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="record at most this many new problems")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-questions", type=int, default=2)
    parser.add_argument("--convert", action="store_true", help="only convert the checkpoint to the .npz trace")
    parser.add_argument("--temperature", type=float, default=SETTINGS["temperature"],
                        help="sampling temperature; other than 0.7, the recording goes to sampling_math_t<T>.jsonl")
    parser.add_argument("--deer", type=int, default=0, help="instead: record DEER full-thinking traces for this many problems")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from stopwise.sampling.record import convert, record

    if args.deer:
        return record_deer(args.deer, threads=args.threads)
    settings = {**SETTINGS, "temperature": args.temperature}
    checkpoint, trace_path = CHECKPOINT, TRACE
    if args.temperature != SETTINGS["temperature"]:
        tag = f"_t{args.temperature:g}".replace(".", "")
        checkpoint, trace_path = (DATA / f"sampling_math{tag}.jsonl", DATA / f"sampling_math{tag}.npz")
    if not args.convert:
        from stopwise.sampling.data import math_questions
        from stopwise.sampling.local import LocalBackend

        questions = math_questions(args.problems, seed=0)
        backend = LocalBackend("smollm2", system=SYSTEM, threads=args.threads, max_batch_rows=32)
        status = record(questions, backend, checkpoint, model="smollm2-135m-instruct", extract="number",
                        batch_questions=args.batch_questions, limit=args.limit, **settings)
        print(status, file=sys.stderr)
    # Re-extract answers from the stored texts with the current extractor (as the benchmark does).
    trace = convert(checkpoint, trace_path, n_samples=SETTINGS["n"], extract="number")
    print(f"{trace!r} -> {trace_path}", file=sys.stderr)
    return 0


def record_deer(count: int, *, threads: int) -> int:
    """Greedy chain of thought with a trial answer at every blank line (resumable JSONL)."""
    import json

    from stopwise.sampling.data import math_questions
    from stopwise.sampling.deer import DEER, DEER_SUFFIX, result_to_json
    from stopwise.sampling.local import LocalBackend
    from stopwise.sampling.record import _append, read_checkpoint

    questions = math_questions(count, seed=DEER_SETTINGS["data_seed"], suffix=DEER_SUFFIX)
    header, rows = read_checkpoint(DEER_CHECKPOINT)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in DEER_SETTINGS.items()}
    if header is None:
        _append(DEER_CHECKPOINT, {"type": "header", "model": "smollm2-135m-instruct", **settings})
    elif any(header.get(k) != v for k, v in settings.items()):
        raise SystemExit(f"{DEER_CHECKPOINT} was recorded with other settings: {header}")
    done = {r["id"] for r in rows}
    backend = LocalBackend("smollm2", system=SYSTEM, threads=threads)
    deer = DEER(backend, transitions=DEER_SETTINGS["transitions"], max_think_tokens=DEER_SETTINGS["max_think_tokens"],
                trial_tokens=DEER_SETTINGS["trial_tokens"])
    for q in questions:
        if q.id in done:
            continue
        _append(DEER_CHECKPOINT, result_to_json(deer.run(q, full=True), label=q.label))
        print(json.dumps({"deer": q.id}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
