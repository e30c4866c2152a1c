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
    """Validated arguments: ``x2d``/``z2d`` are (M, N) views (copies only where strides demand).

    ``heads`` > 1 marks a call regrouped by :func:`prepare` (``regroup_heads=True``) for a strided
    (T, H, N) gate: x2d and z2d are then (T, H*N) views, ``weight``/``bias`` are repeated H times, and
    the statistics come out in the order :func:`heads_stats_to_rows` turns back into the (T*H, N) call's.
    """

    x2d: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    z2d: torch.Tensor | None
    spec: NormSpec
    out_shape: torch.Size
    heads: int = 1


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


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """``device``: x's."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; expected the same device")


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N) -> (M, N), a view whenever the strides allow one."""
    return t if t.dim() == 2 else t.reshape(-1, n)


def _packed_heads(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x as (T, H*N), z as (T, H*N)), both views, for a (T, H, N) gate whose rows no (T*H, N) view can
    address, or None.

    That is the gate serving frameworks slice out of a packed projection (qkvz): heads adjacent
    (stride N), tokens ``proj`` apart. Row (t, h) of the (T*H, N) call is then group h of token t in
    the (T, H*N) layout, which every backend reads through its one row stride. x must allow the
    (T, H*N) view too (rows of N contiguous features, one after another).
    """
    t, h, n = z.shape
    # Decided from the strides alone (no trial views: torch.compile traces this without exceptions).
    if t <= 1 or h <= 1 or z.stride(2) != 1 or z.stride(1) != n or z.stride(0) == h * n:
        return None  # not heads-packed, or a plain (T*H, N) view exists: nothing to regroup
    if x.stride(1) != 1 or x.stride(0) != n:
        return None  # x itself has no (T, H*N) view: the gate is copied into rows as before
    return x.view(t, h * n), z.flatten(1)


def _repeat_param(p: torch.Tensor, heads: int, x: torch.Tensor) -> torch.Tensor:
    """``p`` (N,) repeated ``heads`` times, widened to the compute dtype first: the values the backend
    reads are the same, and the gradient's per-head partial sums (added up by autograd) stay in C, so
    dweight/dbias are still rounded once to the parameter's dtype."""
    return p.to(torch.promote_types(p.dtype, compute_dtype(x.dtype))).repeat(heads)


def heads_stats_to_rows(stat: torch.Tensor | None, heads: int, groups: int) -> torch.Tensor | None:
    """Statistics of a regrouped call (:attr:`GatedNormCall.heads`), index ``(h * G + g) * T + t``, in the
    group-major order of the (T*H, N) call, index ``g * (T*H) + t * H + h`` (G groups per head row)."""
    if stat is None or heads == 1:
        return stat
    return stat.view(heads, groups, -1).permute(1, 2, 0).reshape(-1)


def _check_norm_spec(eps: float, group_size: int | None, n: int, norm_before_gate: bool, is_rms_norm: bool,
                     activation: str) -> NormSpec:
    """The scalar checks of :func:`prepare` (``TypeError``/``ValueError`` naming the argument), and their NormSpec."""
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

    return NormSpec(eps, group_size, norm_before_gate, is_rms_norm, canonical_activation(activation))


#: NormSpec per accepted scalar arguments (:func:`_norm_spec`); a model has a handful, the bound is for
#: programs that sweep eps or group_size.
_SPECS: dict[tuple, NormSpec] = {}
_SPECS_MAX = 1024


