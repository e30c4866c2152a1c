"""The Triton kernels of the gated, grouped LayerNorm/RMSNorm (jit code only; launches live in ``launch.py``).

One kernel family, four kernels (sized and launched by :mod:`.launch`):

* ``fwd_kernel``: grid (row tiles, groups). A program normalises ``ROWS`` rows of one group,
  a 2-D tile [ROWS, BLOCK] (BLOCK = the group size rounded up to a power of two), so small groups
  (128) still give each program several KB to move. Groups wider than ``MAX_BLOCK`` are looped over
  in chunks: the first loop merges per-chunk (mean, M2) pairs (Chan et al.), the second writes y
  (except a group of exactly ``FWD_ONE_TILE_GROUP``, which the launch holds in one tile of 32 warps).
* ``bwd_kernel``: a persistent grid (programs, groups). Each program walks its share of the row
  tiles of one group, reads x, z, dy once, writes dx, dz once (xhat recomputed from mean/rstd) and
  keeps its dweight/dbias contribution in registers; at the end it writes one row of fp32 partials.
* ``sum_partials_kernel``: sums those partial rows in a fixed order into dweight/dbias, cast to
  the parameters' dtypes. No atomics anywhere: the same inputs give the same bits every run.

Launch configurations depend only on (N, group size, dtype) (the backward's number of programs also
on M, which changes only how rows are shared out, never a row's arithmetic), so a row's outputs do
not depend on how many rows are in the call (batch invariance).

The math (per row and group, fp32; act = swish or sigmoid; s = sigmoid(z))::

    xc   = x * act(z) if the gate comes first, else x
    mean = sum(xc) / gs,  var = sum((xc - mean)^2) / gs      (RMSNorm: mean = 0)
    rstd = 1 / sqrt(var + eps),  xhat = (xc - mean) * rstd
    y    = (xhat * w + b) [* act(z) if the gate comes after]

    backward, with g = dL/d(xhat * w + b) (= dy, or dy * act(z) when the gate comes after):
    dz   = dy * (xhat * w + b) * act'(z)                       (gate after)
    dw  += g * xhat,  db += g,  wdy = g * w
    dxc  = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))  (RMSNorm: no mean(wdy) term)
    dz   = dxc * x * act'(z),  dx = dxc * act(z)               (gate first; else dx = dxc)
    swish' = s * (1 + z * (1 - s)),  sigmoid' = s * (1 - s)

Everything computes in float32 in-kernel and rounds once on store (float64 calls are routed to the
native backend by :mod:`gatednorm.ops`).
"""

from __future__ import annotations

import fractions
import struct

import torch
import triton
import triton.language as tl

from ...numerics import QUANT_SCALE_MIN, SAFE_RSTD_MAX, SAFE_VAR_MIN
from ...settings import env_flag

# ---------------------------------------------------------------------------
# Shared helpers (jit)
# ---------------------------------------------------------------------------

#: The hardware's bare approximate ex2 and reciprocal (PTX ``.approx.ftz``, MUFU ops) where they exist: NVIDIA PTX,
#: not under Triton's interpreter (which runs no PTX), nor on ROCm. See _sigmoid and _reciprocal_in_1_2.
_PTX_MUFU = tl.constexpr(not env_flag("TRITON_INTERPRET") and torch.version.hip is None)
_MINUS_LOG2E = tl.constexpr(-1.4426950408889634)


@triton.jit
def _sigmoid(z):
    """s = 1 / (1 + e^-z) in fp32, as Triton computes it: e^-z = ex2(z * -log2(e)) (MUFU.EX2), then the
    reciprocal of 1 + e^-z (MUFU.RCP).

    Triton's own ``1.0 / (1.0 + tl.exp(-z))`` wraps both MUFU ops in range fix-ups for denormal inputs and
    results (ex2: a compare, two predicated multiplies; div.full: three compares and scalings, a multiply):
    eight of the thirteen instructions per element of the gate, and the gate is the largest share of the
    forward's instructions (the fused quantized forward was issue-bound on them: Nsight Compute, H200,
    benchmarks/results/gpu_notes_h200.md). The PTX ``.approx.ftz`` forms are the bare MUFU ops. Where the
    fix-ups do nothing (every z with |z| < 87.3) both give the same bits; beyond, e^-z or s is below 2^-126,
    where ftz gives 0 (z > 87.3: e^-z = 0, s = 1 either way; z < -87.3: s = 0 instead of a denormal, so
    swish(z) = -0 instead of a value below 1e-36). Infinities and NaN propagate alike.
    """
    if _PTX_MUFU:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [z * _MINUS_LOG2E],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _gate(z, SIGMOID_GATE: tl.constexpr):
    """(act(z), act'(z)) in fp32: swish = z * s, swish' = s * (1 + z * (1 - s)); sigmoid = s, s * (1 - s)."""
    s = _sigmoid(z)
    if SIGMOID_GATE:
        return s, s * (1.0 - s)
    else:
        return z * s, s * (1.0 + z * (1.0 - s))


@triton.jit
def _gate_value(z, SIGMOID_GATE: tl.constexpr):
    """act(z) alone (the forward does not need the derivative)."""
    s = _sigmoid(z)
    if SIGMOID_GATE:
        return s
    else:
        return z * s


@triton.jit
def _load_f32(ptrs, mask, BF16_BY_BITS: tl.constexpr):
    """Masked load (0 in masked lanes) converted exactly to fp32."""
    if BF16_BY_BITS and ptrs.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptrs.to(tl.pointer_type(tl.uint16), bitcast=True), mask=mask, other=0)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_out(ptrs, v, mask, BF16_BY_BITS: tl.constexpr):
    """Store fp32 v rounded once (to nearest even) to the pointers' dtype."""
    if BF16_BY_BITS and ptrs.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        tl.store(ptrs.to(tl.pointer_type(tl.uint16), bitcast=True), bits.to(tl.uint16), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _pdl_prologue(USE_PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper and later; launch.pdl_supported): this kernel may be launched
    while the previous one in the stream finishes, so before touching memory it waits until that kernel's
    memory is visible (griddepcontrol.wait); then it lets the next PDL-launched kernel be scheduled (that
    one waits in its own prologue). Without PDL both are left out. The launcher uses PDL for small calls
    only (launch.PDL_MAX_ELEMENTS): see there why."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _tile_and_group(GROUPS_FASTEST: tl.constexpr):
    """(row-tile program, group) of this program. The grid is (row tiles, groups), or with GROUPS_FASTEST
    (groups, row tiles), so that programs launched together cover neighbouring groups of the same rows
    (contiguous memory) instead of the same group of neighbouring rows. Only the order changes."""
    if GROUPS_FASTEST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _tile_ptrs(base, rows64, stride, col0, cols):
    return base + rows64[:, None] * stride + (col0 + cols)[None, :]


@triton.jit
def _load_input(X, R, rows64, mask, stride_xm, stride_rm, col0, cols, HAS_RES: tl.constexpr,
                BF16_BY_BITS: tl.constexpr):
    """The norm's input s in fp32: x, or x + residual (HAS_RES; both widened exactly, one fp32 rounding,
    the value ops.residual_sum computes)."""
    s = _load_f32(_tile_ptrs(X, rows64, stride_xm, col0, cols), mask, BF16_BY_BITS)
    if HAS_RES:
        s = s + _load_f32(_tile_ptrs(R, rows64, stride_rm, col0, cols), mask, BF16_BY_BITS)
    return s


# ---------------------------------------------------------------------------
# Range rescue (shared by both forward paths)
# ---------------------------------------------------------------------------
# The float32 sums of x and x^2 overflow for |x| above ~1.8e19 (bf16 and fp32 reach 3.4e38) and the
# squares underflow below ~1e-19, which matters when eps is tiny too. float64 has neither problem, so
# neither may we: a row (of one group) whose rstd = 1 / sqrt(var + eps) lands outside (0, 2^50] (var +
# eps overflowed, underflowed below 2^-100, or is NaN) is redone from memory by _rescue_row, divided by
# a power of two of its largest |value| (exact); mean * scale and rstd / scale are stored. Other rows
# are never touched, so their bits are the plain path's.
#
# Where the check runs is a cost question (benchmarks/bench_triton_ab.py): a separate scan kernel leaves
# fwd_kernel's code as it was and costs one small launch, 1-4% of a large call; the check-and-branch at the
# end of every program cost 3-17% of bandwidth on some large shapes when first measured (H200,
# benchmarks/results/triton_rescue_ab_h200.md), but on today's kernels (H100, session 22) nothing on groups
# of 96 to 5120, and 3.4-3.6% on groups of 8192 (again in session 29, when one group of 16384 ran 0.8-1.6%
# faster with it). A one-row tile (8192, the 16384 of FWD_ONE_TILE_GROUP, padded widths such as 5120) now
# branches on its row's range before writing y (redone from memory when out of range, else the plain y):
# with the check after the store, z's loads and most of the gate's exponentials fell behind the reductions
# (sm_90 SASS at 8192); before it, 16384x8192 ran 0.7% faster than with the scan kernel (H100, session 30).
# So every width checks in the kernel by default; rescue_kernel stays for launch.RESCUE_SCAN_GROUP_SIZES
# (empty) and for callers that ask for it (launch.rescue_scan_min_elements' option).
# Both judge the same stored rstd and redo rows with the same code and warps: a row's bits do not
# depend on which one ran (batch invariance). Wide groups (looped in chunks) check in-kernel always.
# The fused quantized forward (below) splits at that size at every group width; it stores no rstd, so a row
# to redo is marked in its scales (_RESCUE_MARK) and quant_rescue_kernel scans those.

_SAFE_VAR_MIN = tl.constexpr(SAFE_VAR_MIN)
_SAFE_RSTD_MAX = tl.constexpr(SAFE_RSTD_MAX)  # 2^50
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _rstd_out_of_range(rstd):
    """True where the plain fp32 statistics cannot be trusted: rstd = 1 / sqrt(var + eps) outside
    (0, 2^50], i.e. var + eps overflowed (rstd 0), is NaN, or is below 2^-100 (see _SAFE_VAR_MIN).
    Judged on the stored rstd, so the in-kernel and the separate rescue agree row for row."""
    return ~((rstd > 0.0) & (rstd <= _SAFE_RSTD_MAX))


@triton.jit
def _rescue_scale(amax, eps):
    """(scale, 1 / scale) per row: the power of two at or below max(amax, sqrt(eps)), clamped to
    [2^-126, 2^126] (1 where amax is Inf/NaN: the formula's result is Inf/NaN anyway). Built from the
    exponent bits, so both are exact powers of two."""
    a = tl.maximum(amax, tl.sqrt(eps + tl.zeros_like(amax)))
    e = (a.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.int32)  # a >= 0: sign bit clear
    e = tl.minimum(tl.maximum(e, 1 << 23), 253 << 23)
    finite = amax <= _FP32_MAX
    scale = tl.where(finite, e.to(tl.float32, bitcast=True), 1.0)
    inv = tl.where(finite, ((254 << 23) - e).to(tl.float32, bitcast=True), 1.0)
    return scale, inv


@triton.jit
def _rescued_rstd(var_s, eps, scale, inv):
    """(rstd, rstd * scale) from var_s = var / scale^2; see gatednorm.numerics.scaled_rstd (the same steps)."""
    v = var_s + eps * inv * inv
    rstd_x = 1.0 / tl.sqrt_rn(v)
    plain = 1.0 / tl.sqrt_rn(var_s * scale * scale + eps)
    stuck = (v < _SAFE_VAR_MIN) & (eps > 0)  # a constant group far from zero: take rstd unscaled
    rstd = tl.where(stuck, plain, rstd_x * inv)
    rstd_x = tl.where(stuck, tl.minimum(plain * scale, _FP32_MAX), rstd_x)
    return rstd, rstd_x


@triton.jit
def _tile_stats(x, col_ok, eps, GS: tl.constexpr, BLOCK: tl.constexpr, IS_RMS: tl.constexpr):
    """(mean, x - mean with padded lanes 0, var + eps) of a [ROWS, BLOCK] tile; two-pass (RMSNorm: mean 0)."""
    if IS_RMS:
        mean = tl.zeros([x.shape[0]], dtype=tl.float32)
        xm = x
    else:
        mean = tl.sum(x, axis=1) / GS
        xm = x - mean[:, None]
        if BLOCK != GS:
            xm = tl.where(col_ok[None, :], xm, 0.0)
    return mean, xm, tl.sum(xm * xm, axis=1) / GS + eps


# Groups that are not a power of two, where launch.SPLIT_GROUPS is on (the default), are read unpadded rather
# than as one tile padded to the next power of two, whose padded lanes cost as many instructions as real ones:
# - two power-of-two parts (640 = 512 + 128; launch.split_low): the fused quantized forward reads [ROWS, GS - GLO]
#   and [ROWS, GLO] (sm_90 SASS, Triton 3.9: 49.5 instructions per real element padded at the default launch shape, 32.4
#   split; launch.SPLIT_MIN_LOW). fwd_kernel and bwd_kernel keep the padded tile for these: the forward reached
#   96-100% of copy padded on the H200, and a split backward counted no fewer instructions at its one-row,
#   one-warp launch shape (46.5 per element against 45.5);
# - three equal power-of-two parts (96 = 3 x 32, 3072 = 3 x 1024; launch.fwd_parts): fwd_kernel and bwd_kernel
#   read three [ROWS, GS / 3] tiles (_three_part_stats, _bwd_three_parts; 32768x3072 in groups of 96 on the H200:
#   forward 83 -> 90% of copy, forward + backward in a CUDA graph 77 -> 87%).
# _gated_input reads one such tile, or a whole padded group.

@triton.jit
def _gated_input(X, Z, rows64, mask, stride_xm, stride_zm, col0, cols, HAS_Z: tl.constexpr,
                 GATE_FIRST: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                 R=None, RO=None, stride_rm=0, stride_om=0, HAS_RES: tl.constexpr = False,
                 STORE_RES: tl.constexpr = False):
    """A tile (or a group's part) of the norm's input: (s = x [+ residual R: HAS_RES], stored to RO with STORE_RES,
    times act(z) when the gate comes first; act(z), or 1.0 without z). Masked lanes read x = z = 0, so x * act(z)
    stays 0 there."""
    x = _load_input(X, R, rows64, mask, stride_xm, stride_rm, col0, cols, HAS_RES, BF16_BY_BITS)
    if STORE_RES:
        _store_out(_tile_ptrs(RO, rows64, stride_om, col0, cols), x, mask, BF16_BY_BITS)
    gate = 1.0  # unused without z
    if HAS_Z:
        gate = _gate_value(_load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, cols), mask, BF16_BY_BITS), SIGMOID_GATE)
        if GATE_FIRST:
            x = x * gate
    return x, gate


