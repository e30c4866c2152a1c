"""Moved: the native backend now lives in :mod:`gatednorm.backends.native_cpu` (CPU) and
:mod:`gatednorm.backends.native_accel` (other devices), its shared math in :mod:`gatednorm.numerics`.
This module keeps the old import paths working.
"""

from __future__ import annotations

import torch

from . import ops
from .backends.base import GradsNeeded
from .backends.native_accel import ACCEL_BLOCK_ELEMENTS
from .backends.native_cpu import ATEN_GRAIN, CPU_BLOCK_ELEMENTS, fused_activation_length, in_safe_range
from .numerics import (
    SAFE_VAR_MIN,
    gate_activation,
    gate_activation_and_derivative,
    pow2_scale,
    rescale_groups,
    scaled_rstd,
)
from .spec import NormSpec

__all__ = [
    "ACCEL_BLOCK_ELEMENTS", "ATEN_GRAIN", "CPU_BLOCK_ELEMENTS", "SAFE_VAR_MIN", "backward", "forward",
    "fused_activation_length", "gate_activation", "gate_activation_and_derivative", "in_safe_range",
    "pow2_scale", "rescale_groups", "scaled_rstd",
]


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
            spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The native backend's forward on validated (M, N) rows (M > 0), for x's device."""
    return ops.select_impl("native", x.device).forward(x, weight, bias, z, spec, out)


def backward(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs_dx: bool = True, needs_dz: bool = True,
             needs_dweight: bool = True, needs_dbias: bool = True):
    """The native backend's backward on validated (M, N) rows (M > 0), for x's device."""
    needs = GradsNeeded(needs_dx, needs_dz and z is not None, needs_dweight, needs_dbias and bias is not None)
    return ops.select_impl("native", x.device).backward(dy, x, weight, bias, z, mean, rstd, spec, needs)
