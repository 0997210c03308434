"""Record N samples per question into an append-only JSONL checkpoint, then convert to a Trace.

The checkpoint is the source of truth: one header line, then one line per finished question,
flushed and fsync'ed as soon as it is written. A run that dies mid-line leaves a partial last line;
reading ignores it (that question is sampled again on resume), so nothing complete is ever lost.

Trace layout (stage k = the first k+1 samples of a question):

- ``predictions[:, k]``: hashed running majority vote after k+1 samples (ties: earliest answer);
- ``reference``: the vote over all N samples, so the "gap" risk is "the answer differs from the
  full-budget majority vote";
- ``labels``: the hashed canonical label (when questions have labels);
- ``cost[:, k]``: cumulative generated tokens of the first k+1 samples;
- signals ``sample`` (the sample's own answer as a dense per-question code, -1 = no answer, which
  sample-aware rules read), ``confidence`` (geometric-mean token probability) and ``tokens``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stopwise.core.errors import StopwiseError
from stopwise.core.trace import NO_ANSWER, Trace, hash_answers
from stopwise.sampling.data import Question
from stopwise.sampling.extract import Extractor, make_extractor, safe_extract
from stopwise.sampling.types import Completion, prompt_seed
from stopwise.sampling.vote import dense_codes, running_votes

HEADER_KEYS = ("model", "n", "temperature", "max_tokens", "seed")


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], *, n: int, temperature: float, max_tokens: int,
                 seeds: Sequence[int]) -> list[list[Completion]]: ...


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header, question records) from a checkpoint; a partial or corrupt line is skipped."""
    path = Path(path)
    if not path.is_file():
        return None, []
    header, rows = None, []
    seen: set[Any] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a killed run was writing
            if not isinstance(row, dict):
                continue
            if row.get("type") == "header" and header is None:
                header = row
            elif row.get("type") == "question" and "id" in row and row["id"] not in seen:
                seen.add(row["id"])  # a question recorded twice (two runs at once): keep the first
                rows.append(row)
    return header, rows


