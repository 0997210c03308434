"""Old import path of :mod:`stopwise.core.rules` and its submodules: the very same modules (see :mod:`stopwise._shim`)."""

from stopwise._shim import alias
from stopwise.core.rules import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.core.rules")
