"""The native backend on CPU: one pass per row through the C kernel (:mod:`.native_cpu_kernel`) where it is built,
else plain PyTorch ops over small row blocks; either way spread over worker threads.

The operator of docs/design.md section 1 (the formulas of :mod:`gatednorm.numerics`), written for
a CPU that other processes share, because there speed comes from how the work meets the cores.

Why not ATen's own threading
----------------------------
The straightforward way (big row blocks, every op split over the intra-op threads) opens one
parallel region per op, about 300 per call, and each region ends at a barrier that waits for the
slowest thread. On a quiet machine that is fast; on a machine where another process is busy, a
descheduled thread stalls every barrier for a scheduler time slice. With one core busy (2 cores, the
shapes of benchmarks/bench_cpu.py), that design ran at 0.4-1.5x the float32 recipe's speed forward
and at 0.2-0.6x forward+backward: up to 4.5x slower than the recipe (issue 12). This design is as
fast quiet (4-24% faster in direct calls) and runs 1.2-2.1x slower with one core busy
(benchmarks/results/cpu_bench.md).

The design: coarse-grained, dynamically scheduled work
------------------------------------------------------
* The rows are cut into blocks of fewer than :data:`ATEN_GRAIN` elements (:data:`CPU_BLOCK_ELEMENTS`),
  so every ATen op on a block runs serially: no parallel region, no barrier, inside a call.
* Consecutive blocks form at most :data:`MAX_TASKS` tasks. The calling thread and
  ``torch.get_num_threads() - 1`` persistent helper threads (:class:`_Pool`) take tasks from a shared
  counter until none is left: a helper that the OS deschedules delays only the task it holds, the
  others take the rest. The call waits for tasks, never for idle helpers.
* A task runs the block loop as one TorchScript function (:func:`_forward_rows`,
  :func:`_backward_rows`), which executes without the GIL. Python between ops would not do: every
  ATen call releases and retakes the GIL, and two threads doing that per op ran at 0.5-1.0x the
  speed of one (chains of 1k-32k-element ops; the same chains under TorchScript: 1.6-1.8x). This path
  with its kernels run as Python on two threads took 1.3-2.1x the time of one thread, and 2.4-3.8x the
  time of the TorchScript kernels on two threads.
  TorchScript runs here only as an interpreter of these fixed functions, with graph optimisation off
  (:func:`torch.jit.optimized_execution`, a thread-local switch), so it executes exactly the ATen ops
  the Python source names. Where it is unavailable, or where the call must stay in the calling thread
  (a Python dispatch or function mode is active, tensor subclasses), the same functions run as Python,
  serially, with the same bits.
* Rows wider than a block's limit (about 32k features) run block after block in the calling thread
  with intra-op parallel ops, as before: those ops are big enough to amortise their barriers.
* Alternatives measured (2 cores): ``torch.set_num_threads(1)`` around the old path survives
  contention but is a process-wide setting and takes 1.8-2x the quiet time of either parallel path;
  a C++ extension (``torch.utils.cpp_extension``) took 25 s to build a trivial at::vec kernel here.
* Forward and backward of float32 / bfloat16 tensors run a C kernel instead of the block kernels where a
  C compiler built it (:mod:`.native_cpu_kernel`: one pass per row, built in about a second on first use,
  called through ctypes without the GIL on the same pool, one call per worker taking work from a counter
  shared inside C). The block kernels below remain the fallback (no compiler, float16 / float64, tensor
  subclasses) and the reference.

Batch invariance and determinism
--------------------------------
A row's bits depend on that row only (not on the batch size, its position, the block or task it
lands in, which thread runs it, or the thread count), because only ops whose per-element result is
position independent are used:

* additions, multiplications and divisions are correctly rounded, so their bits never depend on
  vectorisation; an op that reads a narrower input (bf16 x) promotes it exactly in the kernel;
* rstd is ``torch.rsqrt``: a correctly rounded square root, then a correctly rounded division, in the
  vector body and the scalar tail alike. (``torch.sqrt`` on CPU runs MKL's vector math, which is not
  correctly rounded and opens parallel regions of its own: it is not used on this path.)
* ATen's fused ``silu``/``sigmoid`` CPU kernels compute the scalar tail of a loop with a different
  formula than the vector body, so they run on a flat buffer padded so that no element falls in a
  tail (:func:`fused_activation_length`): a multiple of the vector width for a serial call, a
  multiple of ``ATEN_GRAIN * num_threads`` for a parallel one (wide rows only);
* row reductions go through ``torch.sum`` over the last dim, whose CPU order depends only on the group
  size - except when the reduction has a single output, where ATen splits it across threads;
  :func:`_group_sum` avoids that case. No fused multiply-add op (addcmul, alpha=) is used: a compiler
  may contract the vector body but not the scalar tail.

dweight and dbias sum over rows, so their bits depend on the batch; they are deterministic: each task
sums its rows in block order into its own partial row, and the partials are summed in task order
(task boundaries depend on M, N and the block size only, never on the threads).

Errors: a task that raises stops the call (no new task starts), the call waits for the tasks in
flight and re-raises the first error; its outputs are never returned, but an ``out=`` tensor the
caller passed in may hold partial results. Threads: helpers are daemons, created on first use and
reused by every call (and by calls from several user threads at once); a forked child starts without
them and makes its own. A helper frees its buffers before it reports back (see :class:`_Job`).

Range rescue (:mod:`gatednorm.numerics`): after the tasks, one check over the stored rstd finds blocks
with a group whose var + eps left [SAFE_VAR_MIN, inf) (:func:`_blocks_out_of_range`); those are redone
in the calling thread with such groups divided by a power of two (the cold path; groups in range keep
their bits).

Memory: per worker, a few float32 buffers of one block (128 KiB each), plus the statistics and, in the
backward, the per-task partial sums of dweight/dbias (at most N * M / 8 float32 values each).
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..numerics import SAFE_RSTD_MAX, SAFE_VAR_MIN, rescale_groups, scaled_rstd
from ..spec import NormSpec, QuantSpec, compute_dtype
from . import native_cpu_kernel, native_cpu_node
from .base import Grads, GradsNeeded, quantize_by_steps

#: ATen's CPU parallel grain (at::internal::GRAIN_SIZE): element-wise ops and reductions on fewer
#: elements run serially; larger ones are cut into num_threads chunks of ceil(numel / num_threads).
ATEN_GRAIN = 32768

#: Two vectors of the widest ATen CPU vector (2 x 16 float32 for AVX-512) divide this.
_VECTOR_PAD = 64

#: Elements per row block: the largest multiple of the vector padding below ATEN_GRAIN, so that every
#: op on a block (the padded silu/sigmoid call included) runs serially, and a few float32 buffers of
#: one block (128 KiB each) stay in a core's L2 cache.
CPU_BLOCK_ELEMENTS = ATEN_GRAIN - _VECTOR_PAD

#: A call's blocks are grouped into at most this many tasks (the unit that threads take): enough for
#: dynamic load balance, few enough that the backward's per-task partial sums stay small.
MAX_TASKS = 64

#: Rows per task at least (bounds the backward's partial sums to N * M / 8 values per gradient).
_MIN_TASK_ROWS = 8

#: Calls with fewer blocks than this run in the calling thread alone: waking helpers costs more.
_MIN_POOLED_BLOCKS = 4


def rows_per_block(m: int, n: int, block_elements: int = CPU_BLOCK_ELEMENTS) -> int:
    """Rows handled per block: about ``block_elements`` elements, at least one row."""
    return max(1, min(m, block_elements // n))


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
    return _padded_length(numel, torch.get_num_threads())


def in_safe_range(var_eps: torch.Tensor) -> bool:
    """True when every var + eps lies in [SAFE_VAR_MIN, inf): the plain float32 sums were exact enough.
    (Kept for :mod:`gatednorm.native`; this path checks the stored rstd, :func:`_blocks_out_of_range`.)

    Outside it (a NaN fails too) the sums of x or x^2 overflowed (|x| above ~1.8e19) or the squares
    underflowed with a tiny eps; :func:`gatednorm.numerics.rescale_groups` then redoes those groups. One reduction and
    a host read: used on CPU, where that costs nothing like a device sync.
    """
    lo, hi = torch.aminmax(var_eps)
    return bool(lo >= SAFE_VAR_MIN) and bool(hi < float("inf"))


# ---------------------------------------------------------------------------
# Block kernels. Written in the subset of Python that TorchScript compiles (:func:`_kernels`), and run
# as Python where TorchScript is not used: the same ATen ops either way, so the same bits.
# ---------------------------------------------------------------------------


def _padded_length(numel: int, threads: int) -> int:
    """:func:`fused_activation_length` for a given intra-op thread count."""
    padded = (numel + 63) // 64 * 64  # _VECTOR_PAD (TorchScript reads no module constants)
    if padded <= 32768:  # ATEN_GRAIN
        return padded
    unit = 32768 * max(1, threads)
    return (numel + unit - 1) // unit * unit


def _group_sum(t3: torch.Tensor, out3: torch.Tensor, pair: torch.Tensor | None) -> None:
    """out3 (m, G, 1) = sum of t3 (m, G, gs) over the last dim, in a row-independent order.

    ATen reduces each output serially over the last dim, except when the whole
    reduction has a single output: then it splits the row across threads and
    the summation order changes. A lone (row, group) is therefore reduced as two
    identical rows through a stride-0 view (``pair`` is a (2, 1, 1) buffer).
    """
    if pair is not None and t3.shape[0] * t3.shape[1] == 1:
        torch.sum(t3.expand(2, 1, t3.shape[2]), dim=[-1], keepdim=True, out=pair)
        out3.copy_(pair[:1])
    else:
        torch.sum(t3, dim=[-1], keepdim=True, out=out3)


def _fused_gate(z: torch.Tensor, gate: torch.Tensor, work: torch.Tensor, sigmoid_only: bool) -> None:
    """gate (rows, N) = act(z) (silu; sigmoid with ``sigmoid_only``) through a fused kernel run on ``work``,
    the flat padded buffer that ``gate`` starts (:func:`fused_activation_length`). The padding holds
    finite leftovers and is never read."""
    gate.copy_(z)
    if sigmoid_only:
        torch.sigmoid(work, out=work)
    else:
        torch.nn.functional.silu(work, inplace=True)


def _var_plus_eps(src3: torch.Tensor, x3: torch.Tensor, sq3: torch.Tensor, mu: torch.Tensor | None,
                  var_eps: torch.Tensor, pair: torch.Tensor | None, gs: torch.Tensor,
                  eps: torch.Tensor) -> torch.Tensor:
    """var_eps (rows, G, 1) = var + eps of src3 (rows, G, gs); returns the values to normalise.

    LayerNorm (``mu`` given): mu = the mean, and src3 (then the contiguous buffer x3 itself: the
    reduction order must not depend on a layout) is centred in place (two-pass variance, never
    E[x^2] - E[x]^2); the result is x3. RMSNorm: src3 may be x's own rows in the compute dtype (only
    read element-wise), returned as is. ``sq3`` is scratch; ``gs`` and ``eps`` are 0-dim tensors in the
    compute dtype (cheaper than Python scalars, same values).
    """
    if mu is not None:
        _group_sum(x3, mu, pair)
        mu.div_(gs)
        x3.sub_(mu)
        src3 = x3
    torch.mul(src3, src3, out=sq3)
    _group_sum(sq3, var_eps, pair)
    var_eps.div_(gs).add_(eps)
    return src3


def _forward_rows(
    x: torch.Tensor, z: torch.Tensor | None, weight_c: torch.Tensor, bias_c: torch.Tensor | None,
    out: torch.Tensor, mean3: torch.Tensor | None, rstd3: torch.Tensor,
    buf_x: torch.Tensor, buf_t: torch.Tensor, flat_g: torch.Tensor | None, pair: torch.Tensor | None,
    r0: int, r1: int, step: int, gs: int, eps: float, gate_before: bool, sigmoid: bool, threads: int,
) -> None:
    """The forward of rows [r0, r1) of x (M, N), block by block (``step`` rows; blocks start at
    multiples of ``step``), into out and the statistics mean3/rstd3 ((M, G, 1) views of the 1-D
    group-major storage, written in place: var + eps, then rstd). buf_x/buf_t are (step, N) scratch,
    flat_g a zeroed flat buffer of :func:`_padded_length` (step * N) elements.
    """
    n = x.shape[1]
    groups = n // gs
    c = buf_x.dtype
    gs_t = torch.full([], gs, dtype=c)
    eps_t = torch.full([], eps, dtype=c)
    same_out = out.dtype == c
    # RMSNorm reads x's rows directly where they are in the compute dtype (no copy); the others fill buf_x
    read_x = mean3 is None and not (z is not None and gate_before) and x.dtype == c
    # views of a full block, made once; a shorter last block makes its own
    xc, sq = buf_x, buf_t
    x3, sq3 = buf_x.view(step, groups, gs), buf_t.view(step, groups, gs)
    gate, work = buf_x, buf_x  # placeholders; only read with a gate
    if flat_g is not None:
        gate, work = flat_g[: step * n].view(step, n), flat_g[: _padded_length(step * n, threads)]
    mb = step
    for s0 in range(r0, r1, step):
        s1 = min(s0 + step, r1)
        if s1 - s0 != mb:
            mb = s1 - s0
            xc, sq = buf_x[:mb], buf_t[:mb]
            x3, sq3 = xc.view(mb, groups, gs), sq.view(mb, groups, gs)
            if flat_g is not None:
                gate, work = flat_g[: mb * n].view(mb, n), flat_g[: _padded_length(mb * n, threads)]
        xs = x[s0:s1]
        src3 = x3
        if z is not None:
            _fused_gate(z[s0:s1], gate, work, sigmoid)
        if z is not None and gate_before:
            torch.mul(xs, gate, out=xc)  # x promoted to C in the kernel: exact
        elif read_x:
            src3 = xs.view(mb, groups, gs)
        else:
            xc.copy_(xs)
        rs = rstd3[s0:s1]
        mu: torch.Tensor | None = None
        if mean3 is not None:
            mu = mean3[s0:s1]
        src3 = _var_plus_eps(src3, x3, sq3, mu, rs, pair, gs_t, eps_t)
        rs.rsqrt_()  # 1 / sqrt(var + eps), each step correctly rounded (torch.sqrt is MKL's on CPU)
        torch.mul(src3, rs, out=x3)  # xhat
        y = out[s0:s1]
        if z is not None and not gate_before:  # y = (xhat * w + b) * act(z)
            xc.mul_(weight_c)
            if bias_c is not None:
                xc.add_(bias_c)
            _last_op(xc, gate, True, y, same_out)
        elif bias_c is not None:  # y = xhat * w + b
            xc.mul_(weight_c)
            _last_op(xc, bias_c, False, y, same_out)
        else:  # y = xhat * w
            _last_op(xc, weight_c, True, y, same_out)


def _last_op(t: torch.Tensor, operand: torch.Tensor, multiply: bool, y: torch.Tensor, same_dtype: bool) -> None:
    """y = t * operand (or t + operand): written by the op itself when y has t's dtype, else computed in
    t and copied, the one rounding to the output dtype (an op writing a narrower ``out`` allocates)."""
    if same_dtype:
        if multiply:
            torch.mul(t, operand, out=y)
        else:
            torch.add(t, operand, out=y)
    else:
        if multiply:
            t.mul_(operand)
        else:
            t.add_(operand)
        y.copy_(t)


def _backward_rows(
    dy: torch.Tensor, x: torch.Tensor, weight_c: torch.Tensor, bias_c: torch.Tensor | None,
    z: torch.Tensor | None, mean3: torch.Tensor | None, rstd3: torch.Tensor,
    dx: torch.Tensor | None, dz: torch.Tensor | None, part_w: torch.Tensor | None, part_b: torch.Tensor | None,
    buf_x: torch.Tensor, buf_dy: torch.Tensor, buf_p: torch.Tensor, buf_z: torch.Tensor | None,
    flat_s: torch.Tensor | None, buf_dg: torch.Tensor | None, acc_w: torch.Tensor | None,
    acc_b: torch.Tensor | None, stat: torch.Tensor, pair: torch.Tensor | None,
    r0: int, r1: int, step: int, gs: int, gate_before: bool, swish: bool, need_dxin: bool, threads: int,
) -> None:
    """Gradients of rows [r0, r1), block by block; see :func:`backward`.

    With xhat = (xc - mean) * rstd and g = w * dL/dy' (dy' = dy times the gate when the gate comes
    after the norm), per group: LayerNorm dxc = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm
    drops mean(g). dx/dz rows are written directly (rounded once); dweight and dbias of these rows are
    summed, block after block, into acc_w/acc_b (step, N) and then over rows into part_w/part_b (N,).
    mean3/rstd3 are (M, G, 1) views of the saved statistics; stat is a (2, step, G, 1) scratch.
    """
    n = x.shape[1]
    groups = n // gs
    c = buf_x.dtype
    gs_t = torch.full([], gs, dtype=c)
    one = torch.ones([], dtype=c)
    gate_after = z is not None and not gate_before
    if acc_w is not None:
        acc_w.zero_()
    if acc_b is not None:
        acc_b.zero_()
    # views of a full block, made once; a shorter last block makes its own
    xc, dyc, p = buf_x, buf_dy, buf_p
    x3, g3, p3 = buf_x.view(step, groups, gs), buf_dy.view(step, groups, gs), buf_p.view(step, groups, gs)
    c1, c2 = stat[0], stat[1]
    s, zc, work, dg = buf_x, buf_x, buf_x, buf_x  # placeholders; only read with a gate
    if flat_s is not None:
        s, work = flat_s[: step * n].view(step, n), flat_s[: _padded_length(step * n, threads)]
    if buf_z is not None:
        zc = buf_z
    if buf_dg is not None:
        dg = buf_dg
    mb = step
    for s0 in range(r0, r1, step):
        s1 = min(s0 + step, r1)
        if s1 - s0 != mb:
            mb = s1 - s0
            xc, dyc, p = buf_x[:mb], buf_dy[:mb], buf_p[:mb]
            x3, g3, p3 = xc.view(mb, groups, gs), dyc.view(mb, groups, gs), p.view(mb, groups, gs)
            c1, c2 = stat[0, :mb], stat[1, :mb]
            if flat_s is not None:
                s, work = flat_s[: mb * n].view(mb, n), flat_s[: _padded_length(mb * n, threads)]
            if buf_z is not None:
                zc = buf_z[:mb]
            if buf_dg is not None:
                dg = buf_dg[:mb]
        rs = rstd3[s0:s1]
        xs, dys = x[s0:s1], dy[s0:s1]
        gate = s
        if z is not None:
            zs = z[s0:s1]
            _fused_gate(zs, s, work, True)  # s = sigmoid(z)
            if swish:
                zc.copy_(zs)
            if dz is not None:
                torch.sub(one, s, out=dg)  # 1 - s, exactly
                if swish:
                    dg.mul_(zc).add_(one)
                dg.mul_(s)  # act'(z)
            if swish:
                gate = zc.mul_(s)  # the forward's formula, so xhat is recomputed bit for bit

        # xhat = (xc - mean) * rstd, in buf_x (inputs narrower than C promote in the kernels: exact)
        if gate_before:
            torch.mul(xs, gate, out=xc)
            if mean3 is not None:
                x3.sub_(mean3[s0:s1])
            x3.mul_(rs)
        elif mean3 is not None:
            torch.sub(xs.view(mb, groups, gs), mean3[s0:s1], out=x3)
            x3.mul_(rs)
        else:
            torch.mul(xs.view(mb, groups, gs), rs, out=x3)

        if gate_after:
            if dz is not None:
                # y = (xhat * w + b) * act(z): dz = dy * (xhat * w + b) * act'(z)
                torch.mul(xc, weight_c, out=p)
                if bias_c is not None:
                    p.add_(bias_c)
                p.mul_(dys).mul_(dg)
                dz[s0:s1].copy_(p)
            torch.mul(dys, gate, out=dyc)  # dL/d(xhat * w + b)
        else:
            dyc.copy_(dys)
        if acc_w is not None:
            torch.mul(dyc, xc, out=p)
            acc_w[:mb].add_(p)
        if acc_b is not None:
            acc_b[:mb].add_(dyc)
        if not need_dxin:
            continue

        dyc.mul_(weight_c)  # g = dL/dxhat
        torch.mul(xc, dyc, out=p)
        _group_sum(p3, c1, pair)
        c1.div_(gs_t)
        if mean3 is not None:
            _group_sum(g3, c2, pair)
            c2.div_(gs_t)
            g3.sub_(c2)
        x3.mul_(c1)
        dyc.sub_(xc)
        g3.mul_(rs)  # dL/dxc
        if gate_before:
            if dz is not None:
                # xc = x * act(z): dz = dL/dxc * x * act'(z)
                torch.mul(dyc, xs, out=p)
                p.mul_(dg)
                dz[s0:s1].copy_(p)
            dyc.mul_(gate)
        if dx is not None:
            dx[s0:s1].copy_(dyc)
    if acc_w is not None and part_w is not None:
        torch.sum(acc_w, dim=[0], out=part_w)
    if acc_b is not None and part_b is not None:
        torch.sum(acc_b, dim=[0], out=part_b)


class _Kernels:
    """The block kernels as they run: TorchScript functions (GIL released while they run) or the Python
    functions themselves (``scripted`` False: TorchScript unavailable)."""

    def __init__(self) -> None:
        self.forward: Callable[..., None] = _forward_rows
        self.backward: Callable[..., None] = _backward_rows
        self.scripted = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script is deprecated (a warning per function)
                forward, backward = torch.jit.script(_forward_rows), torch.jit.script(_backward_rows)
        except Exception:  # any failure: the Python functions (run serially) are the fallback
            return
        self.forward, self.backward, self.scripted = forward, backward, True


_KERNELS: list[_Kernels] = []
_KERNELS_LOCK = threading.Lock()


def _kernels() -> _Kernels:
    """The block kernels, compiled by TorchScript on first use (about 0.1 s, once per process)."""
    if not _KERNELS:
        with _KERNELS_LOCK:
            if not _KERNELS:
                _KERNELS.append(_Kernels())
    return _KERNELS[0]


# ---------------------------------------------------------------------------
# The worker pool
# ---------------------------------------------------------------------------


class _Job:
    """One call's tasks, taken one at a time by whichever thread asks next (dynamic scheduling).

    ``run(i, state)`` runs task i; ``state`` is what ``make_state()`` returned, made once per thread
    that takes a task (its buffers). The first error stops new tasks.

    The calling thread works through :meth:`work` and then :meth:`finish`, which waits for the helpers
    (never for its own bookkeeping: a KeyboardInterrupt can only hit the calling thread, so it cannot
    leave a count behind). Helpers enter through :meth:`help`, which drops the helper's buffers before
    it reports back, and :meth:`finish` drops the job's tensors afterwards: a helper never holds the last
    reference to a tensor once the call has returned. (Freeing a tensor releases the GIL; a daemon thread
    that does so while the interpreter shuts down is stopped by an unwinding that C++ code turns into
    ``std::terminate``.)
    """

    def __init__(self, tasks: int, run: Callable[[int, Any], None], make_state: Callable[[], Any]) -> None:
        self._tasks = tasks
        self._run: Callable[[int, Any], None] | None = run
        self._make_state: Callable[[], Any] | None = make_state
        self._lock = threading.Lock()
        self._started = 0
        self._helpers = 0  # helpers inside help()
        self._idle = threading.Event()
        self._idle.set()
        self.error: BaseException | None = None
        self.inference = torch.is_inference_mode_enabled()

    def _take(self) -> int | None:
        with self._lock:
            if self._started >= self._tasks:
                return None
            self._started += 1
            return self._started - 1

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self._tasks = self._started  # no task starts after an error

    def work(self) -> None:
        """Run tasks until none is left; a task's error is kept (see :meth:`finish`), not raised."""
        state = None
        while (i := self._take()) is not None:
            try:
                if state is None:
                    state = self._make_state()
                self._run(i, state)
            except BaseException as exc:  # re-raised by finish() in the calling thread
                self._fail(exc)

    def help(self) -> None:
        """A helper's part: :meth:`work`, its buffers freed, then reported done."""
        with self._lock:
            self._helpers += 1
            self._idle.clear()
        try:
            self.work()  # returns after its buffers (a local) are gone
        finally:
            with self._lock:
                self._helpers -= 1
                if self._helpers == 0:
                    self._idle.set()

    def finish(self) -> None:
        """(Calling thread) Start no further task, wait for the helpers' tasks, drop the tensors that the
        tasks reach, and re-raise the first error."""
        with self._lock:
            self._tasks = self._started
        self._idle.wait()
        self._run = self._make_state = None
        if self.error is not None:
            raise self.error


