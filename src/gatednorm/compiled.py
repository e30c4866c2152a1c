"""The ``compiled`` backend: the native formula as whole-tensor ops, compiled by ``torch.compile``.

Same interface as :mod:`gatednorm.native` (``forward``/``backward`` on validated 2-D
tensors) and the same function (DESIGN.md section 1: compute dtype C, two-pass
variance, ``rstd = 1 / sqrt(var + eps)``, one rounding at the end). Inductor fuses
the chain into a few loops, so no full-size temporaries exist at run time.

Compilation: one compiled function per *feature combination* (the static
:class:`~gatednorm.spec.NormSpec`, N, the dtypes, which of bias / z / gradients are
present), with the row count M marked dynamic (size-oblivious, so M = 1 takes the
same graph): a new batch size never recompiles. N and the group size stay static
so that Inductor can fuse each row's reductions without full-size buffers. Every
combination gets its own code object, so the per-code-object recompile limit of
dynamo is never shared between them.

Nesting: inside a user's ``torch.compile`` region, :mod:`gatednorm.ops` routes
through the opaque ``gatednorm::*`` custom ops (traced via their fake
implementations); at run time the op calls into this module, which runs its own
separately compiled function - no nested tracing happens.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable

import torch
import torch.fx.experimental._config

from . import native
from .spec import NormSpec, compute_dtype

_lock = threading.Lock()
_CACHE: dict[tuple, Callable] = {}

#: (key, seconds) of the first call of every compiled function: dynamo + inductor compile time.
COMPILE_TIMES: list[tuple[tuple, float]] = []


def available() -> bool:
    """True when torch.compile can be used in this process (Inductor needs a C++ compiler on CPU)."""
    return hasattr(torch, "compile")


def _act(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), sigmoid(z)) with s = 1 / (1 + exp(-z)): the native backend's formula."""
    s = 1.0 / (1.0 + torch.exp(-z))
    return (z * s if activation == "swish" else s), s


