"""The ``compiled`` backend: the formulas of :mod:`gatednorm.numerics` compiled by ``torch.compile``.

The same function as the native backend (docs/design.md, section 1). Inductor fuses each formula
into a few loops, so no full-size temporaries exist at run time.

Compilation: one compiled function per *feature combination* (the static
:class:`~gatednorm.spec.NormSpec`, N, the dtypes, which of bias / z / gradients are present), with
the row count M marked dynamic (size-oblivious, so M = 1 takes the same graph): a new batch size
never recompiles. N and the group size stay static so that Inductor can fuse each row's reductions
without full-size buffers. Every combination gets its own code object, so dynamo's per-code-object
recompile limit is never shared between them.

Range rescue: on accelerators every group is scaled in the graph (no host sync, CUDA-graph safe).
On CPU, where reading a flag costs nothing like a device sync, the plain graph also returns a
per-row out-of-range flag and flagged rows are redone with the rescuing formula, eagerly.

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
from ..spec import NormSpec
from .base import Grads, GradsNeeded

#: (key, seconds) of the first call of every compiled function: dynamo + inductor compile time.
COMPILE_TIMES: list[tuple[tuple, float]] = []


def _make_forward(spec: NormSpec, rescue_inline: bool) -> Callable:
    """The compiled forward: writes out, returns (mean, rstd) group-major and the per-row out-of-range
    flag (None with ``rescue_inline``, where every group is rescued in the graph)."""

    def fwd(x, weight, bias, z, out):
        m = x.shape[0]
        y, mean, rstd = numerics.forward_rows(x, weight, bias, z, spec, rescue=rescue_inline)
        out_of_range = None if rescue_inline else numerics.rstd_out_of_range(rstd).any(dim=1)
        out.copy_(y.reshape(out.shape))  # the one rounding, fused into the kernel that computes y
        # group-major stats; copy_ into a fresh buffer (not .contiguous()) so M = 1 takes no other branch
        groups = rstd.shape[1]
        rstd_gm = rstd.new_empty(groups * m)
        rstd_gm.view(groups, m).copy_(rstd.t())
        mean_gm = None
        if mean is not None:
            mean_gm = mean.new_empty(groups * m)
            mean_gm.view(groups, m).copy_(mean.t())
        return mean_gm, rstd_gm, out_of_range

    return fwd


def _make_backward(spec: NormSpec, needs: GradsNeeded) -> Callable:
    def bwd(dy, x, weight, bias, z, mean, rstd):
        m = x.shape[0]
        # (M, G) views of the group-major stats: views only, no layout branch on M
        grads = numerics.backward_rows(dy, x, weight, bias, z, None if mean is None else mean.view(-1, m).t(),
                                       rstd.view(-1, m).t(), spec, *needs)
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


class CompiledBackend:
    """The ``compiled`` backend. ``rescue_inline`` (None: on every device but CPU) scales every group
    in the graph instead of flagging out-of-range rows for an eager redo."""

    name = "compiled"
    supports_float64 = True

    def __init__(self, rescue_inline: bool | None = None) -> None:
        self.rescue_inline = rescue_inline
        self._lock = threading.Lock()
        self._cache: dict[tuple, Callable] = {}

    def _compiled(self, key: tuple, factory: Callable[[], Callable]) -> Callable:
        """The compiled function for ``key``: built and wrapped once, on a private code object."""
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
                fn = _timed_first_call(key, torch.compile(raw, dynamic=None, fullgraph=True))
                self._cache[key] = fn
        return fn

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # Row-major inputs only: strided rows would give Inductor another (less accurate, sequential)
        # reduction loop and a recompile per layout; a copy is what a fused kernel would do too.
        x, z = _contiguous(x), _contiguous(z)
        inline = self.rescue_inline if self.rescue_inline is not None else x.device.type != "cpu"
        key = ("fwd", spec, x.shape[1], x.dtype, out.dtype, bias is not None, z is not None, inline)
        fn = self._compiled(key, lambda: _make_forward(spec, inline))
        _mark_rows_dynamic(x, z, out)
        with torch.no_grad():
            mean, rstd, out_of_range = fn(x, weight, bias, z, out)
            if out_of_range is not None and bool(out_of_range.any()):
                _redo_rows(out_of_range.nonzero().squeeze(1), x, weight, bias, z, spec, out, mean, rstd)
        return mean, rstd

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                 needs: GradsNeeded) -> Grads:
        dy, x, z = _contiguous(dy), _contiguous(x), _contiguous(z)
        key = ("bwd", spec, x.shape[1], x.dtype, bias is not None, z is not None, mean is not None, needs)
        fn = self._compiled(key, lambda: _make_backward(spec, needs))
        _mark_rows_dynamic(dy, x, z, mean, rstd)
        with torch.no_grad():
            return fn(dy, x, weight, bias, z, mean, rstd)


def _timed_first_call(key: tuple, compiled: Callable) -> Callable:
    state = {"first": True}

    def call(*args):
        # Size-oblivious: M = 1 must not specialise the graph (no recompile for single rows).
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            if state["first"]:
                start = time.perf_counter()
                result = compiled(*args)
                COMPILE_TIMES.append((key, time.perf_counter() - start))
                state["first"] = False
                return result
            return compiled(*args)

    return call


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
