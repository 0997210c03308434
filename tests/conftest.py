from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def small_bbc_classifier() -> Callable[..., tuple[Any, tuple[Any, Any, Any]]]:
    """Build (classifier, (train, cal, test)): MiniLM heads on a small random BBC split, calibrated.

    The serving tests share this recipe; each module calls it once with its own seed and sizes.
    """

    def build(*, seed: int, sizes: tuple[int, int, int], threads: int, max_length: int = 32) -> tuple[Any, tuple[Any, Any, Any]]:
        import numpy as np
        import torch

        from stopwise.encoder import EarlyExitClassifier
        from stopwise.encoder.data import bbc_news

        data = bbc_news()
        rows = np.random.default_rng(seed).permutation(len(data))
        a, b, c = np.cumsum(sizes)
        split = (data.take(rows[:a]), data.take(rows[a:b]), data.take(rows[b:c]))
        torch.set_num_threads(threads)
        train, cal, _ = split
        model = EarlyExitClassifier.from_base("minilm", class_names=train.class_names, max_length=max_length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(train.texts, train.labels, progress=False, epochs=60)
            model.calibrate(model.record(cal.texts, cal.labels, progress=False), "max_prob", epsilon=0.15, delta=0.2)
        assert model.certificate is not None and model.certificate.lam is not None
        return model, split

    return build


@pytest.fixture(scope="session")
def bbc_sentence_features() -> Callable[..., tuple[Any, list[str], Any, Any]]:
    """Build (classifier, texts, labels, features): MiniLM (32 tokens) on ``n`` random BBC
    sentences, every layer's pooled state cached, heads fitted on the first ``n_fit`` rows."""

    def build(*, seed: int, n: int, n_fit: int, **kwargs: Any) -> tuple[Any, list[str], Any, Any]:
        import numpy as np
        import torch

        from stopwise.encoder import EarlyExitClassifier
        from stopwise.encoder.data import bbc_sentences

        torch.set_num_threads(2)
        data = bbc_sentences(per_article=1)
        rows = np.random.default_rng(seed).permutation(len(data))[:n]
        texts, labels = [data.texts[i] for i in rows], data.labels[rows]
        clf = EarlyExitClassifier.from_base("minilm", class_names=data.class_names, max_length=32, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            feats = clf.features(texts, progress=False)
        clf.fit(features=feats[:n_fit], labels=labels[:n_fit], epochs=30, progress=False)
        return clf, texts, labels, feats

    return build
