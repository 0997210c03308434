"""Old import path of :mod:`stopwise.core.validity`: the very same module (see :mod:`stopwise._shim`)."""

from stopwise._shim import alias
from stopwise.core.validity import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.core.validity")
