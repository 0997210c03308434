"""Questions: a small record type, JSONL question files, and DeepMind's offline math generator."""

from __future__ import annotations

import importlib
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stopwise.core.errors import StopwiseError

#: Easy modules of `mathematics-dataset` with exact short answers (arithmetic, linear equations).
MATH_MODULES = (
    "arithmetic__add_or_sub", "arithmetic__add_sub_multiple", "arithmetic__mul", "arithmetic__div",
    "algebra__linear_1d",
)
MATH_SUFFIX = "\nWork it out in one or two short lines, then end with 'Answer: <number>'."


@dataclass(frozen=True)
class Question:
    """One question: a stable id, the prompt text and, when known, the reference answer."""

    id: str
    prompt: str
    label: str | None = None
    meta: dict[str, Any] | None = None


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file with fields ``prompt`` (or ``question``), optional ``id``,
    ``label`` (or ``answer``)."""
    path = Path(path)
    if not path.is_file():
        raise StopwiseError(f"Question file '{path}' does not exist.")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row.get("prompt", row.get("question"))
        except (json.JSONDecodeError, AttributeError):
            raise StopwiseError(f"'{path}' line {lineno} is not a JSON object with a 'prompt' field.") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise StopwiseError(f"'{path}' line {lineno} has no 'prompt' (or 'question') string.")
        label = row.get("label", row.get("answer"))
        out.append(Question(id=str(row.get("id", lineno - 1)), prompt=prompt,
                            label=None if label is None else str(label)))
    return out


def _patch_sympy() -> None:
    # mathematics-dataset 1.0.1 imports a name that newer sympy keeps only in a submodule.
    dio = sys.modules.get("sympy.solvers.diophantine") or importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dio, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        dio.base_solution_linear = inner.base_solution_linear  # type: ignore[attr-defined]


def math_questions(count: int, *, seed: int = 0, modules: Sequence[str] = MATH_MODULES, level: int = 0,
                   suffix: str = MATH_SUFFIX) -> list[Question]:
    """``count`` problems from DeepMind's ``mathematics-dataset`` generator (offline, exact answers),
    cycling through ``modules`` at difficulty ``level`` (0 easy, 1 medium, 2 hard)."""
    if count < 1:
        raise StopwiseError(f"The 'count' parameter of math_questions must be >= 1. Got {count!r} instead.")
    try:
        import numpy as np

        _patch_sympy()
        from mathematics_dataset import generate
        from mathematics_dataset.modules import algebra, arithmetic
    except ImportError as exc:
        raise StopwiseError(f"math_questions needs the 'mathematics-dataset' package (extra 'data'): {exc}") from None
    entropy = generate._make_entropy_fn(level, 3)
    table = {f"arithmetic__{k}": v for k, v in arithmetic.train(entropy).items()}
    table.update({f"algebra__{k}": v for k, v in algebra.train(entropy).items()})
    unknown = [m for m in modules if m not in table]
    if unknown:
        raise StopwiseError(f"Unknown mathematics-dataset modules {unknown}. Known: {sorted(table)}.")
    # The generator draws from the global random and numpy states: seed both, restore after.
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        out = []
        for i in range(count):
            name = modules[i % len(modules)]
            problem = table[name]()
            text = str(problem.question).strip()
            out.append(Question(id=f"math-{seed}-{i}", prompt=text + suffix, label=str(problem.answer),
                                meta={"module": name, "question": text}))
        return out
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
