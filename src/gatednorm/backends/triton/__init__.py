"""The triton backend: fused forward/backward kernels (:mod:`.kernels`), their launcher (:mod:`.launch`) and
the launches decided once per call signature (:mod:`.plans`, eager plans).

Importing this package imports Triton; :mod:`gatednorm.ops` does so only when the backend is asked for.
"""

from .launch import TritonBackend

__all__ = ["TritonBackend"]