def _stats(x3: torch.Tensor, is_rms_norm: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(mean | None, x3 - mean, var) over the last dim: two-pass variance (RMSNorm: no mean)."""
    gs = x3.shape[-1]
    mean = None
    if not is_rms_norm:
        mean = x3.sum(dim=-1, keepdim=True) / gs
        x3 = x3 - mean
    return mean, x3, (x3 * x3).sum(dim=-1, keepdim=True) / gs


def _make_forward(spec: NormSpec, has_bias: bool, has_z: bool, rescue_inline: bool) -> Callable:
    """The compiled forward. Range rescue (native.rescale_groups: groups whose float32 sums overflow or
    underflow): ``rescue_inline`` scales every group in the graph (no host sync; accelerators); else
    the graph also returns a per-row out-of-range flag and :func:`forward` redoes flagged rows (CPU)."""
    gs = spec.group_size

    def fwd(x, weight, bias, z, out):
        m, n = x.shape
        c = compute_dtype(x.dtype)
        groups = n // gs
        xc = x.to(c)
        gate = None
        if has_z:
            gate, _ = _act(z.to(c), spec.activation)
            if not spec.norm_before_gate:
                xc = xc * gate
        x3 = xc.view(m, groups, gs)
        if rescue_inline:
            # Each group divided by a power of two of its max |value|: exact, so in-range groups get
            # the plain result, but the sums can neither overflow nor underflow. It costs one more
            # reduction before the statistics (about 1.3x the plain graph on CPU).
            scale, inv = native.pow2_scale(x3.abs().amax(dim=-1, keepdim=True), spec.eps)
            mean, xm, var_s = _stats(x3 * inv, spec.is_rms_norm)
            rstd, rstd_x = native.scaled_rstd(var_s, spec.eps, scale, inv)
            if mean is not None:
                mean = mean * scale
            out_of_range = None
        else:
            mean, xm, var = _stats(x3, spec.is_rms_norm)
            var_eps = var + spec.eps
            rstd = rstd_x = 1.0 / torch.sqrt(var_eps)
            out_of_range = ~((var_eps >= native.SAFE_VAR_MIN) & (var_eps < float("inf"))).view(m, groups).all(1)
        y = (xm * rstd_x).view(m, n) * weight.to(c)
        if has_bias:
            y = y + bias.to(c)
        if has_z and spec.norm_before_gate:
            y = y * gate
        # group-major stats; copy_ into a fresh buffer (not .contiguous()) so M = 1 takes no other branch
        rstd_gm = rstd.new_empty(groups * m)
        rstd_gm.view(groups, m).copy_(rstd.view(m, groups).t())
        mean_gm = None
        if mean is not None:
            mean_gm = mean.new_empty(groups * m)
            mean_gm.view(groups, m).copy_(mean.view(m, groups).t())
        out.copy_(y)  # the one rounding, fused into the kernel that computes y
        return mean_gm, rstd_gm, out_of_range

    return fwd


def _make_backward(spec: NormSpec, has_bias: bool, has_z: bool, needs: tuple[bool, bool, bool, bool]) -> Callable:
    gs = spec.group_size
    needs_dx, needs_dz, needs_dw, needs_db = needs
    gate_before = has_z and not spec.norm_before_gate
    gate_after = has_z and spec.norm_before_gate

    def bwd(dy, x, weight, bias, z, mean, rstd):
        m, n = x.shape
        c = compute_dtype(x.dtype)
        groups = n // gs
        wc = weight.to(c)
        rs = rstd.view(groups, m).t().unsqueeze(-1)  # views only: no layout branch on M
        xc = x.to(c)
        gate = dgate = None
        if has_z:
            zc = z.to(c)
            gate, s = _act(zc, spec.activation)
            dgate = s * (1.0 + zc * (1.0 - s)) if spec.activation == "swish" else s * (1.0 - s)
        xin = xc * gate if gate_before else xc
        x3 = xin.view(m, groups, gs)
        if mean is not None:
            x3 = x3 - mean.view(groups, m).t().unsqueeze(-1)
        xhat = x3 * rs
        dyc = dy.to(c)
        dz = dx = dw = db = None
        if gate_after:
            if needs_dz:
                y_pre = xhat.view(m, n) * wc
                if has_bias:
                    y_pre = y_pre + bias.to(c)
                dz = (dyc * y_pre * dgate).to(z.dtype)
            dyc = dyc * gate
        if needs_dw:
            dw = (dyc * xhat.view(m, n)).sum(dim=0).to(weight.dtype)
        if needs_db:
            db = dyc.sum(dim=0).to(bias.dtype)
        if needs_dx or (gate_before and needs_dz):
            g = (dyc * wc).view(m, groups, gs)
            c1 = (xhat * g).sum(dim=-1, keepdim=True) / gs
            dxc = g - xhat * c1
            if mean is not None:
                dxc = dxc - g.sum(dim=-1, keepdim=True) / gs
            dxc = (dxc * rs).view(m, n)
            if gate_before:
                if needs_dz:
                    dz = (dxc * xc * dgate).to(z.dtype)
                dxc = dxc * gate
            if needs_dx:
                dx = dxc.to(x.dtype)
        return dx, dz, dw, db

    return bwd


def _compiled(key: tuple, factory: Callable[[], Callable]) -> Callable:
    """The compiled function for ``key``: built and wrapped once, on a private code object."""
    fn = _CACHE.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _CACHE.get(key)
        if fn is None:
            raw = factory()
            # A fresh code object per feature combination: dynamo keeps its cache (and its
            # recompile limit) per code object, so combinations must not share one.
            code = raw.__code__.replace(co_name=f"{raw.__name__}_{len(_CACHE)}")
            raw = types.FunctionType(code, raw.__globals__, code.co_name, raw.__defaults__, raw.__closure__)
            # dynamic=None + rows marked dynamic: M is symbolic, while N, the group size and the
            # constants stay static so Inductor fuses each row's reductions without full-size buffers.
            fn = _timed_first_call(key, torch.compile(raw, dynamic=None, fullgraph=True))
            _CACHE[key] = fn
    return fn


def _timed_first_call(key: tuple, compiled: Callable) -> Callable:
    state = {"first": True}

    def call(*args):
        # Size-oblivious: M = 1 must not specialise the graph (no recompile for single rows).
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return run(*args)

    def run(*args):
        if state["first"]:
            start = time.perf_counter()
            result = compiled(*args)
            COMPILE_TIMES.append((key, time.perf_counter() - start))
            state["first"] = False
            return result
        return compiled(*args)

    return call


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _mark_rows_dynamic(*tensors: torch.Tensor | None) -> None:
    # M = 1 (and other small counts) must not specialise: the row dim is always symbolic.
    for t in tensors:
        if t is not None and t.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Native-backend interface: write the gated norm of x (M, N) into out; return (mean | None, rstd)."""
    m, n = x.shape
    c = compute_dtype(x.dtype)
    groups = n // spec.group_size
    if m == 0 or x.device.type == "meta":
        mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=x.device)
        return mean, torch.empty(groups * m, dtype=c, device=x.device)
    # Row-major inputs only: strided rows would give Inductor another (less accurate, sequential)
    # reduction loop and a recompile per layout; a copy is what a fused kernel would do too.
    x, z = _contiguous(x), _contiguous(z)
    rescue_inline = _rescue_inline(x.device)
    key = ("fwd", spec, n, x.dtype, out.dtype, bias is not None, z is not None, rescue_inline)
    fn = _compiled(key, lambda: _make_forward(spec, bias is not None, z is not None, rescue_inline))
    _mark_rows_dynamic(x, z, out)
    with torch.no_grad():
        mean, rstd, out_of_range = fn(x, weight, bias, z, out)
        if out_of_range is not None and bool(out_of_range.any()):
            _redo_rows(out_of_range.nonzero().squeeze(1), x, weight, bias, z, spec, out, mean, rstd)
    return mean, rstd


