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
import torch.nn.functional as F

from .ops import (
    formula_rows,
    functorch_active,
    gated_norm_quant_rows,
    gated_norm_residual_rows,
    gated_norm_rows,
    gated_norm_rows_backward,
    grads_with_graph,
    needs_autograd,
    planned_forward,
    planned_quant,
    residual_sum,
    resolve_backend,
)
from .spec import (
    GatedNormCall,
    NormSpec,
    QuantSpec,
    ResidualCall,
    check_linear,
    compute_dtype,
    heads_stats_to_rows,
    prepare,
    prepare_quant,
    prepare_residual,
    regroup_residual,
)


def _needs_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                    residual: torch.Tensor | None) -> bool:
    """:func:`gatednorm.ops.needs_autograd`, the residual included."""
    return needs_autograd(x, weight, bias, z) or (
        residual is not None and torch.is_grad_enabled() and residual.requires_grad
    )


def _shaped_like(y: torch.Tensor, x: torch.Tensor, call: GatedNormCall) -> torch.Tensor:
    """The (M, N) rows y of ``call`` in x's shape. A 2-D x that was not regrouped already has it: no view
    (a view op is 0.7 us of host time; ``view(torch.Size)`` 2 us, hence view_as)."""
    return y if call.heads == 1 and x.dim() == 2 else y.view_as(x)


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
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
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
        residual: None, or x's shape, any floating dtype: the norm is taken of ``s = x + residual``,
            summed in float32 (float64 if either is float64) and not rounded before the norm
            (docs/design.md, "Residual and prenorm").
        prenorm: also return the updated residual stream s, rounded to residual's dtype (without a
            residual: x itself, or x in float32 with ``residual_in_fp32``).
        residual_in_fp32: without a residual, return the prenorm output in float32 (fla's flag; with
            a residual the output keeps the residual's dtype).
        backend: None (``GATEDNORM_BACKEND`` or "auto"), "auto", "native", "triton" or "compiled".

    Returns:
        ``(out, mean, rstd)``, plus ``residual_out`` (x's shape) with ``prenorm=True``: out has x's
        shape (dtype of ``out=`` or x); mean (None for RMSNorm) and rstd are 1-D float32 (float64 for
        float64 x) of length G*M, group-major: the statistic of row m, group g sits at index
        ``g * M + m`` (M = x.numel() // N, G = N // group_size); with a residual they are s's.
        Differentiable in x, weight, bias, z and residual when ``out`` is not given.
    """
    if out is None and residual is None and prenorm is False and residual_in_fp32.__class__ is bool:
        planned = planned_forward(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                  backend)
        if planned is not None:
            return planned
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, out,
                   regroup_heads=True)
    res = regroup_residual(prepare_residual(x, residual, prenorm, residual_in_fp32), call)
    if out is not None and _needs_autograd(x, weight, bias, z, residual):
        raise ValueError(
            "out= cannot be used when x, weight, bias, z or residual requires grad; drop out= or use torch.no_grad()"
        )
    if res is None:
        y, mean, rstd = gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, backend=backend,
                                        out=out)
        res_out = None
    else:
        y, mean, rstd, res_out = gated_norm_residual_rows(call.x2d, res.residual2d, call.weight, call.bias, call.z2d,
                                                          call.spec, res.out_dtype, prenorm=prenorm, backend=backend,
                                                          out=out)
    y = y if out is not None else _shaped_like(y, x, call)
    if call.heads > 1:  # a regrouped strided (T, H, N) gate: statistics back in the (T*H, N) call's order
        groups = x.shape[-1] // call.spec.group_size
        mean, rstd = heads_stats_to_rows(mean, call.heads, groups), heads_stats_to_rows(rstd, call.heads, groups)
    return (y, mean, rstd, res_out.view(call.out_shape)) if prenorm else (y, mean, rstd)


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
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable gated, grouped LayerNorm (or RMSNorm with ``is_rms_norm=True``).

    Same arguments and formula as :func:`layer_norm_fwd`; returns y, shaped and typed like x, or
    ``(y, residual_out)`` with ``prenorm=True`` (the semantics of flash-linear-attention's
    ``fused_norm_gate``: y = norm(x + residual) [gated], residual_out = x + residual in residual's dtype).
    Gradients flow to x, weight, bias, z and residual (analytic backward; the backward keeps only
    x (with a residual: the float32 sum s), z, weight, bias, mean and rstd).
    """
    if residual is None and prenorm is False and residual_in_fp32.__class__ is bool:
        planned = planned_forward(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                  backend, stats=False)
        if planned is not None:
            return planned[0]
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, regroup_heads=True)
    res = regroup_residual(prepare_residual(x, residual, prenorm, residual_in_fp32), call)
    if res is None:
        y = gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, backend=backend, stats=False)[0]
        return _shaped_like(y, x, call)
    y, _, _, res_out = gated_norm_residual_rows(call.x2d, res.residual2d, call.weight, call.bias, call.z2d,
                                                call.spec, res.out_dtype, prenorm=prenorm, backend=backend)
    y = _shaped_like(y, x, call)
    return (y, res_out.view(call.out_shape)) if prenorm else y


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
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable gated, grouped RMSNorm: ``x * rstd * weight (+ bias)``, gated by ``act(z)``.

    rstd = 1 / sqrt(mean(xc^2) + eps) per row and group; otherwise (residual, prenorm included) as
    :func:`layernorm_fn`.
    """
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, True, activation=activation,
                        residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32, backend=backend)


# --- Norm, gate and linear, with the memory-saving backward ------------------------------


def linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the linear layer after the norm runs in: autocast's dtype for x's device while autocast
    is on there, else x's (flash-linear-attention's rule). The norm's output is rounded to it once."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _linear_rows(y: torch.Tensor, linear_weight: torch.Tensor) -> torch.Tensor:
    """The norm's output y as the (M, N) rows the linear layer reads: y itself, or for a regrouped call
    the (T*H, N) view of its contiguous (T, H*N) rows."""
    n = linear_weight.shape[1]
    return y if y.shape[1] == n else y.view(-1, n)


def _linear_of(y: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The linear layer on the norm's output y (in ``dtype``), its weight and bias cast to ``dtype``: (M, O)."""
    return F.linear(_linear_rows(y, linear_weight), linear_weight.to(dtype),
                    None if linear_bias is None else linear_bias.to(dtype))


class GatedNormLinearFunction(torch.autograd.Function):
    """``out = y @ linear_weight.T + linear_bias`` with ``y = norm(s) [gated]`` of (M, N) rows; y is not kept.

    The forward computes y (M, N) in ``dtype`` (one rounding from C), runs the linear layer in ``dtype``
    and drops y. The backward keeps only s, z, weight, bias, mean, rstd and the linear weight: it
    recomputes y with the same backend call (so the same bits the forward used) for
    ``d linear_weight = dout.T @ y``, frees it, then ``dy = dout @ linear_weight`` (M, N) goes through the
    norm's analytic backward. Saved for backward: the norm's inputs and 2 statistics per group, against
    y (M x N values) more for the unfused ``linear(norm(...))``, whose linear layer saves its input.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                linear_weight: torch.Tensor, linear_bias: torch.Tensor | None, spec: NormSpec, backend: str,
                dtype: torch.dtype) -> torch.Tensor:
        """s, z: (M, N) rows (s: x, or the residual sum), or the (T, H*N) rows of a call regrouped for a
        strided (T, H, N) gate (weight and bias then repeated H times; :attr:`GatedNormCall.heads`);
        returns (M, O) in ``dtype``, M = T*H rows of N = ``linear_weight.shape[1]`` features."""
        y, mean, rstd = gated_norm_rows(s, weight, bias, z, spec, backend=backend, out_dtype=dtype)
        out = _linear_of(y, linear_weight, linear_bias, dtype)
        ctx.save_for_backward(s, z, weight, bias, mean, rstd, linear_weight)
        ctx.gatednorm = (spec, backend, dtype, None if linear_bias is None else linear_bias.dtype)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        s, z, weight, bias, mean, rstd, linear_weight = ctx.saved_tensors
        spec, backend, dtype, bias_dtype = ctx.gatednorm
        need = ctx.needs_input_grad  # s, z, weight, bias, linear_weight, linear_bias, then the constants
        dout = dout.to(dtype)
        d_lb = None
        if need[5]:
            # summed in float32 (float64 stays float64), rounded once to the bias's dtype
            d_lb = dout.sum(0, dtype=torch.promote_types(dout.dtype, torch.float32)).to(bias_dtype)
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            return (*_differentiable_linear_grads(dout, s, z, weight, bias, linear_weight, spec, dtype, need[:5]),
                    d_lb, None, None, None)
        d_lw = None
        if need[4]:
            y, _, _ = gated_norm_rows(s, weight, bias, z, spec, backend=backend, out_dtype=dtype)
            d_lw = (dout.t() @ _linear_rows(y, linear_weight)).to(linear_weight.dtype)
            del y  # before dy and the norm's gradients are allocated: y never lives beside them
        ds = dz = dw = db = None
        if any(need[:4]):
            dy = dout @ linear_weight.to(dtype)
            if dy.shape != s.shape:  # a regrouped call: the (T*H, N) rows are, contiguous, its (T, H*N) rows
                dy = dy.view(s.shape)
            ds, dz, dw, db = gated_norm_rows_backward(
                dy, s, weight, bias, z, mean, rstd, spec, backend=backend,
                needs_dx=need[0], needs_dz=need[1], needs_dweight=need[2], needs_dbias=need[3])
        return ds, dz, dw, db, d_lw, d_lb, None, None, None


def _differentiable_linear_grads(dout, s, z, weight, bias, linear_weight, spec: NormSpec, dtype: torch.dtype,
                                 need) -> tuple:
    """(ds, dz, dweight, dbias, dlinear_weight) with their own graph (``create_graph=True``), as
    ops._differentiable_grads does for the norm: its forward (ops.formula_rows) and the linear layer recomputed
    in torch ops, then differentiated by autograd; None where no gradient is asked."""
    out = _linear_of(formula_rows(s, weight, bias, z, spec, out_dtype=dtype)[0], linear_weight, None, dtype)
    return grads_with_graph(out, (s, z, weight, bias, linear_weight), need, dout)


def layernorm_linear_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    *,
    activation: str = "swish",
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated norm followed by a linear layer, ``F.linear(layernorm_fn(x, ...), linear_weight, linear_bias)``,
    with the memory-saving backward (:class:`GatedNormLinearFunction`): the normalised, gated activation
    is recomputed in the backward instead of being stored.

    Args:
        x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, residual, prenorm,
            residual_in_fp32, backend: as for :func:`layernorm_fn` (x (..., N); z x's shape, or (T, H, N)
            for a (T*H, N) x: a strided slice of a packed projection is read without a copy).
        linear_weight: (O, N). linear_bias: (O,) or None.

    Returns:
        ``out`` (..., O), or ``(out, residual_out)`` with ``prenorm=True``. The linear layer runs in x's
        dtype, or in autocast's dtype while autocast is on (:func:`linear_dtype`; the norm's output is
        rounded to it once, and the linear weight and bias are cast to it, as flash-linear-attention
        does). Differentiable in every tensor argument.
    """
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, regroup_heads=True)
    res = regroup_residual(prepare_residual(x, residual, prenorm, residual_in_fp32), call)
    check_linear(x, linear_weight, linear_bias)
    x2d = call.x2d
    transformed = functorch_active()
    if res is not None and res.residual2d is not None and not transformed and not _linear_needs_autograd(
            call, res.residual2d, linear_weight, linear_bias):
        return _norm_residual_linear_inference(call, res, linear_weight, linear_bias, prenorm, backend)
    if res is not None and res.residual2d is not None:
        s = residual_sum(x2d, res.residual2d)
    elif prenorm and torch.is_grad_enabled() and x2d.requires_grad:
        # As in ops.gated_norm_residual_rows: the two outputs' gradients meet at x in float32 and reach x
        # rounded once, not as two narrow gradients added in x's dtype.
        s = x2d.to(compute_dtype(x2d.dtype))
    else:
        s = x2d
    name = resolve_backend(backend, x.device)
    if transformed:  # torch.func sees through the norm (ops.formula_rows) and F.linear, not through the Function
        dtype = linear_dtype(x)
        y = formula_rows(s, call.weight, call.bias, call.z2d, call.spec, out_dtype=dtype)[0]
        out = _linear_of(y, linear_weight, linear_bias, dtype)
    else:
        out = GatedNormLinearFunction.apply(s, call.z2d, call.weight, call.bias, linear_weight, linear_bias,
                                            call.spec, name, linear_dtype(x))
    out = out.view(*call.out_shape[:-1], linear_weight.shape[0])
    if not prenorm:
        return out
    return out, s.to(res.out_dtype).view(call.out_shape)


