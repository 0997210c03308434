"""Old import path of :mod:`stopwise.decoder.verify` (speculative sampling's accept/resample step),
renamed so that it is not confused with the :mod:`stopwise.sampling` adapter: the very same module
(see :mod:`stopwise._shim`)."""

from stopwise._shim import alias
from stopwise.decoder.verify import *  # noqa: F403 -- the names, for type checkers; at run time alias() makes this module that one

alias(__name__, "stopwise.decoder.verify")
