"""The rows behind ``benchmarks/encoder_gate.py``: each backbone's one-sentence-per-article split
(the cached features' rows, rebuilt and checked against the cache), and the extra training rows of
its ``*_all`` head sets on BBC sentences: every sentence of the training articles for the heads
and of the gate articles for the gate, minus any text that is also a calibration or test text.

The calibration and test rows stay one sentence per article, exactly the cached ones, so that
the ``*_all`` head sets are measured on the same rows as today's.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from typing import Any

import numpy as np

#: ``bbc_sentences(per_article=...)`` that keeps every sentence of an article.
EVERY_SENTENCE = 10**6


def smollm2_rows(task: str, caps: dict[str, int]) -> Any:
    """The whole documents of ``task`` that SmolLM2's run keeps (``caps`` rows per task)."""
    from stopwise.encoder import data

    load = {"bbc_articles": data.bbc_news, "bbc_sentences": lambda: data.bbc_sentences(per_article=1),
            "champ_steps": data.champ_steps}[task]
    ts = load()
    docs = np.random.default_rng(0).permutation(np.unique(ts.groups))
    keep = max(1, int(len(docs) * caps[task] / len(ts)))
    return ts.take(np.flatnonzero(np.isin(ts.groups, docs[:keep])))


def _prepare_smollm2(task: str, *, threads: int, cfg: dict[str, Any]) -> Any:
    """SmolLM2's rows of ``task`` (``cfg``: its SETTINGS), split by document, features of every layer."""
    import torch

    from stopwise.encoder import recipes

    torch.set_num_threads(threads)
    ts = smollm2_rows(task, cfg["caps"])
    return recipes.prepare(ts, base="smollm2", max_length=cfg["max_length"], fractions=cfg["fractions"],
                           progress=True, pooling="mean")


def cached(task: str, *, threads: int, backbone: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Pooled features of every split (``prepare_minilm``'s, or SmolLM2's of its ``settings``,
    encoder_gate's SETTINGS), cached under $STOPWISE_CACHE/encoder_gate."""
    import torch

    from stopwise.hf.bundled import cache_dir

    # SmolLM2's file names its rows and tokens, so that a change to SETTINGS is never read from a stale cache.
    sizes = "" if backbone == "minilm" else f"_{settings['caps'][task]}x{settings['max_length']}"
    path = cache_dir() / "encoder_gate" / f"{backbone}_{task}{sizes}.pt"
    if path.is_file():
        out: dict[str, Any] = torch.load(path, weights_only=True)
        return out
    import encoder as bench

    t0 = time.perf_counter()
    if backbone == "minilm":
        prep = bench.prepare_minilm(task, threads=threads)
        max_length, pooling = bench.MAX_LENGTH, bench.POOLING["minilm"]
    else:
        prep = _prepare_smollm2(task, threads=threads, cfg=settings)
        max_length, pooling = settings["max_length"], "mean"
    out = {
        "features": prep.features, "class_names": list(prep.clf.class_names),
        "labels": {p: torch.as_tensor(prep.data.labels[r]) for p, r in prep.splits.items()},
        "groups": {p: torch.as_tensor(np.unique(prep.data.groups[r], return_inverse=True)[1]) for p, r in prep.splits.items()},
        "test_texts": prep.texts("test"), "max_length": max_length, "pooling": pooling,
        "seconds_features": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def task_split(task: str, *, backbone: str, settings: dict[str, Any]) -> tuple[Any, dict[str, np.ndarray]]:
    """The rows of ``task`` and their train / cal / test split, as the cached features were made."""
    from stopwise.encoder import recipes
    from stopwise.encoder.data import group_split

    if backbone == "minilm":
        # benchmarks/encoder.py's rows: its cap (2,400) keeps every row of the three tasks, and
        # all_sentence_rows checks the rebuilt split against the cache, so a change there raises.
        from stopwise.encoder import data

        ts = {"bbc_articles": data.bbc_news, "bbc_sentences": lambda: data.bbc_sentences(per_article=1),
              "champ_steps": data.champ_steps}[task]()
        fractions = recipes.FRACTIONS
    else:
        ts = smollm2_rows(task, settings["caps"])
        fractions = settings["fractions"]
    return ts, dict(zip(("train", "cal", "test"), group_split(ts, fractions, seed=recipes.SEED), strict=True))


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]


def all_sentence_rows(cached: dict[str, Any], gate_rows: np.ndarray, *, clf: Any, backbone: str,
                      settings: dict[str, Any], threads: int) -> dict[str, dict[str, Any]]:
    """Features and labels of every sentence of the training articles ("train") and of the gate
    articles ("gate": the documents of ``gate_rows``, half the test split's), minus the texts of
    the calibration and test splits, each capped at ``settings["all_sentences_caps"]`` rows where
    given (a seeded random subset). Cached under $STOPWISE_CACHE/encoder_gate in files named by
    their row count, token length and a hash of their texts, so that no change reads a stale file."""
    import torch

    from stopwise.encoder.data import bbc_sentences
    from stopwise.hf.bundled import cache_dir

    ts, splits = task_split("bbc_sentences", backbone=backbone, settings=settings)
    if [ts.texts[i] for i in splits["test"]] != list(cached["test_texts"]) or any(
            not np.array_equal(ts.labels[splits[p]], cached["labels"][p].numpy()) for p in ("train", "cal", "test")):
        raise RuntimeError("The rebuilt bbc_sentences split does not match the cached features: delete "
                           f"{cache_dir() / 'encoder_gate'}/{backbone}_bbc_sentences*.pt and run again.")
    test_docs = np.unique(ts.groups[splits["test"]])
    articles = {"train": np.unique(ts.groups[splits["train"]]),
                "gate": test_docs[np.unique(cached["groups"]["test"].numpy()[gate_rows])]}
    held = {ts.texts[i] for p in ("cal", "test") for i in splits[p]}
    every = bbc_sentences(per_article=EVERY_SENTENCE)
    caps = settings.get("all_sentences_caps") or {}
    out: dict[str, dict[str, Any]] = {}
    for role, arts in articles.items():
        rows = np.flatnonzero(np.isin(every.groups, arts))
        dropped = int(sum(every.texts[i] in held for i in rows))
        rows = np.array([i for i in rows if every.texts[i] not in held], dtype=np.int64)
        if role in caps and len(rows) > caps[role]:
            rows = np.sort(np.random.default_rng(0).permutation(rows)[: caps[role]])
        texts = [every.texts[i] for i in rows]
        path = cache_dir() / "encoder_gate" / (f"{backbone}_bbc_sentences_all_{role}_{len(rows)}rows_"
                                               f"{clf.max_length}tok_{_digest(texts)}.pt")
        if path.is_file():
            entry: dict[str, Any] = torch.load(path, weights_only=True)
        else:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*were truncated")
                feats = clf.features(clf.tokenize(texts), batch_size=64, progress=True)
            entry = {"features": feats, "labels": torch.as_tensor(every.labels[rows]),
                     "seconds_features": time.perf_counter() - t0}
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(entry, path)
        out[role] = {"features": entry["features"], "labels": entry["labels"].numpy(), "n_rows": len(rows),
                     "n_articles": len(arts), "n_dropped_as_calibration_or_test_text": dropped,
                     "seconds_features": float(entry["seconds_features"]), "cache_file": path.name}
    return out