@triton.jit
def _split_stats(xh, xl, eps, GS: tl.constexpr, IS_RMS: tl.constexpr):
    """_tile_stats of a group held as two parts: (mean, xh - mean, xl - mean, var + eps); two-pass."""
    if IS_RMS:
        mean = tl.zeros([xh.shape[0]], dtype=tl.float32)
        xmh = xh
        xml = xl
    else:
        mean = (tl.sum(xh, axis=1) + tl.sum(xl, axis=1)) / GS
        xmh = xh - mean[:, None]
        xml = xl - mean[:, None]
    return mean, xmh, xml, (tl.sum(xmh * xmh, axis=1) + tl.sum(xml * xml, axis=1)) / GS + eps


@triton.jit
def _three_part_stats(x0, x1, x2, eps, GS: tl.constexpr, IS_RMS: tl.constexpr):
    """_tile_stats of a group held as three equal parts: (mean, x0 - mean, x1 - mean, x2 - mean, var + eps)."""
    if IS_RMS:
        mean = tl.zeros([x0.shape[0]], dtype=tl.float32)
        xm0 = x0
        xm1 = x1
        xm2 = x2
    else:
        mean = (tl.sum(x0, axis=1) + tl.sum(x1, axis=1) + tl.sum(x2, axis=1)) / GS
        xm0 = x0 - mean[:, None]
        xm1 = x1 - mean[:, None]
        xm2 = x2 - mean[:, None]
    var = tl.sum(xm0 * xm0, axis=1) + tl.sum(xm1 * xm1, axis=1) + tl.sum(xm2 * xm2, axis=1)
    return mean, xm0, xm1, xm2, var / GS + eps


@triton.jit
def _param_tile(P, col0, cols, col_ok, like, BF16_BY_BITS: tl.constexpr):
    """A parameter's (w, b) values at the tile's columns, broadcast over its rows: loaded as a tile of ``like``'s
    shape, in the tile's own layout, each thread its own columns (L1 hits). Loaded as a row and broadcast with
    [None, :], they would cross threads through shared memory: a store, a barrier and a load per element."""
    ptrs = tl.broadcast_to((P + col0 + cols)[None, :], like.shape)
    return _load_f32(ptrs, tl.broadcast_to(col_ok[None, :], like.shape), BF16_BY_BITS)


