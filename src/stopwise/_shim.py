"""Old import paths kept for users: each old module is the very module object of its new home.

A shim file (e.g. ``stopwise/trace.py``) calls :func:`alias` with its own name and the new
module's; from then on both names are one object in ``sys.modules``, so ``isinstance`` checks,
monkeypatching and private names reached through the old path all act on the new module. A
package's shim aliases its submodules too (``stopwise.rules.base`` is ``stopwise.core.rules.base``):
otherwise the import system would find them through the new package's path and load a second copy.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def alias(old: str, new: str) -> None:
    """Make the module named ``old`` (and, for a package, each of its submodules) be ``new``'s."""
    module = importlib.import_module(new)
    sys.modules[old] = module
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        sub = importlib.import_module(f"{new}.{info.name}")
        sys.modules[f"{old}.{info.name}"] = sub
        setattr(module, info.name, sub)