def _linear_needs_autograd(call: GatedNormCall, residual2d: torch.Tensor, linear_weight: torch.Tensor,
                           linear_bias: torch.Tensor | None) -> bool:
    return needs_autograd(call.x2d, call.weight, call.bias, call.z2d) or (torch.is_grad_enabled() and (
        residual2d.requires_grad or linear_weight.requires_grad
        or (linear_bias is not None and linear_bias.requires_grad)))


def _norm_residual_linear_inference(call: GatedNormCall, res: ResidualCall, linear_weight: torch.Tensor,
                                    linear_bias: torch.Tensor | None, prenorm: bool, backend: str | None):
    """:func:`layernorm_linear_fn` with a residual and no gradient recorded: the norm through
    :func:`gated_norm_residual_rows` (where the backend fuses the residual sum, x and residual are read once
    and the float32 sum never reaches memory), y written once in the linear layer's dtype, then the linear
    layer. The same values as GatedNormLinearFunction's forward, which normalises the precomputed sum."""
    dtype = linear_dtype(call.x2d)
    y = torch.empty(call.x2d.shape, dtype=dtype, device=call.x2d.device)
    y, _, _, res_out = gated_norm_residual_rows(call.x2d, res.residual2d, call.weight, call.bias, call.z2d, call.spec,
                                                res.out_dtype, prenorm=prenorm, backend=backend, out=y)
    out = _linear_of(y, linear_weight, linear_bias, dtype).view(*call.out_shape[:-1], linear_weight.shape[0])
    return (out, res_out.view(call.out_shape)) if prenorm else out


