"""Old import path of :mod:`stopwise.core.pvalues`: the very same module (see :mod:`stopwise._shim`)."""

from stopwise._shim import alias
from stopwise.core.pvalues import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.core.pvalues")
