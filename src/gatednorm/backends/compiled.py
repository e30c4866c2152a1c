"""The ``compiled`` backend: the formulas of :mod:`gatednorm.numerics` compiled by ``torch.compile``.

The same function as the native backend (docs/design.md, section 1). Inductor fuses each formula
into a few loops, so no full-size temporaries exist at run time, with one exception: on CPU the forward
with the gate before the norm keeps x * act(z) in one float32 buffer of the output's size, as Inductor
does for the compiled recipe (:func:`_make_forward_sums` says why).

Compilation: one compiled function per *feature combination* (the static
:class:`~gatednorm.spec.NormSpec`, N, every tensor's dtype (None where absent), which gradients), with
the row count M marked dynamic (traced size-obliviously, so M = 1 takes the same graph): a new batch size
never recompiles. N and the group size stay static so that Inductor can fuse each row's reductions
without full-size buffers. Every combination gets its own code object, so dynamo's per-code-object
recompile limit is never shared between them.

Range rescue: on accelerators every group is scaled in the graph (no host sync, CUDA-graph safe).
On CPU, where reading a value costs nothing like a device sync, the plain graph runs and also reduces its
sums to one flag (every row in range or not); the rows out of range are then found and redone with the
rescuing formula, eagerly.

On CPU the graphs are shaped for Inductor's C++ code generation, to stay within the speed of the
compiled recipe (benchmarks/results/cpu_bench.md): the forward graph returns its raw per-group sums
and the statistics are made from them outside (:func:`_make_forward_sums`), only for callers that keep
them (:meth:`CompiledBackend.forward_output` serves those that do not), and the backward
(:func:`_backward_rows_recomputed`) recomputes the gate in every loop that needs it, so no full-size
float32 temporary is written, and sums dweight / dbias over blocks of rows first.

Nesting: inside a user's ``torch.compile`` region, :mod:`gatednorm.ops` routes through the opaque
``gatednorm::*`` custom ops (traced via their fake implementations); at run time the op calls into
this module, which runs its own separately compiled function: no nested tracing happens.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable

import torch
import torch.fx.experimental._config

from .. import numerics
from ..huge_pages import MIN_BYTES, advised_fresh
from ..numerics import in_compute_dtype
from ..spec import NormSpec, compute_dtype
from .base import Grads, GradsNeeded

#: (key, seconds) of the first call of every compiled function: dynamo + inductor compile time.
COMPILE_TIMES: list[tuple[tuple, float]] = []


def _make_forward(spec: NormSpec) -> Callable:
    """The compiled forward with the range rescue in the graph (accelerators): writes out, returns
    (mean, rstd) group-major."""

    def fwd(x, weight, bias, z, out):
        m = x.shape[0]
        y, mean, rstd = numerics.forward_rows(x, weight, bias, z, spec, rescue=True)
        out.copy_(y.reshape(out.shape))  # the one rounding, fused into the kernel that computes y
        # group-major stats; copy_ into a fresh buffer (not .contiguous()) so M = 1 takes no other branch
        groups = rstd.shape[1]
        rstd_gm = rstd.new_empty(groups * m)
        rstd_gm.view(groups, m).copy_(rstd.t())
        mean_gm = None
        if mean is not None:
            mean_gm = mean.new_empty(groups * m)
            mean_gm.view(groups, m).copy_(mean.t())
        return mean_gm, rstd_gm

    return fwd


def _rstd_from_sum(sum_sq: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """rstd = 1 / sqrt(sum_sq / gs + eps): a division, an addition and a reciprocal square root, each rounded
    once (Inductor's code and ATen's ops give the same bits)."""
    return torch.rsqrt(sum_sq / spec.group_size + spec.eps)


def _sums_in_range(sum_sq: torch.Tensor, spec: NormSpec) -> torch.Tensor:
    """0-dim bool: whether every rstd made from sum_sq (:func:`_rstd_from_sum`) is in (0, SAFE_RSTD_MAX], i.e.
    no row needs the rescue (``not numerics.rstd_out_of_range(rstd).any()``), judged on the extremes alone.

    rstd is non-increasing in sum_sq (each rounding step keeps order), so the smallest rstd is that of the
    largest sum and the largest that of the smallest: two reductions over the sums, no statistics needed. A NaN
    sum makes both extremes NaN (amax and amin propagate it), and a NaN rstd fails both comparisons.
    """
    return (_rstd_from_sum(sum_sq.amax(), spec) > 0) & (_rstd_from_sum(sum_sq.amin(), spec) <= numerics.SAFE_RSTD_MAX)


def _make_forward_sums(spec: NormSpec, returns_output: bool = False) -> Callable:
    """The compiled forward on CPU: writes out and returns the per-group sums it reduced, (sum of x or None,
    sum of squared deviations), (M, G, 1) each, for :func:`_stats_from_sums`, and whether every rstd is in
    range (:func:`_sums_in_range`, 0-dim bool). With ``returns_output`` it takes no ``out`` and returns the
    output rows (M, N, x's dtype) first (see :meth:`CompiledBackend.forward_output`).

    The graph's only outputs besides ``out`` are reductions (the range check reduces the sums again, in a
    small kernel of its own after the row loop), so Inductor runs each row's reductions and its output in
    one loop over the rows (as it does for the recipe, whose graph returns y alone). The check is in the
    graph because eager ops after it are slow: each runs on caches the graph has just flushed (in bench_cpu
    the eager statistics with the check took 0.14-0.37 ms after the 4096x2048 LayerNorm's 2 ms graph). A
    statistic computed in the graph (a pointwise node of a reduction) is a buffer with two users, and
    Inductor then splits the work into a reduction loop, a statistics loop and an output loop that
    reads x again.

    Gate before the norm: the sums and the output read one node, x * act(z), which Inductor keeps in a
    full-size float32 buffer (M x N: twice x's size in bf16), as it does for the compiled recipe. The
    alternative, the gate computed again in the output loop, costs a second exp and division per element:
    1.3-1.5x the time of the compiled recipe on a 2048x5120 bf16/fp32 forward with groups of 640 (2-core VM,
    ``--malloc reuse``), where the loops are bound by those, not by memory. Inductor keeps such a value in a
    row-sized buffer only when every loop of the graph runs over the same (row, feature) ranges; with
    several groups per row the output loop runs over (row, group, feature) and the sums over (row * group),
    so it does not.
    """
    gs = spec.group_size
    gate_before = not spec.norm_before_gate

    def fwd(x, weight, bias, z, out=None):
        n = x.shape[1]
        c = compute_dtype(x.dtype)
        shape3 = (n // gs, gs)
        x3 = x.unflatten(1, shape3).to(c)
        gate = None
        summed = x3  # the values whose sums make the statistics
        if z is not None:
            z3 = z.unflatten(1, shape3).to(c)
            gate = numerics.gate_activation(z3, spec.activation)
            if gate_before:
                x3 = summed = x3 * gate
        sum_x = None
        if not spec.is_rms_norm:
            sum_x = summed.sum(dim=-1, keepdim=True)
            mean = sum_x / gs
            summed = summed - mean
            x3 = x3 - mean
        sum_sq = (summed * summed).sum(dim=-1, keepdim=True)
        rstd = _rstd_from_sum(sum_sq, spec)  # as _stats_from_sums computes it, bit for bit
        y = numerics.affine(x3 * rstd, in_compute_dtype(weight, c).view(shape3),
                            None if bias is None else in_compute_dtype(bias, c).view(shape3),
                            gate if spec.norm_before_gate else None)
        in_range = _sums_in_range(sum_sq, spec)
        if returns_output:  # the one rounding, in the loop that computes y
            return y.reshape(x.shape).to(x.dtype), sum_x, sum_sq, in_range
        out.copy_(y.reshape(out.shape))  # the one rounding, fused into the kernel that computes y
        return sum_x, sum_sq, in_range

    return fwd


#: Eager work on the statistics runs in slices of this many elements: below ATen's parallel grain
#: (32768), so every op is serial. A parallel op ends at a barrier that waits for its slowest thread, and
#: with another process busy on the machine that wait costs a scheduler time slice (issue 12).
_SERIAL_SLICE = 16384


def _stats_from_sums(sum_x: torch.Tensor | None, sum_sq: torch.Tensor, spec: NormSpec
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mean, rstd) from the (M, G, 1) sums of :func:`_make_forward_sums`, in place.

    mean and rstd are group-major 1-D, made with the same correctly rounded steps as the graph (a division by
    gs, an addition, 1 / sqrt: :func:`_rstd_from_sum`), so rstd is the factor that normalised the output. With
    one group per row the sums' storage already is the group-major layout; otherwise one transposing copy
    each. Serial slices (:data:`_SERIAL_SLICE`) throughout.
    """
    m, groups = sum_sq.shape[0], sum_sq.shape[1]
    stats = [sum_sq] if sum_x is None else [sum_x, sum_sq]
    for c0 in range(0, m * groups, _SERIAL_SLICE):
        if sum_x is not None:
            sum_x.view(-1)[c0 : c0 + _SERIAL_SLICE].div_(spec.group_size)
        sum_sq.view(-1)[c0 : c0 + _SERIAL_SLICE].div_(spec.group_size).add_(spec.eps).rsqrt_()
    if groups == 1:
        flat = [t.view(m) for t in stats]
    else:
        flat = []
        rows = max(1, _SERIAL_SLICE // groups)
        for t in stats:
            gm = t.new_empty(groups * m)
            gm_view, t2 = gm.view(groups, m), t[..., 0]
            for r0 in range(0, m, rows):
                gm_view[:, r0 : r0 + rows].copy_(t2[r0 : r0 + rows].t())
            flat.append(gm)
    return (None, flat[0]) if sum_x is None else tuple(flat)


def _gate_from_one_sigmoid(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)) from one sigmoid s: swish = z * s, swish' = s + z * s * (1 - s); sigmoid' = s * (1 - s).

    On CPU Inductor keeps every reused node that calls exp in a full-size float32 buffer. With silu(z)
    and sigmoid(z) both in the graph, the backward wrote two such buffers per call; derived from one
    sigmoid it writes one, as the compiled recipe's backward does. act(z) then differs from the forward's
    silu(z) in the last bit at most (the native CPU backward derives it the same way).
    """
    s = torch.sigmoid(z)
    one_minus_s = torch.rsub(s, 1.0)  # exact
    if activation == "swish":
        act = z * s
        return act, s + act * one_minus_s
    return s, one_minus_s * s


#: Column sums (dweight, dbias) over the rows run in blocks of this many rows: each block's partial sums,
#: then the sum of the partials. Inductor reduces a column over the rows with a loop that steps one row at a
#: time down every column chunk; over all rows that reads one cache line per row (one page per row when a
#: row is 4 KiB or more: no prefetching), over a block of rows the lines stay in cache for the next chunk.
_COLUMN_BLOCK = 8


def _backward_rows_recomputed(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                              needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool,
                              blocked: bool) -> tuple[torch.Tensor | None, ...]:
    """:func:`numerics.backward_rows` with the gate of :func:`_gate_from_one_sigmoid`, the same operations
    in the same order, written for Inductor's C++ code generation (CPU):

    * every consumer of a value that calls exp (the gate, and what is made from it) builds its own copy
      of that value. Inductor keeps every graph node that calls exp and has more than one user in a
      full-size float32 buffer (written, then reread by every loop; allocated per call: page faults).
      Here no such node has more than one user, so each loop recomputes the gate from z instead.
      Recomputed values are bit-identical: the same float32 ops on the same inputs;
    * dweight and dbias are summed over blocks of :data:`_COLUMN_BLOCK` rows first (the rows past the
      last whole block are summed apart), then over the blocks: float32 sums of the same float32 terms
      as before, in another order.
    """
    m, n = x.shape
    gs = spec.group_size
    shape3 = (n // gs, gs)
    c = compute_dtype(x.dtype)
    w3 = weight.to(c).view(shape3)
    rs = rstd.unsqueeze(-1)
    mean3 = None if mean is None else mean.unsqueeze(-1)
    x3 = x.unflatten(1, shape3)
    dy3 = dy.unflatten(1, shape3)
    z3 = None if z is None else z.unflatten(1, shape3)
    gate_before = z is not None and not spec.norm_before_gate
    gate_after = z is not None and spec.norm_before_gate

    # Each function below builds new graph nodes on every call, from the rows ``r`` selects: r maps an
    # (M, ...) tensor to a view of its rows (views of the inputs, so that Inductor indexes the inputs
    # directly: a view of a computed value would be a buffer).
    def everything(t):
        return t

    def sig(r):
        return torch.sigmoid(r(z3).to(c))

    def gate(r):  # act(z) of _gate_from_one_sigmoid
        return r(z3).to(c) * sig(r) if spec.activation == "swish" else sig(r)

    def dgate(r):  # act'(z) of _gate_from_one_sigmoid, the same ops
        if spec.activation == "swish":
            return sig(r) + gate(r) * torch.rsub(sig(r), 1.0)
        return torch.rsub(sig(r), 1.0) * sig(r)

    def xhat(r):
        xin = r(x3) * gate(r) if gate_before else r(x3)
        return (xin - r(mean3) if mean3 is not None else xin) * r(rs)

    def dyh(r):  # dL/d(xhat * w + b), in C
        return r(dy3) * gate(r) if gate_after else r(dy3)

    def g(r):
        return dyh(r) * w3

    def column_sum(term) -> torch.Tensor:  # (N,): the sum over all rows of term(r), in C
        if not blocked:
            return term(everything).sum(dim=0, dtype=c).view(n)
        blocks = m // _COLUMN_BLOCK
        whole = blocks * _COLUMN_BLOCK

        def in_blocks(t):  # (blocks, _COLUMN_BLOCK, ...) view of the first whole rows (as_strided: no guards)
            return t.as_strided((blocks, _COLUMN_BLOCK, *t.shape[1:]), (_COLUMN_BLOCK * t.stride(0), *t.stride()))

        partial = term(in_blocks).sum(dim=1, dtype=c)
        return (partial.sum(dim=0) + term(lambda t: t[whole:]).sum(dim=0, dtype=c)).view(n)

    dx = dz = dw = db = None
    if gate_after and needs_dz:
        b3 = None if bias is None else in_compute_dtype(bias, c).view(shape3)
        dz = numerics.affine(xhat(everything), w3, b3, None).mul_(dy3).mul_(dgate(everything))
    if needs_dweight:
        dw = column_sum(lambda r: dyh(r) * xhat(r))
    if needs_dbias and bias is not None:
        db = column_sum(dyh)
    if needs_dx or (gate_before and needs_dz):
        mean_g_xhat = (g(everything) * xhat(everything)).mean(dim=-1, keepdim=True)
        mean_g = g(everything).mean(dim=-1, keepdim=True) if mean is not None else None

        def dxc():
            return numerics.input_grad_from_means(g(everything), xhat(everything), rs, mean_g_xhat, mean_g)

        if gate_before:
            if needs_dz:
                dz = (dxc() * x3).mul_(dgate(everything))
            if needs_dx:
                dx = dxc().mul_(gate(everything))
        else:
            dx = dxc()
    return (None if dx is None else dx.reshape(m, n)), (None if dz is None else dz.reshape(m, n)), dw, db


def _make_backward(spec: NormSpec, needs: GradsNeeded, cpu: bool, blocked: bool) -> Callable:
    """The compiled backward: on CPU :func:`_backward_rows_recomputed` (``blocked``: column sums in row
    blocks), elsewhere :func:`numerics.backward_rows`."""

    def bwd(dy, x, weight, bias, z, mean, rstd):
        m = x.shape[0]
        # (M, G) views of the group-major stats: views only, no layout branch on M
        mean2, rstd2 = None if mean is None else mean.view(-1, m).t(), rstd.view(-1, m).t()
        if cpu:
            grads = _backward_rows_recomputed(dy, x, weight, bias, z, mean2, rstd2, spec, *needs, blocked=blocked)
        else:
            grads = numerics.backward_rows(dy, x, weight, bias, z, mean2, rstd2, spec, *needs)
        dtypes = (x.dtype, None if z is None else z.dtype, weight.dtype, None if bias is None else bias.dtype)
        return tuple(None if g is None else g.to(d) for g, d in zip(grads, dtypes, strict=True))

    return bwd


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _mark_rows_dynamic(*tensors: torch.Tensor | None) -> None:
    # M = 1 (and other small counts) must not specialise: the row dim is always symbolic.
    for t in tensors:
        if t is not None and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


#: Positions of the arguments whose dim 0 counts rows (M, or G * M for the statistics), per compiled function.
_FORWARD_ROW_ARGS = (0, 3, 4)  # fwd(x, weight, bias, z, out); fwd(x, weight, bias, z) returning its output
_BACKWARD_ROW_ARGS = (0, 1, 4, 5, 6)  # bwd(dy, x, weight, bias, z, mean, rstd)


class CompiledBackend:
    """The ``compiled`` backend. ``rescue_inline`` (None: on every device but CPU) scales every group
    in the graph instead of flagging out-of-range rows for an eager redo."""

    name = "compiled"
    supports_float64 = True

    def __init__(self, rescue_inline: bool | None = None) -> None:
        self.rescue_inline = rescue_inline
        self._lock = threading.Lock()
        self._cache: dict[tuple, Callable] = {}

    def _compiled(self, key: tuple, factory: Callable[[], Callable], row_args: tuple[int, ...]) -> Callable:
        """The compiled function for ``key``: built and wrapped once, on a private code object; the dim 0 of
        the arguments at ``row_args`` is traced as a symbol (:func:`_timed_first_call`)."""
        fn = self._cache.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._cache.get(key)
            if fn is None:
                raw = factory()
                # A fresh code object per feature combination: dynamo keeps its cache (and its
                # recompile limit) per code object, so combinations must not share one.
                code = raw.__code__.replace(co_name=f"{raw.__name__}_{len(COMPILE_TIMES)}_{len(self._cache)}")
                raw = types.FunctionType(code, raw.__globals__, code.co_name, raw.__defaults__, raw.__closure__)
                # dynamic=None + rows marked dynamic: M is symbolic, while N, the group size and the
                # constants stay static so Inductor fuses each row's reductions without full-size buffers.
                fn = _timed_first_call(key, torch.compile(raw, dynamic=None, fullgraph=True), row_args)
                self._cache[key] = fn
        return fn

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self._forward(x, weight, bias, z, spec, out, stats=True)

    def forward_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       z: torch.Tensor | None, spec: NormSpec) -> torch.Tensor:
        """:meth:`forward` for a caller that discards the statistics: on CPU they are made only when a row
        needs the rescue (:func:`_stats_from_sums`: its eager ops took 0.14-0.37 ms after a 2 ms graph).

        On CPU the graph returns its own output (:func:`_make_forward_sums` with ``returns_output``), as the
        compiled recipe does, instead of writing into an ``out`` made here: writing into an argument, Inductor
        stores each float32 result twice (into a row buffer and into out). With the gate before the norm and
        float32 (float64) rows, the output then takes the buffer that held x * act(z): one full-size buffer,
        not two. Measured (2-core VM, glibc's blocks reused: no page faults), the compiled recipe's time over
        the two ways: 65536x128 float32 gate after 1.25x -> 1.04x, 4096x2048 LayerNorm float32 1.30x -> 0.98x,
        bf16 1.01-1.07x either way. Except where an output made here lands on memory not mapped yet and is
        advised onto huge pages (:func:`gatednorm.huge_pages.advised_fresh`, outputs of 32 MiB or more): it
        then takes no page fault per 4 KiB, which Inductor's own output would (same rows, glibc as users have
        it: 10.1 ms returned, 5.8 ms advised). An output on memory glibc had mapped already is let go, and the
        graph's own output takes that memory back.
        """
        x, z = _contiguous(x), _contiguous(z)
        in_graph = self._rescue_in_graph(x)
        gate_buffer = not spec.norm_before_gate and z is not None and x.dtype == compute_dtype(x.dtype)
        if in_graph or (not gate_buffer and x.numel() * x.element_size() >= MIN_BYTES):
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            if in_graph or advised_fresh(out):
                self._forward(x, weight, bias, z, spec, out, stats=False)
                return out
            del out  # memory glibc had mapped already: the graph's own output takes it back
        key = ("fwd", spec, x.shape[1], _dtypes(x, weight, bias, z), "returns output")
        fn = self._compiled(key, lambda: _make_forward_sums(spec, returns_output=True), _FORWARD_ROW_ARGS[:2])
        with torch.no_grad():
            out, sum_x, sum_sq, in_range = fn(x, weight, bias, z)
            if not in_range:
                mean, rstd = _stats_from_sums(sum_x, sum_sq, spec)
                _redo_out_of_range(x, weight, bias, z, spec, out, mean, rstd)
        return out

    def _forward(self, x, weight, bias, z, spec: NormSpec, out, stats: bool):
        """Write out; return (mean, rstd), or with ``stats=False`` on CPU (None, None) unless a row was redone."""
        x, z = _contiguous(x), _contiguous(z)
        with torch.no_grad():
            if self._rescue_in_graph(x):
                return self._compiled_forward(x, weight, bias, z, spec, out, sums=False)(x, weight, bias, z, out)
            fn = self._compiled_forward(x, weight, bias, z, spec, out, sums=True)
            sum_x, sum_sq, in_range = fn(x, weight, bias, z, out)
            if in_range and not stats:
                return None, None
            mean, rstd = _stats_from_sums(sum_x, sum_sq, spec)
            if not in_range:
                _redo_out_of_range(x, weight, bias, z, spec, out, mean, rstd)
        return mean, rstd

    def _rescue_in_graph(self, x: torch.Tensor) -> bool:
        return self.rescue_inline if self.rescue_inline is not None else x.device.type != "cpu"

    def _compiled_forward(self, x, weight, bias, z, spec: NormSpec, out, sums: bool) -> Callable:
        """The compiled forward for this call (its row count traced as a symbol): :func:`_make_forward_sums` with
        ``sums``, else :func:`_make_forward`. Row-major x and z only (the callers' ``_contiguous``): strided
        rows would give Inductor another (less accurate, sequential) reduction loop and a recompile per
        layout; a copy is what a fused kernel would do too."""
        key = ("fwd", spec, x.shape[1], _dtypes(x, weight, bias, z, out), not sums)
        return self._compiled(key, lambda: _make_forward_sums(spec) if sums else _make_forward(spec),
                              _FORWARD_ROW_ARGS)

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                 needs: GradsNeeded) -> Grads:
        dy, x, z = _contiguous(dy), _contiguous(x), _contiguous(z)
        cpu = x.device.type == "cpu"
        # Row blocks for the column sums from 2 blocks on: a graph traced with fewer rows than a block
        # fails in Inductor (an empty block loop), and one traced with M = 1 is specialised to it. Batches
        # below 2 blocks take a graph of their own (one more, or two when the first of them has M = 1).
        blocked = cpu and x.shape[0] >= 2 * _COLUMN_BLOCK
        key = ("bwd", spec, x.shape[1], _dtypes(dy, x, weight, bias, z), mean is not None, needs, cpu, blocked)
        fn = self._compiled(key, lambda: _make_backward(spec, needs, cpu, blocked), _BACKWARD_ROW_ARGS)
        with torch.no_grad():
            return fn(dy, x, weight, bias, z, mean, rstd)


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    """The dtypes of a call's tensors (None: absent), for the compiled functions' keys: a dtype the key left out
    would make dynamo recompile the same function, and only a function's first call traces size-obliviously."""
    return tuple(None if t is None else t.dtype for t in tensors)


def _timed_first_call(key: tuple, compiled: Callable, row_args: tuple[int, ...]) -> Callable:
    """``compiled`` with its first call (the trace: dynamo and Inductor) timed into COMPILE_TIMES, its row
    dims (dim 0 of the arguments at ``row_args``) marked dynamic and traced size-obliviously, so that M = 1
    does not specialise the graph (no recompile for single rows).

    Later calls skip both: the marks and the setting are read while dynamo traces, and later calls meet the
    guards of the first trace (a row count it left symbolic). Every dtype, shape feature and flag the graph
    depends on is in ``key``, so only an unusual layout (a strided weight) retraces a later call: without the
    setting, so at worst that layout gets a graph specialised to its M. Marking and setting took about 14 us of
    host time per call (a 2-row LayerNorm through layernorm_fn: 64.7 -> 50.5 us), several times that on caches
    flushed by a large call.
    """
    state = {"first": True}

    def call(*args):
        if not state["first"]:
            return compiled(*args)
        _mark_rows_dynamic(*(args[i] for i in row_args))
        config = torch.fx.experimental._config
        saved = config.backed_size_oblivious
        config.backed_size_oblivious = True
        try:
            start = time.perf_counter()
            result = compiled(*args)
            COMPILE_TIMES.append((key, time.perf_counter() - start))
            state["first"] = False
            return result
        finally:
            config.backed_size_oblivious = saved

    return call


def _redo_out_of_range(x, weight, bias, z, spec: NormSpec, out, mean, rstd) -> None:
    """Redo the rows whose rstd is out of range (:func:`_redo_rows`)."""
    rows = numerics.rstd_out_of_range(numerics.row_major(rstd, x.shape[0])).any(dim=1)
    _redo_rows(rows.nonzero().squeeze(1), x, weight, bias, z, spec, out, mean, rstd)


def _redo_rows(rows: torch.Tensor, x, weight, bias, z, spec: NormSpec, out, mean, rstd) -> None:
    """Recompute ``rows`` with the rescuing formula and write them into out / mean / rstd. A row's
    result still depends on that row alone (batch invariance)."""
    m = x.shape[0]
    sub_out = out.new_empty(len(rows), out.shape[1])
    _, mu, rs = numerics.forward_rows(x.index_select(0, rows), weight, bias,
                                      None if z is None else z.index_select(0, rows), spec, rescue=True, out=sub_out)
    out.index_copy_(0, rows, sub_out)
    rstd.view(-1, m).index_copy_(1, rows, rs.t())
    if mean is not None:
        mean.view(-1, m).index_copy_(1, rows, mu.t())
