"""The triton backend: fused forward/backward kernels (:mod:`.kernels`) and their launcher (:mod:`.launch`).

Importing this package imports Triton; :mod:`gatednorm.ops` does so only when the backend is asked for.
"""

from .launch import TritonBackend

__all__ = ["TritonBackend"]
