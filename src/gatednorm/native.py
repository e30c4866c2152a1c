"""The native backend: forward and analytic backward in plain PyTorch ops.

Runs on every device PyTorch runs on (CPU, CUDA, ROCm, XPU, MPS, NPU/GCU
plugins, meta). All math happens in the compute dtype C (float32, or float64
for float64 inputs) and the result is rounded once, when it is written to
``out``: exactly the function of DESIGN.md section 1.

There are two paths: the CPU path below, and an accelerator path (every other
device, see further down) that counts kernel launches rather than cache misses.

On CPU, speed and memory come from the memory layout, not from cleverer math:

* Rows are processed in blocks of about :data:`CPU_BLOCK_ELEMENTS` elements,
  so the compute-dtype working set (a few buffers of one block each) stays in
  the L2/L3 cache instead of streaming full-size float32 copies of the input
  through DRAM.
* The per-block buffers are allocated once per call and reused by every
  block; every step writes in place or through ``out=`` so no op allocates.
  Peak extra memory is therefore O(block) plus the statistics themselves.

Batch invariance (a row's bits do not depend on how many rows are in the call
or where the row sits) is kept by only using ops whose per-element result is
position independent:

* additions, multiplications, divisions and square roots are correctly
  rounded, so their bits never depend on vectorisation;
* ATen's fused ``silu``/``sigmoid`` CPU kernels compute the scalar tail of a
  loop with a different formula than the vector body, so they run on a flat
  buffer padded so that no element falls in a tail
  (:func:`fused_activation_length`); on devices where that cannot be
  arranged the gate is built from ``exp`` (whose CPU kernel uses one vector
  routine for every element, tails included) plus the exact ops above;
* row reductions go through ``torch.sum`` over the last dim, whose CPU order
  depends only on the group size - except when the reduction has a single
  output, where ATen splits it across threads; :func:`_group_sum` avoids
  that case (see there). No fused multiply-add op (addcmul, alpha=) is used:
  a compiler may contract the vector body but not the scalar tail.

On GPUs ATen's reduction strategy depends on the number of outputs, so the
native backend is batch invariant on CPU only; the fused Triton backend is
the batch-invariant path there.

Accelerators (every device but CPU, see :func:`_uses_accelerator_path`) take a
separate path, :func:`_forward_accel` / :func:`_backward_accel`: there every ATen
op is a kernel launch and eager calls of this size are launch bound, so that path
minimises the number of ops per call instead of cache residency. It is the same
function (compute dtype C, two-pass-stable variance, ``rstd = 1 / sqrt(var + eps)``,
one rounding at the final write) built from fewer, larger ops:

* mixed-dtype ops instead of copies: a bf16/fp16 (or, for C = float64, float32)
  tensor combined with a C tensor is promoted to C inside the kernel, exactly, so
  ``x``, ``dy``, ``weight`` and ``bias`` are read in their own dtype and the result
  is written to ``out`` (or ``dx``/``dz``) by the last op, rounding once;
* statistics are reduced from a group-major view of the rows, so they come out in
  the group-major layout without a transpose copy;
* LayerNorm statistics are two-pass (mean, centre in place, mean of the squares;
  never E[x^2] - E[x]^2); RMSNorm's are ``torch.mean`` of the squares;
* ``torch.addcmul`` where it saves a full-size pass (bias, backward's
  ``g - xhat * c1``, the swish derivative): a possibly contracted multiply-add,
  within the rounding of C.

Rows are still processed in blocks, of up to :data:`ACCEL_BLOCK_ELEMENTS`
elements (one block for most shapes), so a huge input cannot blow up memory.
Batch invariance is not promised there (nor on CPU would it hold for this path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import NormSpec, compute_dtype

#: On CPU, elements per row block: 3-6 buffers of this many float32 values (1 MiB each)
#: stay in the L2 + L3 caches of a small machine, and each op has enough work to amortise
#: its dispatch overhead and to be split over the intra-op threads.
CPU_BLOCK_ELEMENTS = 1 << 18

#: ATen's CPU parallel grain (at::internal::GRAIN_SIZE): element-wise ops on fewer elements
#: run serially; larger ones are cut into num_threads chunks of ceil(numel / num_threads).
ATEN_GRAIN = 32768

#: Two vectors of the widest ATen CPU vector (2 x 16 float32 for AVX-512) divide this.
_VECTOR_PAD = 64

#: On other devices, cap a block at this many elements (64 MiB of float32 per buffer):
#: one block covers most shapes, while a huge input cannot blow up memory.
ACCEL_BLOCK_ELEMENTS = 1 << 24


def rows_per_block(m: int, n: int, device: torch.device) -> int:
    """Rows handled per block: cache-sized on CPU, capped at ACCEL_BLOCK_ELEMENTS elsewhere."""
    if m == 0:
        return 1
    budget = CPU_BLOCK_ELEMENTS if device.type == "cpu" else ACCEL_BLOCK_ELEMENTS
    return max(1, min(m, budget // n))


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


#: var + eps at or above this (and finite) is computed to full precision in the compute dtype: the
#: squares lost to underflow are below 2^-149 each, under 2^-136 for a group, 2^-36 of this (C = float32).
SAFE_VAR_MIN = 2.0**-100


def in_safe_range(var_eps: torch.Tensor) -> bool:
    """True when every var + eps lies in [SAFE_VAR_MIN, inf): the plain float32 sums were exact enough.

    Outside it (a NaN fails too) the sums of x or x^2 overflowed (|x| above ~1.8e19) or the squares
    underflowed with a tiny eps; :func:`rescale_groups` then redoes those groups. One reduction and
    a host read: used on CPU, where that costs nothing like a device sync.
    """
    lo, hi = torch.aminmax(var_eps)
    return bool(lo >= SAFE_VAR_MIN) and bool(hi < float("inf"))


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
    redo = amax < float("inf") if redo is None else redo & (amax < float("inf"))
    one = torch.ones((), dtype=amax.dtype, device=amax.device)
    return torch.where(redo, torch.exp2(e), one), torch.where(redo, torch.exp2(-e), one)


def rescale_groups(x3: torch.Tensor, var_eps: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, inv) for a block whose var + eps left the safe range (the cold path).

    ``x3`` (rows, G, gs) holds the (gated) inputs; ``var_eps`` (rows, G, 1) the plain pass's var + eps.
    Groups still in range get scale 1: the same arithmetic, bit for bit, as the plain pass.
    """
    redo = ~((var_eps >= SAFE_VAR_MIN) & (var_eps < float("inf")))
    return pow2_scale(x3.abs().amax(dim=-1, keepdim=True), eps, redo)


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


