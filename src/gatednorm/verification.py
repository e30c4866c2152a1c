"""Moved to :mod:`gatednorm.verify`; this module re-exports its public names for existing imports.

Everything in ``gatednorm.verify.__all__`` is reachable here as the same object, so the two cannot drift
apart when the package gains a name.
"""

from .verify import *  # noqa: F403 (the shim's whole point: the package's public names, as listed there)
from .verify import __all__  # noqa: F401 (re-exported: `from gatednorm.verification import *` gives the same)