def _norm_spec(eps: float, group_size: int | None, n: int, norm_before_gate: bool, is_rms_norm: bool,
               activation: str) -> NormSpec:
    """:func:`_check_norm_spec`, remembered per argument values: a call repeats its layer's arguments, and
    checking them and building the NormSpec is about 1 us of every call's host time; a hit is 0.3 us.

    Each value's type is part of the key, since True == 1 (and hashes alike) where only one of them is
    valid. Errors are never remembered: a rejected argument is checked, and raises, every time. Not while
    torch.compile traces: a global dict that grows would be guarded on and recompile the graph.
    """
    if torch.compiler.is_compiling():
        return _check_norm_spec(eps, group_size, n, norm_before_gate, is_rms_norm, activation)
    key = (eps, type(eps), group_size, type(group_size), n, norm_before_gate, type(norm_before_gate),
           is_rms_norm, type(is_rms_norm), activation)
    try:
        spec = _SPECS.get(key)
    except TypeError:  # an unhashable argument is of a wrong kind: the checks raise naming it
        return _check_norm_spec(eps, group_size, n, norm_before_gate, is_rms_norm, activation)
    if spec is None:
        spec = _check_norm_spec(eps, group_size, n, norm_before_gate, is_rms_norm, activation)
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


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
    *,
    regroup_heads: bool = False,
) -> GatedNormCall:
    """Check every argument of the operator and return normalised views.

    Raises ``TypeError`` for wrong kinds/dtypes and ``ValueError`` for wrong
    shapes, devices and values. Nothing is written before this returns.

    ``regroup_heads``: a (T, H, N) gate that no (T*H, N) view can address (a strided slice of a packed
    projection) is not copied: the call is regrouped as T rows of H*N features, head h of token t being
    features ``[h*N, (h+1)*N)`` of row t (``heads`` = H in the result; see :class:`GatedNormCall`).
    Callers that return statistics reorder them with :func:`heads_stats_to_rows`. Without it, such a
    gate is copied into rows.
    """
    # x's shape and device are read once: each read builds a Python object (0.05-0.1 us), and this runs on
    # every call.
    _check_floating("x", x)
    shape = x.shape
    if len(shape) < 1:
        raise ValueError("x must have at least one dimension (..., N), got a 0-d tensor")
    n = shape[-1]
    if n == 0:
        raise ValueError("x must have a non-empty last dimension N, got N = 0")
    device = x.device

    _check_floating("weight", weight)
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},) to match x's last dimension, got {tuple(weight.shape)}")
    _check_device("weight", weight, device)

    if bias is not None:
        _check_floating("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},) to match x's last dimension, got {tuple(bias.shape)}")
        _check_device("bias", bias, device)

    rows = len(shape) == 2
    x2d = x if rows else x.reshape(-1, n)
    z2d = None
    packed = None
    if z is not None:
        _check_floating("z", z)
        _check_device("z", z, device)
        if z.shape == shape:
            z2d = z if rows else z.reshape(-1, n)
        elif rows and z.dim() == 3 and z.shape[0] * z.shape[1] == shape[0] and z.shape[2] == n:
            # The (T, H, N) gate layout of the newest sglang kernel: x is (T*H, N).
            packed = _packed_heads(x, z) if regroup_heads else None
            z2d = packed[1] if packed is not None else _rows_view(z, n)
        else:
            raise ValueError(
                f"z must have x's shape {tuple(shape)} (or (T, H, N) with T*H rows for a 2-D x), "
                f"got {tuple(z.shape)}"
            )

    spec = _norm_spec(eps, group_size, n, norm_before_gate, is_rms_norm, activation)

    if out is not None:
        _check_floating("out", out)
        if out.shape != shape:
            raise ValueError(f"out must have x's shape {tuple(shape)}, got {tuple(out.shape)}")
        _check_device("out", out, device)

    if packed is not None:
        heads = z.shape[1]
        return GatedNormCall(packed[0], _repeat_param(weight, heads, x),
                             None if bias is None else _repeat_param(bias, heads, x), z2d, spec, shape, heads)
    return GatedNormCall(x2d, weight, bias, z2d, spec, shape)


# ---------------------------------------------------------------------------
# Residual and prenorm (docs/design.md, "Residual and prenorm")
# ---------------------------------------------------------------------------


class ResidualCall(NamedTuple):
    """Validated residual arguments of one call.

    ``residual2d``: an (M, N) view of ``residual`` (None: no residual; the norm's input is x itself).
    ``out_dtype``: the dtype of the prenorm output (the updated residual stream): residual's dtype;
    without a residual, float32 for ``residual_in_fp32`` (float64 inputs stay float64), else x's.
    """

    residual2d: torch.Tensor | None
    out_dtype: torch.dtype