def _gate_denominator(z: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d = 1 + exp(-z) in d's (compute) dtype. Negation is exact in any dtype."""
    if z.dtype == d.dtype:
        torch.neg(z, out=d)
    else:
        d.copy_(z).neg_()
    return d.exp_().add_(1.0)


def fused_activation_length(numel: int, device: torch.device) -> int | None:
    """Length to pad a flat fused silu/sigmoid call on ``numel`` elements to, or None for "don't fuse".

    ATen's fused CPU kernels run the vector body on all but the last < 2 vectors of each
    thread's chunk, which take a scalar formula with different rounding: an element's bits
    would depend on its position in the call. Padding the flat call so that every chunk is
    a whole number of vectors puts every element through the vector body:
    serial calls (<= ATEN_GRAIN elements) to a multiple of _VECTOR_PAD; parallel ones to a
    multiple of ATEN_GRAIN * num_threads, so each of the num_threads chunks is a multiple
    of ATEN_GRAIN. CUDA kernels are lane-wise already. Other devices: None (exp formula).
    """
    if device.type == "cuda":
        return numel
    if device.type != "cpu":
        return None
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
    length = fused_activation_length(rows * n, flat.device)
    work = flat[:length]
    if activation == "swish" and not sigmoid:
        torch.nn.functional.silu(work, inplace=True)
    else:
        torch.sigmoid(work, out=work)
    return gate


def _fused_buffer(step: int, n: int, dtype, device) -> torch.Tensor | None:
    """Zeroed flat buffer long enough for any padded block (None if fused kernels are not used)."""
    length = fused_activation_length(step * n, device)
    if length is None:
        return None
    return torch.zeros(length, dtype=dtype, device=device)


def _forward_gate(z: torch.Tensor, gate: torch.Tensor, tmp: torch.Tensor, activation: str) -> torch.Tensor:
    """gate = act(z) in C: s = 1 / (1 + exp(-z)); swish z * s, sigmoid s. tmp is scratch."""
    if activation == "swish":
        s = _gate_denominator(z, tmp).reciprocal_()
        gate.copy_(z)
        return gate.mul_(s)
    return _gate_denominator(z, gate).reciprocal_()


# Kept for other modules and tests: act(z) and act'(z) on whole tensors (allocating).
def gate_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) in z's dtype, with the same formula as the blocked kernels."""
    return _forward_gate(z, torch.empty_like(z), torch.empty_like(z), activation)


