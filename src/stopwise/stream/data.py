"""UCR/UEA classification sets bundled inside the aeon wheel, read offline, pooled and re-split.

The bundled train/test splits leave too few inputs to calibrate on (GunPoint: 50 train, 150
test), so :func:`load_pooled` joins them and :func:`stratified_split` draws new parts.
Unequal-length sets (JapaneseVowels, PickupGestureWiimoteZ) load as lists; the prefix classifiers
need one length, so :func:`bundled_sets` lists aeon's padded ``_eq`` versions instead and
:func:`load_pooled` refuses the ragged ones with that advice. aeon is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stopwise._errors import StopwiseError
from stopwise.trace import IntArray

#: Bundled sets that are not classification problems (aeon refuses them) or not data.
NOT_CLASSIFICATION = ("CardanoSentiment", "Covid3Month", "UnitTestTimeStamps")


def _data_root() -> Path:
    import aeon

    return Path(aeon.__file__).parent / "datasets" / "data"


def bundled_sets(*, equal_length: bool = True) -> list[str]:
    """Names of the classification sets shipped in aeon's wheel (``_TRAIN.ts`` files), sorted;
    with ``equal_length`` the ragged ones are left out in favour of their ``_eq`` versions."""
    names = sorted({f.name[: -len("_TRAIN.ts")] for f in _data_root().glob("*/*_TRAIN.ts")} - set(NOT_CLASSIFICATION))
    if equal_length:
        names = [n for n in names if f"{n}_eq" not in names]
    return names


def load_pooled(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, channels, length) float, y) of a bundled set, its train and test parts joined."""
    from aeon.datasets import load_classification

    if name not in bundled_sets(equal_length=False):
        raise StopwiseError(f"The 'name' parameter of load_pooled must be one of {bundled_sets(equal_length=False)}. "
                            f"Got {name!r} instead.")
    X, y = load_classification(name, extract_path=str(_data_root()))
    if isinstance(X, list):
        raise StopwiseError(f"{name} has series of unequal lengths; prefix classifiers need one length. "
                            f"Use {name}_eq (aeon's padded version) instead.")
    return np.asarray(X, dtype=np.float64), np.asarray(y)


def stratified_split(y: np.ndarray, fractions: tuple[float, ...], *, seed: int) -> list[IntArray]:
    """Row indices per part, each class shared out in the given proportions (every part gets
    every class that has enough members)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    total = float(sum(fractions))
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        bounds = np.round(np.cumsum((0.0, *fractions)) / total * rows.size).astype(int)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            parts[i].extend(rows[a:b].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
