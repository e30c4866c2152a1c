"""Fused Triton kernels for the gated, grouped LayerNorm/RMSNorm: forward and backward.

One kernel family, three kernels, each beside its launcher and the heuristics that size it:

* ``_fwd_kernel``: grid (row tiles, groups). A program normalises ``ROWS`` rows of one group,
  a 2-D tile [ROWS, BLOCK] (BLOCK = the group size rounded up to a power of two), so small groups
  (128) still give each program several KB to move. Groups wider than ``MAX_BLOCK`` are looped over
  in chunks: the first loop merges per-chunk (mean, M2) pairs (Chan et al.), the second writes y.
* ``_bwd_kernel``: a persistent grid (programs, groups). Each program walks its share of the row
  tiles of one group, reads x, z, dy once, writes dx, dz once (xhat recomputed from mean/rstd) and
  keeps its dweight/dbias contribution in registers; at the end it writes one row of fp32 partials.
* ``_sum_partials_kernel``: sums those partial rows in a fixed order into dweight/dbias, cast to
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

float64 inputs are handed to the native backend (which computes in float64, as the operator
requires); everything else computes in float32 in-kernel and rounds once on store.
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import triton  # noqa: F401  (ImportError here makes the backend unavailable, as ops.py expects)
import triton.language as tl

from . import native
from .spec import NormSpec

#: Widest chunk of a group held in registers at once; wider groups are looped over.
MAX_BLOCK = 8192
#: Elements per tile when groups are small (several rows share a program), forward and backward.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 4096
#: fp32 values of a tile per thread: sets num_warps (tile elements / 32 / this, 1 to 16 warps).
FWD_ELEMS_PER_THREAD = 16
BWD_ELEMS_PER_THREAD = 16
#: Backward tiles of groups up to 1024 wide hold at least this many rows (H100: 640-wide groups ran
#: 8 rows x 1024 at 16 warps about 10% faster than 4 rows).
BWD_MIN_ROWS = 8
#: Persistent backward programs per multiprocessor (before dividing among groups).
BWD_PROGRAMS_PER_SM = 2
#: Rows of partials summed per step by the final dweight/dbias reduction.
PARTIAL_ROWS = 32

_FLOAT64 = torch.float64


# ---------------------------------------------------------------------------
# Low-overhead launches
# ---------------------------------------------------------------------------
# Triton's JITFunction.run binds and specialises every argument on every call (tens of microseconds
# of Python per launch, more than these kernels take on small inputs). After the first launch of a
# specialisation we keep its CompiledKernel and call its launcher directly. The key holds everything
# Triton specialises on (dtypes, 16-byte alignment of pointers, integers equal to 1 / divisible by
# 16 / needing 64 bits, constexprs, warps, device), so a hit is the kernel Triton would have picked.


def _fast_launch_supported() -> bool:
    try:
        import inspect

        from triton.runtime.jit import JITFunction

        # The launcher takes all bound arguments (constexprs too) after the launch hooks.
        return "*bound_args.values()" in inspect.getsource(JITFunction.run) and hasattr(triton, "knobs")
    except Exception:  # a Triton whose internals look different: always take the ordinary path
        return False


_FAST_LAUNCH = _fast_launch_supported() and os.environ.get("GATEDNORM_TRITON_FAST_LAUNCH", "1") != "0"
_COMPILED: dict = {}
_INTERPRETER_LOCK = threading.Lock()
#: Launches that took the cached path (a diagnostic for benchmarks and tests).
fast_launches = 0


def _arg_key(v):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return (v == 1, v % 16 == 0, -(2**31) <= v < 2**31)
    return type(v)


def _launch(kernel, grid: tuple[int, int, int], args: tuple, constexprs: tuple, num_warps: int,
            dev: torch.device) -> None:
    """kernel[grid](*args, **constexprs, num_warps=...), skipping Triton's binding once compiled.

    ``args`` are the runtime parameters in signature order; ``constexprs`` the values of the
    remaining (constexpr) parameters, also in signature order.
    """
    if not _FAST_LAUNCH or dev.type != "cuda":
        names = kernel.arg_names[len(args):]
        if dev.type == "cpu":
            # Triton's interpreter keeps the grid of the running kernel in global state: one at a time.
            with _INTERPRETER_LOCK:
                kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), num_warps=num_warps)
        else:
            kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), num_warps=num_warps)
        return
    index = torch.cuda.current_device()
    key = (kernel, index, num_warps, constexprs, tuple(_arg_key(a) for a in args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        names = kernel.arg_names[len(args):]
        compiled = kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), num_warps=num_warps)
        if compiled is not None:
            _COMPILED[key] = compiled
        return
    global fast_launches
    fast_launches += 1
    stream = torch._C._cuda_getCurrentRawStream(index)
    all_args = (*args, *constexprs)
    # The launch hooks exactly as JITFunction.run passes them (profilers such as proton hook in here);
    # launch metadata is only built when a hook is actually installed.
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    meta = None
    if enter is not None and getattr(enter, "calls", True):
        meta = compiled.launch_metadata(grid, stream, *all_args)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, meta,
                 enter, leave, *all_args)


# ---------------------------------------------------------------------------
# Shared helpers (jit)
# ---------------------------------------------------------------------------

@triton.jit
def _gate(z, SIGMOID_GATE: tl.constexpr):
    """(act(z), act'(z)) in fp32: swish = z * s, swish' = s * (1 + z * (1 - s)); sigmoid = s, s * (1 - s)."""
    s = 1.0 / (1.0 + tl.exp(-z))
    if SIGMOID_GATE:
        return s, s * (1.0 - s)
    else:
        return z * s, s * (1.0 + z * (1.0 - s))


@triton.jit
def _gate_value(z, SIGMOID_GATE: tl.constexpr):
    """act(z) alone (the forward does not need the derivative)."""
    s = 1.0 / (1.0 + tl.exp(-z))
    if SIGMOID_GATE:
        return s
    else:
        return z * s


#: Triton's interpreter (3.9) converts bf16 <-> fp32 wrongly at the edges: fp32 -> bf16 rounds toward
#: zero (the GPU rounds to nearest even) and bf16 subnormals load as garbage. Under the interpreter the
#: kernels do these two conversions on the bits (bf16 is the top half of fp32), so CPU runs give the
#: GPU's results; compiled kernels use the hardware conversions.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
def _tile_ptrs(base, rows64, stride, col0, cols):
    return base + rows64[:, None] * stride + (col0 + cols)[None, :]


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
# Where the check runs is a cost question (H200, benchmarks/bench_triton_ab.py): a check-and-branch
# at the end of every program costs nothing measurable on small inputs but 3-17% of bandwidth on
# some large shapes (it perturbs how the compiler schedules the common path); a separate scan kernel
# leaves _fwd_kernel's code as it was and costs one small launch, 1-4% of a large call (results in
# benchmarks/results/triton_rescue_ab_h200.md). So calls of at least RESCUE_KERNEL_MIN_ELEMENTS
# elements use _rescue_kernel, smaller ones (launch-bound anyway) check in-kernel.
# Both judge the same stored rstd and redo rows with the same code and warps: a row's bits do not
# depend on which one ran (batch invariance). Wide groups (looped in chunks) check in-kernel always.

_SAFE_VAR_MIN = tl.constexpr(native.SAFE_VAR_MIN)
_SAFE_RSTD_MAX = tl.constexpr(native.SAFE_VAR_MIN ** -0.5)  # 2^50
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
    """(rstd, rstd * scale) from var_s = var / scale^2; see native.scaled_rstd (the same steps)."""
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


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(
    X, Z, W, B, Y, MEAN, RSTD,
    M, stride_xm, stride_zm, stride_ym, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr, RESCUE_IN_KERNEL: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col0 = g * GS
    GATE_FIRST: tl.constexpr = HAS_Z and not NORM_BEFORE_GATE
    GATE_AFTER: tl.constexpr = HAS_Z and NORM_BEFORE_GATE
    stat = g.to(tl.int64) * M + rows64  # group-major statistics: index g * M + m

    if NUM_CHUNKS == 1:
        # The whole group is in registers: two-pass variance on the tile itself.
        col_ok = cols < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_f32(_tile_ptrs(X, rows64, stride_xm, col0, cols), mask, BF16_BY_BITS)
        gate = 1.0  # unused without z
        if HAS_Z:
            # Padded lanes read z = 0 (never garbage), so x * act(z) stays 0 there.
            z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, cols), mask, BF16_BY_BITS)
            gate = _gate_value(z, SIGMOID_GATE)
            if GATE_FIRST:
                x = x * gate
        mean, xm, var_eps = _tile_stats(x, col_ok, eps, GS, BLOCK, IS_RMS)
        rstd = 1.0 / tl.sqrt_rn(var_eps)
        if not IS_RMS:
            tl.store(MEAN + stat, mean, mask=row_ok)
        tl.store(RSTD + stat, rstd, mask=row_ok)
        w = _load_f32(W + col0 + cols, col_ok, BF16_BY_BITS)
        y = xm * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y = y + _load_f32(B + col0 + cols, col_ok, BF16_BY_BITS)[None, :]
        if GATE_AFTER:
            y = y * gate
        _store_out(_tile_ptrs(Y, rows64, stride_ym, col0, cols), y, mask, BF16_BY_BITS)
        if RESCUE_IN_KERNEL:  # else _rescue_kernel runs after this kernel (see "Range rescue")
            if tl.max((_rstd_out_of_range(rstd) & row_ok).to(tl.int32), axis=0) != 0:
                tl.debug_barrier()  # the rows' plain results (written by other threads) are overwritten
                _rescue_rows(X, Z, W, B, Y, MEAN, RSTD, pid * ROWS, g, M, stride_xm, stride_zm, stride_ym, col0,
                             eps, GS, BLOCK, ROWS, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE,
                             BF16_BY_BITS)
    else:
        # Wide group (ROWS = 1): pass 1 merges chunk statistics, pass 2 writes (_chunked_stats).
        ones = tl.full([ROWS], 1.0, tl.float32)
        run_mean, run_m2 = _chunked_stats(X, Z, rows64, row_ok, stride_xm, stride_zm, col0, cols, ones,
                                          GS, BLOCK, NUM_CHUNKS, GATE_FIRST, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
        rstd = 1.0 / tl.sqrt_rn(run_m2 / GS + eps)
        if tl.max((_rstd_out_of_range(rstd) & row_ok).to(tl.int32), axis=0) != 0:  # rare: see "Range rescue"
            _rescue_row(X, Z, W, B, Y, MEAN, RSTD, pid, g, M, stride_xm, stride_zm, stride_ym,
                        col0, eps, GS, BLOCK, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                        SIGMOID_GATE, BF16_BY_BITS)
        else:
            if not IS_RMS:
                tl.store(MEAN + stat, run_mean, mask=row_ok)
            tl.store(RSTD + stat, rstd, mask=row_ok)
            _write_chunked(X, Z, W, B, Y, rows64, row_ok, stride_xm, stride_zm, stride_ym, col0, cols,
                           ones, run_mean, rstd, GS, BLOCK, NUM_CHUNKS,
                           HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)


@triton.jit
def _write_chunked(X, Z, W, B, Y, rows64, row_ok, stride_xm, stride_zm, stride_ym, col0, cols,
                   inv, mean, rstd_x, GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                   HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                   IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """y = ((x * inv - mean) * rstd_x * w + b) [* act(z)] chunk by chunk (inv = 1 and rstd_x = rstd
    unless rescued; mean = 0 for RMSNorm)."""
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        col_ok = offs < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _load_f32(_tile_ptrs(X, rows64, stride_xm, col0, offs), mask, BF16_BY_BITS)
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
def _rescue_rows(X, Z, W, B, Y, MEAN, RSTD, row0, g, M, stride_xm, stride_zm, stride_ym, col0, eps,
                 GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                 HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                 IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """Redo rows row0 .. row0 + ROWS - 1 of group g whose stored rstd is out of range. Not inlined, and
    scalars only: the rarely taken rescue must not raise the common path's register count."""
    for r in range(ROWS):
        row = row0 + r
        if row < M:
            if _rstd_out_of_range(tl.load(RSTD + g.to(tl.int64) * M + row)):
                _rescue_row(X, Z, W, B, Y, MEAN, RSTD, row, g, M, stride_xm, stride_zm, stride_ym,
                            col0, eps, GS, BLOCK, HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS,
                            SIGMOID_GATE, BF16_BY_BITS)


@triton.jit
def _rescue_kernel(
    X, Z, W, B, Y, MEAN, RSTD,
    M, stride_xm, stride_zm, stride_ym, eps,
    GS: tl.constexpr, BLOCK: tl.constexpr, SCAN: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    """After _fwd_kernel on large inputs: grid (row blocks of SCAN, groups). Reads the stored rstd and
    redoes the rows out of range, with the code the forward would run in-kernel (same bits)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * SCAN + tl.arange(0, SCAN)
    ok = rows < M
    rstd = tl.load(RSTD + g.to(tl.int64) * M + rows.to(tl.int64), mask=ok, other=1.0)
    if tl.max((_rstd_out_of_range(rstd) & ok).to(tl.int32), axis=0) != 0:
        _rescue_rows(X, Z, W, B, Y, MEAN, RSTD, pid * SCAN, g, M, stride_xm, stride_zm, stride_ym, g * GS, eps,
                     GS, BLOCK, SCAN, HAS_Z, HAS_BIAS, HAS_Z and not NORM_BEFORE_GATE, HAS_Z and NORM_BEFORE_GATE,
                     IS_RMS, SIGMOID_GATE, BF16_BY_BITS)


#: Calls with at least this many elements run the range rescue as a separate kernel (see "Range rescue").
RESCUE_KERNEL_MIN_ELEMENTS = 1 << 24
#: Rows whose stored rstd one program of _rescue_kernel checks.
RESCUE_SCAN_ROWS = 1024

#: Chunk width of the range rescue's passes: narrow, so the rarely taken rescue code needs few
#: registers (the kernel's register count is the maximum over all its code, taken or not).
_RESCUE_BLOCK = tl.constexpr(512)


@triton.jit(noinline=True)
def _rescue_row(X, Z, W, B, Y, MEAN, RSTD, row, g, M, stride_xm, stride_zm, stride_ym, col0, eps,
                GS: tl.constexpr, BLOCK: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr,
                IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """The range rescue of one row of group g, known to be out of range, from memory in narrow chunks:
    max |x|, the statistics of x / scale (chunks merged as in _chunked_stats), then y."""
    RB: tl.constexpr = BLOCK if BLOCK < _RESCUE_BLOCK else _RESCUE_BLOCK
    NC: tl.constexpr = (GS + RB - 1) // RB
    rows64 = (row + tl.arange(0, 1)).to(tl.int64)
    row_ok = rows64 < M
    stat = g.to(tl.int64) * M + rows64
    cols = tl.arange(0, RB)
    amax = _chunked_amax(X, Z, rows64, row_ok, stride_xm, stride_zm, col0, cols,
                         GS, RB, NC, GATE_FIRST, SIGMOID_GATE, BF16_BY_BITS)
    scale, inv = _rescue_scale(amax, eps)
    mean, m2 = _chunked_stats(X, Z, rows64, row_ok, stride_xm, stride_zm, col0, cols, inv,
                              GS, RB, NC, GATE_FIRST, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
    rstd, rstd_x = _rescued_rstd(m2 / GS, eps, scale, inv)
    if not IS_RMS:
        tl.store(MEAN + stat, mean * scale, mask=row_ok)
    tl.store(RSTD + stat, rstd, mask=row_ok)
    _write_chunked(X, Z, W, B, Y, rows64, row_ok, stride_xm, stride_zm, stride_ym, col0, cols,
                   inv, mean, rstd_x, GS, RB, NC,
                   HAS_Z, HAS_BIAS, GATE_FIRST, GATE_AFTER, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)


@triton.jit
def _chunk_of_x(X, Z, rows64, mask, stride_xm, stride_zm, col0, offs,
                GATE_FIRST: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """One chunk of the normalised input: x, or x * act(z) when the gate comes first."""
    x = _load_f32(_tile_ptrs(X, rows64, stride_xm, col0, offs), mask, BF16_BY_BITS)
    if GATE_FIRST:
        z = _load_f32(_tile_ptrs(Z, rows64, stride_zm, col0, offs), mask, BF16_BY_BITS)
        x = x * _gate_value(z, SIGMOID_GATE)
    return x


@triton.jit
def _chunked_stats(X, Z, rows64, row_ok, stride_xm, stride_zm, col0, cols, inv,
                   GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GATE_FIRST: tl.constexpr,
                   IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """(mean, M2 = sum of squared deviations) of a wide group of x * inv, chunk by chunk: each chunk's
    (mean, M2) is exact two-pass in registers and the chunks are merged (Chan et al.), which keeps
    the variance free of E[x^2] - E[x]^2. RMSNorm: mean 0 and M2 = sum of squares."""
    run_mean = tl.zeros([inv.shape[0]], dtype=tl.float32)
    run_m2 = tl.zeros([inv.shape[0]], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        col_ok = offs < GS
        mask = row_ok[:, None] & col_ok[None, :]
        x = _chunk_of_x(X, Z, rows64, mask, stride_xm, stride_zm, col0, offs,
                        GATE_FIRST, SIGMOID_GATE, BF16_BY_BITS) * inv[:, None]
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
def _chunked_amax(X, Z, rows64, row_ok, stride_xm, stride_zm, col0, cols,
                  GS: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, GATE_FIRST: tl.constexpr,
                  SIGMOID_GATE: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    """max |x| (x * act(z) when the gate comes first) over a wide group, chunk by chunk."""
    amax = tl.zeros([row_ok.shape[0]], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK + cols
        mask = row_ok[:, None] & (offs < GS)[None, :]
        x = _chunk_of_x(X, Z, rows64, mask, stride_xm, stride_zm, col0, offs, GATE_FIRST, SIGMOID_GATE,
                        BF16_BY_BITS)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    return amax


@functools.cache
def _tile_config(group_size: int, tile_elements: int, elems_per_thread: int, max_block: int, min_rows: int = 1):
    """(BLOCK, NUM_CHUNKS, ROWS, num_warps) for a group size: BLOCK = group rounded up to a power of two
    (at most max_block; wider groups take NUM_CHUNKS chunks), ROWS rows a tile so a tile holds about
    tile_elements (at least min_rows for groups up to 1024 wide), and warps so each thread holds
    about elems_per_thread fp32 values of a tile."""
    block = min(triton.next_power_of_2(group_size), max_block)
    chunks = triton.cdiv(group_size, block)
    rows = max(1, tile_elements // block, min_rows if block <= 1024 else 1) if chunks == 1 else 1
    num_warps = max(1, min(16, rows * block // (32 * elems_per_thread)))
    return block, chunks, rows, num_warps


def _fwd_config(group_size: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """Forward launch shape: from the group size and dtype only, never from M (batch invariance)."""
    return _tile_config(group_size, FWD_TILE_ELEMENTS, FWD_ELEMS_PER_THREAD, MAX_BLOCK)


def _bwd_config(group_size: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """Backward tile shape: from the group size and dtype only (the program count may follow M)."""
    return _tile_config(group_size, BWD_TILE_ELEMENTS, BWD_ELEMS_PER_THREAD, MAX_BLOCK, BWD_MIN_ROWS)


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along features: copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Write the gated norm of x (M, N) into out (M, N, any floating dtype); return (mean | None, rstd).

    Stats are 1-D float32 of G*M values, group-major. float64 x goes to the native backend.
    """
    if x.dtype == _FLOAT64:
        return native.forward(x, weight, bias, z, spec, out)
    m, n = x.shape
    gs = spec.group_size
    groups = n // gs
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(groups * m, dtype=torch.float32, device=x.device)
    if m == 0:
        return mean, rstd
    x = _rows_ready(x)
    if z is not None:
        z = _rows_ready(z)
    weight = _rows_ready(weight)
    bias = _rows_ready(bias) if bias is not None else None
    y = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    block, chunks, rows, warps = _fwd_config(gs, x.element_size())
    args = (x, z, weight, bias, y, mean, rstd, m, x.stride(0), z.stride(0) if z is not None else 0, y.stride(0),
            spec.eps)
    flags = (z is not None, bias is not None, spec.norm_before_gate, spec.is_rms_norm, spec.activation == "sigmoid",
             _INTERPRET)  # HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS
    rescue_after = chunks == 1 and m * n >= RESCUE_KERNEL_MIN_ELEMENTS
    # GS, BLOCK, ROWS, NUM_CHUNKS, *flags, RESCUE_IN_KERNEL
    _launch(_fwd_kernel, (triton.cdiv(m, rows), groups, 1), args, (gs, block, rows, chunks, *flags, not rescue_after),
            warps, x.device)
    if rescue_after:  # GS, BLOCK, SCAN, *flags; the forward's warps: the rescued rows' bits must not change
        _launch(_rescue_kernel, (triton.cdiv(m, RESCUE_SCAN_ROWS), groups, 1), args,
                (gs, block, RESCUE_SCAN_ROWS, *flags), warps, x.device)
    if y is not out:
        out.copy_(y)
    return mean, rstd


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
def _bwd_kernel(
    DY, X, Z, W, B, MEAN, RSTD, DX, DZ, DW_PART, DB_PART,
    M, stride_dym, stride_xm, stride_zm, stride_dxm, stride_dzm, N,
    GS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, NUM_CHUNKS: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    IS_RMS: tl.constexpr, SIGMOID_GATE: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DZ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    g = tl.program_id(1)
    col0 = g * GS
    cols = tl.arange(0, BLOCK)
    num_tiles = tl.cdiv(M, ROWS)
    part_row = pid.to(tl.int64) * N + col0  # this program's row of partials (dweight and dbias alike)
    if NUM_CHUNKS == 1:
        dw_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for tile in range(pid, num_tiles, num_progs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        stat = g.to(tl.int64) * M + rows64
        rstd = tl.load(RSTD + stat, mask=row_ok, other=0.0)
        if IS_RMS:
            mean = rstd  # unused
        else:
            mean = tl.load(MEAN + stat, mask=row_ok, other=0.0)
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
            for c in range(NUM_CHUNKS):
                offs = c * BLOCK + cols
                x, act, dact, xhat, gy, wdy, dz_after, mask = _bwd_terms(
                    DY, X, Z, W, B, mean, rstd, rows64, row_ok, stride_dym, stride_xm, stride_zm, col0, offs,
                    GS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS)
                col_ok = offs < GS
                # This program owns its partial row: read-modify-write is race-free and ordered.
                if NEED_DW:
                    acc = tl.load(DW_PART + part_row + offs, mask=col_ok, other=0.0)
                    tl.store(DW_PART + part_row + offs, acc + tl.sum(gy * xhat, axis=0), mask=col_ok)
                if NEED_DB:
                    acc = tl.load(DB_PART + part_row + offs, mask=col_ok, other=0.0)
                    tl.store(DB_PART + part_row + offs, acc + tl.sum(gy, axis=0), mask=col_ok)
                dxc = wdy - xhat * c1[:, None]
                if not IS_RMS:
                    dxc = dxc - c2[:, None]
                dxc = dxc * rstd[:, None]
                _bwd_store(DX, DZ, dxc, x, act, dact, dz_after, rows64, stride_dxm, stride_dzm, col0, offs, mask,
                           HAS_Z, NORM_BEFORE_GATE, NEED_DX, NEED_DZ, BF16_BY_BITS)
    if NUM_CHUNKS == 1:
        col_ok = cols < GS
        if NEED_DW:
            tl.store(DW_PART + part_row + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if NEED_DB:
            tl.store(DB_PART + part_row + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    DW_PART, DB_PART, DW, DB, P, N,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BF16_BY_BITS: tl.constexpr,
):
    """dweight[n] = sum over p of partials[p, n], in a fixed order (tiles of BLOCK_P rows, then a tree)."""
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


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few programs, so the persistent loop and the partial sums are exercised


def _bwd_programs(m: int, rows: int, groups: int, device: torch.device) -> int:
    """Persistent programs per group: enough to fill the machine, never more than there are row tiles."""
    per_group = max(1, (_sm_count(device) * BWD_PROGRAMS_PER_SM) // groups)
    return max(1, min(per_group, triton.cdiv(m, rows)))


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
    """(dx, dz, dweight, dbias) from dy (M, N) and the saved x, z, weight, bias, mean, rstd.

    dx/dz in x's/z's dtypes (contiguous), dweight/dbias in the parameters' dtypes; None where not asked.
    """
    if x.dtype == _FLOAT64:
        return native.backward(dy, x, weight, bias, z, mean, rstd, spec,
                               needs_dx, needs_dz, needs_dweight, needs_dbias)
    m, n = x.shape
    gs = spec.group_size
    groups = n // gs
    needs_dz = needs_dz and z is not None
    needs_dbias = needs_dbias and bias is not None
    dev = x.device
    dx = torch.empty((m, n), dtype=x.dtype, device=dev) if needs_dx else None
    dz = torch.empty((m, n), dtype=z.dtype, device=dev) if needs_dz else None
    if m == 0:
        dw = torch.zeros_like(weight) if needs_dweight else None
        db = torch.zeros_like(bias) if needs_dbias else None
        return dx, dz, dw, db
    dy = _rows_ready(dy)
    x = _rows_ready(x)
    if z is not None:
        z = _rows_ready(z)
    weight = _rows_ready(weight)
    bias = _rows_ready(bias) if bias is not None else None
    block, chunks, rows, warps = _bwd_config(gs, x.element_size())
    progs = _bwd_programs(m, rows, groups, dev)
    need_part = needs_dweight or needs_dbias
    # Wide groups accumulate into their partial row in memory, so it must start at zero.
    alloc = torch.zeros if chunks > 1 else torch.empty
    dw_part = alloc((progs, n), dtype=torch.float32, device=dev) if needs_dweight else None
    db_part = alloc((progs, n), dtype=torch.float32, device=dev) if needs_dbias else None
    _launch(
        _bwd_kernel, (progs, groups, 1),
        (dy, x, z, weight, bias, mean, rstd, dx, dz, dw_part, db_part,
         m, dy.stride(0), x.stride(0), z.stride(0) if z is not None else 0, n, n, n),
        # GS, BLOCK, ROWS, NUM_CHUNKS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, NEED_DX..NEED_DB
        (gs, block, rows, chunks, z is not None, bias is not None, spec.norm_before_gate, spec.is_rms_norm,
         spec.activation == "sigmoid", needs_dx, needs_dz, needs_dweight, needs_dbias, _INTERPRET),
        warps, dev,
    )
    dw = db = None
    if need_part:
        dw = torch.empty(n, dtype=weight.dtype, device=dev) if needs_dweight else None
        db = torch.empty(n, dtype=bias.dtype, device=dev) if needs_dbias else None
        block_n = min(triton.next_power_of_2(n), 256)
        _launch(
            _sum_partials_kernel, (triton.cdiv(n, block_n), 1, 1),
            (dw_part, db_part, dw, db, progs, n),
            (PARTIAL_ROWS, block_n, needs_dweight, needs_dbias, _INTERPRET),  # BLOCK_P, BLOCK_N, NEED_DW/DB, EMULATE
            4, dev,
        )
    return dx, dz, dw, db