def rmsnorm_linear_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    *,
    activation: str = "swish",
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`layernorm_linear_fn` with RMSNorm (no mean subtraction)."""
    return layernorm_linear_fn(x, weight, bias, z, linear_weight, linear_bias, eps, group_size, norm_before_gate,
                               True, activation=activation, residual=residual, prenorm=prenorm,
                               residual_in_fp32=residual_in_fp32, backend=backend)


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
    planned = planned_quant(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, quant,
                            quant_group_size, scale_format, round_to, column_major_scales, backend)
    if planned is not None:
        return _quant_shaped(*planned, x.shape, column_major_scales)
    call, qspec = prepare_quant(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                quant, quant_group_size, scale_format, round_to, column_major_scales,
                                regroup_heads=True)
    if needs_autograd(x, weight, bias, z):
        raise ValueError(
            "gated_norm_quant is not differentiable, but x, weight, bias or z requires grad; "
            "call it under torch.no_grad() / torch.inference_mode(), or pass detached tensors"
        )
    if call.heads == 1:
        q, scale = gated_norm_quant_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, qspec,
                                         backend=backend)
    else:
        q, scale = _quant_regrouped(call, qspec, backend)
    return _quant_shaped(q, scale, call.out_shape, column_major_scales)


def _quant_shaped(q: torch.Tensor, scale: torch.Tensor, out_shape: torch.Size,
                  column_major_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (M, N), scale (M, G)) of rows in the call's shape: q as x, scale as x.shape[:-1] + (G,)."""
    if len(out_shape) == 2 and not column_major_scales:  # the rows are the shape (two views: ~3 us a call)
        return q, scale
    lead = out_shape[:-1]
    if column_major_scales:  # (M, G) with strides (1, M): a view of (G, M) storage, G outermost
        scale = scale.t().view(scale.shape[1], *lead).movedim(0, -1)
    else:
        scale = scale.view(*lead, scale.shape[1])
    return q.view(out_shape), scale


def _quant_regrouped(call: GatedNormCall, qspec: QuantSpec, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) as (T*H, N) and (T*H, N // block) rows for a call regrouped for a strided (T, H, N) gate
    (:attr:`GatedNormCall.heads`), whose rows are T tokens of H*N features: the gate is read through its
    strides, not copied.

    A quant block (k features, k dividing N) never crosses a head there, so q (T, H*N) and the row-major
    scales (T, H*N // k) are, contiguous, the (T*H, N) and (T*H, N // k) results themselves: views. Column-major
    scales of the (T*H, N) call (block index outermost) are not a layout of the regrouped rows: the call
    computes row-major scales and transposes them into that storage, one copy of the scales (1/k of q's
    elements; none where k = N, one scale per row, since both layouts are then the same storage).
    """
    column_major = qspec.column_major_scales
    q, scale = gated_norm_quant_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec,
                                     qspec._replace(column_major_scales=False) if column_major else qspec,
                                     backend=backend)
    n = call.out_shape[-1]
    scale = scale.view(-1, n // qspec.block)
    if column_major:
        scale = scale.t().contiguous().t()  # a no-op for one block per row ((M, 1) storage is both layouts)
    return q.view(-1, n), scale
