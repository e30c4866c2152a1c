"""The operator's math, written once in torch ops (docs/design.md, section 1).

Per row m and group g of ``gs`` features, in the compute dtype C (float32; float64 for float64 x)::

    xc   = x                        (x * act(z) when the gate comes before the norm)
    mean = sum(xc) / gs             (LayerNorm; RMSNorm has no mean)
    var  = sum((xc - mean)^2) / gs  (two passes: never E[x^2] - E[x]^2)
    rstd = 1 / sqrt(var + eps),  xhat = (xc - mean) * rstd
    y    = xhat * w + b             (then * act(z) when the gate comes after the norm)

and the backward, with g = dL/d(xhat) = w * dL/d(xhat * w + b)::

    dxc = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)

The whole-tensor formulas here are what the native accelerator path, the compiled graph, the
tensor-parallel spanning path and the float64 reference run. The blocked CPU path and the Triton
kernels keep their own code where speed demands it, and share the constants and the range-rescue
rules defined here; tests hold them all to these formulas.

Range rescue: the float32 sums of x and x^2 overflow for |x| above about 1.8e19, and squares of
tiny values underflow when eps is tiny too. Dividing a group by a power of two of its largest
|value| (:func:`pow2_scale`) is exact and brings the sums into range; the statistics are then scaled
back exactly (:func:`scaled_rstd`). A group in range keeps its bits wherever it is not rescaled.

This module imports torch only: it sits below every backend. The forward formulas use no in-place
ops, so autograd can run through them (the float64 reference does); the backward formulas may.
"""

from __future__ import annotations

import torch

from .spec import NormSpec, QuantSpec, compute_dtype, quant_dtype, quant_max

#: var + eps at or above this (and finite) is computed to full precision in the compute dtype: the
#: squares lost to underflow are below 2^-149 each, under 2^-136 for a group, 2^-36 of this (C = float32).
SAFE_VAR_MIN = 2.0**-100

#: rstd = 1 / sqrt(var + eps) above this means var + eps fell below SAFE_VAR_MIN (2^50).
SAFE_RSTD_MAX = SAFE_VAR_MIN**-0.5


# ---------------------------------------------------------------------------
# Gate activation
# ---------------------------------------------------------------------------


def gate_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) in z's dtype: swish = z * sigmoid(z) (SiLU), or sigmoid(z)."""
    return torch.nn.functional.silu(z) if activation == "swish" else torch.sigmoid(z)


def gate_activation_and_derivative(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)). With s = sigmoid(z): swish' = s * (1 + z * (1 - s)); sigmoid' = s * (1 - s).

    act(z) is computed exactly as :func:`gate_activation` does, so a backward recomputes the forward's gate.
    """
    s = torch.sigmoid(z)
    one_minus_s = torch.rsub(s, 1.0)  # exact
    if activation == "swish":
        act = torch.nn.functional.silu(z)
        return act, torch.addcmul(s, act, one_minus_s)  # s + z * s * (1 - s)
    return s, one_minus_s.mul_(s)


# ---------------------------------------------------------------------------
# Range rescue: power-of-two scaling of groups whose float sums leave the safe range
# ---------------------------------------------------------------------------


def var_out_of_range(var_eps: torch.Tensor) -> torch.Tensor:
    """Mask of var + eps outside [SAFE_VAR_MIN, inf) (NaN included): the plain sums were not exact enough."""
    return ~((var_eps >= SAFE_VAR_MIN) & (var_eps < float("inf")))


def rstd_out_of_range(rstd: torch.Tensor) -> torch.Tensor:
    """:func:`var_out_of_range` judged on the stored rstd: outside (0, SAFE_RSTD_MAX], or NaN."""
    return ~((rstd > 0) & (rstd <= SAFE_RSTD_MAX))


#: Exponent bits of the compute dtypes, as (integer view dtype, mask): keeping only them rounds a positive
#: normal value down to a power of two, in one elementwise op.
_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}
#: Scales stay normal powers of two, so both the scale and its reciprocal are exact.
_SCALE_MIN, _SCALE_MAX = 2.0**-126, 2.0**126


def in_compute_dtype(t: torch.Tensor, c: torch.dtype) -> torch.Tensor:
    """``t`` itself where an op with a C operand promotes it to C exactly (its dtype is C or narrower),
    else ``t`` cast to C. Saves a full-size cast of bf16/fp16 inputs: the promotion happens in-kernel."""
    return t if t.dtype == c or t.dtype.itemsize < c.itemsize else t.to(c)


def pow2_scale(amax: torch.Tensor, eps: float, redo: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) per group: the power of two at or below max(amax, sqrt(eps)), within
    [2^-126, 2^126], where ``redo`` (default: everywhere); 1 elsewhere. ``amax`` is in C.

    Dividing a group by it is exact and brings its largest value into [1, 2) (or eps to about 1),
    so the float32 sums of the scaled values neither overflow nor lose the group to underflow. A
    group holding Inf or NaN gets some scale: the formula makes its result Inf/NaN either way.
    """
    int_dtype, mask = _EXPONENT_BITS[amax.dtype]
    bounded = amax.clamp(min=max(eps**0.5, _SCALE_MIN), max=_SCALE_MAX)
    scale = (bounded.view(int_dtype) & mask).view(amax.dtype)  # exponent bits only: the power of two below
    if redo is not None:
        scale = torch.where(redo, scale, 1.0)
    return scale, scale.reciprocal()


