"""The BBC News recipe shared by the demo, the shipped trace and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stopwise.core.trace import Trace
from stopwise.encoder.data import TextSet, group_split
from stopwise.encoder.model import EarlyExitClassifier

#: Train / calibration / test fractions of the deduplicated articles.
FRACTIONS = (0.25, 0.40, 0.35)
SEED = 0
#: Tokens per article: the headline and first sentences (keeps `make demo` within minutes on 2 cores).
MAX_LENGTH = 64


@dataclass
class Prepared:
    clf: EarlyExitClassifier
    data: TextSet
    splits: dict[str, np.ndarray]
    features: dict[str, torch.Tensor]
    n_tokens: dict[str, np.ndarray]

    def trace(self, part: str, *, cost: str = "layers") -> Trace:
        rows = self.splits[part]
        return self.clf.trace_from_features(self.features[part], self.data.labels[rows], n_tokens=self.n_tokens[part],
                                            cost=cost, meta={"task": self.data.name, "split": part})

    def texts(self, part: str) -> list[str]:
        return [self.data.texts[i] for i in self.splits[part]]


def prepare(data: TextSet, *, base: Any = "minilm", max_length: int | None = MAX_LENGTH, seed: int = SEED,
            fractions: tuple[float, ...] = FRACTIONS, batch_size: int = 32, progress: bool = True,
            parts: tuple[str, ...] = ("train", "cal", "test"), pooling: str | None = None, **fit_kwargs: Any) -> Prepared:
    """Split by document, cache every layer's pooled state in one pass, train heads on 'train'."""
    import warnings

    clf = EarlyExitClassifier.from_base(base, class_names=data.class_names, max_length=max_length, pooling=pooling)
    splits = dict(zip(("train", "cal", "test"), group_split(data, fractions, seed=seed), strict=True))
    feats, n_tok = {}, {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*were truncated")  # truncation is the recipe here
        for part in parts:
            enc = clf.tokenize([data.texts[i] for i in splits[part]])
            n_tok[part] = np.array([len(x) for x in enc.ids])
            feats[part] = clf.features(enc, batch_size=batch_size, progress=progress)
    clf.fit(features=feats["train"], labels=data.labels[splits["train"]], seed=seed, **fit_kwargs)
    return Prepared(clf, data, {k: v for k, v in splits.items() if k in parts}, feats, n_tok)
