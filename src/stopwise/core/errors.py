"""Exceptions and the validation helpers that phrase errors like scikit-learn does."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class StopwiseError(ValueError):
    """Base class for stopwise's user-facing errors."""


class TraceFormatError(StopwiseError):
    """A file is not a stopwise trace, is truncated, or has another schema version."""


class CalibrationError(StopwiseError):
    """Calibration cannot run on the data it was given."""


def param_error(name: str, owner: str, allowed: str, got: Any) -> StopwiseError:
    return StopwiseError(f"The '{name}' parameter of {owner} must be {allowed}. Got {got!r} instead.")


def check_open_unit(value: Any, name: str, owner: str) -> float:
    """Return ``value`` as a float in the open interval (0, 1) or raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or not 0.0 < float(value) < 1.0:
        raise param_error(name, owner, "a float in the open interval (0, 1)", value)
    return float(value)


def check_choice(value: Any, name: str, owner: str, choices: Iterable[str]) -> str:
    options = sorted(choices)
    if value not in options:
        raise param_error(name, owner, f"one of {options}", value)
    return str(value)


def check_int(value: Any, name: str, owner: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int,)) or value < minimum:
        raise param_error(name, owner, f"an int >= {minimum}", value)
    return int(value)


def check_directory(value: Any, name: str, owner: str, *, holding: str) -> Path:
    """Return ``value`` as a Path to an existing directory or raise (``holding``: what it should hold)."""
    path = Path(value)
    if not path.is_dir():
        raise StopwiseError(f"The '{name}' parameter of {owner} must be a directory of {holding}. Got "
                            f"{str(path)!r}, which is not a directory, instead.")
    return path