def _rescue_inline(device: torch.device) -> bool:
    """Range rescue inside the graph on accelerators: a host check there would sync (and break CUDA
    graphs). On CPU the check is free, so the plain graph runs and flagged rows are redone."""
    return device.type != "cpu"


def _redo_rows(rows: torch.Tensor, x, weight, bias, z, spec: NormSpec, out, mean, rstd) -> None:
    """Recompute ``rows`` with the native backend (whose CPU path rescues out-of-range groups) and write
    them into out / mean / rstd. A row's result still depends on that row alone (batch invariance)."""
    m, n = x.shape
    groups = n // spec.group_size
    sub_out = out.new_empty(len(rows), n)
    sub_mean, sub_rstd = native.forward(x.index_select(0, rows), weight, bias,
                                        None if z is None else z.index_select(0, rows), spec, sub_out)
    out.index_copy_(0, rows, sub_out)
    rstd.view(groups, m).index_copy_(1, rows, sub_rstd.view(groups, -1))
    if mean is not None:
        mean.view(groups, m).index_copy_(1, rows, sub_mean.view(groups, -1))


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
    """Native-backend interface: (dx, dz, dweight, dbias), each None when not requested."""
    needs = (needs_dx, needs_dz and z is not None, needs_dweight, needs_dbias and bias is not None)
    m = x.shape[0]
    if m == 0 or x.device.type == "meta":
        from . import native

        return native.backward(dy, x, weight, bias, z, mean, rstd, spec, *needs)
    dy, x, z = _contiguous(dy), _contiguous(x), _contiguous(z)
    key = ("bwd", spec, x.shape[1], x.dtype, bias is not None, z is not None, mean is not None, needs)
    fn = _compiled(key, lambda: _make_backward(spec, bias is not None, z is not None, needs))
    _mark_rows_dynamic(dy, x, z, mean, rstd)
    with torch.no_grad():
        return fn(dy, x, weight, bias, z, mean, rstd)
