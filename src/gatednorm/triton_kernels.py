"""Moved: the triton backend now lives in :mod:`gatednorm.backends.triton` (``kernels`` and ``launch``).
This module keeps the old import path working (importing it imports Triton)."""

from .backends.triton.kernels import bwd_kernel, fwd_kernel, rescue_kernel, sum_partials_kernel
from .backends.triton.launch import (
    RESCUE_KERNEL_MIN_ELEMENTS,
    RESCUE_SCAN_ROWS,
    TritonBackend,
    backward,
    forward,
)

__all__ = [
    "RESCUE_KERNEL_MIN_ELEMENTS", "RESCUE_SCAN_ROWS", "TritonBackend", "backward", "bwd_kernel", "forward",
    "fwd_kernel", "rescue_kernel", "sum_partials_kernel",
]