def gate_activation_and_derivative(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)). With s = sigmoid(z): swish' = s * (1 + z * (1 - s)); sigmoid' = s * (1 - s)."""
    s = _gate_denominator(z, torch.empty_like(z)).reciprocal_()
    ds = torch.rsub(s, 1.0)
    if activation == "swish":
        ds.mul_(z).add_(1.0).mul_(s)
        return z * s, ds
    return s, ds.mul_(s)


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
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Write the gated norm of x (M, N) into out (M, N); return (mean, rstd).

    x, z, out may have any strides; weight/bias are (N,). mean (None for RMSNorm)
    and rstd are 1-D, G*M long, group-major (row m, group g at g*M + m), in C.
    Extra memory: about 3-4 compute-dtype buffers of one row block.
    """
    if _uses_accelerator_path(x.device):
        return _forward_accel(x, weight, bias, z, spec, out)
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=dev)
    rstd = torch.empty(groups * m, dtype=c, device=dev)
    if m == 0 or dev.type == "meta":
        return mean, rstd
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None

    step = rows_per_block(m, n, dev)
    buf_x = torch.empty(step, n, dtype=c, device=dev)
    buf_t = torch.empty(step, n, dtype=c, device=dev)  # squares / exp scratch
    flat_g = _fused_buffer(step, n, c, dev) if z is not None else None
    buf_g = torch.empty(step, n, dtype=c, device=dev) if (z is not None and flat_g is None) else None
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
            if flat_g is not None:
                gate = _fused_gate(z[r0:r1], flat_g, mb, n, spec.activation)
            else:
                gate = _forward_gate(z[r0:r1], buf_g[:mb], t, spec.activation)
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
    if m > 0 and dev.type != "meta" and _uses_accelerator_path(dev):
        return _backward_accel(dy, x, weight, bias, z, mean, rstd, spec, dx, dz, needs_dweight, needs_dbias)
    dw_acc = torch.zeros(n, dtype=c, device=dev) if needs_dweight else None
    db_acc = torch.zeros(n, dtype=c, device=dev) if (needs_dbias and bias is not None) else None

    def finish():
        dweight = dw_acc.to(weight.dtype) if dw_acc is not None else None
        dbias = db_acc.to(bias.dtype) if db_acc is not None else None
        return dx, dz, dweight, dbias

    if m == 0 or dev.type == "meta":
        return finish()
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    gate_before = has_z and not spec.norm_before_gate
    gate_after = has_z and spec.norm_before_gate
    need_dgate = dz is not None
    need_dxin = dx is not None or (gate_before and need_dgate)

    step = rows_per_block(m, n, dev)

    def buf():
        return torch.empty(step, n, dtype=c, device=dev)

    buf_x, buf_dy, buf_p = buf(), buf(), buf()
    buf_g = buf() if has_z else None  # z, then the gate
    flat_s = _fused_buffer(step, n, c, dev) if has_z else None
    buf_s = buf() if (has_z and flat_s is None) else None  # 1 + exp(-z), then sigmoid(z)
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
            if flat_s is not None:
                s = _fused_gate(z[r0:r1], flat_s, mb, n, spec.activation, sigmoid=True)
            else:
                s = _gate_denominator(z[r0:r1], buf_s[:mb]).reciprocal_()  # sigmoid(z)
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


# ---------------------------------------------------------------------------
# Accelerator path: fewest ops per call (each op is a kernel launch there)
# ---------------------------------------------------------------------------


def _uses_accelerator_path(device: torch.device) -> bool:
    """True for devices that take the launch-lean path: every device but CPU (meta included).

    A module-level function so that tests can run the accelerator path on CPU tensors.
    """
    return device.type != "cpu"


