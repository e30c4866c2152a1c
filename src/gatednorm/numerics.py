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

This module imports torch only: it sits below every backend.
"""

from __future__ import annotations

import torch

from .spec import NormSpec, compute_dtype

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
    one_minus_s = 1.0 - s  # exact
    if activation == "swish":
        return torch.nn.functional.silu(z), s * (1.0 + z * one_minus_s)
    return s, s * one_minus_s


# ---------------------------------------------------------------------------
# Range rescue: power-of-two scaling of groups whose float sums leave the safe range
# ---------------------------------------------------------------------------


def var_out_of_range(var_eps: torch.Tensor) -> torch.Tensor:
    """Mask of var + eps outside [SAFE_VAR_MIN, inf) (NaN included): the plain sums were not exact enough."""
    return ~((var_eps >= SAFE_VAR_MIN) & (var_eps < float("inf")))


def rstd_out_of_range(rstd: torch.Tensor) -> torch.Tensor:
    """:func:`var_out_of_range` judged on the stored rstd: outside (0, SAFE_RSTD_MAX], or NaN."""
    return ~((rstd > 0) & (rstd <= SAFE_RSTD_MAX))


def pow2_scale(amax: torch.Tensor, eps: float, redo: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) per group: the power of two at or below max(amax, sqrt(eps)), within
    [2^-126, 2^126], where ``redo`` (default: everywhere) and amax is finite; 1 elsewhere.

    Dividing a group by it is exact and brings its largest value into [1, 2) (or eps to about 1),
    so the float32 sums of the scaled values neither overflow nor lose the group to underflow. A
    group with an Inf/NaN keeps scale 1: the formula makes its result Inf/NaN anyway.
    """
    _, e = torch.frexp(amax.clamp(min=eps**0.5))
    e = (e - 1).clamp_(-126, 126).to(amax.dtype)
    finite = amax < float("inf")
    redo = finite if redo is None else redo & finite
    one = torch.ones((), dtype=amax.dtype, device=amax.device)
    return torch.where(redo, torch.exp2(e), one), torch.where(redo, torch.exp2(-e), one)


def rescale_groups(x3: torch.Tensor, var_eps: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, inv) for groups whose var + eps left the safe range; scale 1 for the others.

    ``x3`` (rows, G, gs) holds the (gated) inputs; ``var_eps`` (rows, G, 1) the plain pass's var + eps.
    """
    return pow2_scale(x3.abs().amax(dim=-1, keepdim=True), eps, var_out_of_range(var_eps))


def scaled_rstd(var_s: torch.Tensor, eps: float, scale: torch.Tensor, inv: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rstd, rstd * scale) of groups whose variance was computed divided by ``scale``: var_s = var / scale^2.

    rstd = 1 / sqrt(var + eps) = inv / sqrt(var_s + eps * inv^2), exact scaling by powers of two (a
    square root of a power of four), so scale 1 gives the plain result bit for bit. The second value
    multiplies the scaled centred values. When eps * inv^2 underflows and var_s is tiny too (a constant
    group far from zero: float32 resolves no deviation there), rstd is taken unscaled instead, so it is
    1 / sqrt(eps) as float64 says, not Inf.
    """
    v = var_s + eps * inv * inv
    rstd_s = v.sqrt().reciprocal()
    rstd = rstd_s * inv
    if eps > 0:
        stuck = v < SAFE_VAR_MIN
        plain = (var_s * scale * scale + eps).sqrt().reciprocal()
        rstd = torch.where(stuck, plain, rstd)
        rstd_s = torch.where(stuck, (plain * scale).clamp(max=torch.finfo(v.dtype).max), rstd_s)
    return rstd, rstd_s


# ---------------------------------------------------------------------------
# Forward formulas on whole tensors
# ---------------------------------------------------------------------------


