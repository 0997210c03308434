"""Old import path of :mod:`stopwise.core.report`: the very same module (see :mod:`stopwise._shim`)."""

from stopwise._shim import alias
from stopwise.core.report import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.core.report")