def _append(path: Path, row: dict[str, Any]) -> None:
    # Each question is one write of one line; a partial trailing line from a crash is first
    # terminated so the new record starts on its own line.
    data = json.dumps(row, ensure_ascii=False) + "\n"
    with open(path, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(data.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def sample_record(c: Completion, answer: str | None) -> dict[str, Any]:
    return {"text": c.text, "answer": answer, "n_tokens": int(c.n_tokens),
            "confidence": round(float(c.confidence), 6), "finish_reason": c.finish_reason}


def record(questions: Sequence[Question], backend: Generator, path: str | Path, *, n: int, model: str,
           extract: str | Extractor = "number", temperature: float = 0.7, max_tokens: int = 96, seed: int = 0,
           batch_questions: int = 2, progress: bool = True, limit: int | None = None,
           seed_fn: Callable[[int, str], int] | None = None) -> dict[str, Any]:
    """Sample ``n`` completions for every question not yet in the checkpoint ``path``.

    Resumable: run it again with the same settings and it continues where it stopped; other
    settings are refused (they would mix two computations in one trace). ``limit`` stops after
    that many new questions (for bounded runs). Returns counts of done / new / pending questions.
    """
    if not questions:
        raise StopwiseError("The 'questions' parameter of record must hold at least one question. Got an empty list instead.")
    if n < 1:
        raise StopwiseError(f"The 'n' parameter of record must be an int >= 1. Got {n!r} instead.")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise StopwiseError("The 'questions' parameter of record must have unique ids.")
    extractor = make_extractor(extract)
    path = Path(path)
    wanted = {"model": model, "n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    header, rows = read_checkpoint(path)
    if header is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _append(path, {"type": "header", **wanted})
    else:
        clash = {k: (header.get(k), v) for k, v in wanted.items() if header.get(k) != v}
        if clash:
            raise StopwiseError(
                f"The checkpoint '{path}' was recorded with other settings {clash} (recorded, asked); "
                "use another file or the recorded settings."
            )
    done = {r["id"] for r in rows}
    todo = [q for q in questions if q.id not in done]
    if limit is not None:
        todo = todo[: max(0, int(limit))]
    seeder = seed_fn or prompt_seed
    bar = _progress(len(todo), progress, desc=f"sampling {n} per question")
    for start in range(0, len(todo), batch_questions):
        chunk = todo[start : start + batch_questions]
        results = backend.generate([q.prompt for q in chunk], n=n, temperature=temperature, max_tokens=max_tokens,
                                   seeds=[seeder(seed, q.id) for q in chunk])
        if len(results) != len(chunk):
            raise StopwiseError(f"The backend returned {len(results)} results for {len(chunk)} prompts; it must return one list per prompt.")
        for q, comps in zip(chunk, results, strict=True):
            samples = [sample_record(c, safe_extract(extractor, c.text)) for c in comps]
            _append(path, {"type": "question", "id": q.id, "prompt": q.prompt, "label": q.label,
                           "meta": q.meta or {}, "samples": samples})
        bar.update(len(chunk))
    bar.close()
    return {"done": len(done) + len(todo), "new": len(todo), "pending": len(questions) - len(done) - len(todo)}


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="q")


def trace_from_records(rows: Sequence[dict[str, Any]], *, header: dict[str, Any] | None = None,
                       extract: str | Extractor | None = None, label_extract: str | Extractor | None = None,
                       n_samples: int | None = None, weighted: bool = False) -> Trace:
    """A :class:`Trace` from checkpoint records (see the module docstring for the layout).

    ``extract`` re-extracts answers from the stored texts (default: use the stored answers).
    Questions with fewer than ``n_samples`` samples get a shorter (masked) row.
    """
    if not rows:
        raise StopwiseError("Cannot build a trace from zero recorded questions.")
    extractor = None if extract is None else make_extractor(extract)
    lab_extractor = make_extractor(label_extract or extract or "number")
    k = n_samples or max(len(r.get("samples") or []) for r in rows)
    if k < 1:
        raise StopwiseError("The recorded questions hold no samples.")
    n = len(rows)
    sample = np.full((n, k), NO_ANSWER, dtype=np.int64)
    conf = np.zeros((n, k))
    tokens = np.zeros((n, k))
    lengths = np.zeros(n, dtype=np.int64)
    answers: list[list[str]] = []
    for i, r in enumerate(rows):
        samples = r.get("samples", [])[:k] if isinstance(r.get("samples"), list) else []
        if not samples:
            raise StopwiseError(f"Question {r.get('id')!r} has no samples; drop it or record it again.")
        texts = [s.get("answer") if extractor is None else safe_extract(extractor, s.get("text")) for s in samples]
        codes, names = dense_codes(texts)
        m = len(samples)
        lengths[i] = m
        sample[i, :m] = codes
        conf[i, :m] = [float(s.get("confidence", 1.0)) for s in samples]
        tokens[i, :m] = [float(s.get("n_tokens", 0)) for s in samples]
        answers.append(names)
    mask = np.arange(k)[None, :] < lengths[:, None]
    votes = running_votes(sample, conf if weighted else None)
    # Masked stages repeat the last vote so every array stays well defined.
    last = votes[np.arange(n), lengths - 1]
    votes = np.where(mask, votes, last[:, None])
    preds = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        preds[i] = hash_answers([answers[i][c] if c >= 0 else None for c in votes[i]])
    cost = np.cumsum(np.where(mask, tokens, 0.0), axis=1)
    labels = None
    if all(r.get("label") is not None for r in rows):
        labels = hash_answers([safe_extract(lab_extractor, str(r["label"])) or str(r["label"]) for r in rows])
    meta = {"task": "self_consistency", "stage": "sample", "vote": "weighted" if weighted else "majority",
            "n_samples": int(k), "ids": [str(r.get("id")) for r in rows]}
    for key in HEADER_KEYS:
        if header and key in header:
            meta[key if key != "n" else "recorded_n"] = header[key]
    return Trace(predictions=preds, reference=preds[np.arange(n), lengths - 1], mask=mask, cost=cost,
                 labels=labels, signals={"sample": sample.astype(np.float64), "confidence": conf, "tokens": tokens},
                 stage_names=tuple(f"sample_{j + 1}" for j in range(k)), meta=meta)


def convert(jsonl: str | Path, out: str | Path, **kwargs: Any) -> Trace:
    """Read a checkpoint and save its trace as ``.npz``; returns the trace."""
    header, rows = read_checkpoint(jsonl)
    if header is None and not rows:
        raise StopwiseError(f"'{jsonl}' is not a sampling checkpoint (no header, no questions).")
    trace = trace_from_records(rows, header=header, **kwargs)
    trace.save(out)
    return trace
