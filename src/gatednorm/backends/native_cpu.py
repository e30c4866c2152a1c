"""The native backend on CPU: plain PyTorch ops over cache-sized row blocks, batch invariant.

The operator of docs/design.md section 1 (the formulas of :mod:`gatednorm.numerics`), written
for the CPU's memory hierarchy rather than as whole-tensor expressions, because there speed and
memory come from the memory layout:

* Rows are processed in blocks of about :data:`CPU_BLOCK_ELEMENTS` elements, so the
  compute-dtype working set (a few buffers of one block each) stays in the L2/L3 cache instead
  of streaming full-size float32 copies of the input through DRAM.
* The per-block buffers are allocated once per call and reused by every block; every step writes
  in place or through ``out=`` so no op allocates. Peak extra memory is O(block) plus the
  statistics themselves.

Batch invariance (a row's bits do not depend on how many rows are in the call or where the row
sits) is kept by only using ops whose per-element result is position independent:

* additions, multiplications, divisions and square roots are correctly rounded, so their bits
  never depend on vectorisation;
* ATen's fused ``silu``/``sigmoid`` CPU kernels compute the scalar tail of a loop with a
  different formula than the vector body, so they run on a flat buffer padded so that no element
  falls in a tail (:func:`fused_activation_length`);
* row reductions go through ``torch.sum`` over the last dim, whose CPU order depends only on the
  group size - except when the reduction has a single output, where ATen splits it across
  threads; :func:`_group_sum` avoids that case. No fused multiply-add op (addcmul, alpha=) is
  used: a compiler may contract the vector body but not the scalar tail.

Range rescue (:mod:`gatednorm.numerics`): one check per row block of the stored var + eps; a block
with a group out of range is redone with those groups divided by a power of two (the cold path).
"""

from __future__ import annotations

import torch

from ..numerics import SAFE_VAR_MIN, rescale_groups, scaled_rstd
from ..spec import NormSpec, compute_dtype
from .base import Grads, GradsNeeded

#: Elements per row block: 3-6 buffers of this many float32 values (1 MiB each) stay in the
#: L2 + L3 caches of a small machine, and each op has enough work to amortise its dispatch
#: overhead and to be split over the intra-op threads.
CPU_BLOCK_ELEMENTS = 1 << 18

#: ATen's CPU parallel grain (at::internal::GRAIN_SIZE): element-wise ops on fewer elements
#: run serially; larger ones are cut into num_threads chunks of ceil(numel / num_threads).
ATEN_GRAIN = 32768

#: Two vectors of the widest ATen CPU vector (2 x 16 float32 for AVX-512) divide this.
_VECTOR_PAD = 64


