"""stopwise: stop neural computation as soon as the answer is known, with a certificate.

The core (:mod:`stopwise.core`, re-exported here) is pure numpy/scipy: traces, stopping rules,
calibration and certificates. Adapters that need torch live in subpackages and are imported on demand.
"""

from __future__ import annotations

import importlib as _importlib

# The core's old module paths are loaded before the names below are bound, as when the core lived
# at this level: a later `import stopwise.calibrate` must not rebind `stopwise.calibrate`, the
# function, to the module (the import system sets a package attribute on a submodule's first load).
for _old in ("_errors", "trace", "rules", "risks", "pvalues", "fwer", "curves", "calibrate", "certificate",
             "conditional", "controller", "validity", "report", "synthetic"):
    _importlib.import_module(f"stopwise.{_old}")
del _importlib, _old

from stopwise._version import __version__  # noqa: E402

# One list of public names, the core's: whatever it exports, stopwise exports.
from stopwise.core import *  # noqa: E402, F403
from stopwise.core import __all__ as _core_names  # noqa: E402

__all__ = [*_core_names, "__version__"]
