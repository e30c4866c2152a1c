"""Argument checking and normalisation, done once here for every backend.

Every public entry point funnels its arguments through :func:`prepare`, which
raises ``TypeError``/``ValueError`` naming the offending argument and returns a
:class:`GatedNormCall`: 2-D views of ``x`` and ``z`` (rows x N) plus the static
description of the operator (:class:`NormSpec`). Backends never re-check.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Accepted spellings of the gate activation, mapped to the canonical name.
ACTIVATIONS = {"swish": "swish", "silu": "swish", "sigmoid": "sigmoid"}


class NormSpec(NamedTuple):
    """Static description of one gated norm call (hashable; no tensors).

    A NamedTuple rather than a dataclass: it is built on every call, and its fields are the
    custom ops' scalar arguments in order (``op(..., *spec, backend)``).
    """

    eps: float
    group_size: int
    norm_before_gate: bool
    is_rms_norm: bool
    activation: str  # "swish" | "sigmoid"


class GatedNormCall(NamedTuple):
    """Validated arguments: ``x2d``/``z2d`` are (M, N) views (copies only where strides demand)."""

    x2d: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    z2d: torch.Tensor | None
    spec: NormSpec
    out_shape: torch.Size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def canonical_activation(activation: str) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )
    return ACTIVATIONS[activation]


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N) -> (M, N), a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, n)


def prepare(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
    is_rms_norm: bool,
    activation: str,
    out: torch.Tensor | None = None,
) -> GatedNormCall:
    """Check every argument of the operator and return normalised views.

    Raises ``TypeError`` for wrong kinds/dtypes and ``ValueError`` for wrong
    shapes, devices and values. Nothing is written before this returns.
    """
    _check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., N), got a 0-d tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError("x must have a non-empty last dimension N, got N = 0")

    _check_floating("weight", weight)
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) to match x's last dimension, got {tuple(weight.shape)}")
    _check_device("weight", weight, x)

    if bias is not None:
        _check_floating("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},) to match x's last dimension, got {tuple(bias.shape)}")
        _check_device("bias", bias, x)

    x2d = _rows_view(x, n)
    z2d = None
    if z is not None:
        _check_floating("z", z)
        _check_device("z", z, x)
        if z.shape == x.shape:
            z2d = _rows_view(z, n)
        elif x.dim() == 2 and z.dim() == 3 and z.shape[0] * z.shape[1] == x.shape[0] and z.shape[2] == n:
            # The (T, H, N) gate layout of the newest sglang kernel: x is (T*H, N).
            z2d = _rows_view(z, n)
        else:
            raise ValueError(
                f"z must have x's shape {tuple(x.shape)} (or (T, H, N) with T*H rows for a 2-D x), "
                f"got {tuple(z.shape)}"
            )

    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")

    if group_size is None:
        group_size = n
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"group_size must be a positive divisor of N = {n}, got {group_size}")

    for flag_name, flag in (("norm_before_gate", norm_before_gate), ("is_rms_norm", is_rms_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")

    activation = canonical_activation(activation)

    if out is not None:
        _check_floating("out", out)
        if out.shape != x.shape:
            raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
        _check_device("out", out, x)

    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    return GatedNormCall(x2d, weight, bias, z2d, spec, x.shape)
