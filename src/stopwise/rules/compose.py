"""Old import path of :mod:`stopwise.core.rules.compose`: the very same module (see :mod:`stopwise._shim`).

At run time the package's shim has already aliased this name, so this file is for tools that read files (type checkers, linters)."""

from stopwise._shim import alias
from stopwise.core.rules.compose import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.core.rules.compose")
