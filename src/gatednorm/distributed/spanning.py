"""The spanning path: groups that cross shard boundaries, one ``all_reduce`` per forward.

Each rank reduces its part of every group it touches in the compute dtype C, **one** ``all_reduce``
of a small (parts x slots, spanning groups, rows) tensor combines the parts of the groups that cross
a shard boundary, and every rank finishes its columns locally. Activations are never gathered. The
formulas are those of :mod:`gatednorm.numerics` (gate activation, range rescue, affine step, input
gradient); only the reductions are split over ranks.

**LayerNorm statistics (why not E[x^2] - E[x]^2).** Each rank r computes, for its part of a group
(n_r columns, a static count), the local mean mu_r and the local sum of squared deviations
M2_r = sum((x - mu_r)^2): a two-pass computation on data it holds. Chan et al.'s pairwise formula
combines them exactly::

    mean = sum_r n_r * mu_r / n          (evaluated as mu_0 + sum_r n_r * (mu_r - mu_0) / n)
    M2   = sum_r M2_r + sum_r n_r * (mu_r - mean)^2

The second term needs every rank's mu_r, not just their sum, so the all_reduce buffer gives each
participating rank its own slot (the others contribute zeros: a sum-reduce then acts as a gather).
Every quantity that is squared is a difference of nearby values computed before squaring, so nothing
cancels catastrophically even for data with mean 1e4 and std 1e-2. RMSNorm needs only sum(x^2) (no
cancellation), also one slot per rank (see below for why not one shared slot).

**Range rescue across ranks.** As on the other paths (numerics, "Range rescue"), every group is
divided by a power of two of its max |value| before its sums are taken, so the float32 sums
neither overflow (|x| above ~1.8e19) nor lose tiny values to underflow (tiny eps), and the
statistics are scaled back exactly (:func:`gatednorm.numerics.scaled_rstd`, mean * scale). The
scale must be the same on every rank holding a part of a group; it is agreed on inside the one
existing all_reduce, with no extra collective and no host synchronisation (CUDA graph capture keeps
working):

1. each rank takes its part's max |value| a_r, divides the part by s_r = pow2_scale(a_r) and
   computes its partial statistics of x / s_r;
2. a_r goes into the rank's own slot of the buffer, next to its mu_r and M2_r (or sum(x^2) for
   RMSNorm): the sum-reduce gathers them as it gathers the means;
3. every rank recomputes each s_r from the gathered a_r (same function, same bits), takes the
   group's scale S = pow2_scale(max_r a_r) (what the single-device paths use for the whole group)
   and rescales each part to it: mu_r * (s_r / S), M2_r * (s_r / S)^2, multiplications by powers of
   two, exact (a part they push below the float32 range is negligible next to the part holding the
   group's max |value|), then combines as above.

The maxima travel rather than the scales because max_r pow2_scale(a_r) is not pow2_scale(max_r a_r)
when a part is all zeros and eps is 0 (pow2_scale(0) is 1/2, which would swamp a group of tiny values).

The per-rank M2_r (and RMSNorm's sums of squares), which used to be summed in one shared slot by
the reduction, each get a slot of their own: the reduction cannot rescale them to a scale it does not
know yet. The buffer holds (3 x slots) rows per spanning group for LayerNorm (mu, M2, max) and
(2 x slots) for RMSNorm (sum of squares, max), against (slots + 1) and 1 before; it stays tiny
(rows x spanning groups values per slot). The rejected alternative, a second all_reduce with
ReduceOp.MAX of the per-group max |value| before the sums, would add a collective's latency to every
call. Groups in range get the same bits as these formulas without the scaling: scaling by powers of two commutes exactly
with every operation here while nothing overflows or underflows.

**Backward.** dweight and dbias need no reduction across ranks (each rank owns its columns). dx (and
dz when the gate comes before the norm) needs, per row and group, the means of g * xhat and (for
LayerNorm) of g over the whole group, g = dy' * w (dy' = dy, times act(z) when the gate comes after
the norm): one ``all_reduce`` of those partial sums for the groups that cross a shard boundary, then
:func:`gatednorm.numerics.input_grad_from_means`. No rescue is needed there: the backward works from
the stored statistics, and xhat is of order one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..numerics import (
    affine,
    gate_activation,
    gate_activation_and_derivative,
    group_major,
    input_grad_from_means,
    pow2_scale,
    scaled_rstd,
)
from ..spec import NormSpec, compute_dtype
from .layout import Consts, ShardLayout, constants, per_column, segment_reduce


def _all_reduce(buf: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if buf.numel() == 0:
        # No rows: every rank of the group sees the same (replicated) row count, so all skip together.
        return
    # dist.all_reduce is looked up at call time so tests can count collectives.
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)


class ScaledStats(NamedTuple):
    """Full-group statistics of the scaled values, (M, num_local_groups) each, in C.

    With s = ``scale`` (a power of two per row and group, ``inv`` = 1 / s): mean = mean_s * s and
    var = var_s * s^2, where mean_s / var_s are the statistics of xc / s.
    """

    mean_s: torch.Tensor | None  # None for RMSNorm
    var_s: torch.Tensor
    scale: torch.Tensor
    inv: torch.Tensor


def span_stats(xc: torch.Tensor, lay: ShardLayout, spec: NormSpec, group: dist.ProcessGroup | None,
               consts: Consts) -> ScaledStats:
    """Full-group statistics of every local group from this rank's (M, shard) columns ``xc`` (in C).

    One all_reduce when the layout has spanning groups (every rank of ``group`` calls this together).
    See the module docstring for the combination and the common scale.
    """
    m = xc.shape[0]
    gs = lay.group_size
    slots = lay.num_slots
    # Local scale of every local group: final for whole groups, this rank's part's for partial ones.
    amax = segment_reduce(xc.abs(), lay, "amax")
    scale, inv = pow2_scale(amax, spec.eps)
    xs = xc * per_column(inv, consts)
    if spec.is_rms_norm:
        mean_s = None
        parts = [segment_reduce(xs * xs, lay)]  # sum(x^2)
    else:
        mean_s = segment_reduce(xs, lay, "mean")  # local means (the full-group mean for whole groups)
        d = xs - per_column(mean_s, consts)
        parts = [mean_s, segment_reduce(d * d, lay)]  # mu_r, M2_r (two-pass)
    del xs
    parts.append(amax)
    # buf[p * slots + slot, span]: part p of this rank (slot) for spanning group span; zeros elsewhere.
    buf = torch.zeros(len(parts) * slots, lay.num_spanning, m, device=xc.device, dtype=xc.dtype)
    for j, span, slot, _counts in lay.partials:
        for p, t in enumerate(parts):
            buf[p * slots + slot, span] = t[:, j]
    _all_reduce(buf, group)
    ss = parts[0] if spec.is_rms_norm else parts[1]  # sums of squares, written per group below
    for (j, span, _slot, _counts), n_r in zip(lay.partials, consts.slot_counts, strict=True):
        got = buf[:, span].view(len(parts), slots, m)
        maxima = got[-1]  # (slots, M): a_r, 0 in the slots this group does not use
        part_scale, _ = pow2_scale(maxima, spec.eps)  # s_r: what each rank divided its part by
        common, common_inv = pow2_scale(maxima.amax(dim=0), spec.eps)  # S; every rank gets the same bits
        f = part_scale * common_inv  # s_r / S: a power of two, exact (it multiplies zeros in unused slots)
        if spec.is_rms_norm:
            ss[:, j] = ((got[0] * f) * f).sum(dim=0)
        else:
            mus = got[0] * f  # (slots, M); unused slots hold 0 with n_r = 0
            # sum_r n_r mu_r / n, written as mu_0 + sum_r (n_r / n) (mu_r - mu_0): the differences of nearby
            # means are exact, so the mean is as accurate as the first rank's local mean (no large partial sums).
            mean_j = mus[0] + (n_r * (mus - mus[0])).sum(dim=0) / gs
            dev = mus - mean_j
            ss[:, j] = ((got[1] * f) * f).sum(dim=0) + (n_r * dev * dev).sum(dim=0)
            mean_s[:, j] = mean_j
        scale[:, j] = common
        inv[:, j] = common_inv
    return ScaledStats(mean_s, ss / gs, scale, inv)


def span_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 lay: ShardLayout, spec: NormSpec, group: dist.ProcessGroup | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Spanning-path forward on (M, shard) local rows.

    Returns (y (M, shard) in x.dtype, mean | None, rstd): statistics 1-D in C, group-major over the
    local groups (local group j, row m at j * M + m). y = affine(xhat, w, b[, act(z)]) with
    xhat = (xc / s - mean_s) * rstd_s (numerics.scaled_rstd), rounded once.
    """
    c = compute_dtype(x.dtype)
    consts = constants(lay, x.device, c)
    xc = x.to(c)
    gate = None
    if z is not None:
        gate = gate_activation(z.to(c), spec.activation)
        if not spec.norm_before_gate:
            xc = xc * gate
    st = span_stats(xc, lay, spec, group, consts)
    rstd, rstd_s = scaled_rstd(st.var_s, spec.eps, st.scale, st.inv)
    # The scaled centred values: for a group in range this is (xc - mean) * rstd bit for bit (the powers
    # of two cancel exactly); for one out of range it keeps values that xc - mean would lose.
    xs = xc * per_column(st.inv, consts)
    if st.mean_s is not None:
        xs = xs - per_column(st.mean_s, consts)
    xhat = xs * per_column(rstd_s, consts)
    y = affine(xhat, weight.to(c), None if bias is None else bias.to(c),
               gate if spec.norm_before_gate else None)
    out = y.to(x.dtype)  # the one rounding
    mean = None if st.mean_s is None else group_major(st.mean_s * st.scale)
    return out, mean, group_major(rstd)


