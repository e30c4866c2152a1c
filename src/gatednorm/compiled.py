"""Moved: the compiled backend now lives in :mod:`gatednorm.backends.compiled`. This module keeps the
old import path working."""

from .backends.compiled import COMPILE_TIMES, CompiledBackend

__all__ = ["COMPILE_TIMES", "CompiledBackend"]