def group_abs_max(x3: torch.Tensor, c: torch.dtype) -> torch.Tensor:
    """max |x| over the last dim, in C, keepdim (one reduction)."""
    return torch.linalg.vector_norm(x3, float("inf"), dim=-1, keepdim=True, dtype=c)


def rescale_groups(x3: torch.Tensor, var_eps: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, inv) for groups whose var + eps left the safe range; scale 1 for the others.

    ``x3`` (rows, G, gs) holds the (gated) inputs; ``var_eps`` (rows, G, 1) the plain pass's var + eps.
    """
    return pow2_scale(group_abs_max(x3, var_eps.dtype), eps, var_out_of_range(var_eps))


def scaled_rstd(var_s: torch.Tensor, eps: float, scale: torch.Tensor, inv: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rstd, rstd * scale) of groups whose variance was computed divided by ``scale``: var_s = var / scale^2.

    rstd = 1 / sqrt(var + eps) = inv / sqrt(var_s + eps * inv^2), exact scaling by powers of two (a
    square root of a power of four), so scale 1 gives the plain result bit for bit. The second value
    multiplies the scaled centred values.

    When eps * inv^2 underflows and var_s is below SAFE_VAR_MIN too, the group is constant (its scaled
    values lie in [1, 2), so any deviation would give var_s >= 2^-46 / gs): var = 0 and rstd is
    1 / sqrt(eps), as float64 says, not Inf; its centred values are exactly 0, so the factor that
    multiplies them only has to be finite.
    """
    v = torch.addcmul(var_s, inv, inv, value=eps) if eps else var_s
    rstd_s = v.sqrt().reciprocal()
    rstd = rstd_s * inv
    if eps > 0:
        rstd = torch.where(v < SAFE_VAR_MIN, 1.0 / eps**0.5, rstd)
        rstd_s = rstd_s.clamp(max=torch.finfo(v.dtype).max)
    return rstd, rstd_s


# ---------------------------------------------------------------------------
# Forward formulas on whole tensors
# ---------------------------------------------------------------------------


