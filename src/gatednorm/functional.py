"""Functional API: ``layer_norm_fwd``, ``layernorm_fn``, ``rmsnorm_fn`` and the migration guide's names.

The operator (docs/design.md, section 1), per row m and group g of ``group_size``
features, computed in float32 (float64 for float64 ``x``) and rounded once::

    xc   = x                      (x * act(z) if the gate comes before the norm)
    mean = sum(xc) / gs           (LayerNorm only; RMSNorm uses 0)
    var  = sum((xc - mean)^2) / gs
    rstd = 1 / sqrt(var + eps)
    y    = (xc - mean) * rstd * weight + bias
    y    = y * act(z)             (if the gate comes after the norm)

with ``act`` = swish (t * sigmoid(t)) or sigmoid.
"""

from __future__ import annotations

import torch

from .ops import gated_norm_rows, needs_autograd
from .spec import prepare


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    z: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gated, grouped LayerNorm/RMSNorm forward with statistics: the drop-in for upstream ``_layer_norm_fwd``.

    Args:
        x: (..., N) floating tensor (upstream takes (M, N); any leading dims and strides work here).
        weight: (N,) scale. bias: (N,) shift or None.
        eps: added to the variance inside the square root, >= 0.
        z: gate, x's shape, or (T, H, N) when x is (T*H, N); None for no gate.
        out: optional output of x's shape, any floating dtype (the one rounding targets its dtype).
            Not allowed when an input requires grad.
        group_size: features per group, a positive divisor of N; None means N (one group).
        norm_before_gate: True: ``norm(x) * act(z)``; False: ``norm(x * act(z))``.
        is_rms_norm: RMSNorm (no mean subtraction) instead of LayerNorm.
        activation: "swish"/"silu" (t * sigmoid(t)) or "sigmoid".
        backend: None (``GATEDNORM_BACKEND`` or "auto"), "auto", "native", "triton" or "compiled".

    Returns:
        ``(out, mean, rstd)``: out has x's shape (dtype of ``out=`` or x); mean (None for RMSNorm)
        and rstd are 1-D float32 (float64 for float64 x) of length G*M, group-major: the statistic
        of row m, group g sits at index ``g * M + m`` (M = x.numel() // N, G = N // group_size).
        Differentiable in x, weight, bias and z when ``out`` is not given.
    """
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, out)
    if out is not None and needs_autograd(x, weight, bias, z):
        raise ValueError(
            "out= cannot be used when x, weight, bias or z requires grad; drop out= or use torch.no_grad()"
        )
    y, mean, rstd = gated_norm_rows(call.x2d, weight, bias, call.z2d, call.spec, backend=backend, out=out)
    return (y if out is not None else y.view(call.out_shape)), mean, rstd


def layernorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    backend: str | None = None,
) -> torch.Tensor:
    """Differentiable gated, grouped LayerNorm (or RMSNorm with ``is_rms_norm=True``).

    Same arguments and formula as :func:`layer_norm_fwd`; returns only y, shaped and typed like x.
    Gradients flow to x, weight, bias and z (analytic backward; the statistics are recomputed
    from nothing but x, z, weight, bias, mean and rstd).
    """
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation)
    return gated_norm_rows(call.x2d, weight, bias, call.z2d, call.spec, backend=backend)[0].view(call.out_shape)


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    activation: str = "swish",
    backend: str | None = None,
) -> torch.Tensor:
    """Differentiable gated, grouped RMSNorm: ``x * rstd * weight (+ bias)``, gated by ``act(z)``.

    rstd = 1 / sqrt(mean(xc^2) + eps) per row and group; otherwise as :func:`layernorm_fn`.
    """
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, True,
                        activation=activation, backend=backend)


# --- The names of the original migration guide (native backend by default) ---------------


def _layer_norm_fwd_native(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    z: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    backend: str | None = "native",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`layer_norm_fwd` on the native backend: the migration guide's drop-in for ``_layer_norm_fwd``."""
    return layer_norm_fwd(x, weight, bias, eps, z, out, group_size, norm_before_gate, is_rms_norm,
                          activation=activation, backend=backend)


def layernorm_fn_native(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    backend: str | None = "native",
) -> torch.Tensor:
    """:func:`layernorm_fn` on the native backend (the migration guide's name)."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm,
                        activation=activation, backend=backend)


def rmsnorm_fn_native(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    activation: str = "swish",
    backend: str | None = "native",
) -> torch.Tensor:
    """:func:`rmsnorm_fn` on the native backend (the migration guide's name)."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, True,
                        activation=activation, backend=backend)


def simple_layernorm_native(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """Plain LayerNorm over the last dimension (no gate, one group), native backend, differentiable.

    Equals ``F.layer_norm(x, (N,), weight, bias, eps)`` computed in float32 and rounded once.
    """
    return layernorm_fn(x, weight, bias, None, eps, backend="native")