def group_statistics(x3: torch.Tensor, eps: float, is_rms_norm: bool, *, rescue: bool = True
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(mean | None, rstd, xhat) of x3 (rows, G, gs) in C; mean and rstd are (rows, G, 1).

    ``rescue=True`` scales every group by :func:`pow2_scale` of its max |value| first: exact for groups in
    range, correct for groups beyond the float32 range of the sums, and without a host round trip (one
    more reduction). ``rescue=False`` is the plain formula; callers check :func:`rstd_out_of_range`.
    """
    gs = x3.shape[-1]
    scale = inv = None
    if rescue:
        scale, inv = pow2_scale(x3.abs().amax(dim=-1, keepdim=True), eps)
        x3 = x3 * inv
    mean = None
    if not is_rms_norm:
        mean = x3.sum(dim=-1, keepdim=True) / gs
        x3 = x3 - mean
    var = (x3 * x3).sum(dim=-1, keepdim=True) / gs
    if rescue:
        rstd, rstd_x = scaled_rstd(var, eps, scale, inv)
        if mean is not None:
            mean = mean * scale
    else:
        rstd = rstd_x = (var + eps).sqrt().reciprocal()
    return mean, rstd, x3 * rstd_x


def affine(xhat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           gate: torch.Tensor | None) -> torch.Tensor:
    """y = (xhat * w + b) [* gate]: the gate is passed only when it comes after the norm."""
    y = xhat * weight
    if bias is not None:
        y = y + bias
    if gate is not None:
        y = y * gate
    return y


def forward_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, *, rescue: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The forward of (M, N) rows in C: (y (M, N) not yet rounded, mean (M, G) | None, rstd (M, G)).

    Row-major statistics; :func:`group_major` turns them into the stored layout.
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    groups = n // spec.group_size
    xc = x.to(c)
    gate = gate_activation(z.to(c), spec.activation) if z is not None else None
    if gate is not None and not spec.norm_before_gate:
        xc = xc * gate
    mean, rstd, xhat = group_statistics(xc.view(m, groups, spec.group_size), spec.eps, spec.is_rms_norm,
                                        rescue=rescue)
    y = affine(xhat.view(m, n), weight.to(c), None if bias is None else bias.to(c),
               gate if spec.norm_before_gate else None)
    return y, (None if mean is None else mean.view(m, groups)), rstd.view(m, groups)


def group_major(stat: torch.Tensor) -> torch.Tensor:
    """(M, G) row-major statistics -> the 1-D group-major layout (row m, group g at g * M + m)."""
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
    d = g - xhat * mean_g_xhat
    if mean_g is not None:
        d = d - mean_g
    return d * rstd


def backward_rows(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                  needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool,
                  ) -> tuple[torch.Tensor | None, ...]:
    """(dx, dz, dweight, dbias) in C, not yet rounded, for (M, N) rows; mean/rstd are (M, G) row-major.

    Only the gradients asked for are computed (dz needs z, dbias needs bias). dweight/dbias are this
    block's sums over rows.
    """
    m, n = x.shape
    gs = spec.group_size
    groups = n // gs
    c = compute_dtype(x.dtype)
    wc = weight.to(c)
    rs = rstd.reshape(m, groups, 1)
    xc = x.to(c)
    gate = dgate = None
    if z is not None:
        gate, dgate = gate_activation_and_derivative(z.to(c), spec.activation)
    gate_before = gate is not None and not spec.norm_before_gate
    gate_after = gate is not None and spec.norm_before_gate
    xin = (xc * gate if gate_before else xc).view(m, groups, gs)
    if mean is not None:
        xin = xin - mean.reshape(m, groups, 1)
    xhat = (xin * rs).view(m, n)
    dyc = dy.to(c)
    dx = dz = dw = db = None
    if gate_after:
        if needs_dz:
            # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
            dz = dyc * affine(xhat, wc, None if bias is None else bias.to(c), None) * dgate
        dyc = dyc * gate
    if needs_dweight:
        dw = (dyc * xhat).sum(dim=0)
    if needs_dbias and bias is not None:
        db = dyc.sum(dim=0)
    if needs_dx or (gate_before and needs_dz):
        g = (dyc * wc).view(m, groups, gs)
        x3 = xhat.view(m, groups, gs)
        mean_g = g.sum(dim=-1, keepdim=True) / gs if mean is not None else None
        dxc = input_grad_from_means(g, x3, rs, (g * x3).sum(dim=-1, keepdim=True) / gs, mean_g).view(m, n)
        if gate_before:
            if needs_dz:
                dz = dxc * xc * dgate  # xc = x * act(z): dz = dL/dxc * x * act'(z)
            dxc = dxc * gate
        if needs_dx:
            dx = dxc
    return dx, dz, dw, db