class _Pool:
    """Persistent helper threads (daemons, created on demand, reused by every call).

    :meth:`run` posts a job to ``helpers`` of them and works on it in the calling thread too, so a job
    always progresses even when every helper is busy elsewhere (another user thread's call) or
    descheduled; a helper that comes late finds the job finished and touches nothing. Calls from
    several threads at once share the helpers, each job in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []

    def _helper(self, jobs: queue.SimpleQueue) -> None:
        # the calling thread's grad and inference modes, which are thread-local: outputs created in
        # inference mode only accept writes in inference mode
        with torch.jit.optimized_execution(False):
            while True:
                job = jobs.get()
                with torch.inference_mode() if job.inference else torch.no_grad():
                    job.help()
                del job

    def run(self, job: _Job, helpers: int) -> None:
        with self._lock:
            while len(self._queues) < helpers:
                jobs: queue.SimpleQueue = queue.SimpleQueue()
                thread = threading.Thread(target=self._helper, args=(jobs,), daemon=True,
                                          name=f"gatednorm-cpu-{len(self._queues)}")
                thread.start()
                self._queues.append(jobs)
            targets = self._queues[:helpers]
        for jobs in targets:
            jobs.put(job)
        try:
            job.work()
        finally:
            job.finish()

    def threads(self) -> int:
        """Helper threads started so far."""
        return len(self._queues)


_POOL = _Pool()


def _reset_pool_after_fork() -> None:
    global _POOL
    _POOL = _Pool()  # the child process has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


#: Tensor types the TorchScript kernels take (a Parameter is a plain tensor to them).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _thread_local_modes_active() -> bool:
    """A Python dispatch or function mode is active in this thread: helper threads would not see it."""
    dispatch = getattr(torch._C, "_len_torch_dispatch_stack", None)
    function = getattr(torch._C, "_len_torch_function_stack", None)
    return bool((dispatch is not None and dispatch() > 0) or (function is not None and function() > 0))


class _Plan:
    """How a call's rows are cut: ``step`` rows per block, ``per_task`` blocks per task, and whether the
    tasks run on the pool (``workers`` > 1, blocks below ATen's grain) or in the calling thread."""

    def __init__(self, m: int, n: int, block_elements: int, tensors: tuple[torch.Tensor | None, ...],
                 compiled_kernel: bool = False) -> None:
        self.step = rows_per_block(m, n, block_elements)
        self.blocks = -(-m // self.step)
        # tasks depend on M and N only (never on threads): the backward's partial sums follow them
        max_tasks = max(1, min(MAX_TASKS, self.blocks, m // _MIN_TASK_ROWS))
        self.per_task = -(-self.blocks // max_tasks)
        self.tasks = -(-self.blocks // self.per_task)
        self.serial_ops = _padded_length(self.step * n, 1) < ATEN_GRAIN
        self.threads = torch.get_num_threads()
        self.forward: Callable[..., None] = _forward_rows
        self.backward: Callable[..., None] = _backward_rows
        if compiled_kernel:
            # the C kernel (native_cpu_kernel) runs the tasks: no TorchScript kernels to compile, and it opens
            # no parallel region at all, so any block size can share the pool
            self.scripted = False
            pooled = True
        else:
            kernels = _kernels()
            # the TorchScript kernels run outside this thread's Python modes: only plain tensors, no mode active
            self.scripted = (kernels.scripted and not _thread_local_modes_active()
                             and all(t is None or type(t) in _PLAIN_TENSORS for t in tensors))
            pooled = self.scripted and self.serial_ops
            if self.scripted:
                self.forward, self.backward = kernels.forward, kernels.backward
        pooled = pooled and self.threads > 1 and self.blocks >= _MIN_POOLED_BLOCKS
        self.workers = min(self.threads, self.tasks) if pooled else 1

    def rows(self, task: int, m: int) -> tuple[int, int]:
        r0 = task * self.per_task * self.step
        return r0, min(m, r0 + self.per_task * self.step)

    def run(self, run_task: Callable[[int, Any], None], make_state: Callable[[], Any],
            tasks: int | None = None) -> None:
        """Run tasks 0 .. ``tasks`` (default: this plan's tasks) on the pool or in this thread."""
        job = _Job(self.tasks if tasks is None else tasks, run_task, make_state)
        # graph optimisation off (a thread-local flag): the interpreter runs exactly the ops of the source
        with torch.jit.optimized_execution(not self.scripted):
            if self.workers > 1:
                _POOL.run(job, self.workers - 1)
            else:
                try:
                    job.work()
                finally:
                    job.finish()


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
    Extra memory: about 3 compute-dtype buffers of one block per worker. M > 0.
    """
    if _use_cpu_kernel((x, z, out), (weight, bias)):  # reads and writes memory only: no autograd to turn off
        return _forward_cpu_kernel(x, weight, bias, z, spec, out, block_elements)
    with torch.no_grad():
        return _forward(x, weight, bias, z, spec, out, block_elements)


def _forward(x, weight, bias, z, spec: NormSpec, out, block_elements: int):
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=dev)
    rstd = torch.empty(groups * m, dtype=c, device=dev)
    mean3 = mean.view(groups, m).t().unsqueeze(-1) if mean is not None else None  # (M, G, 1) views
    rstd3 = rstd.view(groups, m).t().unsqueeze(-1)
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    gate_before = z is not None and not spec.norm_before_gate
    sigmoid = spec.activation == "sigmoid"
    plan = _Plan(m, n, block_elements, (x, z, out, weight, bias))
    step = plan.step

    def make_state():
        return (torch.empty(step, n, dtype=c, device=dev),  # x: gated, centred, normalised, the output
                torch.empty(step, n, dtype=c, device=dev),  # squares
                _fused_buffer(step, n, c, dev, plan.threads) if z is not None else None,
                torch.empty(2, 1, 1, dtype=c, device=dev) if groups == 1 else None)

    def run_task(task: int, state) -> None:
        r0, r1 = plan.rows(task, m)
        plan.forward(x, z, weight_c, bias_c, out, mean3, rstd3, *state, r0, r1, step, gs, spec.eps, gate_before,
                     sigmoid, plan.threads)

    plan.run(run_task, make_state)
    blocks = _blocks_out_of_range(rstd, m, step)
    if blocks:
        state = make_state()
        for block in blocks:
            r0 = block * step
            _redo_block(x, z, weight_c, bias_c, spec, out, mean3, rstd3, state, r0, min(m, r0 + step), plan.threads)
    return mean, rstd


def _use_cpu_kernel(rows: tuple[torch.Tensor | None, ...], others: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether the C kernel (:mod:`.native_cpu_kernel`) runs this call: ``rows`` the (M, N) tensors it reads
    and writes (float32 / bf16 with contiguous features, :func:`native_cpu_kernel.handles`), ``others`` the
    rest it reads (parameters, statistics); all plain CPU tensors (it reads their memory; subclasses such as
    fake or functional tensors take the block kernels), and the kernel built. An active dispatch or function
    mode does not matter: like any kernel, it runs no ATen op that a mode could see, so results do not
    depend on one."""
    if not rows[0].is_cpu:
        return False
    for t in rows + others:  # a loop, not all() over a generator: this runs on every CPU call
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    return native_cpu_kernel.handles(*rows)


def _forward_cpu_kernel(x, weight, bias, z, spec: NormSpec, out, block_elements: int,
                        quant: native_cpu_kernel.QuantTarget | None = None):
    """The forward through the C kernel (GIL released during each call): a call that the pool would not share
    out is one kernel call over all rows in this thread; a pooled one is one kernel call per worker, the
    workers taking blocks of rows from a counter shared inside C (a row's bits do not depend on which call
    computes it). Only when the kernel counted groups out of range are their rows found on the stored rstd
    and redone by the block kernels' rescue, so a row's bits never depend on its neighbours. ``quant``
    (out None): the rows quantized into that target in the same pass instead of written as y; rows redone by
    the rescue go through a float32 buffer and are quantized again."""
    m, n = x.shape
    groups = n // spec.group_size
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=torch.float32)
    rstd = torch.empty(groups * m, dtype=torch.float32)
    weight_k, bias_k = native_cpu_kernel.params_ready(weight), native_cpu_kernel.params_ready(bias)
    gate_before = z is not None and not spec.norm_before_gate
    args = (spec.group_size, spec.eps, spec.is_rms_norm, gate_before, spec.activation == "sigmoid")
    # one block of rows: one kernel call in this thread, as _Plan decides for it (not built: a few us of a
    # small call's host time)
    plan = None if m * n <= block_elements else _Plan(m, n, block_elements, (x, z, out), compiled_kernel=True)
    if plan is None or plan.workers == 1:
        out_of_range = native_cpu_kernel.forward_rows(x, z, weight_k, bias_k, out, mean, rstd, 0, m, *args,
                                                      quant=quant)
    elif native_cpu_kernel.use_team():  # PyTorch's OpenMP threads take the same chunks from a counter
        out_of_range = native_cpu_kernel.forward_rows_team(x, z, weight_k, bias_k, out, mean, rstd, *args, plan.step,
                                                           plan.workers, quant=quant)
    else:
        # one kernel call per worker, each taking blocks of rows from a shared counter inside C (dynamic,
        # so a worker on a busy core takes fewer); a worker that comes late finds none left
        shared = (native_cpu_kernel.WorkCounter(), plan.step)
        counts: list[int] = []  # list.append is atomic: workers on several threads add to it

        def run_worker(_: int, state) -> None:
            counts.append(native_cpu_kernel.forward_rows(x, z, weight_k, bias_k, out, mean, rstd, 0, m, *args,
                                                         shared=shared, quant=quant))

        plan.run(run_worker, lambda: None, tasks=plan.workers)
        out_of_range = sum(counts)
    if out_of_range:
        if plan is None:
            plan = _Plan(m, n, block_elements, (x, z, out), compiled_kernel=True)
        with torch.no_grad():
            _redo_rows_out_of_range(x, z, weight, bias, spec, out, mean, rstd, plan, quant)
    return mean, rstd


def _redo_rows_out_of_range(x, z, weight, bias, spec: NormSpec, out, mean, rstd, plan: _Plan,
                            quant: native_cpu_kernel.QuantTarget | None = None) -> None:
    """The C forward's cold path: the rows holding a group out of range, redone by the block kernels' rescue,
    into ``out``, or (``quant``, out None) quantized from the rescue's float32 rows of each run (no (M, N)
    buffer: a run is at most a step of rows)."""
    m, n = x.shape
    c = torch.float32
    groups = n // spec.group_size
    step = plan.step
    state = (torch.empty(step, n, dtype=c), torch.empty(step, n, dtype=c),
             _fused_buffer(step, n, c, x.device, plan.threads) if z is not None else None,
             torch.empty(2, 1, 1, dtype=c) if groups == 1 else None)
    mean3 = mean.view(groups, m).t().unsqueeze(-1) if mean is not None else None
    rstd3 = rstd.view(groups, m).t().unsqueeze(-1)
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    for r0, r1 in _runs_out_of_range(rstd, m, step):
        y_rows = _redo_block(x, z, weight_c, bias_c, spec, out, mean3, rstd3, state, r0, r1, plan.threads)
        if quant is not None:
            native_cpu_kernel.quantize_rows(y_rows, quant.rows(r0, r1))


def _runs_out_of_range(rstd: torch.Tensor, m: int, step: int) -> list[tuple[int, int]]:
    """[r0, r1) runs of consecutive rows that hold a group whose stored rstd is outside (0, SAFE_RSTD_MAX) or
    NaN, at most ``step`` rows each. Only such rows are redone (the block kernels' rows are independent of
    their block), so the rows in range keep the C kernel's bits; runs keep an all-NaN batch from being
    redone row by row."""
    runs: list[tuple[int, int]] = []
    for row in _blocks_out_of_range(rstd, m, 1):
        if runs and runs[-1][1] == row and row - runs[-1][0] < step:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _fused_buffer(step: int, n: int, dtype, device, threads: int) -> torch.Tensor:
    """Zeroed flat buffer long enough for any padded block."""
    return torch.zeros(_padded_length(step * n, threads), dtype=dtype, device=device)


def _blocks_out_of_range(rstd: torch.Tensor, m: int, step: int) -> list[int]:
    """Blocks holding a group whose var + eps left [SAFE_VAR_MIN, inf), judged on the stored rstd:
    outside (0, SAFE_RSTD_MAX) or NaN. The bound is strict, so a var + eps that rounds to rstd = 2^50
    is redone too (harmlessly: the cold path rescales only groups out of range, the others keep their
    bits). Checked in slices below ATEN_GRAIN: serial reductions, no parallel region."""
    for c0 in range(0, rstd.numel(), CPU_BLOCK_ELEMENTS):
        lo, hi = torch.aminmax(rstd[c0 : c0 + CPU_BLOCK_ELEMENTS])
        if not (bool(lo > 0) and bool(hi < SAFE_RSTD_MAX)):
            break
    else:
        return []
    rstd_mg = rstd.view(-1, m).t()
    bad_rows = (~((rstd_mg > 0) & (rstd_mg < SAFE_RSTD_MAX))).any(dim=1)
    return sorted({row // step for row in bad_rows.nonzero().flatten().tolist()})


def _redo_block(x, z, weight_c, bias_c, spec: NormSpec, out, mean3, rstd3, state, r0: int, r1: int,
                threads: int) -> torch.Tensor:
    """The cold path: rows [r0, r1), whose float32 sums overflowed or underflowed, redone with each such
    group divided by a power of two (exact); groups in range keep scale 1 and their bits. Writes
    ``out[r0:r1]`` (out None: nothing) and returns the rows' float32 y (state's buffer, until the next block)."""
    buf_x, buf_t, flat_g, pair = state
    mb, n = r1 - r0, x.shape[1]
    gs = spec.group_size
    groups = n // gs
    gate_before = z is not None and not spec.norm_before_gate
    xc = buf_x[:mb]
    xc.copy_(x[r0:r1])
    gate = None
    if z is not None:
        gate = flat_g[: mb * n].view(mb, n)
        _fused_gate(z[r0:r1], gate, flat_g[: _padded_length(mb * n, threads)], spec.activation == "sigmoid")
        if gate_before:
            xc.mul_(gate)
    x3, sq3 = xc.view(mb, groups, gs), buf_t[:mb].view(mb, groups, gs)
    c = xc.dtype
    mu = torch.empty(mb, groups, 1, dtype=c) if mean3 is not None else None
    var = torch.empty(mb, groups, 1, dtype=c)
    gs_t = torch.full([], gs, dtype=c)
    # the plain pass (which groups are out of range), and its rstd as the block kernel computed it
    _var_plus_eps(x3, x3, sq3, mu, var, pair, gs_t, torch.full([], spec.eps, dtype=c))
    plain_rstd = torch.rsqrt(var)
    xc.copy_(x[r0:r1])
    if gate is not None and gate_before:
        xc.mul_(gate)
    scale, inv = rescale_groups(x3, var, spec.eps)
    x3.mul_(inv)
    _var_plus_eps(x3, x3, sq3, mu, var, pair, gs_t, torch.zeros([], dtype=c))
    rstd_block, rstd_scaled = scaled_rstd(var, spec.eps, scale, inv)
    # groups in range (scale 1) keep the plain pass's rstd: scaled_rstd takes torch.sqrt, whose CPU kernel
    # (MKL's) can differ from the correctly rounded square root of rsqrt in the last bit
    keep = scale == 1
    rstd3[r0:r1] = torch.where(keep, plain_rstd, rstd_block)
    if mean3 is not None:
        mean3[r0:r1] = mu * scale
    x3.mul_(torch.where(keep, plain_rstd, rstd_scaled))
    xc.mul_(weight_c)
    if bias_c is not None:
        xc.add_(bias_c)
    if gate is not None and not gate_before:
        xc.mul_(gate)
    if out is not None:
        out[r0:r1].copy_(xc)
    return xc


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

    dx and dz are in x's and z's dtypes, dweight/dbias in the parameters' dtypes, each rounded
    once from the compute dtype. Works in row blocks and tasks like forward (:func:`_backward_rows`).
    """
    if (_use_cpu_kernel((dy, x, z), (weight, bias, mean, rstd)) and rstd.is_contiguous()
            and (mean is None or mean.is_contiguous())):  # the kernel reads the statistics' memory directly
        return _backward_cpu_kernel(dy, x, weight, bias, z, mean, rstd, spec, needs_dx, needs_dz and z is not None,
                                    needs_dweight, needs_dbias and bias is not None, block_elements)
    with torch.no_grad():
        return _backward(dy, x, weight, bias, z, mean, rstd, spec, needs_dx, needs_dz, needs_dweight, needs_dbias,
                         block_elements)


def _backward(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs_dx: bool, needs_dz: bool,
              needs_dweight: bool, needs_dbias: bool, block_elements: int):
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gs = spec.group_size
    groups = n // gs
    dev = x.device
    has_z = z is not None
    dx = torch.empty(m, n, dtype=x.dtype, device=dev) if needs_dx else None
    dz = torch.empty(m, n, dtype=z.dtype, device=dev) if (needs_dz and has_z) else None
    has_db = needs_dbias and bias is not None
    plan = _Plan(m, n, block_elements, (dy, x, z, weight, bias))
    step = plan.step
    part_w = torch.empty(plan.tasks, n, dtype=c, device=dev) if needs_dweight else None
    part_b = torch.empty(plan.tasks, n, dtype=c, device=dev) if has_db else None
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    mean3 = mean.view(groups, m).t().unsqueeze(-1) if mean is not None else None  # (M, G, 1) views
    rstd3 = rstd.view(groups, m).t().unsqueeze(-1)
    gate_before = has_z and not spec.norm_before_gate
    need_dxin = dx is not None or (gate_before and dz is not None)
    swish = spec.activation == "swish"

    def make_state():
        def buf():
            return torch.empty(step, n, dtype=c, device=dev)

        return (buf(), buf(), buf(),  # x then xhat; dy then g; scratch
                buf() if has_z and swish else None,  # z, then the gate
                _fused_buffer(step, n, c, dev, plan.threads) if has_z else None,  # sigmoid(z)
                buf() if dz is not None else None,  # act'(z)
                buf() if part_w is not None else None, buf() if part_b is not None else None,
                torch.empty(2, step, groups, 1, dtype=c, device=dev),
                torch.empty(2, 1, 1, dtype=c, device=dev) if groups == 1 else None)

    def run_task(task: int, state) -> None:
        r0, r1 = plan.rows(task, m)
        plan.backward(dy, x, weight_c, bias_c, z, mean3, rstd3, dx, dz,
                      part_w[task] if part_w is not None else None, part_b[task] if part_b is not None else None,
                      *state, r0, r1, step, gs, gate_before, swish, need_dxin, plan.threads)

    plan.run(run_task, make_state)
    dweight = _sum_tasks(part_w, weight.dtype) if part_w is not None else None
    dbias = _sum_tasks(part_b, bias.dtype) if part_b is not None else None
    return dx, dz, dweight, dbias


def _backward_cpu_kernel(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs_dx: bool, needs_dz: bool,
                         needs_dweight: bool, needs_db: bool, block_elements: int):
    """The backward through the C kernel, in the block kernels' tasks (they depend on M and N only): in this
    thread task by task, or on the pool with one kernel call per worker, the workers taking tasks from a
    counter shared inside C. Each task writes its dx / dz rows and one row of dweight / dbias partial sums,
    summed in task order after (one task: its row is the sum, rounded once)."""
    m, n = x.shape
    dx = torch.empty(m, n, dtype=x.dtype) if needs_dx else None
    dz = torch.empty(m, n, dtype=z.dtype) if needs_dz else None
    weight_k, bias_k = native_cpu_kernel.params_ready(weight), native_cpu_kernel.params_ready(bias)
    gate_before = z is not None and not spec.norm_before_gate
    sigmoid = spec.activation == "sigmoid"
    args = (spec.group_size, spec.is_rms_norm, gate_before, sigmoid)
    if m * n <= block_elements:  # one block, so one task (_Plan's decision, without building it)
        part_w = torch.empty(n, dtype=torch.float32) if needs_dweight else None
        part_b = torch.empty(n, dtype=torch.float32) if needs_db else None
        native_cpu_kernel.backward_rows(dy, x, z, weight_k, bias_k, mean, rstd, dx, dz, part_w, part_b, 0, m, *args)
        # the kernel's sums start at +0.0, so never -0.0: one task's row is torch.sum's over tasks as it is
        return (dx, dz, part_w.to(weight.dtype) if part_w is not None else None,
                part_b.to(bias.dtype) if part_b is not None else None)
    plan = _Plan(m, n, block_elements, (dy, x, z), compiled_kernel=True)
    part_w = torch.empty(plan.tasks, n, dtype=torch.float32) if needs_dweight else None
    part_b = torch.empty(plan.tasks, n, dtype=torch.float32) if needs_db else None
    if plan.workers == 1:  # in this thread, task by task: no job for the pool
        for task in range(plan.tasks):
            r0, r1 = plan.rows(task, m)
            native_cpu_kernel.backward_rows(dy, x, z, weight_k, bias_k, mean, rstd, dx, dz,
                                            part_w[task] if part_w is not None else None,
                                            part_b[task] if part_b is not None else None, r0, r1, *args)
    elif native_cpu_kernel.use_team():  # PyTorch's OpenMP threads take the same tasks from a counter
        native_cpu_kernel.backward_rows_team(dy, x, z, weight_k, bias_k, mean, rstd, dx, dz, part_w, part_b, *args,
                                             plan.per_task * plan.step, plan.tasks, plan.workers)
    else:
        # one kernel call per worker, each taking tasks from a shared counter inside C (see the forward)
        shared = (native_cpu_kernel.WorkCounter(), plan.per_task * plan.step, plan.tasks)

        def run_worker(_: int, state) -> None:
            native_cpu_kernel.backward_rows(dy, x, z, weight_k, bias_k, mean, rstd, dx, dz, part_w, part_b, 0, m,
                                            *args, shared=shared)

        plan.run(run_worker, lambda: None, tasks=plan.workers)
    dweight = _sum_tasks(part_w, weight.dtype) if part_w is not None else None
    dbias = _sum_tasks(part_b, bias.dtype) if part_b is not None else None
    return dx, dz, dweight, dbias


def _sum_tasks(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-task partial sums (T, N) summed over tasks in a fixed order, rounded once to ``dtype``.

    Column slices below ATEN_GRAIN elements keep every reduction serial: its order depends on T only.
    """
    tasks, n = parts.shape
    if tasks == 1:
        return (parts[0] + 0.0).to(dtype)  # torch.sum's 0 + row (-0.0 becomes +0.0, as there), in fewer steps
    total = torch.empty(n, dtype=parts.dtype, device=parts.device)
    width = max(1, CPU_BLOCK_ELEMENTS // tasks)
    for c0 in range(0, n, width):
        torch.sum(parts[:, c0 : c0 + width], dim=0, out=total[c0 : c0 + width])
    return total.to(dtype)


class KernelForwardPlan:
    """The C kernel's forward for one call signature (docs/design.md, "Eager plans"), as
    :func:`_forward_cpu_kernel` runs it on a call of one block of rows: one kernel call in this thread, the
    struct of its arguments built from the fields the signature fixes (dtype codes, row strides, N, the spec)
    and the call's addresses and M. The same call, hence the same bits; rows holding a group out of range are
    redone by the same rescue. For calls above ``block_elements`` (shared out over threads: their compute, not
    the host, is the time) or when the kernel is off (``GATEDNORM_CPU_KERNEL=0``, read on every call), it returns
    None, having done nothing, and the backend's forward runs. ``rmsnorm_fn`` at 1x128 bf16 on the CPU machine
    (2 cores, ``bench_host.py --device cpu``): 20.4 -> 13.7 us per call quiet, 26.7 -> 12.9 with two busy
    processes on the cores; ``torch.mul`` of the same tensors 3.7 (benchmarks/results/cpu_host_plan_ab.md). Once
    the C++ extension of :mod:`.native_cpu_node` is loaded, the call is one C call (allocations and the kernel call,
    the same fields; ``native``), the Python below taking the calls it declines (a group out of range)."""

    __slots__ = ("n", "groups", "is_rms", "spec", "block_elements", "fields", "native")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, block_elements: int) -> None:
        n = x.shape[-1]
        self.n, self.groups, self.is_rms, self.spec = n, n // spec.group_size, spec.is_rms_norm, spec
        self.block_elements = block_elements
        self.native = None
        self.fields = native_cpu_kernel.planned_forward_fields(
            x, z, weight, bias, spec.group_size, spec.eps, spec.is_rms_norm,
            z is not None and not spec.norm_before_gate, spec.activation == "sigmoid")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        numel = x.numel()
        n = self.n
        m = numel // n
        if m == 0 or numel > self.block_elements or not native_cpu_kernel.ready():
            return None
        native = self.native
        if native is None:  # the extension's call once it is loaded (None: it builds; False: never)
            native = self.native = native_cpu_node.forward_entry(self.fields, self.groups, self.block_elements)
        if native:
            done = native(x, z, weight, bias)
            if done is not None:
                return done
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        rstd = torch.empty(self.groups * m, dtype=torch.float32)
        mean = None if self.is_rms else torch.empty(self.groups * m, dtype=torch.float32)
        out_of_range = native_cpu_kernel.planned_forward(self.fields, x, z, weight, bias, y, mean, rstd, m)
        if out_of_range:  # the cold path, as _forward_cpu_kernel takes it, on (M, N) views
            rows = (x.view(m, n), None if z is None else z.view(m, n), y.view(m, n))
            with torch.no_grad():
                _redo_rows_out_of_range(rows[0], rows[1], weight, bias, self.spec, rows[2], mean, rstd,
                                        _Plan(m, n, self.block_elements, rows, compiled_kernel=True))
        return y, mean, rstd


def _kernel_plannable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      z: torch.Tensor | None) -> bool:
    """Whether the C kernel would run this signature's calls, so that its plans may serve them: plain CPU tensors;
    x and z float32 / bf16, unit feature stride, 2-D or contiguous; weight and bias of those dtypes and contiguous,
    as the kernel reads them."""
    if not x.is_cpu or not native_cpu_kernel.ready():
        return False
    for t in (x, z):
        if t is not None and (type(t) not in _PLAIN_TENSORS or not native_cpu_kernel.takes_dtype(t.dtype)
                              or t.stride(-1) != 1 or not (t.dim() == 2 or t.is_contiguous())):
            return False
    for t in (weight, bias):
        if t is not None and (type(t) not in _PLAIN_TENSORS or native_cpu_kernel.params_ready(t) is not t):
            return False
    return True


def plan_kernel_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                        spec: NormSpec, block_elements: int) -> KernelForwardPlan | None:
    """A :class:`KernelForwardPlan` where the C kernel would run this signature's calls (:func:`_kernel_plannable`),
    else None."""
    if not _kernel_plannable(x, weight, bias, z):
        return None
    return KernelForwardPlan(x, weight, bias, z, spec, block_elements)


class KernelBackwardPlan:
    """The C kernel's backward for one call signature (docs/design.md, "Eager plans"), as
    :func:`_backward_cpu_kernel` runs it on a call of one block of rows: one kernel call in this thread, the
    struct of its arguments packed from the fields the signature fixes (dtype codes, N, the spec) and the call's
    addresses, strides and M. The same call, hence the same bits. It returns None, having done nothing, where
    :func:`backward` would not take that path: a call above ``block_elements`` (shared out over threads), dy of
    another class, dtype or layout (:func:`native_cpu_kernel.handles`), statistics not contiguous, or the kernel off
    (``GATEDNORM_CPU_KERNEL=0``, read on every call); the backend's backward then runs."""

    __slots__ = ("block_elements", "fields", "weight_dtype", "bias_dtype")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                 spec: NormSpec, block_elements: int) -> None:
        self.block_elements = block_elements
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        self.fields = native_cpu_kernel.planned_backward_fields(
            x, z, weight, bias, spec.group_size, spec.is_rms_norm, z is not None and not spec.norm_before_gate,
            spec.activation == "sigmoid")

    def __call__(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
                 needs: GradsNeeded) -> Grads | None:
        m, n = x.shape
        if (m * n > self.block_elements or type(dy) not in _PLAIN_TENSORS or not rstd.is_contiguous()
                or (mean is not None and not mean.is_contiguous()) or not native_cpu_kernel.handles(dy)):
            return None
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs.dx else None
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if needs.dz and z is not None else None
        part_w = torch.empty(n, dtype=torch.float32) if needs.dweight else None
        part_b = torch.empty(n, dtype=torch.float32) if needs.dbias and bias is not None else None
        native_cpu_kernel.planned_backward(self.fields, dy, x, z, weight, bias, mean, rstd, dx, dz, part_w, part_b)
        # one task: its row is the sum (the kernel's sums start at +0.0), rounded once, as _backward_cpu_kernel
        return (dx, dz, None if part_w is None else part_w.to(self.weight_dtype),
                None if part_b is None else part_b.to(self.bias_dtype))


class NativeCPUBackend:
    """The ``native`` backend's implementation for CPU tensors.

    ``block_elements`` sizes the row blocks (tests shrink it to cross block boundaries; blocks of
    ATEN_GRAIN elements or more run in the calling thread with intra-op parallel ops).
    """

    name = "native"
    supports_float64 = True

    def __init__(self, block_elements: int = CPU_BLOCK_ELEMENTS) -> None:
        self.block_elements = block_elements

    def forward(self, x, weight, bias, z, spec: NormSpec, out):
        return forward(x, weight, bias, z, spec, out, self.block_elements)

    def backward(self, dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs: GradsNeeded) -> Grads:
        return backward(dy, x, weight, bias, z, mean, rstd, spec, *needs, block_elements=self.block_elements)

    def forward_quant(self, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec, q, scale) -> bool:
        return forward_quant(self, x, weight, bias, z, spec, qspec, q, scale)

    def plan_forward(self, x, weight, bias, z, spec: NormSpec) -> KernelForwardPlan | None:
        """The C kernel's forward decided once for this signature (:func:`plan_kernel_forward`), or None."""
        return plan_kernel_forward(x, weight, bias, z, spec, self.block_elements)

    def plan_backward(self, x, weight, bias, z, spec: NormSpec) -> KernelBackwardPlan | None:
        """The C kernel's backward decided once for this signature: where the forward's plan takes it (the same
        tensors are saved for the backward), else None."""
        if not _kernel_plannable(x, weight, bias, z):
            return None
        return KernelBackwardPlan(x, weight, bias, z, spec, self.block_elements)

    def plan_autograd(self, forward_plan, backward_plan):
        """Differentiable calls of the C kernel's plans through a C++ autograd node (:mod:`.native_cpu_node`)
        instead of the Python Function, where both plans are the kernel's; None while its extension builds."""
        if not isinstance(forward_plan, KernelForwardPlan) or not isinstance(backward_plan, KernelBackwardPlan):
            return False
        return native_cpu_node.node_entry(forward_plan.fields, forward_plan.groups, forward_plan.block_elements)


#: Rows per step of the quantized forward: y of about this many elements in float32 (1 MiB), written by the
#: forward and read back by the quantizer while it is still in the cache.
QUANT_STEP_ELEMENTS = 1 << 18


def forward_quant(backend: NativeCPUBackend, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec, q, scale) -> bool:
    """The quantized output where the C kernel is built and y is quantized from float32 (``round_to`` None):
    where the C forward takes x and z (float32 / bf16 rows), one pass: each row normalised and quantized in C
    (numerics.quantize_blocks' steps on its float32 y), on the forward's threads, no y in memory; else per step
    of rows the backend's forward into a float32 buffer, then the C quantizer
    (:func:`.native_cpu_kernel.quantize_rows`). The quantization runs no ATen op either way, so no parallel
    region that waits for a descheduled thread on a busy machine. False elsewhere, having written nothing: the
    generic path then runs the same forward and numerics.quantize_blocks (the same bits)."""
    if (qspec.round_to != "none" or not native_cpu_kernel.quantizer_ready()
            or not all(t is None or type(t) in _PLAIN_TENSORS for t in (x, z, q, scale))):
        return False  # (a tensor subclass may hold no memory of its own for the C code to read)
    target = native_cpu_kernel.QuantTarget(q.view(torch.uint8), scale, qspec.block, qspec.quant,
                                           qspec.scale_format == "ue8m0")
    if _use_cpu_kernel((x, z), (weight, bias)):  # the C forward quantizes each row as it computes it
        _forward_cpu_kernel(x, weight, bias, z, spec, None, backend.block_elements, quant=target)
        return True
    quantize_by_steps(backend.forward, x, weight, bias, z, spec, torch.float32, QUANT_STEP_ELEMENTS,
                      lambda y_rows, r0, r1: native_cpu_kernel.quantize_rows(y_rows, target.rows(r0, r1)))
    return True