def _accel_rows(m: int, n: int) -> int:
    return max(1, min(m, ACCEL_BLOCK_ELEMENTS // max(n, 1)))


def _in_c(t: torch.Tensor, c: torch.dtype) -> torch.Tensor:
    """t itself where an op with a C tensor promotes it to C exactly (t's dtype is C or narrower), else t in C."""
    return t if t.dtype == c or t.dtype.itemsize < c.itemsize else t.to(c)


def _act_accel(z: torch.Tensor, c: torch.dtype, activation: str) -> torch.Tensor:
    """act(z) in C as a fresh tensor: one op when z is in C, two (cast, then in place) otherwise."""
    if z.dtype == c:
        return F.silu(z) if activation == "swish" else torch.sigmoid(z)
    zc = z.to(c)
    return F.silu(zc, inplace=True) if activation == "swish" else zc.sigmoid_()


def _forward_accel(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`forward` with the fewest ops: about 8-11 per call for one block (see the module docstring)."""
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    step = _accel_rows(m, n)
    single = step >= m
    if m == 0 or dev.type == "meta" or not single:
        mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=dev)
        rstd = torch.empty(groups * m, dtype=c, device=dev)
        if m == 0 or dev.type == "meta":
            return mean, rstd
    w3 = _in_c(weight, c).unflatten(0, (groups, gs))
    b3 = _in_c(bias, c).unflatten(0, (groups, gs)) if bias is not None else None
    gate_before = z is not None and not spec.norm_before_gate
    gate_after = z is not None and spec.norm_before_gate

    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        xb = x[r0:r1].unflatten(1, (groups, gs))  # views only: any strides
        gate = _act_accel(z[r0:r1], c, spec.activation).unflatten(1, (groups, gs)) if z is not None else None
        if gate_before:
            xc, own = gate.mul_(xb), True  # x * act(z) in C; the gate is not needed afterwards
        elif xb.dtype != c:
            xc, own = xb.to(c), True
        else:
            xc, own = xb, False
        # statistics reduced from the group-major view (G, rows, gs): they come out group-major
        if spec.is_rms_norm:
            sq = xc.mul_(xc) if (own and not gate_before) else torch.mul(xc, xc)
            var = torch.mean(sq.transpose(0, 1), dim=-1, keepdim=True)
            mu = None
        else:
            # two-pass, as the contract says: centre, then the mean of squares (never E[x^2] - E[x]^2)
            mu = torch.mean(xc.transpose(0, 1), dim=-1, keepdim=True)
            xc = xc.sub_(mu.transpose(0, 1)) if own else torch.sub(xc, mu.transpose(0, 1))
            own = True
            var = torch.mean(torch.mul(xc, xc).transpose(0, 1), dim=-1, keepdim=True)
        if spec.eps:
            var.add_(spec.eps)
        rs = var.sqrt_().reciprocal_()  # rstd = 1 / sqrt(var + eps)
        rs3 = rs.transpose(0, 1)  # (rows, G, 1)
        if mu is not None:
            xhat = xc.mul_(rs3)  # xc is centred already (and ours)
        elif own and gate_before:
            xhat = xc.mul_(rs3)
        else:
            xhat = torch.mul(xb, rs3)  # x in its own dtype: promoted to C in the kernel
        dst = out[r0:r1].unflatten(1, (groups, gs))
        if gate_after:
            if b3 is not None:
                torch.addcmul(b3, xhat, w3, out=xhat)
            else:
                xhat.mul_(w3)
            torch.mul(xhat, gate, out=dst)  # the one rounding to out's dtype
        elif b3 is not None:
            torch.addcmul(b3, xhat, w3, out=dst)
        else:
            torch.mul(xhat, w3, out=dst)
        if single:
            return (mu.reshape(-1) if mu is not None else None), rs.reshape(-1)
        rstd.view(groups, m)[:, r0:r1].copy_(rs.reshape(groups, -1))
        if mu is not None:
            mean.view(groups, m)[:, r0:r1].copy_(mu.reshape(groups, -1))
    return mean, rstd


def _backward_accel(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    dx: torch.Tensor | None,
    dz: torch.Tensor | None,
    needs_dweight: bool,
    needs_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`backward` with the fewest ops; dx/dz are preallocated (M, N) outputs or None. M > 0."""
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    has_z = z is not None
    gate_before = has_z and not spec.norm_before_gate
    gate_after = has_z and spec.norm_before_gate
    need_dgate = dz is not None
    need_dxin = dx is not None or (gate_before and need_dgate)
    needs_dbias = needs_dbias and bias is not None
    w3 = _in_c(weight, c).unflatten(0, (groups, gs))
    b3 = _in_c(bias, c).unflatten(0, (groups, gs)) if bias is not None else None
    w3_c = None  # weight in C, made only if dy meets it without a C operand
    rs_gm = rstd.view(groups, m)
    mu_gm = mean.view(groups, m) if mean is not None else None
    swish = spec.activation == "swish"
    dw = db = None

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(1, (groups, gs))

    step = _accel_rows(m, n)
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        xb, dyb = split(x[r0:r1]), split(dy[r0:r1])
        rs3 = rs_gm[:, r0:r1].t().unsqueeze(-1)  # (rows, G, 1) view of the group-major stats

        gate = dgate = None
        if has_z:
            zb = split(z[r0:r1])
            if need_dgate:
                zc = _in_c(zb, c)  # z itself unless wider than C
                s = torch.sigmoid(zc) if zc.dtype == c else zc.to(c).sigmoid_()
                one_minus = torch.rsub(s, 1.0)  # 1 - s, exact
                if swish:
                    gate = torch.mul(zc, s)  # a narrower z is promoted to C in the kernel
                    # act' = s * (1 + z * (1 - s)) = s + act(z) * (1 - s)
                    dgate = torch.addcmul(s, gate, one_minus, out=one_minus)
                else:
                    gate, dgate = s, one_minus.mul_(s)
            else:
                gate = split(_act_accel(z[r0:r1], c, spec.activation))

        # xhat = (x [* act(z)] - mean) * rstd in C
        if gate_before:
            xin, own = torch.mul(xb, gate), True
        else:
            xin, own = xb, False
        if mu_gm is not None:
            mu3 = mu_gm[:, r0:r1].t().unsqueeze(-1)
            xhat = (xin.sub_(mu3) if own else torch.sub(xin, mu3)).mul_(rs3)
        else:
            xhat = xin.mul_(rs3) if own else torch.mul(xin, rs3)

        if gate_after:
            if need_dgate:
                # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
                pre = torch.addcmul(b3, xhat, w3) if b3 is not None else torch.mul(xhat, w3)
                torch.mul(pre.mul_(dyb), dgate, out=split(dz[r0:r1]))
            dyc = torch.mul(dyb, gate)  # dL/d(norm output), in C
        else:
            dyc = dyb  # may be narrower than C: every op below meets a C operand
        p = None
        if needs_dweight:
            p = torch.mul(dyc, xhat)
            part = p.sum(dim=0)
            dw = part if dw is None else dw.add_(part)
        if needs_dbias:
            part = torch.sum(dyc, dim=0, dtype=c)
            db = part if db is None else db.add_(part)
        if not need_dxin:
            continue

        if dyc is dyb and dyc.dtype != c:
            if w3_c is None:
                w3_c = w3 if w3.dtype == c else w3.to(c)
            g = torch.mul(dyc, w3_c)  # dL/dxhat in C
        elif dyc is dyb:
            g = torch.mul(dyc, w3)
        else:
            g = dyc.mul_(w3)
        # c1 = mean(xhat * g); p = dy' * xhat already holds all but the weight
        c1 = (p.mul_(w3) if p is not None else torch.mul(xhat, g)).mean(dim=-1, keepdim=True)
        if mu_gm is not None:
            g.sub_(g.mean(dim=-1, keepdim=True))
        torch.addcmul(g, xhat, c1, value=-1.0, out=g)  # g - mean(g) - xhat * c1
        if gate_before:
            g.mul_(rs3)  # dL/dxc
            if need_dgate:
                # xc = x * act(z): dz = dL/dxc * x * act'(z)
                torch.mul(torch.mul(g, xb), dgate, out=split(dz[r0:r1]))
            if dx is not None:
                torch.mul(g, gate, out=split(dx[r0:r1]))
        else:
            torch.mul(g, rs3, out=split(dx[r0:r1]))
    dweight = dw.reshape(n).to(weight.dtype) if dw is not None else None
    dbias = db.reshape(n).to(bias.dtype) if db is not None else None
    return dx, dz, dweight, dbias
