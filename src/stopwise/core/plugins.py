"""Importing optional modules by name (adapters' rules and subcommands): absent ones are skipped,
broken ones raise."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_if_present(module: str) -> ModuleType | None:
    """Import ``module``, or return None when it, or a package above it, does not exist.

    Anything else that fails while importing an existing module (a dependency it lacks, a bug)
    raises: a broken adapter must not look like an absent one.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