def rows_per_block(m: int, n: int, block_elements: int = CPU_BLOCK_ELEMENTS) -> int:
    """Rows handled per block: about ``block_elements`` elements, at least one row."""
    return max(1, min(m, block_elements // n))


# ---------------------------------------------------------------------------
# Position-independent building blocks
# ---------------------------------------------------------------------------


def _group_sum(t3: torch.Tensor, out3: torch.Tensor, pair: torch.Tensor | None) -> None:
    """out3 (m, G, 1) = sum of t3 (m, G, gs) over the last dim, in a row-independent order.

    ATen reduces each output serially over the last dim, except when the whole
    reduction has a single output: then it splits the row across threads and
    the summation order changes. A lone (row, group) is therefore reduced as two
    identical rows through a stride-0 view (``pair`` is a (2, 1, 1) buffer).
    """
    if pair is not None and t3.shape[0] * t3.shape[1] == 1:
        torch.sum(t3.expand(2, 1, t3.shape[2]), dim=-1, keepdim=True, out=pair)
        out3.copy_(pair[:1])
    else:
        torch.sum(t3, dim=-1, keepdim=True, out=out3)


def in_safe_range(var_eps: torch.Tensor) -> bool:
    """True when every var + eps lies in [SAFE_VAR_MIN, inf): the plain float32 sums were exact enough.

    Outside it (a NaN fails too) the sums of x or x^2 overflowed (|x| above ~1.8e19) or the squares
    underflowed with a tiny eps; :func:`gatednorm.numerics.rescale_groups` then redoes those groups. One reduction and
    a host read: used on CPU, where that costs nothing like a device sync.
    """
    lo, hi = torch.aminmax(var_eps)
    return bool(lo >= SAFE_VAR_MIN) and bool(hi < float("inf"))


def fused_activation_length(numel: int) -> int:
    """Length to pad a flat fused silu/sigmoid call on ``numel`` elements to.

    ATen's fused CPU kernels run the vector body on all but the last < 2 vectors of each
    thread's chunk, which take a scalar formula with different rounding: an element's bits
    would depend on its position in the call. Padding the flat call so that every chunk is
    a whole number of vectors puts every element through the vector body:
    serial calls (<= ATEN_GRAIN elements) to a multiple of _VECTOR_PAD; parallel ones to a
    multiple of ATEN_GRAIN * num_threads, so each of the num_threads chunks is a multiple
    of ATEN_GRAIN.
    """
    padded = -(-numel // _VECTOR_PAD) * _VECTOR_PAD
    if padded <= ATEN_GRAIN:
        return padded
    unit = ATEN_GRAIN * max(1, torch.get_num_threads())
    return -(-numel // unit) * unit


def _fused_gate(z: torch.Tensor, flat: torch.Tensor, rows: int, n: int, activation: str, sigmoid: bool = False):
    """act(z) (or sigmoid(z)) of z (rows, N) through a fused kernel on a padded flat buffer.

    Returns the (rows, N) view; the padding holds finite leftovers and is never read.
    """
    gate = flat[: rows * n].view(rows, n)
    gate.copy_(z)
    length = fused_activation_length(rows * n)
    work = flat[:length]
    if activation == "swish" and not sigmoid:
        torch.nn.functional.silu(work, inplace=True)
    else:
        torch.sigmoid(work, out=work)
    return gate


def _fused_buffer(step: int, n: int, dtype, device) -> torch.Tensor:
    """Zeroed flat buffer long enough for any padded block."""
    return torch.zeros(fused_activation_length(step * n), dtype=dtype, device=device)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
    block_elements: int = CPU_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Write the gated norm of x (M, N) into out (M, N); return (mean, rstd).

    x, z, out may have any strides; weight/bias are (N,). mean (None for RMSNorm)
    and rstd are 1-D, G*M long, group-major (row m, group g at g*M + m), in C.
    Extra memory: about 3-4 compute-dtype buffers of one row block. M > 0.
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=dev)
    rstd = torch.empty(groups * m, dtype=c, device=dev)
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None

    step = rows_per_block(m, n, block_elements)
    buf_x = torch.empty(step, n, dtype=c, device=dev)
    buf_t = torch.empty(step, n, dtype=c, device=dev)  # squares / exp scratch
    flat_g = _fused_buffer(step, n, c, dev) if z is not None else None
    stat = torch.empty(2, step, groups, 1, dtype=c, device=dev)
    pair = torch.empty(2, 1, 1, dtype=c, device=dev) if groups == 1 else None
    gate_before = z is not None and not spec.norm_before_gate
    gate_after = z is not None and spec.norm_before_gate
    direct_out = out.dtype == c  # the last multiply can write out directly

    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        mb = r1 - r0
        xc = buf_x[:mb]
        t = buf_t[:mb]
        xc.copy_(x[r0:r1])
        gate = None
        if z is not None:
            gate = _fused_gate(z[r0:r1], flat_g, mb, n, spec.activation)
            if gate_before:
                xc.mul_(gate)
        x3 = xc.view(mb, groups, gs)
        mu = stat[0, :mb] if mean_gm is not None else None
        rs = stat[1, :mb]
        _var_plus_eps(x3, t, mu, rs, pair, spec.eps)
        if in_safe_range(rs):
            rs.sqrt_().reciprocal_()  # rstd = 1 / sqrt(var + eps)
            if mean_gm is not None:
                mean_gm[:, r0:r1].copy_(mu.view(mb, groups).t())
            rstd_gm[:, r0:r1].copy_(rs.view(mb, groups).t())
            x3.mul_(rs)
        else:
            # cold path: the float32 sums overflowed or underflowed; redo the block with each such
            # group divided by a power of two (exact); groups in range keep scale 1 and their bits
            xc.copy_(x[r0:r1])
            if gate_before:
                xc.mul_(gate)
            scale, inv = rescale_groups(x3, rs, spec.eps)
            x3.mul_(inv)
            _var_plus_eps(x3, t, mu, rs, pair, 0.0)
            rstd_block, rstd_scaled = scaled_rstd(rs, spec.eps, scale, inv)
            if mean_gm is not None:
                mean_gm[:, r0:r1].copy_((mu * scale).view(mb, groups).t())
            rstd_gm[:, r0:r1].copy_(rstd_block.view(mb, groups).t())
            x3.mul_(rstd_scaled)
        steps = [(torch.mul, weight_c)]
        if bias_c is not None:
            steps.append((torch.add, bias_c))
        if gate_after:
            steps.append((torch.mul, gate))
        for op, operand in steps[:-1]:
            op(xc, operand, out=xc)
        op, operand = steps[-1]
        if direct_out:  # no rounding needed: the last step writes out itself
            op(xc, operand, out=out[r0:r1])
        else:
            op(xc, operand, out=xc)
            out[r0:r1].copy_(xc)  # the one rounding to the output dtype
    return mean, rstd


def _var_plus_eps(x3: torch.Tensor, t: torch.Tensor, mu: torch.Tensor | None, var_eps: torch.Tensor,
                  pair: torch.Tensor | None, eps: float) -> None:
    """var_eps (rows, G, 1) = var + eps of x3 (rows, G, gs); LayerNorm (``mu`` given): mu = the mean and
    x3 is centred in place first (two-pass variance, never E[x^2] - E[x]^2). ``t`` is scratch."""
    rows, groups, gs = x3.shape
    if mu is not None:
        _group_sum(x3, mu, pair)
        mu.div_(gs)
        x3.sub_(mu)
    sq = t[:rows].view(rows, groups, gs)
    torch.mul(x3, x3, out=sq)
    _group_sum(sq, var_eps, pair)
    var_eps.div_(gs).add_(eps)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    needs_dx: bool = True,
    needs_dz: bool = True,
    needs_dweight: bool = True,
    needs_dbias: bool = True,
    block_elements: int = CPU_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Analytic gradients (dx, dz, dweight, dbias) from the saved inputs and stats.

    With xhat = (xc - mean) * rstd and g = w * dL/dy' (dy' = dy times the gate when
    the gate comes after the norm), per group:
    LayerNorm dxc = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops mean(g).
    dx and dz are in x's and z's dtypes, dweight/dbias in the parameters' dtypes,
    each rounded once from the compute dtype. Works in row blocks like forward.
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    has_z = z is not None
    dx = torch.empty(m, n, dtype=x.dtype, device=dev) if needs_dx else None
    dz = torch.empty(m, n, dtype=z.dtype, device=dev) if (needs_dz and has_z) else None
    dw_acc = torch.zeros(n, dtype=c, device=dev) if needs_dweight else None
    db_acc = torch.zeros(n, dtype=c, device=dev) if (needs_dbias and bias is not None) else None

    def finish():
        dweight = dw_acc.to(weight.dtype) if dw_acc is not None else None
        dbias = db_acc.to(bias.dtype) if db_acc is not None else None
        return dx, dz, dweight, dbias

    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    gate_before = has_z and not spec.norm_before_gate
    gate_after = has_z and spec.norm_before_gate
    need_dgate = dz is not None
    need_dxin = dx is not None or (gate_before and need_dgate)

    step = rows_per_block(m, n, block_elements)

    def buf():
        return torch.empty(step, n, dtype=c, device=dev)

    buf_x, buf_dy, buf_p = buf(), buf(), buf()
    buf_g = buf() if has_z else None  # z, then the gate
    flat_s = _fused_buffer(step, n, c, dev) if has_z else None
    buf_dg = buf() if need_dgate else None  # act'(z)
    stat = torch.empty(4, step, groups, 1, dtype=c, device=dev)
    pair = torch.empty(2, 1, 1, dtype=c, device=dev) if groups == 1 else None
    col = torch.empty(n, dtype=c, device=dev)

    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        mb = r1 - r0
        xc, dyc, p = buf_x[:mb], buf_dy[:mb], buf_p[:mb]
        x3 = xc.view(mb, groups, gs)
        rs = stat[0, :mb]
        rs.copy_(rstd_gm[:, r0:r1].t().unsqueeze(-1))

        gate = dgate = None
        if has_z:
            s = _fused_gate(z[r0:r1], flat_s, mb, n, spec.activation, sigmoid=True)  # sigmoid(z)
            zc = buf_g[:mb]
            zc.copy_(z[r0:r1])
            if need_dgate:
                dgate = torch.neg(s, out=buf_dg[:mb]).add_(1.0)  # 1 - s, exactly
                if spec.activation == "swish":
                    dgate.mul_(zc).add_(1.0)
                dgate.mul_(s)
            # same formula as the forward gate, so xhat is recomputed bit for bit
            gate = zc.mul_(s) if spec.activation == "swish" else s

        # xhat = (xc - mean) * rstd, in buf_x
        xc.copy_(x[r0:r1])
        if gate_before:
            xc.mul_(gate)
        if mean_gm is not None:
            mu = stat[1, :mb]
            mu.copy_(mean_gm[:, r0:r1].t().unsqueeze(-1))
            x3.sub_(mu)
        x3.mul_(rs)

        dyc.copy_(dy[r0:r1])
        if gate_after:
            if need_dgate:
                # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
                torch.mul(xc, weight_c, out=p)
                if bias_c is not None:
                    p.add_(bias_c)
                p.mul_(dyc).mul_(dgate)
                dz[r0:r1].copy_(p)
            dyc.mul_(gate)
        if dw_acc is not None:
            torch.mul(dyc, xc, out=p)
            torch.sum(p, dim=0, out=col)
            dw_acc.add_(col)
        if db_acc is not None:
            torch.sum(dyc, dim=0, out=col)
            db_acc.add_(col)
        if not need_dxin:
            continue

        g = dyc.mul_(weight_c)  # dL/dxhat
        g3 = g.view(mb, groups, gs)
        c1 = stat[2, :mb]
        torch.mul(xc, g, out=p)
        _group_sum(p.view(mb, groups, gs), c1, pair)
        c1.div_(gs)
        if mean_gm is not None:
            c2 = stat[3, :mb]
            _group_sum(g3, c2, pair)
            c2.div_(gs)
            g3.sub_(c2)
        x3.mul_(c1)
        g.sub_(xc)
        g3.mul_(rs)  # dL/dxc
        if gate_before:
            if need_dgate:
                # xc = x * act(z): dz = dL/dxc * x * act'(z)
                p.copy_(x[r0:r1])
                p.mul_(g).mul_(dgate)
                dz[r0:r1].copy_(p)
            g.mul_(gate)
        if dx is not None:
            dx[r0:r1].copy_(g)
    return finish()


class NativeCPUBackend:
    """The ``native`` backend's implementation for CPU tensors.

    ``block_elements`` sizes the row blocks (tests shrink it to cross block boundaries).
    """

    name = "native"
    supports_float64 = True

    def __init__(self, block_elements: int = CPU_BLOCK_ELEMENTS) -> None:
        self.block_elements = block_elements

    def forward(self, x, weight, bias, z, spec: NormSpec, out):
        return forward(x, weight, bias, z, spec, out, self.block_elements)

    def backward(self, dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs: GradsNeeded) -> Grads:
        return backward(dy, x, weight, bias, z, mean, rstd, spec, *needs, block_elements=self.block_elements)