def group_statistics(x3: torch.Tensor, eps: float, is_rms_norm: bool, *, rescue: bool = True
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(mean | None, rstd, xhat) of x3 (rows, G, gs); mean and rstd are (rows, G, 1), xhat like x3, in C.

    ``x3`` may be narrower than C (promoted in-kernel). The reductions run over the group-major view
    (G, rows, gs), so the statistics are (rows, G, 1) views of group-major storage: the stored layout
    needs no copy (:func:`group_major`).

    ``rescue=True`` scales every group by :func:`pow2_scale` of its max |value| first: exact for groups in
    range, correct for groups beyond the float32 range of the sums, and without a host round trip (one
    more reduction and one more elementwise pass). ``rescue=False`` is the plain formula; callers check
    :func:`rstd_out_of_range`.
    """
    c = compute_dtype(x3.dtype)
    xt = x3.transpose(0, 1)  # (G, rows, gs): reductions come out group-major
    scale = inv = None
    if rescue:
        scale, inv = pow2_scale(group_abs_max(xt, c), eps)
        xt = xt * inv
    elif xt.dtype != c:
        xt = xt.to(c)
    mean = None
    if not is_rms_norm:
        mean = xt.mean(dim=-1, keepdim=True)
        xt = xt - mean
    var = (xt * xt).mean(dim=-1, keepdim=True)
    if rescue:
        rstd, rstd_x = scaled_rstd(var, eps, scale, inv)
        if mean is not None:
            mean = mean * scale
    else:
        rstd = rstd_x = (var + eps).sqrt().reciprocal()
    xhat = (xt * rstd_x).transpose(0, 1)
    return (None if mean is None else mean.transpose(0, 1)), rstd.transpose(0, 1), xhat


def affine(xhat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gate: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = (xhat * w + b) [* gate]: the gate is passed only when it comes after the norm.

    ``out`` (any floating dtype) receives the last op's result: the one rounding of the operator.
    """
    if gate is None and bias is None:
        return torch.mul(xhat, weight, out=out)
    if bias is not None:
        y = torch.addcmul(bias, xhat, weight, out=out if gate is None else None)
    else:
        y = xhat * weight
    return y if gate is None else torch.mul(y, gate, out=out)


def forward_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, *, rescue: bool = True, out: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forward of (M, N) rows: (y (M, G, gs), mean (M, G) | None, rstd (M, G)), all in C.

    With ``out`` (M, N, any floating dtype and strides) y is written there, rounded once, and returned as
    an (M, G, gs) view of it. The statistics are views of group-major storage (:func:`group_major`).
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    shape3 = (n // spec.group_size, spec.group_size)
    x3 = x.unflatten(1, shape3)  # views only: any strides
    gate = None
    if z is not None:
        gate = gate_activation(z.unflatten(1, shape3).to(c), spec.activation)
        if not spec.norm_before_gate:
            x3 = x3 * gate  # promoted to C in the kernel
    mean, rstd, xhat = group_statistics(x3, spec.eps, spec.is_rms_norm, rescue=rescue)
    y = affine(xhat, in_compute_dtype(weight, c).view(shape3),
               None if bias is None else in_compute_dtype(bias, c).view(shape3),
               gate if spec.norm_before_gate else None, None if out is None else out.unflatten(1, shape3))
    return y, (None if mean is None else mean[..., 0]), rstd[..., 0]


def group_major(stat: torch.Tensor) -> torch.Tensor:
    """(M, G) statistics -> the 1-D group-major layout (row m, group g at g * M + m); a view when the
    (M, G) tensor is itself a view of group-major storage, as :func:`forward_rows` returns."""
    return stat.t().reshape(-1)


def row_major(stat: torch.Tensor, m: int) -> torch.Tensor:
    """The 1-D group-major statistics of M rows -> an (M, G) view."""
    return stat.view(-1, m).t()


# ---------------------------------------------------------------------------
# Backward formulas
# ---------------------------------------------------------------------------


def input_grad_from_means(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                          mean_g_xhat: torch.Tensor, mean_g: torch.Tensor | None) -> torch.Tensor:
    """dL/dxc = rstd * (g - xhat * mean(g * xhat) - mean(g)) given the per-group means (RMSNorm: no mean(g)).

    g = dL/dxhat; the means may come from a local reduction or from one spanning several ranks.
    """
    d = torch.addcmul(g, xhat, mean_g_xhat, value=-1.0)
    if mean_g is not None:
        d = d.sub_(mean_g)
    return d.mul_(rstd)


def backward_rows(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                  needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool,
                  *, gate_fn=None) -> tuple[torch.Tensor | None, ...]:
    """(dx, dz, dweight, dbias) in C, not yet rounded, for (M, N) rows; mean/rstd are (M, G).

    dx and dz are (M, N); dweight/dbias (N,) are this block's sums over rows. Only the gradients asked
    for are computed (dz needs z, dbias needs bias). Inputs narrower than C are promoted in-kernel.
    ``gate_fn(z, activation) -> (act(z), act'(z))`` replaces :func:`gate_activation_and_derivative` (the
    compiled backend on CPU derives both from one sigmoid: see backends/compiled.py).
    """
    m, n = x.shape
    gs = spec.group_size
    shape3 = (n // gs, gs)
    c = compute_dtype(x.dtype)
    w3 = weight.to(c).view(shape3)  # in C: dy * w must not round in a narrow dtype
    rs = rstd.unsqueeze(-1)
    x3 = x.unflatten(1, shape3)
    dy3 = dy.unflatten(1, shape3)
    gate = dgate = None
    if z is not None:
        gate, dgate = (gate_fn or gate_activation_and_derivative)(z.unflatten(1, shape3).to(c), spec.activation)
    gate_before = gate is not None and not spec.norm_before_gate
    gate_after = gate is not None and spec.norm_before_gate
    xin = x3 * gate if gate_before else x3
    xhat = (xin - mean.unsqueeze(-1) if mean is not None else xin) * rs  # in C
    dx = dz = dw = db = None
    if gate_after:
        if needs_dz:
            # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
            b3 = None if bias is None else in_compute_dtype(bias, c).view(shape3)
            dz = affine(xhat, w3, b3, None).mul_(dy3).mul_(dgate)
        dy3 = dy3 * gate  # dL/d(xhat * w + b), in C
    if needs_dweight:
        dw = (dy3 * xhat).sum(dim=0).view(n)
    if needs_dbias and bias is not None:
        db = dy3.sum(dim=0, dtype=c).view(n)
    if needs_dx or (gate_before and needs_dz):
        g = dy3 * w3
        mean_g = g.mean(dim=-1, keepdim=True) if mean is not None else None
        dxc = input_grad_from_means(g, xhat, rs, (g * xhat).mean(dim=-1, keepdim=True), mean_g)
        if gate_before:
            if needs_dz:
                dz = (dxc * x3).mul_(dgate)  # xc = x * act(z): dz = dL/dxc * x * act'(z)
            dxc = dxc.mul_(gate)
        if needs_dx:
            dx = dxc
    return (None if dx is None else dx.reshape(m, n)), (None if dz is None else dz.reshape(m, n)), dw, db


# ---------------------------------------------------------------------------
# Quantized output (docs/design.md, "Quantized output")
# ---------------------------------------------------------------------------
# Per row and block of k consecutive features (k = QuantSpec.block; k = N: one block per row), on the
# float32 values of y (y rounded to bf16/fp16 first with round_to)::
#
#     amax  = max |y| over the block                       (NaN when the block holds a NaN)
#     scale = max(amax / qmax, QUANT_SCALE_MIN)            (ue8m0: rounded up to a power of two)
#     q     = round_half_even(clamp(y / scale, -qmax, qmax)) in the quant dtype
#
# Every step is one correctly rounded float32 operation (a division, a max, a clamp, the final cast),
# so any implementation that follows these steps gets the same bits from the same y.

#: The smallest scale: 2^-126, the smallest normal float32. An all-zero block gets this scale and q = 0;
#: 1 / scale (2^126) is finite, and the floor is a power of two, so ue8m0 leaves it alone. Only blocks
#: with amax below qmax * 2^-126 (about 3e-36 for int8) are affected at all.
QUANT_SCALE_MIN = 2.0**-126


def ue8m0_round_up(scale: torch.Tensor) -> torch.Tensor:
    """float32 ``scale`` (positive normal, Inf or NaN) rounded up to a power of two, exactly.

    Adding 2^23 - 1 to the bits carries into the exponent exactly when some mantissa bit is set;
    keeping the exponent bits then gives 2^ceil(log2(scale)). Inf stays Inf; NaN stays NaN.
    """
    bits = scale.view(torch.int32)
    up = ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(torch.isnan(scale), scale, up)


def divided_by_scalar(t: torch.Tensor, d: float) -> torch.Tensor:
    """t / d correctly rounded on every device. PyTorch's CUDA kernels divide a tensor by a Python scalar as a
    product with the scalar's reciprocal, which misses the correctly rounded quotient by one bit for about half
    of all inputs (by 448: 9.2 of the 16.8 million float32 values in [1, 4) on an H100, session 25); by a tensor they
    divide. The CPU divides either way, without the extra tensor."""
    if t.device.type == "cpu":
        return t / d
    return t / torch.full((1,), d, dtype=t.dtype, device=t.device)


def quant_scales(amax: torch.Tensor, qspec: QuantSpec) -> torch.Tensor:
    """float32 scales from float32 block maxima (NaN in, NaN out; Inf in, Inf out)."""
    scale = divided_by_scalar(amax, quant_max(qspec.quant)).clamp_(min=QUANT_SCALE_MIN)  # clamp keeps NaN
    return ue8m0_round_up(scale) if qspec.scale_format == "ue8m0" else scale


def quantize_blocks(y: torch.Tensor, qspec: QuantSpec, q_out: torch.Tensor | None = None,
                    scale_out: torch.Tensor | None = None, *,
                    y_is_scratch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (M, N), scale (M, N // k)) of y (M, N): the quantization of a norm's output, k = ``qspec.block``.

    ``y`` is float32, or bf16/fp16 (taken exactly); a float64 y is rounded to float32 first (that is the
    rule: the quantizer reads float32). ``q_out`` / ``scale_out`` (any strides) receive the results when
    given. ``qspec.round_to`` is the caller's business: pass y already rounded. ``y_is_scratch``: y is a float32
    buffer the caller discards, which the quotients may overwrite (no temporary of y's size: on CPU a fresh
    one costs its page faults, about as much as the division).

    Non-finite blocks (docs/design.md): a block holding a NaN gets scale NaN (the quiet NaN 0x7FC00000,
    whatever NaN the block held), one holding an Inf (and no NaN) scale +Inf; every q of such a block is
    NaN (fp8) or 0 (int8), so ``q * scale`` is NaN across the block. Other blocks of the row are not
    affected.
    """
    m, n = y.shape
    k = qspec.block
    qmax = quant_max(qspec.quant)
    y3 = (y if y.dtype != torch.float64 else y.float()).unflatten(1, (n // k, k))
    # max |y| per block as max(max y, -min y): exact, NaN propagates, and on CPU about 3x faster than the
    # inf-norm reduction or abs().amax() (which allocates a copy of y).
    amax = torch.maximum(y3.amax(-1), y3.amin(-1).neg()).float()
    scale = quant_scales(amax, qspec)
    # correctly rounded float32 division (bf16/fp16 y promote exactly)
    if y_is_scratch and y3.dtype == torch.float32:
        v = y3.div_(scale.unsqueeze(-1))
    else:
        v = y3 / scale.unsqueeze(-1)
    v.clamp_(-qmax, qmax)
    is_int = qspec.quant == "int8"
    # Blocks with a NaN or Inf: q marks them (NaN; int8 has none, so 0) and the scale carries the cause.
    # On CPU, where reading a flag costs no device sync, the fill (a pass with a broadcast mask, as long as
    # the division) runs only for calls that have such a block.
    bad = ~torch.isfinite(scale)
    if v.device.type != "cpu" or bool(bad.any()):
        v.masked_fill_(bad.unsqueeze(-1), 0.0 if is_int else float("nan"))
        # one NaN for every NaN block, the quiet positive one the fused kernels write, rather than the
        # block's own (its sign and payload would make the scales' bits differ between backends)
        scale = scale.masked_fill(scale.isnan(), float("nan"))
    if is_int:
        v.round_()  # half to even
    v = v.view(m, n)
    if q_out is None:
        q_out = v.to(quant_dtype(qspec.quant))  # fp8: the cast rounds to nearest even
    else:
        q_out.copy_(v)
    if scale_out is None:
        scale_out = scale
    else:
        scale_out.copy_(scale)
    return q_out, scale_out