def span_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, lay: ShardLayout,
                  spec: NormSpec, group: dist.ProcessGroup | None,
                  needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool,
                  ) -> tuple[torch.Tensor | None, ...]:
    """Spanning-path backward: (dx, dz, dweight, dbias) in the inputs' dtypes, None where not needed.

    dy, x, z: (M, shard); mean/rstd: the forward's 1-D group-major statistics. One all_reduce of the
    partial row-group sums of g * xhat and, for LayerNorm, g (g = dy' * w), when dx (or dz with the gate
    before the norm) is needed; dweight = sum_rows(dy' * xhat) and dbias = sum_rows(dy') are local.
    """
    m = x.shape[0]
    c = compute_dtype(x.dtype)
    gl = lay.num_local_groups
    gs = lay.group_size
    consts = constants(lay, x.device, c)
    weight_c = weight.to(c)
    xc = x.to(c)
    gate = dgate = None
    if z is not None:
        gate, dgate = gate_activation_and_derivative(z.to(c), spec.activation)
    gate_before = gate is not None and not spec.norm_before_gate
    gate_after = gate is not None and spec.norm_before_gate
    x_in = xc
    if gate_before:
        xc = xc * gate
    # (gl, M) views, not numerics.row_major: view(-1, 0) is ambiguous for an empty batch
    rstd_cols = per_column(rstd.view(gl, m).t(), consts)
    if mean is not None:
        xc = xc - per_column(mean.view(gl, m).t(), consts)
    xhat = xc * rstd_cols
    dyc = dy.to(c)
    dx = dz = dweight = dbias = None
    if gate_after:
        if needs_dz:
            # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
            y_pre = affine(xhat, weight_c, None if bias is None else bias.to(c), None)
            dz = (dyc * y_pre * dgate).to(z.dtype)
        dyc = dyc * gate
    if needs_dweight:
        dweight = (dyc * xhat).sum(dim=0).to(weight.dtype)
    if needs_dbias and bias is not None:
        dbias = dyc.sum(dim=0).to(bias.dtype)
    if needs_dx or (needs_dz and gate_before):
        g = dyc * weight_c
        sums = [segment_reduce(g * xhat, lay)]
        if not spec.is_rms_norm:
            sums.append(segment_reduce(g, lay))
        buf = torch.zeros(len(sums), lay.num_spanning, m, device=x.device, dtype=c)
        for j, span, _slot, _counts in lay.partials:
            for k, s in enumerate(sums):
                buf[k, span] = s[:, j]
        _all_reduce(buf, group)
        for j, span, _slot, _counts in lay.partials:
            for k, s in enumerate(sums):
                s[:, j] = buf[k, span]
        mean_g = per_column(sums[1] / gs, consts) if len(sums) > 1 else None
        dxc = input_grad_from_means(g, xhat, rstd_cols, per_column(sums[0] / gs, consts), mean_g)
        if gate_before:
            if needs_dz:
                dz = (dxc * x_in * dgate).to(z.dtype)  # xc = x * act(z): dz = dL/dxc * x * act'(z)
            dxc = dxc * gate
        if needs_dx:
            dx = dxc.to(x.dtype)
    return dx, dz, dweight, dbias


class TPSpanFunction(torch.autograd.Function):
    """Autograd for the spanning path; saves only x, weight, bias, z, mean and rstd (xhat is recomputed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, lay, spec, group):
        out, mean, rstd = span_forward(x, weight, bias, z, lay, spec, group)
        ctx.save_for_backward(x, weight, bias, z, mean, rstd)
        ctx.lay, ctx.spec, ctx.group = lay, spec, group
        if mean is None:
            mean = rstd.new_empty(0)  # autograd outputs must be tensors; the caller turns it back into None
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, z, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dz, dw, db = span_backward(
            dy, x, weight, bias, z, mean, rstd, ctx.lay, ctx.spec, ctx.group,
            need[0], need[3] and z is not None, need[1], need[2] and bias is not None,
        )
        return dx, dw, db, dz, None, None, None