def residual_sum_dtype(x_dtype: torch.dtype, residual_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``s = x + residual``: float32, or float64 when either operand is float64.

    float32 holds the sum of two bf16/fp16 values exactly in most cases and rounds it once otherwise,
    as the upstream fused kernels do (they add in float32 registers).
    """
    return torch.float64 if torch.float64 in (x_dtype, residual_dtype) else torch.float32


def prepare_residual(
    x: torch.Tensor, residual: torch.Tensor | None, prenorm: bool, residual_in_fp32: bool
) -> ResidualCall | None:
    """Check the residual arguments of a call (after :func:`prepare` has checked x).

    Returns None when they change nothing (no residual and no prenorm output: ``residual_in_fp32``
    alone only decides the dtype of an output that is not returned), else a :class:`ResidualCall`.
    Raises ``TypeError`` for non-bool flags or a residual that is not a floating tensor, ``ValueError``
    for a residual whose shape is not x's or that lives on another device.
    """
    if residual is None and prenorm is False and (residual_in_fp32 is False or residual_in_fp32 is True):
        return None  # the common call, checked without the loop below (bools are the two singletons)
    for flag_name, flag in (("prenorm", prenorm), ("residual_in_fp32", residual_in_fp32)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be a bool, got {type(flag).__name__}")
    if residual is None:
        if not prenorm:
            return None
        wide = torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else x.dtype
        return ResidualCall(None, wide)
    _check_floating("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_device("residual", residual, x.device)
    # fla's rule: the updated residual keeps the residual's dtype; residual_in_fp32 applies only
    # when there is no residual yet (the first layer), where it decides the dtype the stream starts in.
    return ResidualCall(_rows_view(residual, x.shape[-1]), residual.dtype)


def regroup_residual(res: ResidualCall | None, call: GatedNormCall) -> ResidualCall | None:
    """``res`` laid out as ``call.x2d`` (the (T, H*N) rows of a regrouped call; a copy only where the
    residual's strides allow no such view)."""
    if res is None or res.residual2d is None or call.heads == 1:
        return res
    return res._replace(residual2d=res.residual2d.reshape(call.x2d.shape))


def check_linear(x: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None) -> None:
    """Check the linear layer of a norm + gate + linear call: ``linear_weight`` (O, N), ``linear_bias``
    (O,) or None, floating, on x's device (``TypeError`` / ``ValueError`` naming the argument)."""
    n = x.shape[-1]
    _check_floating("linear_weight", linear_weight)
    if linear_weight.dim() != 2 or linear_weight.shape[1] != n:
        raise ValueError(f"linear_weight must have shape (out_features, {n}), got {tuple(linear_weight.shape)}")
    _check_device("linear_weight", linear_weight, x.device)
    if linear_bias is not None:
        _check_floating("linear_bias", linear_bias)
        if linear_bias.shape != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got {tuple(linear_bias.shape)}")
        _check_device("linear_bias", linear_bias, x.device)


# ---------------------------------------------------------------------------
# Quantized output (docs/design.md, "Quantized output")
# ---------------------------------------------------------------------------

#: quant= name -> (torch dtype attribute name, qmax: the largest |q|). The two fp8 formats are not
#: interchangeable: e4m3fn (NVIDIA, OCP) saturates at 448, e4m3fnuz (AMD MI300) at 240.
QUANT_FORMATS = {
    "fp8_e4m3": ("float8_e4m3fn", 448.0),
    "fp8_e4m3fnuz": ("float8_e4m3fnuz", 240.0),
    "int8": ("int8", 127.0),
}

#: scale_format= values: "float32" (scale = amax / qmax) or "ue8m0" (that, rounded up to a power of two).
SCALE_FORMATS = ("float32", "ue8m0")

#: round_to= dtypes -> their canonical names in :class:`QuantSpec` ("none": quantize the float32 y).
_ROUND_TO = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


class QuantSpec(NamedTuple):
    """Static description of the quantization of one call (hashable; no tensors; custom-op scalars in order).

    ``block`` is the number of consecutive features that share a scale: ``quant_group_size``, or N for
    one scale per row (per token). ``round_to`` is "none", "bfloat16" or "float16".
    """

    quant: str  # a key of QUANT_FORMATS
    block: int
    scale_format: str  # "float32" | "ue8m0"
    round_to: str  # "none" | "bfloat16" | "float16"
    column_major_scales: bool


def quant_dtype(quant: str) -> torch.dtype:
    """The torch dtype of q for ``quant`` (a key of :data:`QUANT_FORMATS`); ``TypeError`` where this PyTorch
    lacks it (float8 dtypes arrived in torch 2.1)."""
    attr = QUANT_FORMATS[quant][0]
    dtype = getattr(torch, attr, None)
    if dtype is None:
        raise TypeError(
            f"quant={quant!r} needs torch.{attr}, which this PyTorch ({torch.__version__}) does not have; "
            "upgrade PyTorch or use quant='int8'"
        )
    return dtype


def quant_max(quant: str) -> float:
    """qmax of ``quant``: 448 (fp8_e4m3), 240 (fp8_e4m3fnuz), 127 (int8)."""
    return QUANT_FORMATS[quant][1]


def round_to_dtype(round_to: str) -> torch.dtype | None:
    """The dtype y is rounded to before quantization (None: quantize the float32 y)."""
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[round_to]


def prepare_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    eps: float,
    group_size: int | None,
    norm_before_gate: bool,
    is_rms_norm: bool,
    activation: str,
    quant: str,
    quant_group_size: int | None,
    scale_format: str,
    round_to: torch.dtype | None,
    column_major_scales: bool,
    *,
    regroup_heads: bool = False,
) -> tuple[GatedNormCall, QuantSpec]:
    """:func:`prepare` for the norm arguments (``regroup_heads`` passed on: a strided (T, H, N) gate is then
    not copied, and the caller turns the regrouped (T, H*N) results back into (T*H, N) rows), then the
    quantization arguments. ``QuantSpec.block`` is counted in x's features (N) also for a regrouped call.

    Raises ``ValueError`` for an unknown ``quant`` or ``scale_format``, or a ``quant_group_size`` that is
    not a positive divisor of N; ``TypeError`` for arguments of the wrong kind, a ``round_to`` other
    than None / torch.bfloat16 / torch.float16, and a float8 format this PyTorch lacks. Nothing is
    written before this returns, and nothing is allocated but a regrouped call's repeated weight and bias.
    """
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                   regroup_heads=regroup_heads)
    n = x.shape[-1]
    if not isinstance(quant, str) or quant not in QUANT_FORMATS:
        raise ValueError(f"quant must be one of {sorted(QUANT_FORMATS)}, got {quant!r}")
    quant_dtype(quant)  # the float8 dtypes are missing from old PyTorch: say so now, not at allocation

    if quant_group_size is None:
        block = n
    elif isinstance(quant_group_size, bool) or not isinstance(quant_group_size, int):
        raise TypeError(f"quant_group_size must be an int or None, got {type(quant_group_size).__name__}")
    elif quant_group_size <= 0 or n % quant_group_size != 0:
        raise ValueError(f"quant_group_size must be a positive divisor of N = {n} (or None: one scale per row), "
                         f"got {quant_group_size}")
    else:
        block = quant_group_size

    if not isinstance(scale_format, str) or scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")

    if round_to is None:
        rounding = "none"
    elif isinstance(round_to, torch.dtype) and round_to in _ROUND_TO:
        rounding = _ROUND_TO[round_to]
    else:
        raise TypeError(f"round_to must be None, torch.bfloat16 or torch.float16, got {round_to!r}")

    if not isinstance(column_major_scales, bool):
        raise TypeError(f"column_major_scales must be a bool, got {type(column_major_scales).__name__}")

    return call, QuantSpec(quant, block, scale_format, rounding, column_major_scales)
