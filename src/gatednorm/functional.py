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

from .ops import gated_norm_quant_rows, gated_norm_rows, needs_autograd
from .spec import prepare, prepare_quant


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


# --- Quantized output ---------------------------------------------------------------------


def gated_norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    z: torch.Tensor | None = None,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    quant: str = "fp8_e4m3",
    quant_group_size: int | None = None,
    scale_format: str = "float32",
    round_to: torch.dtype | None = None,
    column_major_scales: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated norm quantized for the next matmul: ``(q, scale)`` with ``y ~= q * scale`` per block.

    The norm is :func:`layer_norm_fwd`'s, computed in float32; then, per row and block of k =
    ``quant_group_size`` consecutive features (one block per row when None), on the float32 y::

        amax  = max |y| over the block
        scale = max(amax / qmax, 2^-126)         ("ue8m0": rounded up to a power of two)
        q     = round_half_even(clamp(y / scale, -qmax, qmax))

    Args:
        x, weight, bias, eps, z, group_size, norm_before_gate, is_rms_norm, activation, backend: as for
            :func:`layer_norm_fwd`: x (..., N) of any floating dtype and strides, z of x's shape or
            (T, H, N) for a (T*H, N) x.
        quant: "fp8_e4m3" (q is torch.float8_e4m3fn, qmax 448), "fp8_e4m3fnuz" (torch.float8_e4m3fnuz,
            qmax 240, AMD MI300) or "int8" (symmetric, qmax 127).
        quant_group_size: features per scale, a positive divisor of N (128: the DeepGEMM layout), or
            None for one scale per row (per token).
        scale_format: "float32" (scale = amax / qmax) or "ue8m0" (rounded up to a power of two: the
            exponent-only scales of DeepGEMM's UE8M0 mode; still returned as float32 values).
        round_to: None (default) quantizes the float32 y directly, one rounding in all. torch.bfloat16
            or torch.float16 first rounds y to that dtype, as the upstream fused kernels (which write
            bf16 before quantizing) do: use it to match their q and scales bit for bit.
        column_major_scales: return scale with column-major strides (1, M), the layout DeepGEMM and
            sglang's per-token-group quantization use; the values are the same.

    Returns:
        ``q``: x's shape in the quant dtype, contiguous. ``scale``: float32 of shape (..., N // k)
        (x's leading dims; (..., 1) per token), contiguous, or with ``column_major_scales`` the same
        shape over storage in which the block index is outermost (for a 2-D x: strides (1, M)).

    Non-finite values are not hidden: a block holding a NaN gets scale NaN, one holding an Inf scale
    +Inf, and all its q are NaN (fp8) or 0 (int8), so ``q * scale`` is NaN across that block; other
    blocks are unaffected. float64 inputs compute the norm in float64 and quantize its float32 rounding.

    Raises:
        ValueError: every error of :func:`layer_norm_fwd`; an unknown ``quant`` or ``scale_format``;
            a ``quant_group_size`` that is not a positive divisor of N; an input that requires grad while
            grad mode is on (the result is not differentiable: use ``torch.no_grad()`` or
            ``torch.inference_mode()``).
        TypeError: arguments of the wrong kind; ``round_to`` other than None / torch.bfloat16 /
            torch.float16; a float8 ``quant`` this PyTorch has no dtype for.
    """
    call, qspec = prepare_quant(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                quant, quant_group_size, scale_format, round_to, column_major_scales)
    if needs_autograd(x, weight, bias, z):
        raise ValueError(
            "gated_norm_quant is not differentiable, but x, weight, bias or z requires grad; "
            "call it under torch.no_grad() / torch.inference_mode(), or pass detached tensors"
        )
    q, scale = gated_norm_quant_rows(call.x2d, weight, bias, call.z2d, call.spec, qspec, backend=backend)
    lead = call.out_shape[:-1]
    if column_major_scales:  # (M, G) with strides (1, M): a view of (G, M) storage, G outermost
        scale = scale.t().view(scale.shape[1], *lead).movedim(0, -1)
    else:
        scale = scale.view(*lead, scale.shape[1])
    return q.view(call.out_shape), scale