@triton.jit
def _group_params(W, B, col0, cols, col_ok, HAS_BIAS: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """(w, b) of one group as rows of its features (b = 0.0 without a bias): fwd_kernel's single tile, which
    broadcasts them with [None, :]."""
    w = _load_f32(W + col0 + cols, col_ok, BF16_BY_BITS)
    b = _load_f32(B + col0 + cols, col_ok, BF16_BY_BITS) if HAS_BIAS else 0.0
    return w, b


@triton.jit
def _scale_shift_gate(xm, rstd, w, b, gate, HAS_BIAS: tl.constexpr, GATE_AFTER: tl.constexpr):
    """y = (xm * rstd * w + b) [* act(z)] from parameters already loaded (rows [ROWS, BLOCK] or a row [BLOCK],
    broadcast over the tile's rows): fwd_kernel's order of operations."""
    y = xm * rstd[:, None] * w
    if HAS_BIAS:
        y = y + b
    if GATE_AFTER:
        y = y * gate
    return y


@triton.jit
def _norm_output(W, B, xm, rstd, gate, col0, cols, col_ok, HAS_BIAS: tl.constexpr, GATE_AFTER: tl.constexpr,
                 BF16_BY_BITS: tl.constexpr):
    """y = (xm * rstd * w + b) [* act(z)] of a tile or part (fwd_kernel's order of operations); col_ok masks
    the parameters' loads."""
    y = xm * rstd[:, None] * _param_tile(W, col0, cols, col_ok, xm, BF16_BY_BITS)
    if HAS_BIAS:
        y = y + _param_tile(B, col0, cols, col_ok, xm, BF16_BY_BITS)
    if GATE_AFTER:
        y = y * gate
    return y


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _rescue_tile(X, R, Z, W, B, Y, MEAN, RSTD, rstd, row_ok, row0, g, M, stride_xm, stride_rm, stride_zm, stride_ym,
                 col0, eps, GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr, IS_RMS: tl.constexpr,
                 SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, HAS_RES: tl.constexpr):
    """fwd_kernel's in-kernel range rescue of a single-tile program (rows row0 ..): its rows whose rstd is out of
    range, if any, redone by _rescue_rows with the padded width BLOCK (rescue_kernel's code: the same bits)."""
    if tl.max((_rstd_out_of_range(rstd) & row_ok).to(tl.int32), axis=0) != 0:
        tl.debug_barrier()  # the rows' plain results (written by other threads) are overwritten
        _rescue_rows(X, R, Z, W, B, Y, MEAN, RSTD, row0, g, M, stride_xm, stride_rm, stride_zm, stride_ym, col0, eps,
                     GS, BLOCK, ROWS, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE, BF16_BY_BITS,
                     HAS_RES)


@triton.jit
def fwd_kernel(
    X, R, Z, W, B, Y, RO, MEAN, RSTD,
    M, stride_xm, stride_rm, stride_zm, stride_ym, stride_om, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, RESCUE_IN_KERNEL: tl.constexpr,
    USE_PDL: tl.constexpr, GROUPS_FASTEST: tl.constexpr, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr,
    PARTS: tl.constexpr = 1,
):
    """The norm of s = x (HAS_RES: x + residual R, summed in fp32) into Y; with STORE_RES, s rounded to RO's
    dtype is written to RO too (the prenorm output, or s in fp32 kept for the backward). PARTS = 3: a group of
    three power-of-two parts (96 = 3 x 32) read as three unpadded tiles (launch.fwd_parts); BLOCK stays the
    padded width, for the range rescue (the same code as rescue_kernel's, so rescued rows keep their bits)."""
    _pdl_prologue(USE_PDL)
    pid, g = _tile_and_group(GROUPS_FASTEST)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col0 = g * GS
    GATE_FIRST: tl.constexpr = HAS_Z and not NORM_BEFORE_GATE
    GATE_AFTER: tl.constexpr = HAS_Z and NORM_BEFORE_GATE
    stat = g.to(tl.int64) * M + rows64  # group-major statistics: index g * M + m

    if NUM_CHUNKS == 1 and PARTS == 3:
        # The whole group is in registers as three [ROWS, GS / 3] tiles: no padded lanes (a 96-wide group
        # padded to 128 spends a quarter of its instructions on them; see launch.fwd_parts).
        PW: tl.constexpr = GS // 3
        pcols = tl.arange(0, PW)
        pcol_ok = pcols < PW
        mask = row_ok[:, None] & pcol_ok[None, :]
        x0, g0 = _gated_input(X, Z, rows64, mask, stride_xm, stride_zm, col0, pcols, HAS_Z, GATE_FIRST, SIGMOID_GATE,
                              BF16_BY_BITS, R, RO, stride_rm, stride_om, HAS_RES, STORE_RES)
        x1, g1 = _gated_input(X, Z, rows64, mask, stride_xm, stride_zm, col0 + PW, pcols, HAS_Z, GATE_FIRST,
                              SIGMOID_GATE, BF16_BY_BITS, R, RO, stride_rm, stride_om, HAS_RES, STORE_RES)
        x2, g2 = _gated_input(X, Z, rows64, mask, stride_xm, stride_zm, col0 + 2 * PW, pcols, HAS_Z, GATE_FIRST,
                              SIGMOID_GATE, BF16_BY_BITS, R, RO, stride_rm, stride_om, HAS_RES, STORE_RES)
        mean, xm0, xm1, xm2, var_eps = _three_part_stats(x0, x1, x2, eps, GS, IS_RMS)
        rstd = 1.0 / tl.sqrt_rn(var_eps)
        if not IS_RMS:
            tl.store(MEAN + stat, mean, mask=row_ok)
        tl.store(RSTD + stat, rstd, mask=row_ok)
        y = _norm_output(W, B, xm0, rstd, g0, col0, pcols, pcol_ok, HAS_BIAS, GATE_AFTER, BF16_BY_BITS)
        _store_out(_tile_ptrs(Y, rows64, stride_ym, col0, pcols), y, mask, BF16_BY_BITS)
        y = _norm_output(W, B, xm1, rstd, g1, col0 + PW, pcols, pcol_ok, HAS_BIAS, GATE_AFTER, BF16_BY_BITS)
        _store_out(_tile_ptrs(Y, rows64, stride_ym, col0 + PW, pcols), y, mask, BF16_BY_BITS)
        y = _norm_output(W, B, xm2, rstd, g2, col0 + 2 * PW, pcols, pcol_ok, HAS_BIAS, GATE_AFTER, BF16_BY_BITS)
        _store_out(_tile_ptrs(Y, rows64, stride_ym, col0 + 2 * PW, pcols), y, mask, BF16_BY_BITS)
        if RESCUE_IN_KERNEL:  # else rescue_kernel runs after this kernel (see "Range rescue")
            _rescue_tile(X, R, Z, W, B, Y, MEAN, RSTD, rstd, row_ok, pid * ROWS, g, M, stride_xm, stride_rm, stride_zm,
                         stride_ym, col0, eps, GS, BLOCK, ROWS, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                         SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
    elif NUM_CHUNKS == 1:
        # The whole group is in registers: two-pass variance on the tile itself.
        col_ok = cols < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_input(X, R, rows64, mask, stride_xm, stride_rm, col0, cols, HAS_RES, BF16_BY_BITS)
        if STORE_RES:
            _store_out(_tile_ptrs(RO, rows64, stride_om, col0, cols), x, mask, BF16_BY_BITS)
        gate = 1.0  # unused without z
        if HAS_Z:
            # Padded lanes read z = 0 (never garbage), so x * act(z) stays 0 there.
            z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, cols), mask, BF16_BY_BITS)
            gate = _gate_value(z, SIGMOID_GATE)
            if GATE_FIRST:
                x = x * gate
        # Narrow groups load w (and b) with x and z, before the reductions and the statistics' stores: loaded
        # after those stores (which may alias W for all the compiler knows), they are a second memory round trip
        # on the critical path, which a short call after an L2 flush pays in full (H100, session 27: 8192x128 and
        # 2048x128 0.97x / 0.96x the time eagerly). Wide tiles load them late: there they would stay in registers
        # over the reductions, beside 16 x values a thread, where a 32-warp tile may use 64 registers at most
        PARAMS_EARLY: tl.constexpr = BLOCK <= 1024
        if PARAMS_EARLY:
            w, b = _group_params(W, B, col0, cols, col_ok, HAS_BIAS, BF16_BY_BITS)
        mean, xm, var_eps = _tile_stats(x, col_ok, eps, GS, BLOCK, IS_RMS)
        rstd = 1.0 / tl.sqrt_rn(var_eps)
        if not IS_RMS:
            tl.store(MEAN + stat, mean, mask=row_ok)
        tl.store(RSTD + stat, rstd, mask=row_ok)
        if RESCUE_IN_KERNEL and ROWS == 1:
            # one row: redo it from memory instead of writing its plain result when out of range
            if tl.max((_rstd_out_of_range(rstd) & row_ok).to(tl.int32), axis=0) != 0:
                _rescue_rows(X, R, Z, W, B, Y, MEAN, RSTD, pid * ROWS, g, M, stride_xm, stride_rm, stride_zm,
                             stride_ym, col0, eps, GS, BLOCK, ROWS, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                             SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
            else:
                if not PARAMS_EARLY:
                    w, b = _group_params(W, B, col0, cols, col_ok, HAS_BIAS, BF16_BY_BITS)
                y = _scale_shift_gate(xm, rstd, w[None, :], b, gate, HAS_BIAS, GATE_AFTER)
                _store_out(_tile_ptrs(Y, rows64, stride_ym, col0, cols), y, mask, BF16_BY_BITS)
        else:
            if not PARAMS_EARLY:  # w loaded before the products: the instruction order measured on the H200
                w, b = _group_params(W, B, col0, cols, col_ok, HAS_BIAS, BF16_BY_BITS)
            y = _scale_shift_gate(xm, rstd, w[None, :], b, gate, HAS_BIAS, GATE_AFTER)
            _store_out(_tile_ptrs(Y, rows64, stride_ym, col0, cols), y, mask, BF16_BY_BITS)
        if RESCUE_IN_KERNEL and ROWS > 1:  # else rescue_kernel runs after this kernel (see "Range rescue")
            _rescue_tile(X, R, Z, W, B, Y, MEAN, RSTD, rstd, row_ok, pid * ROWS, g, M, stride_xm, stride_rm, stride_zm,
                         stride_ym, col0, eps, GS, BLOCK, ROWS, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                         SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
    else:
        # Wide group (ROWS = 1): pass 1 merges chunk statistics, pass 2 writes (_chunked_stats).
        ones = tl.full([ROWS], 1.0, tl.float32)
        run_mean, run_m2 = _chunked_stats(X, R, Z, rows64, row_ok, stride_xm, stride_rm, stride_zm, col0, cols,
                                          ones, GS, BLOCK, NUM_CHUNKS, GATE_FIRST, IS_RMS, SIGMOID_GATE,
                                          BF16_BY_BITS, HAS_RES)
        rstd = 1.0 / tl.sqrt_rn(run_m2 / GS + eps)
        if tl.max((_rstd_out_of_range(rstd) & row_ok).to(tl.int32), axis=0) != 0:  # rare: see "Range rescue"
            _rescue_row(X, R, Z, W, B, Y, RO, MEAN, RSTD, pid, g, M, stride_xm, stride_rm, stride_zm, stride_ym,
                        stride_om, col0, eps, GS, BLOCK, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                        SIGMOID_GATE, BF16_BY_BITS, HAS_RES, STORE_RES)
        else:
            if not IS_RMS:
                tl.store(MEAN + stat, run_mean, mask=row_ok)
            tl.store(RSTD + stat, rstd, mask=row_ok)
            _write_chunked(X, R, Z, W, B, Y, RO, rows64, row_ok, stride_xm, stride_rm, stride_zm, stride_ym,
                           stride_om, col0, cols, ones, run_mean, rstd, GS, BLOCK, NUM_CHUNKS,
                           HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE, BF16_BY_BITS,
                           HAS_RES, STORE_RES)


@triton.jit
def fwd_flat_kernel(
    X, Z, W, B, Y, MEAN, RSTD,
    M, G, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """fwd_kernel's single-tile path over contiguous x, z, y seen as (M * G, GS): row r is group g = r % G of
    row m = r // G, and the ROWS rows of a tile are consecutive in memory (every group of a row before the
    next row), so small groups (96 wide) are read as one contiguous stretch rather than ROWS short pieces
    N apart. The arithmetic per (row, group) is fwd_kernel's, on the same tile shape. The range rescue
    always runs afterwards as rescue_kernel."""
    _pdl_prologue(USE_PDL)
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = r < M * G
    r64 = r.to(tl.int64)
    g = r64 % G
    cols = tl.arange(0, BLOCK)
    col_ok = cols < GS
    mask = r_ok[:, None] & col_ok[None, :]
    offs = r64[:, None] * GS + cols[None, :]
    GATE_FIRST: tl.constexpr = HAS_Z and not NORM_BEFORE_GATE
    GATE_AFTER: tl.constexpr = HAS_Z and NORM_BEFORE_GATE
    stat = g * M + r64 // G  # group-major statistics: index g * M + m
    x = _load_f32(X + offs, mask, BF16_BY_BITS)
    gate = 1.0  # unused without z
    if HAS_Z:
        gate = _gate_value(_load_f32(Z + offs, mask, BF16_BY_BITS), SIGMOID_GATE)
        if GATE_FIRST:
            x = x * gate
    mean, xm, var_eps = _tile_stats(x, col_ok, eps, GS, BLOCK, IS_RMS)
    rstd = 1.0 / tl.sqrt_rn(var_eps)
    if not IS_RMS:
        tl.store(MEAN + stat, mean, mask=r_ok)
    tl.store(RSTD + stat, rstd, mask=r_ok)
    wcols = g[:, None] * GS + cols[None, :]  # the weight of each row's own group (L1/L2 hits)
    y = xm * rstd[:, None] * _load_f32(W + wcols, mask, BF16_BY_BITS)
    if HAS_BIAS:
        y = y + _load_f32(B + wcols, mask, BF16_BY_BITS)
    if GATE_AFTER:
        y = y * gate
    _store_out(Y + offs, y, mask, BF16_BY_BITS)


@triton.jit
def _write_chunked(X, R, Z, W, B, Y, RO, rows64, row_ok, stride_xm, stride_rm, stride_zm, stride_ym, stride_om,
                   col0, cols, inv, mean, rstd_x, GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                   HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                   IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                   HAS_RES: tl.constexpr, STORE_RES: tl.constexpr):
    """y = ((s * inv - mean) * rstd_x * w + b) [* act(z)] chunk by chunk (inv = 1 and rstd_x = rstd
    unless rescued; mean = 0 for RMSNorm); with STORE_RES also s into RO."""
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        col_ok = offs < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_input(X, R, rows64, mask, stride_xm, stride_rm, col0, offs, HAS_RES, BF16_BY_BITS)
        if STORE_RES:
            _store_out(_tile_ptrs(RO, rows64, stride_om, col0, offs), x, mask, BF16_BY_BITS)
        if HAS_Z:
            z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, offs), mask, BF16_BY_BITS)
            gate = _gate_value(z, SIGMOID_GATE)
            if GATE_FIRST:
                x = x * gate
        x = x * inv[:, None]
        if not IS_RMS:
            x = x - mean[:, None]
        w = _load_f32(W + col0 + offs, col_ok, BF16_BY_BITS)
        y = x * rstd_x[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + _load_f32(B + col0 + offs, col_ok, BF16_BY_BITS)[None, :]
        if GATE_AFTER:
            y = y * gate
        _store_out(_tile_ptrs(Y, rows64, stride_ym, col0, offs), y, mask, BF16_BY_BITS)


@triton.jit(noinline=True)
def _rescue_rows(X, R, Z, W, B, Y, MEAN, RSTD, row0, g, M, stride_xm, stride_rm, stride_zm, stride_ym, col0, eps,
                 GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                 HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                 IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                 HAS_RES: tl.constexpr):
    """Redo rows row0 .. row0 + ROWS - 1 of group g whose stored rstd is out of range. Not inlined, and
    scalars only: the rarely taken rescue must not raise the common path's register count."""
    for r in range(ROWS):
        row = row0 + r
        if row < M:
            if _rstd_out_of_range(tl.load(RSTD + g.to(tl.int64) * M + row)):
                # the single-tile path has written s to RO already: STORE_RES off
                _rescue_row(X, R, Z, W, B, Y, None, MEAN, RSTD, row, g, M, stride_xm, stride_rm, stride_zm,
                            stride_ym, 0, col0, eps, GS, BLOCK, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                            SIGMOID_GATE, BF16_BY_BITS, HAS_RES, False)


@triton.jit
def rescue_kernel(
    X, R, Z, W, B, Y, RO, MEAN, RSTD,
    M, stride_xm, stride_rm, stride_zm, stride_ym, stride_om, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, USE_PDL: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """After fwd_kernel on large inputs: grid (row blocks of SCAN, groups). Reads the stored rstd and
    redoes the rows out of range, with the code the forward would run in-kernel (same bits). Takes
    fwd_kernel's runtime arguments; RO is not touched (fwd_kernel wrote it)."""
    _pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * SCAN + tl.arange(0, SCAN)
    ok = rows < M
    rstd = tl.load(RSTD + g.to(tl.int64) * M + rows.to(tl.int64), mask=ok, other=1.0)
    if tl.max((_rstd_out_of_range(rstd) & ok).to(tl.int32), axis=0) != 0:
        _rescue_rows(X, R, Z, W, B, Y, MEAN, RSTD, pid * SCAN, g, M, stride_xm, stride_rm, stride_zm, stride_ym,
                     g * GS, eps, GS, BLOCK, SCAN, HAS_Z, HAS_BIAS, HAS_Z and not NORM_BEFORE_GATE,
                     HAS_Z and NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS, HAS_RES)

#: Chunk width of the range rescue's passes: narrow, so the rarely taken rescue code needs few
#: registers (the kernel's register count is the maximum over all its code, taken or not).
_RESCUE_BLOCK = tl.constexpr(512)


@triton.jit(noinline=True)
def _rescue_row(X, R, Z, W, B, Y, RO, MEAN, RSTD, row, g, M, stride_xm, stride_rm, stride_zm, stride_ym, stride_om,
                col0, eps, GS: tl.constexpr, BLOCK: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                HAS_RES: tl.constexpr, STORE_RES: tl.constexpr):
    """The range rescue of one row of group g, known to be out of range, from memory in narrow chunks:
    max |x|, the statistics of x / scale (chunks merged as in _chunked_stats), then y."""
    RB: tl.constexpr = BLOCK if BLOCK < _RESCUE_BLOCK else _RESCUE_BLOCK
    NC: tl.constexpr = (GS + RB - 1) // RB
    rows64 = (row + tl.arange(0, 1)).to(tl.int64)
    row_ok = rows64 < M
    stat = g.to(tl.int64) * M + rows64
    cols = tl.arange(0, RB)
    amax = _chunked_amax(X, R, Z, rows64, row_ok, stride_xm, stride_rm, stride_zm, col0, cols,
                         GS, RB, NC, GATE_FIRST, SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
    scale, inv = _rescue_scale(amax, eps)
    mean, m2 = _chunked_stats(X, R, Z, rows64, row_ok, stride_xm, stride_rm, stride_zm, col0, cols, inv,
                              GS, RB, NC, GATE_FIRST, IS_RMS, SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
    rstd, rstd_x = _rescued_rstd(m2 / GS, eps, scale, inv)
    if not IS_RMS:
        tl.store(MEAN + stat, mean * scale, mask=row_ok)
    tl.store(RSTD + stat, rstd, mask=row_ok)
    _write_chunked(X, R, Z, W, B, Y, RO, rows64, row_ok, stride_xm, stride_rm, stride_zm, stride_ym, stride_om,
                   col0, cols, inv, mean, rstd_x, GS, RB, NC,
                   HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE, BF16_BY_BITS, HAS_RES, STORE_RES)


@triton.jit
def _chunk_of_x(X, R, Z, rows64, mask, stride_xm, stride_rm, stride_zm, col0, offs,
                GATE_FIRST: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                HAS_RES: tl.constexpr):
    """One chunk of the normalised input: s (x, or x + residual), or s * act(z) when the gate comes first."""
    x = _load_input(X, R, rows64, mask, stride_xm, stride_rm, col0, offs, HAS_RES, BF16_BY_BITS)
    if GATE_FIRST:
        z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, offs), mask, BF16_BY_BITS)
        x = x * _gate_value(z, SIGMOID_GATE)
    return x


@triton.jit
def _chunked_stats(X, R, Z, rows64, row_ok, stride_xm, stride_rm, stride_zm, col0, cols, inv,
                   GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GATE_FIRST: tl.constexpr,
                   IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                   HAS_RES: tl.constexpr):
    """(mean, M2 = sum of squared deviations) of a wide group of x * inv, chunk by chunk: each chunk's
    (mean, M2) is exact two-pass in registers and the chunks are merged (Chan et al.), which keeps
    the variance free of E[x^2] - E[x]^2. RMSNorm: mean 0 and M2 = sum of squares."""
    run_mean = tl.zeros([inv.shape[0]], dtype=tl.float32)
    run_m2 = tl.zeros([inv.shape[0]], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        col_ok = offs < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _chunk_of_x(X, R, Z, rows64, mask, stride_xm, stride_rm, stride_zm, col0, offs,
                        GATE_FIRST, SIGMOID_GATE, BF16_BY_BITS, HAS_RES) * inv[:, None]
        if IS_RMS:
            run_m2 += tl.sum(x * x, axis=1)
        else:
            n_a = c * BLOCK * 1.0  # elements merged so far (float: the weights below are fp32)
            n_b = tl.minimum(GS - c * BLOCK, BLOCK) * 1.0
            mean_b = tl.sum(x, axis=1) / n_b
            d = tl.where(col_ok[None, :], x - mean_b[:, None], 0.0)
            m2_b = tl.sum(d * d, axis=1)
            delta = mean_b - run_mean
            n_ab = n_a + n_b
            run_mean = run_mean + delta * (n_b / n_ab)
            run_m2 = run_m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
    return run_mean, run_m2


@triton.jit
def _chunked_amax(X, R, Z, rows64, row_ok, stride_xm, stride_rm, stride_zm, col0, cols,
                  GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GATE_FIRST: tl.constexpr,
                  SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, HAS_RES: tl.constexpr):
    """max |x| (x * act(z) when the gate comes first) over a wide group, chunk by chunk."""
    amax = tl.zeros([row_ok.shape[0]], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        mask = row_ok[:, None] & (offs < GS)[None, :]
        x = _chunk_of_x(X, R, Z, rows64, mask, stride_xm, stride_rm, stride_zm, col0, offs, GATE_FIRST,
                        SIGMOID_GATE, BF16_BY_BITS, HAS_RES)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    return amax


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

@triton.jit
def _bwd_terms(
    DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, offs,
    GS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """Load one [ROWS, BLOCK] chunk and return (x, act, dact, xhat, g, wdy, dz_after, mask).

    g = dL/d(xhat * w + b); dz_after is dz when the gate comes after the norm (else unused).
    Padded lanes carry x = z = dy = w = 0, so xhat, g and wdy are 0 there.
    """
    col_ok = offs < GS
    mask = row_ok[:, None] & col_ok[None, :]
    x = _load_f32(_tile_ptrs(X, rows64, stride_xm, col0, offs), mask, BF16_BY_BITS)
    dy = _load_f32(_tile_ptrs(DY, rows64, stride_dym, col0, offs), mask, BF16_BY_BITS)
    w = _load_f32(W + col0 + offs, col_ok, BF16_BY_BITS)
    act = x  # placeholders when there is no gate (never used then)
    dact = x
    dz_after = x
    xc = x
    if HAS_Z:
        z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, offs), mask, BF16_BY_BITS)
        act, dact = _gate(z, SIGMOID_GATE)
        if not NORM_BEFORE_GATE:
            xc = x * act
    if IS_RMS:
        xhat = xc * rstd[:, None]
    else:
        xhat = tl.where(col_ok[None, :], (xc - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_Z and NORM_BEFORE_GATE:
        y_pre = xhat * w[None, :]
        if HAS_BIAS:
            y_pre = y_pre + _load_f32(B + col0 + offs, col_ok, BF16_BY_BITS)[None, :]
        dz_after = dy * y_pre * dact
        g = dy * act
    wdy = g * w[None, :]
    return x, act, dact, xhat, g, wdy, dz_after, mask


@triton.jit
def _bwd_store(
    DX, DZ, dxc, x, act, dact, dz_after, rows64, stride_dxm, stride_dzm, col0, offs, mask,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, NEED_DX: tl.constexpr, NEED_DZ: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """Store dx (and dz) for one chunk, given dxc = dL/dxc."""
    if HAS_Z and not NORM_BEFORE_GATE:
        if NEED_DZ:
            _store_out(_tile_ptrs(DZ, rows64, stride_dzm, col0, offs), dxc * x * dact, mask, BF16_BY_BITS)
        dxc = dxc * act
    if HAS_Z and NORM_BEFORE_GATE and NEED_DZ:
        _store_out(_tile_ptrs(DZ, rows64, stride_dzm, col0, offs), dz_after, mask, BF16_BY_BITS)
    if NEED_DX:
        _store_out(_tile_ptrs(DX, rows64, stride_dxm, col0, offs), dxc, mask, BF16_BY_BITS)


@triton.jit
def _bwd_tile_rows(MEAN, RSTD, tile, g, M, ROWS: tl.constexpr, IS_RMS: tl.constexpr):
    """(rows as int64, which are < M, mean, rstd) of a backward row tile of group g (mean: rstd, unused, for RMS)."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    stat = g.to(tl.int64) * M + rows64
    rstd = tl.load(RSTD + stat, mask=row_ok, other=0.0)
    if IS_RMS:
        mean = rstd  # unused
    else:
        mean = tl.load(MEAN + stat, mask=row_ok, other=0.0)
    return rows64, row_ok, mean, rstd


@triton.jit
def _bwd_three_parts(
    DY, X, Z, W, B, MEAN, RSTD, DX, DZ, DW_PART, DB_PART, M, stride_dym, stride_xm, stride_zm, stride_dxm, stride_dzm,
    pid, g, num_progs, part_row, GS: tl.constexpr, ROWS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr, IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """bwd_kernel's single-tile loop for a group held as three unpadded [ROWS, GS / 3] tiles: each part's terms
    (_bwd_terms), the row sums c1 = mean(xhat * w dy), c2 = mean(w dy) over the three, then each part's dx, dz."""
    PW: tl.constexpr = GS // 3
    pcols = tl.arange(0, PW)
    col0 = g * GS
    dw0 = tl.zeros([ROWS, PW], dtype=tl.float32)
    dw1 = tl.zeros([ROWS, PW], dtype=tl.float32)
    dw2 = tl.zeros([ROWS, PW], dtype=tl.float32)
    db0 = tl.zeros([ROWS, PW], dtype=tl.float32)
    db1 = tl.zeros([ROWS, PW], dtype=tl.float32)
    db2 = tl.zeros([ROWS, PW], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, ROWS), num_progs):
        rows64, row_ok, mean, rstd = _bwd_tile_rows(MEAN, RSTD, tile, g, M, ROWS, IS_RMS)
        x0, act0, dact0, xhat0, gy0, wdy0, dza0, mask = _bwd_terms(
            DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, pcols,
            GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
        x1, act1, dact1, xhat1, gy1, wdy1, dza1, mask = _bwd_terms(
            DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, PW + pcols,
            GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
        x2, act2, dact2, xhat2, gy2, wdy2, dza2, mask = _bwd_terms(
            DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, 2 * PW + pcols,
            GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
        if NEED_DW:
            dw0 += gy0 * xhat0
            dw1 += gy1 * xhat1
            dw2 += gy2 * xhat2
        if NEED_DB:
            db0 += gy0
            db1 += gy1
            db2 += gy2
        c1 = (tl.sum(xhat0 * wdy0, axis=1) + tl.sum(xhat1 * wdy1, axis=1) + tl.sum(xhat2 * wdy2, axis=1)) / GS
        c2 = (tl.sum(wdy0, axis=1) + tl.sum(wdy1, axis=1) + tl.sum(wdy2, axis=1)) / GS
        _bwd_store(DX, DZ, _bwd_dxc(wdy0, xhat0, c1, c2, rstd, IS_RMS), x0, act0, dact0, dza0, rows64, stride_dxm,
                   stride_dzm, col0, pcols, mask, HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
        _bwd_store(DX, DZ, _bwd_dxc(wdy1, xhat1, c1, c2, rstd, IS_RMS), x1, act1, dact1, dza1, rows64, stride_dxm,
                   stride_dzm, col0, PW + pcols, mask, HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
        _bwd_store(DX, DZ, _bwd_dxc(wdy2, xhat2, c1, c2, rstd, IS_RMS), x2, act2, dact2, dza2, rows64, stride_dxm,
                   stride_dzm, col0, 2 * PW + pcols, mask, HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
    if NEED_DW:
        tl.store(DW_PART + part_row + pcols, tl.sum(dw0, axis=0))
        tl.store(DW_PART + part_row + PW + pcols, tl.sum(dw1, axis=0))
        tl.store(DW_PART + part_row + 2 * PW + pcols, tl.sum(dw2, axis=0))
    if NEED_DB:
        tl.store(DB_PART + part_row + pcols, tl.sum(db0, axis=0))
        tl.store(DB_PART + part_row + PW + pcols, tl.sum(db1, axis=0))
        tl.store(DB_PART + part_row + 2 * PW + pcols, tl.sum(db2, axis=0))


@triton.jit
def _bwd_dxc(wdy, xhat, c1, c2, rstd, IS_RMS: tl.constexpr):
    """dL/dxc of a tile from the row sums: (w dy - xhat c1 [- c2]) rstd. bwd_kernel's padded paths keep this
    formula inline: through the helper, with c2 reduced first, LayerNorm's compiled order changed (sm_90 SASS)."""
    dxc = wdy - xhat * c1[:, None]
    if not IS_RMS:
        dxc = dxc - c2[:, None]
    return dxc * rstd[:, None]


@triton.jit
def _bwd_chunk_write(
    DY, X, Z, W, B, DX, DZ, mean, rstd, c1, c2, rows64, row_ok, stride_dym, stride_xm, stride_zm, stride_dxm,
    stride_dzm, col0, offs, GS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr, IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DZ: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """A wide group's second pass over one chunk of a row tile, given the row sums' means c1, c2: stores its dx
    (and dz) and returns its (g * xhat, g), the chunk's dweight / dbias contributions per element."""
    x, act, dact, xhat, gy, wdy, dz_after, mask = _bwd_terms(
        DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, offs,
        GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
    dxc = wdy - xhat * c1[:, None]
    if not IS_RMS:
        dxc = dxc - c2[:, None]
    dxc = dxc * rstd[:, None]
    _bwd_store(DX, DZ, dxc, x, act, dact, dz_after, rows64, stride_dxm, stride_dzm, col0, offs, mask,
               HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
    return gy * xhat, gy


@triton.jit
def bwd_kernel(
    DY, X, Z, W, B, MEAN, RSTD, DX, DZ, DW_PART, DB_PART,
    M, stride_dym, stride_xm, stride_zm, stride_dxm, stride_dzm, N,
    GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, USE_PDL: tl.constexpr, GROUPS_FASTEST: tl.constexpr, PARTS: tl.constexpr = 1,
):
    """dx, dz and this program's partial rows of dweight / dbias over the row tiles it takes (persistent). PARTS = 3:
    a group of three power-of-two parts held as three unpadded tiles (launch.fwd_parts), as in fwd_kernel.

    A group wider than BLOCK is read in NUM_CHUNKS chunks, twice per row tile (the row sums, then dx and dz, the
    second pass from L2). With two chunks (groups up to 2 * MAX_BLOCK) each chunk's dweight / dbias sums stay in
    registers across the program's tiles and its partial row is written once at the end; with more, they are
    added into the partial row in memory once per tile and chunk (read-modify-write: the launcher zeroes it)."""
    _pdl_prologue(USE_PDL)
    pid, g = _tile_and_group(GROUPS_FASTEST)
    num_progs = tl.num_programs(1 if GROUPS_FASTEST else 0)
    col0 = g * GS
    cols = tl.arange(0, BLOCK)
    num_tiles = tl.cdiv(M, ROWS)
    part_row = pid.to(tl.int64) * N + col0  # this program's row of partials (dweight and dbias alike)
    if NUM_CHUNKS == 1 and PARTS == 3:
        _bwd_three_parts(DY, X, Z, W, B, MEAN, RSTD, DX, DZ, DW_PART, DB_PART, M, stride_dym, stride_xm, stride_zm,
                         stride_dxm, stride_dzm, pid, g, num_progs, part_row, GS, ROWS, HAS_Z, HAS_BIAS,
                         NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, NEED_DX, NEED_DZ, NEED_DW, NEED_DB, BF16_BY_BITS)
        return
    if NUM_CHUNKS <= 2:  # the partial sums in registers (two chunks: the second one's in dw_hi / db_hi)
        dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    if NUM_CHUNKS == 2:
        dw_hi = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        db_hi = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for tile in range(pid, num_tiles, num_progs):
        rows64, row_ok, mean, rstd = _bwd_tile_rows(MEAN, RSTD, tile, g, M, ROWS, IS_RMS)
        if NUM_CHUNKS == 1:
            x, act, dact, xhat, gy, wdy, dz_after, mask = _bwd_terms(
                DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, cols,
                GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
            if NEED_DW:
                dw_acc += gy * xhat
            if NEED_DB:
                db_acc += gy
            c1 = tl.sum(xhat * wdy, axis=1) / GS
            dxc = wdy - xhat * c1[:, None]
            if not IS_RMS:
                dxc = dxc - (tl.sum(wdy, axis=1) / GS)[:, None]
            dxc = dxc * rstd[:, None]
            _bwd_store(DX, DZ, dxc, x, act, dact, dz_after, rows64, stride_dxm, stride_dzm, col0, cols, mask,
                       HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
        else:
            # Wide group: pass 1 reduces mean(xhat * wdy) and mean(wdy) over chunks, pass 2 writes.
            s1 = tl.zeros([ROWS], dtype=tl.float32)
            s2 = tl.zeros([ROWS], dtype=tl.float32)
            for c in range(NUM_CHUNKS):
                offs = c * BLOCK + cols
                x, act, dact, xhat, gy, wdy, dz_after, mask = _bwd_terms(
                    DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, offs,
                    GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
                s1 += tl.sum(xhat * wdy, axis=1)
                s2 += tl.sum(wdy, axis=1)
            c1 = s1 / GS
            c2 = s2 / GS
            if NUM_CHUNKS == 2:
                gx, gb = _bwd_chunk_write(
                    DY, X, Z, W, B, DX, DZ, mean, rstd, c1, c2, rows64, row_ok, stride_dym, stride_xm, stride_zm,
                    stride_dxm, stride_dzm, col0, cols, GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS,
                    SIGMOID_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
                dw_acc += gx
                db_acc += gb
                gx, gb = _bwd_chunk_write(
                    DY, X, Z, W, B, DX, DZ, mean, rstd, c1, c2, rows64, row_ok, stride_dym, stride_xm, stride_zm,
                    stride_dxm, stride_dzm, col0, BLOCK + cols, GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS,
                    SIGMOID_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
                dw_hi += gx
                db_hi += gb
            else:
                for c in range(NUM_CHUNKS):
                    offs = c * BLOCK + cols
                    gx, gb = _bwd_chunk_write(
                        DY, X, Z, W, B, DX, DZ, mean, rstd, c1, c2, rows64, row_ok, stride_dym, stride_xm,
                        stride_zm, stride_dxm, stride_dzm, col0, offs, GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE,
                        IS_RMS, SIGMOID_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
                    col_ok = offs < GS
                    # This program owns its partial row: read-modify-write is race-free and ordered.
                    if NEED_DW:
                        acc = tl.load(DW_PART + part_row + offs, mask=col_ok, other=0.0)
                        tl.store(DW_PART + part_row + offs, acc + tl.sum(gx, axis=0), mask=col_ok)
                    if NEED_DB:
                        acc = tl.load(DB_PART + part_row + offs, mask=col_ok, other=0.0)
                        tl.store(DB_PART + part_row + offs, acc + tl.sum(gb, axis=0), mask=col_ok)
    if NUM_CHUNKS <= 2:
        col_ok = cols < GS
        if NEED_DW:
            tl.store(DW_PART + part_row + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if NEED_DB:
            tl.store(DB_PART + part_row + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    if NUM_CHUNKS == 2:
        hi_ok = BLOCK + cols < GS
        if NEED_DW:
            tl.store(DW_PART + part_row + BLOCK + cols, tl.sum(dw_hi, axis=0), mask=hi_ok)
        if NEED_DB:
            tl.store(DB_PART + part_row + BLOCK + cols, tl.sum(db_hi, axis=0), mask=hi_ok)


@triton.jit
def sum_partials_kernel(
    DW_PART, DB_PART, DW, DB, P, N,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BF16_BY_BITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """dweight[n] = sum over p of partials[p, n], in a fixed order (tiles of BLOCK_P rows, then a tree)."""
    _pdl_prologue(USE_PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc_w = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        if NEED_DW:
            acc_w += tl.load(DW_PART + offs, mask=mask, other=0.0)
        if NEED_DB:
            acc_b += tl.load(DB_PART + offs, mask=mask, other=0.0)
    if NEED_DW:
        _store_out(DW + cols, tl.sum(acc_w, axis=0), col_ok, BF16_BY_BITS)
    if NEED_DB:
        _store_out(DB + cols, tl.sum(acc_b, axis=0), col_ok, BF16_BY_BITS)


# ---------------------------------------------------------------------------
# Fused quantized forward (docs/design.md, "Quantized output")
# ---------------------------------------------------------------------------
# fwd_quant_kernel reads x and z once, normalises in fp32 registers, and writes q (1 byte per feature)
# and one float32 scale per block: no y in memory. Per row and quant block of K features, exactly the
# steps of gatednorm.numerics.quantize_blocks, each one correctly rounded fp32 operation:
#
#     amax = max |y|,  scale = max(amax / qmax, 2^-126)  (ue8m0: up to a power of two),
#     q = round_half_even(clamp(y / scale, -qmax, qmax));  a block holding NaN/Inf: scale NaN/Inf, q NaN / 0
#
# so the fused q and scales are bit for bit those of the generic path given the same y. The tile is
# [ROWS, NG, GB]: ROWS rows x NG norm groups of GS features (GB lanes, GS rounded up to a power of two).
# Its quant blocks are the same values seen as [ROWS, NQ, KB]: one block per tile (K = NG * GS, several
# whole groups, or K = GS) or NQ blocks of K inside one group. The launcher sends other layouts to the
# generic path.
#
# The scales and q must be the correctly rounded quotients (Triton's `/` may compile to an approximate division on
# GPUs), yet no step divides: div_rn costs a dozen instructions and a slow-path branch, and at 8192x128 (one wave,
# issue-bound) every instruction shows. Scales are RN(amax / QMAX) by a split reciprocal of the constant and one
# exact correction (_divided_by_qmax); q = RN(y / scale) by the scale's correctly rounded reciprocal, a MUFU
# estimate and one Newton step (_reciprocal_in_1_2), and the same correction per element (_scaled_quotient); ue8m0
# scales are powers of two: y times the exact reciprocal is the same quotient. tests/test_quant.py, run on a GPU,
# checks both against IEEE division for every float32 amax and every scale significand.
# Rounding to an integer uses the 1.5 * 2^23 trick: adding it to |v| < 2^22 leaves no fraction bits, so the fp32
# add itself rounds half to even.

_QUANT_SCALE_MIN = tl.constexpr(QUANT_SCALE_MIN)
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23
#: The bits of the scale written for a row whose statistics are out of range until _quant_rescue_rows redoes
#: it: a quiet NaN with a payload no arithmetic produces (GPUs write 0x7FFFFFFF, the kernels 0x7FC00000), so
#: a NaN scale of the formula's own is never taken for one to redo.
_RESCUE_MARK = tl.constexpr(0x7FC00BAD)


@triton.jit
def _round_through(y, ROUND_TO: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """fp32 y rounded to nearest even in bf16 (ROUND_TO 1) or fp16 (2) and widened back (0: y itself)."""
    if ROUND_TO == 1:
        if BF16_BY_BITS:  # the interpreter's fp32 -> bf16 truncates: round on the bits (as _store_out does)
            bits = y.to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            nan = ((bits >> 16) << 16) | 0x400000  # NaN stays a (quiet) NaN
            return tl.where(y != y, nan, rounded).to(tl.float32, bitcast=True)
        else:
            return y.to(tl.bfloat16).to(tl.float32)
    elif ROUND_TO == 2:
        return y.to(tl.float16).to(tl.float32)
    else:
        return y


@triton.jit
def _fp8_e4m3_bits(v, FNUZ: tl.constexpr):
    """The float8 e4m3fn (FNUZ: e4m3fnuz) bits, as int32 in [0, 255], of fp32 v rounded to nearest even.

    v must be finite and round to the format's range: |v| below its largest value plus half a step there
    (464 for e4m3fn, 248 for e4m3fnuz; _quantize's quotients are within 2^-23 of it). Used where the hardware
    conversion is missing (e4m3fnuz on NVIDIA GPUs) or wrong (Triton's interpreter rounds fp32 -> fp8
    incorrectly). e4m3fn: exponent bias 7, subnormal spacing 2^-9, -0 kept; e4m3fnuz: bias 8, spacing
    2^-10, no -0 (0x80 is its NaN).
    """
    # With exponent bias BIAS (7; fnuz 8): REBIAS = (127 - BIAS) << 3, the smallest normal 2^(1 - BIAS),
    # subnormal spacing 2^(-BIAS - 2) (SUB_SCALE is its inverse).
    REBIAS: tl.constexpr = 952 if FNUZ else 960
    MIN_NORMAL: tl.constexpr = 0.0078125 if FNUZ else 0.015625
    SUB_SCALE: tl.constexpr = 1024.0 if FNUZ else 512.0
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # bit 31 -> bit 7
    mag = bits & 0x7FFFFFFF
    # Normal results: round the 23 mantissa bits to 3, ties to even, on the bits (a carry bumps the
    # exponent, which is right); then re-bias the exponent field: (e - 127 + BIAS) << 3 | m3.
    rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
    normal = (rounded >> 20) - REBIAS
    # Subnormal results: the multiple of the spacing nearest |v|, ties to even; the code is that
    # multiple (8 lands exactly on the smallest normal, whose code is 8 too).
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a * SUB_SCALE + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int32)
    code = tl.where(a < MIN_NORMAL, sub, normal)
    if FNUZ:
        sign = tl.where(code == 0, 0, sign)
    return code | sign


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (tl.max's maxnum ignores it): a block's amax is NaN iff it holds a NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def _float32_reciprocal_parts(d: float) -> tuple[float, float]:
    """(hi, lo) with hi = RN32(1 / d) and lo = RN32(1 / d - hi), from the exact rational 1 / d (float(Fraction) is
    correctly rounded to float64; the float32 candidates on either side of it are then compared exactly)."""
    def rn32(x: fractions.Fraction) -> float:
        f = struct.unpack("<f", struct.pack("<f", float(x)))[0]
        bits = struct.unpack("<i", struct.pack("<f", f))[0]
        near = [struct.unpack("<f", struct.pack("<i", b))[0] for b in (bits - 1, bits, bits + 1)]
        return min(near, key=lambda c: abs(fractions.Fraction(c) - x))

    exact = 1 / fractions.Fraction(d)
    hi = rn32(exact)
    return hi, rn32(exact - fractions.Fraction(hi))


# 1 / QMAX of e4m3fn (448), e4m3fnuz (240) and int8 (127) in two float32 parts, for _divided_by_qmax
_INV_448_HI, _INV_448_LO = (tl.constexpr(v) for v in _float32_reciprocal_parts(448.0))
_INV_240_HI, _INV_240_LO = (tl.constexpr(v) for v in _float32_reciprocal_parts(240.0))
_INV_127_HI, _INV_127_LO = (tl.constexpr(v) for v in _float32_reciprocal_parts(127.0))
#: RN(1 / (2 - 2^-23)) = 0.5 + 2^-24: the reciprocal of the one significand (all ones) where a Newton step from a
#: reciprocal within one ulp may miss the correctly rounded one (Markstein's reciprocal theorem's exception)
_S1_ALL_ONES = tl.constexpr(2.0 - 2.0**-23)
_RCP_S1_ALL_ONES = tl.constexpr(0.5 + 2.0**-24)


@triton.jit
def _divided_by_qmax(amax, QMAX: tl.constexpr):
    """RN(amax / QMAX) for amax >= 0 (or NaN, or +Inf) and QMAX one of 448, 240, 127, without a division.

    With hi + lo = 1 / QMAX within 2^-48 relative (both float32), q0 = RN(amax hi + RN(amax lo)) is a faithful
    rounding of t = amax / QMAX; the residual e = fma(-q0, QMAX, amax) is then exact and RN(q0 + e hi) = RN(t)
    (Markstein's theorem, as in _scaled_quotient). Where q0 would underflow the caller's floor (2^-126) takes
    over; tests/test_quant.py on a GPU compares every non-negative float32 amax with IEEE division. +Inf: the residual
    is NaN, so Inf is passed through.
    """
    if QMAX == 448.0:
        hi, lo = _INV_448_HI, _INV_448_LO
    elif QMAX == 240.0:
        hi, lo = _INV_240_HI, _INV_240_LO
    else:
        tl.static_assert(QMAX == 127.0, "_divided_by_qmax: QMAX must be 448, 240 or 127")
        hi, lo = _INV_127_HI, _INV_127_LO
    q0 = tl.fma(amax, hi, amax * lo)
    q = tl.fma(tl.fma(-q0, QMAX, amax), hi, q0)
    return tl.where(amax == float("inf"), amax, q)


@triton.jit
def _reciprocal_in_1_2(s1):
    """RN(1 / s1) for s1 in [1, 2) (a scale's significand), without a division.

    r0 = the MUFU reciprocal (rcp.approx.ftz: within one ulp), then one Newton step r = RN(r0 + r0 RN(1 - s1 r0))
    (the first product exact by fma): the correctly rounded reciprocal for every s1 but 2 - 2^-23 (Markstein),
    whose RN(1 / s1) is a constant. tests/test_quant.py on a GPU compares all 2^23 significands with IEEE
    division. Under Triton's interpreter and on ROCm: div_rn.
    """
    if _PTX_MUFU:
        r0 = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [s1],
                                       dtype=tl.float32, is_pure=True, pack=1)
        r = tl.fma(tl.fma(-s1, r0, 1.0), r0, r0)
        return tl.where(s1 == _S1_ALL_ONES, _RCP_S1_ALL_ONES, r)
    else:
        return tl.math.div_rn(tl.full(s1.shape, 1.0, tl.float32), s1)


@triton.jit
def _scaled_quotient(y, scale, SIGNED_ZEROS: tl.constexpr = True):
    """RN(y / scale) per element, without a division per element (not clamped: see _quantize).

    ``scale`` [..., 1] is a normal float32 in [2^-126, 2^122) (fwd_quant_kernel's finite scales), or NaN or
    +Inf: then every quotient of the block is NaN (on GPUs the canonical, positive NaN, which the hardware fp8
    conversion turns into the format's NaN code, 0x7F, with no select per element). Equal bits to
    tl.math.div_rn(y, scale) wherever |y / scale| >= 2^-100; below that both are under 2^-90 with y's sign
    (any fp8 / int8 code: +-0).

    Per block: s1 = scale * 2^-e in [1, 2) (exact, on the bits), r = RN(1 / s1), r_lo = RN(RN(1 - s1 r) r)
    (r + r_lo is 1 / s1 within 2^-45 relative). Per element, a = y 2^-e (exact while |a| >= 2^-126, i.e.
    for every quotient that matters) and a / s1 = y / scale:

    * q0 = RN(a r + RN(a r_lo)) is within |t| 2^-45 + 1/2 ulp of t = a / s1, so a faithful rounding of t;
    * e = fma(-q0, s1, a) is then exact and q = RN(q0 + e r) = RN(t): Markstein's theorem (IBM J. Res. Dev.
      34 (1990); J.-M. Muller et al., Handbook of Floating-Point Arithmetic, "Markstein's theorem"): q0
      faithful, r within relative 2^-24 of 1 / s1, no underflow (s1 in [1, 2), |a| >= 2^-100: the
      residual's last bit is >= 2^-23 ulp(q0) >= 2^-146).

    Signed throughout (every step is an RN of an odd function of y, so a nonzero result has y's sign), then
    a's sign bit (y's, as p2 > 0) copied onto the result, one bit-select: zeros take y's sign too (-0 / scale
    = -0), which the arithmetic alone does not guarantee (an exact cancellation gives +0, and compilers may
    rewrite negations around zeros; on the H200 a -0 came out +0 without the copy). Six operations per element;
    five without SIGNED_ZEROS (int8 codes, which have no -0: the copy is left out, and a zero's sign is any).
    tests/test_quant.py checks the bits against float32 division (midpoints of the fp8 and int8 grids and
    their neighbours, every binade of the scales, signed zeros).
    """
    sb = scale.to(tl.int32, bitcast=True)
    p2 = ((254 << 23) - (sb & 0x7F800000)).to(tl.float32, bitcast=True)  # 2^-e (e <= 121: normal)
    p2 = tl.where(scale <= _FP32_MAX, p2, float("nan"))  # a NaN or Inf scale: every quotient NaN
    s1 = ((sb & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # scale * 2^-e, in [1, 2)
    neg_s1 = -s1  # per block: -q0 would be an op per element (Triton negates as 0 - q0, which no fma absorbs)
    r = _reciprocal_in_1_2(s1)
    r_lo = tl.fma(neg_s1, r, 1.0) * r
    a = y * p2
    q0 = tl.fma(a, r, a * r_lo)
    q = tl.fma(tl.fma(q0, neg_s1, a), r, q0)
    if not SIGNED_ZEROS:  # int8 codes: -0 and +0 are the same code
        return q
    return ((q.to(tl.int32, bitcast=True) & 0x7FFFFFFF) | (a.to(tl.int32, bitcast=True) & -0x80000000)).to(
        tl.float32, bitcast=True)


@triton.jit
def _quantize(yq, QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr, UE8M0: tl.constexpr,
              FP8_BY_BITS: tl.constexpr):
    """(codes, scale) of the quant blocks along yq's last axis (any rank): the steps above, per block. codes
    are int8, float8e4nv (the hardware conversion), or uint8 holding the fp8 bits (FP8_BY_BITS); scale has
    yq's shape without its last axis."""
    LAST: tl.constexpr = len(yq.shape) - 1  # explicit: Triton's interpreter mishandles axis -1 here
    amax = tl.reduce(tl.abs(yq), LAST, _max_nan)  # NaN iff the block holds a NaN (one pass, no separate NaN scan)
    scale, has_nan = _scale_of_blocks(amax, QMAX, UE8M0)
    return _codes_of_blocks(yq, scale, has_nan, QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)


@triton.jit
def _scale_of_blocks(amax, QMAX: tl.constexpr, UE8M0: tl.constexpr):
    """(the scale the codes divide by, whether it is NaN) of blocks of largest |y| amax (NaN for a block
    holding a NaN). With UE8M0 a NaN scale has turned +Inf here; _codes_of_blocks gives it back its NaN."""
    scale = tl.maximum(_divided_by_qmax(amax, QMAX), _QUANT_SCALE_MIN, propagate_nan=tl.PropagateNan.ALL)
    has_nan = scale != scale
    if UE8M0:  # up to a power of two on the bits (exact; Inf stays Inf): numerics.ue8m0_round_up
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale, has_nan


@triton.jit
def _codes_of_blocks(yq, scale, has_nan, QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr,
                     UE8M0: tl.constexpr, FP8_BY_BITS: tl.constexpr):
    """(codes, scale as stored) of the blocks along yq's last axis, given their scales from _scale_of_blocks
    (scale and has_nan: yq's shape without its last axis)."""
    LAST: tl.constexpr = len(yq.shape) - 1
    scale = tl.where(has_nan, float("nan"), scale)  # one NaN for every NaN block (the generic path's)
    block_finite = scale <= _FP32_MAX  # False for NaN and Inf
    # v: y / scale, NaN throughout a non-finite block (per block, so that the hardware fp8 conversion needs no
    # select per element)
    if UE8M0:
        # 1 / scale is a power of two too (2^-126 <= scale < 2^127), built from the exponent bits: y * inv
        # is then exactly y / scale, without a division per element
        inv = ((254 << 23) - scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
        v = yq * tl.expand_dims(tl.where(block_finite, inv, float("nan")), LAST)
    else:  # RN(y / scale), by a reciprocal and one exact correction (no division per element)
        v = _scaled_quotient(yq, tl.expand_dims(scale, LAST), SIGNED_ZEROS=not INT8)
    finite = tl.expand_dims(block_finite, LAST)
    # No clamp to [-QMAX, QMAX]: it never binds. |y| <= amax and scale >= RN(amax / QMAX) >= amax / QMAX *
    # (1 - 2^-24) (ue8m0 and the floor only raise it), so |RN(y / scale)| <= QMAX (1 + 2^-23), which every
    # conversion below rounds to QMAX (the midpoint to the next value up lies at least 0.39% above QMAX: 127.5
    # for int8, 464 for e4m3fn, 248 for e4m3fnuz): two ops per element saved.
    if INT8:
        # v + 1.5 * 2^23 rounds v half to even onto the integers, and for |k| < 2^22 its bits are those of
        # 1.5 * 2^23 plus k: the low byte is k in two's complement, i.e. the int8 code (no float -> int
        # conversion). A non-finite block's codes are 0.
        qv = tl.where(finite, (v + _RNE_MAGIC).to(tl.int32, bitcast=True), 0).to(tl.int8)
    else:
        if FP8_BY_BITS:
            code = _fp8_e4m3_bits(tl.where(finite, v, 0.0), FNUZ)
            NAN_CODE: tl.constexpr = 0x80 if FNUZ else 0x7F  # the format's NaN
            qv = tl.where(finite, code, NAN_CODE).to(tl.uint8)
        else:
            # e4m3fn in hardware (cvt.rn.satfinite, two values per instruction): a (positive) NaN becomes
            # 0x7F, the format's NaN, so a non-finite block, whose v is the GPU's canonical NaN throughout,
            # needs no code of its own
            qv = v.to(tl.float8e4nv)
    return qv, scale


@triton.jit
def _mark_for_rescue(scale, bad):
    """scale with _RESCUE_MARK's bits where bad (a where on the bits: a NaN constant's payload may not survive)."""
    return tl.where(bad, _RESCUE_MARK, scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _marked(s):
    """Where the scales s hold _RESCUE_MARK's bits."""
    return s.to(tl.int32, bitcast=True) == _RESCUE_MARK


@triton.jit
def _block_scale_ptrs(S, rows64, t, blk, NQ_REAL: tl.constexpr, stride_sm, stride_sg):
    """Where the scales of tile t's quant blocks ``blk`` (< NQ_REAL) go for rows ``rows64`` (broadcast): column
    t * NQ_REAL + blk. The one place the writers and the rescue's readers agree on."""
    return S + rows64 * stride_sm + (t * NQ_REAL + blk).to(tl.int64) * stride_sg


@triton.jit
def _quant_tile(X, Z, W, B, Q, S, rows, t, M, stride_xm, stride_zm, stride_qm, stride_sm, stride_sg, eps,
                GS: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr, KB: tl.constexpr, NQ: tl.constexpr,
                NQ_REAL: tl.constexpr, ROWS: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
                QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr, UE8M0: tl.constexpr,
                ROUND_TO: tl.constexpr, FP8_BY_BITS: tl.constexpr, BF16_BY_BITS: tl.constexpr,
                RESCUE: tl.constexpr, GLO: tl.constexpr):
    """Normalise and quantize ``rows`` ([ROWS]) of tile t (features t * NG * GS onwards): write their codes
    and scales. Rows whose statistics are out of range (see "Range rescue"): RESCUE redoes them here, in
    registers (the tile is there); else their scales get _RESCUE_MARK's bits, to be redone by
    _quant_rescue_rows (with RESCUE, one row at a time). Returns whether any row was out of range (int32 0/1).
    GLO > 0 (NG = 1): the group is two power-of-two parts, read as two unpadded tiles (see _split_stats)."""
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, GB)
    col_ok = cols < GS
    GATE_FIRST: tl.constexpr = HAS_Z and not NORM_BEFORE_GATE
    GATE_AFTER: tl.constexpr = HAS_Z and NORM_BEFORE_GATE
    if NG == 1 and GLO > 0:
        # A split group (see _split_stats): the steps below on its two parts, then NQ_REAL quant blocks of KB over
        # them (KB divides both: a power of two dividing GS divides its lower part), or one block over both (NQ 1).
        GHI: tl.constexpr = GS - GLO
        col0 = t * GS
        part_mask = row_ok[:, None]
        hi = tl.arange(0, GHI)
        lo = GHI + tl.arange(0, GLO)
        xh, gate_h = _gated_input(X, Z, rows64, part_mask, stride_xm, stride_zm, col0, hi, HAS_Z, GATE_FIRST,
                                  SIGMOID_GATE, BF16_BY_BITS)
        xl, gate_l = _gated_input(X, Z, rows64, part_mask, stride_xm, stride_zm, col0, lo, HAS_Z, GATE_FIRST,
                                  SIGMOID_GATE, BF16_BY_BITS)
        _, xmh, xml, var_eps = _split_stats(xh, xl, eps, GS, IS_RMS)
        rstd = 1.0 / tl.sqrt_rn(var_eps)
        bad = _rstd_out_of_range(rstd) & row_ok
        any_bad = tl.max(bad.to(tl.int32), axis=0)
        if RESCUE:
            if any_bad != 0:  # the range rescue in registers, as below
                scale_r, inv = _rescue_scale(tl.maximum(tl.max(tl.abs(xh), axis=1), tl.max(tl.abs(xl), axis=1)),
                                             eps)
                _, xmsh, xmsl, var_s = _split_stats(xh * inv[:, None], xl * inv[:, None], 0.0, GS, IS_RMS)
                _, rstd_x = _rescued_rstd(var_s, eps, scale_r, inv)
                xmh = tl.where(bad[:, None], xmsh, xmh)
                xml = tl.where(bad[:, None], xmsl, xml)
                rstd = tl.where(bad, rstd_x, rstd)
        yh = _round_through(_norm_output(W, B, xmh, rstd, gate_h, col0, hi, hi >= 0, HAS_BIAS, GATE_AFTER,
                                         BF16_BY_BITS), ROUND_TO, BF16_BY_BITS)
        yl = _round_through(_norm_output(W, B, xml, rstd, gate_l, col0, lo, lo >= 0, HAS_BIAS, GATE_AFTER,
                                         BF16_BY_BITS), ROUND_TO, BF16_BY_BITS)
        if NQ == 1:
            amax = _max_nan(tl.reduce(tl.abs(yh), 1, _max_nan), tl.reduce(tl.abs(yl), 1, _max_nan))
            scale, has_nan = _scale_of_blocks(amax, QMAX, UE8M0)
            qh, scale_out = _codes_of_blocks(yh, scale, has_nan, QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            ql, _ = _codes_of_blocks(yl, scale, has_nan, QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            if not RESCUE:
                scale_out = _mark_for_rescue(scale_out, bad)
            tl.store(S + rows64 * stride_sm + t * stride_sg, scale_out, mask=row_ok)
        else:
            qh, scale_h = _quantize(tl.reshape(yh, [ROWS, GHI // KB, KB]), QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            ql, scale_l = _quantize(tl.reshape(yl, [ROWS, GLO // KB, KB]), QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            qh = tl.reshape(qh, [ROWS, GHI])
            ql = tl.reshape(ql, [ROWS, GLO])
            if not RESCUE:
                scale_h = _mark_for_rescue(scale_h, bad[:, None])
                scale_l = _mark_for_rescue(scale_l, bad[:, None])
            blk_h = tl.arange(0, GHI // KB)
            blk_l = GHI // KB + tl.arange(0, GLO // KB)
            tl.store(_block_scale_ptrs(S, rows64[:, None], t, blk_h[None, :], NQ_REAL, stride_sm, stride_sg), scale_h,
                     mask=part_mask)
            tl.store(_block_scale_ptrs(S, rows64[:, None], t, blk_l[None, :], NQ_REAL, stride_sm, stride_sg), scale_l,
                     mask=part_mask)
        tl.store(_tile_ptrs(Q, rows64, stride_qm, col0, hi), qh, mask=part_mask)
        tl.store(_tile_ptrs(Q, rows64, stride_qm, col0, lo), ql, mask=part_mask)
    elif NG == 1:
        col0 = t * GS
        mask = row_ok[:, None] & col_ok[None, :]
        # The norm: fwd_kernel's steps on the tile.
        x, gate = _gated_input(X, Z, rows64, mask, stride_xm, stride_zm, col0, cols, HAS_Z, GATE_FIRST, SIGMOID_GATE,
                               BF16_BY_BITS)
        # w (and b) loaded with x and z, not after the reductions (as fwd_kernel's narrow tiles): one memory round
        # trip for a short call after an L2 flush instead of two
        w = _param_tile(W, col0, cols, col_ok, x, BF16_BY_BITS)
        b = _param_tile(B, col0, cols, col_ok, x, BF16_BY_BITS) if HAS_BIAS else 0.0
        _, xm, var_eps = _tile_stats(x, col_ok, eps, GS, GB, IS_RMS)
        rstd = 1.0 / tl.sqrt_rn(var_eps)
        bad = _rstd_out_of_range(rstd) & row_ok
        any_bad = tl.max(bad.to(tl.int32), axis=0)
        if RESCUE:
            # Rows out of range redone divided by a power of two of their max |value| (see "Range rescue");
            # the others keep their bits, so a row's result never depends on its neighbours.
            if any_bad != 0:
                scale_r, inv = _rescue_scale(tl.max(tl.abs(x), axis=1), eps)
                _, xms, var_s = _tile_stats(x * inv[:, None], col_ok, 0.0, GS, GB, IS_RMS)
                _, rstd_x = _rescued_rstd(var_s, eps, scale_r, inv)
                xm = tl.where(bad[:, None], xms, xm)
                rstd = tl.where(bad, rstd_x, rstd)
        y = _round_through(_scale_shift_gate(xm, rstd, w, b, gate, HAS_BIAS, GATE_AFTER), ROUND_TO, BF16_BY_BITS)
        if GB != GS:  # padding lanes must not reach a block's max (rows past M only fill blocks never stored)
            y = tl.where(col_ok[None, :], y, 0.0)
        # The quantization: one block per row (the group), or NQ blocks of KB inside it.
        if NQ == 1:
            qv, scale = _quantize(y, QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            if not RESCUE:
                scale = _mark_for_rescue(scale, bad)
            tl.store(S + rows64 * stride_sm + t * stride_sg, scale, mask=row_ok)
        else:
            qv, scale = _quantize(tl.reshape(y, [ROWS, NQ, KB]), QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
            qv = tl.reshape(qv, [ROWS, GB])
            if not RESCUE:
                scale = _mark_for_rescue(scale, bad[:, None])
            blk = tl.arange(0, NQ)
            s_ptrs = _block_scale_ptrs(S, rows64[:, None], t, blk[None, :], NQ_REAL, stride_sm, stride_sg)
            tl.store(s_ptrs, scale, mask=row_ok[:, None] & (blk < NQ_REAL)[None, :])
        tl.store(_tile_ptrs(Q, rows64, stride_qm, col0, cols), qv, mask=mask)
    else:
        # NG power-of-two groups of GS = GB features make one quant block: a [ROWS, NG, GB] tile.
        grp = tl.arange(0, NG)
        offs = t * (NG * GS) + grp[:, None] * GS + cols[None, :]  # [NG, GB] feature index
        mask = row_ok[:, None, None] & (offs >= 0)[None, :, :]
        x = _load_f32(X + rows64[:, None, None] * stride_xm + offs[None, :, :], mask, BF16_BY_BITS)
        gate = 1.0  # unused without z
        if HAS_Z:
            z = _load_f32(Z + rows64[:, None, None] * stride_zm + offs[None, :, :], mask, BF16_BY_BITS)
            gate = _gate_value(z, SIGMOID_GATE)
            if GATE_FIRST:
                x = x * gate
        if IS_RMS:
            xm = x
        else:
            xm = x - (tl.sum(x, axis=2) / GS)[:, :, None]
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xm * xm, axis=2) / GS + eps)
        bad = _rstd_out_of_range(rstd) & row_ok[:, None]
        bad_row = tl.max(bad.to(tl.int32), axis=1) != 0
        any_bad = tl.max(bad_row.to(tl.int32), axis=0)
        if RESCUE:
            if any_bad != 0:  # the range rescue, as above, per (row, group)
                scale_r, inv = _rescue_scale(tl.max(tl.abs(x), axis=2), eps)
                xms = x * inv[:, :, None]
                if not IS_RMS:
                    xms = xms - (tl.sum(xms, axis=2) / GS)[:, :, None]
                _, rstd_x = _rescued_rstd(tl.sum(xms * xms, axis=2) / GS, eps, scale_r, inv)
                xm = tl.where(bad[:, :, None], xms, xm)
                rstd = tl.where(bad, rstd_x, rstd)
        y = xm * rstd[:, :, None] * _load_f32(W + offs, offs >= 0, BF16_BY_BITS)[None, :, :]
        if HAS_BIAS:
            y = y + _load_f32(B + offs, offs >= 0, BF16_BY_BITS)[None, :, :]
        if GATE_AFTER:
            y = y * gate
        y = _round_through(y, ROUND_TO, BF16_BY_BITS)
        # A row's block is its NG groups: the block's max over both axes, the codes on the [ROWS, NG, GB] tile
        # itself. Not through tl.reshape to [ROWS, KB]: on the GPU (Triton 3.6, H100; an H200 before) that mixed
        # rows up at some launch shapes (2 rows / 4 warps over 32 groups of 128, 4 rows / 1 warp over 64 + 64).
        amax = tl.reduce(tl.reduce(tl.abs(y), 2, _max_nan), 1, _max_nan)
        scale, has_nan = _scale_of_blocks(amax, QMAX, UE8M0)
        qv, scale = _codes_of_blocks(y, scale[:, None], has_nan[:, None], QMAX, INT8, FNUZ, UE8M0, FP8_BY_BITS)
        scale = tl.reduce(scale, 1, _max_nan)  # [ROWS, 1] -> [ROWS], a NaN kept
        if not RESCUE:
            scale = _mark_for_rescue(scale, bad_row)
        tl.store(Q + rows64[:, None, None] * stride_qm + offs[None, :, :], qv, mask=mask)
        tl.store(S + rows64 * stride_sm + t * stride_sg, scale, mask=row_ok)
    return any_bad


@triton.jit(noinline=True)
def _quant_rescue_rows(X, Z, W, B, Q, S, row0, t, M, stride_xm, stride_zm, stride_qm, stride_sm, stride_sg, eps,
                       GS: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr, KB: tl.constexpr, NQ: tl.constexpr,
                       NQ_REAL: tl.constexpr, GLO: tl.constexpr, COUNT: tl.constexpr,
                       HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                       IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
                       QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr, UE8M0: tl.constexpr,
                       ROUND_TO: tl.constexpr, FP8_BY_BITS: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """Redo, one at a time with the in-register rescue, the rows row0 .. row0 + COUNT - 1 that _quant_tile
    marked in tile t (_RESCUE_MARK in their scales). Not inlined: the rarely taken rescue must not raise the
    common path's register count."""
    blk = tl.arange(0, NQ)
    for r in range(COUNT):
        row = row0 + r
        if row < M:
            s = tl.load(_block_scale_ptrs(S, row.to(tl.int64), t, blk, NQ_REAL, stride_sm, stride_sg),
                        mask=blk < NQ_REAL, other=0.0)
            if tl.max(_marked(s).to(tl.int32), axis=0) != 0:
                _quant_tile(X, Z, W, B, Q, S, row + tl.arange(0, 1), t, M, stride_xm, stride_zm, stride_qm,
                            stride_sm, stride_sg, eps, GS, GB, NG, KB, NQ, NQ_REAL, 1, HAS_Z, HAS_BIAS,
                            NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, QMAX, INT8, FNUZ, UE8M0, ROUND_TO,
                            FP8_BY_BITS, BF16_BY_BITS, True, GLO)


@triton.jit
def fwd_quant_kernel(
    X, Z, W, B, Q, S,
    M, stride_xm, stride_zm, stride_qm, stride_sm, stride_sg, eps,
    GS: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr, KB: tl.constexpr, NQ: tl.constexpr,
    NQ_REAL: tl.constexpr, GLO: tl.constexpr, ROWS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
    QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr, UE8M0: tl.constexpr, ROUND_TO: tl.constexpr,
    FP8_BY_BITS: tl.constexpr, BF16_BY_BITS: tl.constexpr, RESCUE_IN_KERNEL: tl.constexpr, USE_PDL: tl.constexpr,
    GROUPS_FASTEST: tl.constexpr,
):
    """Grid (row tiles, N // (NG * GS)), with GROUPS_FASTEST the other way round (_tile_and_group). Q is int8,
    or uint8 holding the fp8 bits; S is (M, G) float32
    with strides (stride_sm, stride_sg); NQ_REAL of the tile's NQ quant blocks hold features (the rest
    cover the padding of a group whose size is not a power of two). USE_PDL: see _pdl_prologue.

    One norm group per tile (NG = 1: a quant block is the group, or a power-of-two part of it) runs on a 2-D
    [ROWS, GB] tile, fwd_kernel's layout, or, for a group of two power-of-two parts (GLO > 0), on two unpadded
    tiles; several small groups per quant block (NG > 1) on [ROWS, NG, GB].
    Rows out of range are redone at the end of the program (RESCUE_IN_KERNEL) or by quant_rescue_kernel
    afterwards, with the same code either way (see "Range rescue")."""
    _pdl_prologue(USE_PDL)
    pid, t = _tile_and_group(GROUPS_FASTEST)
    any_bad = _quant_tile(X, Z, W, B, Q, S, pid * ROWS + tl.arange(0, ROWS), t, M, stride_xm, stride_zm, stride_qm,
                          stride_sm, stride_sg, eps, GS, GB, NG, KB, NQ, NQ_REAL, ROWS, HAS_Z, HAS_BIAS,
                          NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, QMAX, INT8, FNUZ, UE8M0, ROUND_TO, FP8_BY_BITS,
                          BF16_BY_BITS, False, GLO)
    if RESCUE_IN_KERNEL:
        if any_bad != 0:
            tl.debug_barrier()  # the marked scales (written by other threads) are read back
            _quant_rescue_rows(X, Z, W, B, Q, S, pid * ROWS, t, M, stride_xm, stride_zm, stride_qm, stride_sm,
                               stride_sg, eps, GS, GB, NG, KB, NQ, NQ_REAL, GLO, ROWS, HAS_Z, HAS_BIAS,
                               NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, QMAX, INT8, FNUZ, UE8M0, ROUND_TO, FP8_BY_BITS,
                               BF16_BY_BITS)


@triton.jit
def quant_rescue_kernel(
    X, Z, W, B, Q, S,
    M, stride_xm, stride_zm, stride_qm, stride_sm, stride_sg, eps,
    GS: tl.constexpr, GB: tl.constexpr, NG: tl.constexpr, KB: tl.constexpr, NQ: tl.constexpr,
    NQ_REAL: tl.constexpr, GLO: tl.constexpr, SCAN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
    QMAX: tl.constexpr, INT8: tl.constexpr, FNUZ: tl.constexpr, UE8M0: tl.constexpr, ROUND_TO: tl.constexpr,
    FP8_BY_BITS: tl.constexpr, BF16_BY_BITS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """After fwd_quant_kernel on large inputs (fwd_quant_kernel's arguments): grid (row blocks of SCAN, tiles).
    Scans the scales of its rows in tile t and redoes the rows _quant_tile marked, as the forward would in-kernel
    (run with the forward's warps: the same tile layout, the same bits)."""
    _pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    t = tl.program_id(1)
    rows = pid * SCAN + tl.arange(0, SCAN)
    blk = tl.arange(0, NQ)
    ok = (rows < M)[:, None] & (blk < NQ_REAL)[None, :]
    s = tl.load(_block_scale_ptrs(S, rows.to(tl.int64)[:, None], t, blk[None, :], NQ_REAL, stride_sm, stride_sg),
                mask=ok, other=0.0)
    if tl.max(tl.max(_marked(s).to(tl.int32), axis=1), axis=0) != 0:
        _quant_rescue_rows(X, Z, W, B, Q, S, pid * SCAN, t, M, stride_xm, stride_zm, stride_qm, stride_sm,
                           stride_sg, eps, GS, GB, NG, KB, NQ, NQ_REAL, GLO, SCAN, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE,
                           IS_RMS, SIGMOID_GATE, QMAX, INT8, FNUZ, UE8M0, ROUND_TO, FP8_BY_BITS, BF16_BY_BITS)
