"""Recording encoder traces with Ray Data: ``map_batches`` over a large text set, one Trace back.

Calibration needs every exit of every text (:meth:`~stopwise.encoder.EarlyExitClassifier.record`).
On a large text set that is the costly step, and it parallelises over texts: :func:`record_traces`
streams the texts through Ray Data's ``map_batches`` into ``concurrency`` actors that load the
classifier once each, and assembles their per-batch arrays into the one :class:`~stopwise.Trace`
that ``clf.record(texts, labels)`` would give, in input order (Ray Data may hand blocks back in
another order, so every row carries its index).

Importing this module imports Ray (install the ``[ray]`` extra); :mod:`stopwise.serve` does not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data

import stopwise as sw
from stopwise._errors import StopwiseError, check_choice, check_directory, check_int

COSTS = ("layers", "flops")


class TraceRecorder:
    """A Ray Data callable class: loads the classifier once per actor, records each batch it is given.

    Each batch is a dict of numpy columns ``idx``, ``text`` and optionally ``label``; the answer
    holds the same ``idx`` with every layer's ``predictions`` (rows × layers), ``probs`` (rows ×
    layers × classes), ``cost`` (rows × layers), ``labels`` (class ids, or -1 without labels) and
    ``meta`` (the trace's JSON metadata and stage names, equal on every row).
    """

    def __init__(self, heads_dir: str, *, base: str | None = None, cost: str = "layers",
                 inner_batch_size: int = 32, threads: int | None = None) -> None:
        import torch

        from stopwise.encoder import EarlyExitClassifier

        if threads is not None:
            torch.set_num_threads(threads)
        self.clf = EarlyExitClassifier.from_pretrained(base, heads_dir)
        self.cost, self.inner_batch_size = cost, inner_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        labels = batch["label"].tolist() if "label" in batch else None
        trace = self.clf.record(texts, labels, batch_size=self.inner_batch_size, cost=self.cost, progress=False)
        n = len(texts)
        head = json.dumps({"meta": dict(trace.meta), "stage_names": list(trace.stage_names or ())}, sort_keys=True)
        return {"idx": np.asarray(batch["idx"], dtype=np.int64), "predictions": trace.predictions,
                "probs": trace.probs, "cost": trace.cost_matrix,
                "labels": trace.labels if trace.labels is not None else np.full(n, -1, dtype=np.int64),
                "meta": np.array([head] * n, dtype=object)}


def _check_texts(texts: Any, labels: Any) -> tuple[list[str], list[Any] | None]:
    owner = "record_traces"
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise StopwiseError(f"The 'texts' parameter of {owner} must be a sequence of strings. Got "
                            f"{type(texts).__name__} instead.")
    texts = list(texts)
    if not texts:
        raise StopwiseError(f"The 'texts' parameter of {owner} must hold at least one text. Got an empty sequence "
                            "instead.")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise StopwiseError(f"The 'texts' parameter of {owner} must hold strings only. Got "
                            f"{type(texts[bad]).__name__} at index {bad} instead.")
    if labels is None:
        return texts, None
    labels = list(labels)
    if len(labels) != len(texts):
        raise StopwiseError(f"The 'labels' parameter of {owner} must hold one label per text ({len(texts)}). Got "
                            f"{len(labels)} instead.")
    kinds = {isinstance(y, str) for y in labels}
    if len(kinds) > 1:  # a column must have one type: class names or class ids, not both
        raise StopwiseError(f"The 'labels' parameter of {owner} must hold class names only or class ids only. Got "
                            "a mix instead.")
    return texts, labels


def record_traces(texts: Sequence[str], labels: Sequence[Any] | None = None, *, heads_dir: str | Path,
                  base: str | Path | None = None, batch_size: int = 64, concurrency: int = 1,
                  num_cpus: float = 1.0, cost: str = "layers", inner_batch_size: int = 32,
                  threads: int | None = None) -> sw.Trace:
    """Every exit of every text, recorded by Ray Data actors: equal to ``clf.record(texts, labels)``.

    ``batch_size`` texts go to an actor per ``map_batches`` call (each runs ``record`` on them in
    forward passes of ``inner_batch_size``); ``concurrency`` actors, each reserving ``num_cpus``
    CPUs and ``threads`` torch threads, load the heads in ``heads_dir`` on ``base`` once each.
    Uses the running Ray (``ray.init``), or starts a local one.
    """
    owner = "record_traces"
    texts, label_list = _check_texts(texts, labels)
    heads = check_directory(heads_dir, "heads_dir", owner, holding="saved exit heads")
    batch_size = check_int(batch_size, "batch_size", owner, minimum=1)
    concurrency = check_int(concurrency, "concurrency", owner, minimum=1)
    inner_batch_size = check_int(inner_batch_size, "inner_batch_size", owner, minimum=1)
    if threads is not None:
        threads = check_int(threads, "threads", owner, minimum=1)
    cost = check_choice(cost, "cost", owner, COSTS)
    if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus >= 0:
        raise StopwiseError(f"The 'num_cpus' parameter of {owner} must be a number >= 0. Got {num_cpus!r} instead.")
    rows: list[dict[str, Any]] = [{"idx": i, "text": t} for i, t in enumerate(texts)]
    if label_list is not None:
        for row, y in zip(rows, label_list, strict=True):
            row["label"] = y if isinstance(y, str) else int(y)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(texts) // batch_size)))
    out = ds.map_batches(TraceRecorder, batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
                         num_cpus=num_cpus, fn_constructor_args=(str(heads.resolve()),),
                         fn_constructor_kwargs={"base": None if base is None else str(base), "cost": cost,
                                                "inner_batch_size": inner_batch_size, "threads": threads})
    return assemble(list(out.iter_batches(batch_size=None, batch_format="numpy")), len(texts), cost=cost,
                    labelled=label_list is not None)


def assemble(parts: Sequence[dict[str, np.ndarray]], n: int, *, cost: str = "layers",
             labelled: bool = True) -> sw.Trace:
    """One Trace in input order from :class:`TraceRecorder` batches returned in any order.

    Refuses output that does not hold each of the ``n`` row indices exactly once, or rows recorded
    under different metadata (other heads).
    """
    keys = ("idx", "predictions", "probs", "cost", "labels", "meta")
    if not parts:
        raise StopwiseError(f"Ray Data returned no rows for {n} texts.")
    got = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    order = np.argsort(got["idx"], kind="stable")
    if not np.array_equal(got["idx"][order], np.arange(n)):
        raise StopwiseError(f"Ray Data returned {len(got['idx'])} rows for {n} texts, not each text once.")
    metas = set(got["meta"].tolist())
    if len(metas) != 1:
        raise StopwiseError("The Ray Data actors recorded with different heads or settings; every actor must load "
                            "the same heads.")
    head = json.loads(metas.pop())
    cost_rows = got["cost"][order]
    return sw.Trace(predictions=got["predictions"][order], probs=got["probs"][order],
                    # 'layers' cost is one row shared by every text, as record() gives it
                    cost=cost_rows[0] if cost == "layers" else cost_rows,
                    labels=got["labels"][order] if labelled else None,
                    stage_names=tuple(head["stage_names"]) or None, meta=head["meta"])
