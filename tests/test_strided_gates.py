"""Strided gates and inputs on every path: read through their strides, never copied (issue 15, item 3).

Serving stacks slice the gate z (and sometimes x) out of a packed projection: a column slice of an
(M, 4N) projection (rows strided, features contiguous), or a (T, H, N) view of a (T, 4*H*N) one (heads
adjacent, tokens a projection apart; no (T*H, N) view exists, so the call is regrouped into T rows of H*N
features, see ``gatednorm.spec.prepare(regroup_heads=True)``). The backends read any row stride with unit
feature stride. Here, for the plain functions, the quantized output (``gated_norm_quant``) and norm + gate +
linear (``layernorm_linear_fn`` / ``rmsnorm_linear_fn``, ``LayerNormLinear`` / ``RMSNormLinear``):

* what reaches the backend (a recording wrapper registered with ``ops.override_impl``) is the caller's
  memory: same ``data_ptr`` as the caller's view, forward and backward; and no activation-sized copy is made
  by the dispatch layers (spec / functional / ops / modules), seen by a dispatch mode;
* the results equal the contiguous call's bit for bit: y, q, scales, the linear output, dx, dz (landing
  in the right columns of the parent projection's gradient, zeros elsewhere), the linear layer's gradients.
  dweight/dbias of a regrouped call are summed per head, then across heads (in float32), so they equal
  the contiguous call's up to the order of a float32 sum, not bit for bit (the plain functions too).

The triton cases run Triton's interpreter on CPU (tests/conftest.py) and are marked slow.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from helpers import RecordingBackend, make_inputs, make_like
from torch.utils._python_dispatch import TorchDispatchMode

import gatednorm
from gatednorm import ops

INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
_triton = pytest.mark.skipif(not INTERPRETED or not gatednorm.triton_available(),
                             reason="the triton backend on CPU tensors needs Triton and TRITON_INTERPRET=1")
BACKENDS = ["native", pytest.param("triton", marks=[_triton, pytest.mark.slow])]
# The interpreter runs kernels in numpy, which may warn about values in masked-off lanes (never stored).
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

T, H, N, GS = 6, 4, 32, 16
EPS = 1e-6


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _recording(backend: str):
    rec = RecordingBackend(ops.select_impl(backend, torch.device("cpu")))
    return rec, ops.override_impl(backend, "cpu", rec)


class _Copies(TorchDispatchMode):
    """Sizes of the copies (clone, copy_, _to_copy) made by the dispatch layers (spec, functional, ops, modules:
    the innermost gatednorm frame of the stack). Backends write their results with copy_ (and Triton's
    interpreter stages kernel arguments through copies): those are not copies of the inputs."""

    COPIES = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
    LAYERS = ("spec.py", "functional.py", "ops.py", "modules.py")

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.COPIES:
            frames = [f.filename for f in traceback.extract_stack()
                      if f"{os.sep}gatednorm{os.sep}" in f.filename]
            if frames and f"{os.sep}backends{os.sep}" not in frames[-1] and os.path.basename(frames[-1]) in self.LAYERS:
                self.sizes.append(out.numel())
        return out


def _rand(*shape, dtype, scale=2.0, shift=0.0, requires_grad=False):
    """Fresh random data (never zeros), drawn in float64 as helpers.make_inputs does."""
    t = (shift + scale * torch.randn(*shape, dtype=torch.float64)).to(dtype)
    return t.requires_grad_(requires_grad)


def _strided(layout: str, dtype, requires_grad=False):
    """(x_parent, x, z_parent, z): x and z views (:func:`_view`) of larger tensors of fresh random data.

    * ``cols``: x columns [N, 2N) of an (M, 3N) tensor, z columns [3N, 4N) of a packed (M, 4N) projection;
    * ``heads``: x a contiguous (T*H, N), z the (T, H, N) view of columns [2HN, 3HN) of a (T, 4HN) projection;
    * ``heads_x_strided``: the same gate, x columns [0, N) of a (T*H, 2N) tensor. x has no (T, H*N) view, so
      the call cannot be regrouped and the gate is copied into (T*H, N) rows (the one copy left);
    * ``lead``: 3-D (T, H, N) slices of (T, H, 3N) / (T, H, 4N) tensors (their (M, N) rows are views).
    """
    m = T * H
    xp = {"cols": (m, 3 * N), "heads": (m, N), "heads_x_strided": (m, 2 * N), "lead": (T, H, 3 * N)}[layout]
    zp = {"cols": (m, 4 * N), "lead": (T, H, 4 * N)}.get(layout, (T, 4 * H * N))
    xp = _rand(*xp, dtype=dtype, shift=0.5, requires_grad=requires_grad)
    zp = _rand(*zp, dtype=dtype, requires_grad=requires_grad)
    return xp, _view(layout, "x", xp), zp, _view(layout, "z", zp)


def _view(layout: str, which: str, parent: torch.Tensor) -> torch.Tensor:
    """x or z of :func:`_strided` as a view of its parent (also used on the parent's gradient)."""
    if layout == "cols":
        return parent[:, N:2 * N] if which == "x" else parent[:, 3 * N:]
    if layout in ("heads", "heads_x_strided"):
        return parent[:, :N] if which == "x" else parent[:, 2 * H * N:3 * H * N].view(T, H, N)
    return parent[..., 2 * N:] if which == "x" else parent[..., N:2 * N]


def _contiguous(x: torch.Tensor, z: torch.Tensor, requires_grad=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous copies of x and of z as x's rows (a (T, H, N) gate as (T*H, N))."""
    xc = x.detach().clone().requires_grad_(requires_grad)
    zc = z.detach().reshape(x.shape).clone().requires_grad_(requires_grad)
    return xc, zc


def _assert_uncopied(rec: RecordingBackend, x: torch.Tensor, z: torch.Tensor | None,
                     kinds: list[str] | None = None) -> None:
    """Every x and z the backend received starts at the caller's view (its memory, not a copy)."""
    if kinds is not None:
        assert [kind for kind, _, _ in rec.seen] == kinds
    assert rec.seen
    for kind, xs, zs in rec.seen:
        if x is not None:
            assert xs.data_ptr() == x.data_ptr() and xs.stride(-1) == 1, (kind, "x was copied")
        if z is not None:
            assert zs.data_ptr() == z.data_ptr() and zs.stride(-1) == 1, (kind, "z was copied")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int8 else t.view(torch.uint8)


def _assert_grad_in_place(parent_grad: torch.Tensor, layout: str, which: str, want: torch.Tensor) -> None:
    """The gradient of a view lands where the view lies in the parent (bit for bit ``want``, the gradient of the
    contiguous call, in x's rows); the rest of the parent's gradient is 0."""
    mask = torch.zeros_like(parent_grad, dtype=torch.bool)
    _view(layout, which, mask).fill_(True)
    assert torch.equal(_view(layout, which, parent_grad).reshape(want.shape), want), which
    assert bool((parent_grad[~mask] == 0).all()), which


# ---------------------------------------------------------------------------
# Plain functions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["cols", "heads", "lead"])
def test_strided_plain_functions_uncopied_and_bitwise(backend, layout):
    dtype = torch.bfloat16
    xp, x, zp, z = _strided(layout, dtype, requires_grad=True)
    _, _, w, b = make_inputs(1, N, dtype)
    rec, registered = _recording(backend)
    with registered, _Copies() as copies:
        got = gatednorm.layer_norm_fwd(x.detach(), w, b, EPS, z=z.detach(), group_size=GS, backend=backend)
        y = gatednorm.rmsnorm_fn(x, w, None, z, EPS, GS, backend=backend)
        dy = make_like(y)
        dxp, dzp = torch.autograd.grad(y, (xp, zp), dy)
    _assert_uncopied(rec, x, z, ["forward", "forward", "backward"])
    assert all(size < x.numel() for size in copies.sizes), copies.sizes
    xc, zc = _contiguous(x, z, requires_grad=True)
    want = gatednorm.layer_norm_fwd(xc.detach(), w, b, EPS, z=zc.detach(), group_size=GS, backend=backend)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)
    y2 = gatednorm.rmsnorm_fn(xc, w, None, zc, EPS, GS, backend=backend)
    dx2, dz2 = torch.autograd.grad(y2, (xc, zc), dy)
    assert torch.equal(y, y2)
    _assert_grad_in_place(dxp, layout, "x", dx2)
    _assert_grad_in_place(dzp, layout, "z", dz2)


def test_strided_plain_module_uncopied():
    """The LayerNorm module (layernorm_fn underneath) reads a (T, H, N) gate and strided rows in place."""
    for layout in ("cols", "heads"):
        xp, x, zp, z = _strided(layout, torch.float32, requires_grad=True)
        norm = gatednorm.LayerNorm(N, group_size=GS)
        with torch.no_grad():
            norm.weight.copy_(make_inputs(1, N)[2])
            norm.bias.copy_(make_inputs(1, N)[3])
        rec, registered = _recording("native")
        with registered:
            y = norm(x, z)
            y.backward(make_like(y))
        _assert_uncopied(rec, x, z, ["forward", "backward"])
        xc, zc = _contiguous(x, z)
        assert torch.equal(y, norm(xc, zc))


# ---------------------------------------------------------------------------
# Quantized output
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["cols", "heads", "heads_x_strided", "lead"])
@pytest.mark.parametrize("quant", ["fp8_e4m3", "int8"])
def test_strided_quant_uncopied_and_bitwise(backend, layout, quant):
    dtype = torch.bfloat16 if quant == "int8" else torch.float32
    _, x, _, z = _strided(layout, dtype)
    _, _, w, b = make_inputs(1, N, dtype)
    xc, zc = _contiguous(x, z)
    # (group, quant block): one block per group (the fused triton kernel), blocks inside a group, one per row
    for group_size, block in ((GS, GS), (2 * GS, GS), (GS, None)):
        for column_major in (False, True):
            kwargs = dict(quant=quant, quant_group_size=block, column_major_scales=column_major, backend=backend)
            rec, registered = _recording(backend)
            with registered, _Copies() as copies:
                q, scale = gatednorm.gated_norm_quant(x, w, b, EPS, z, group_size, **kwargs)
            # the heads_x_strided gate is copied into rows (x has no (T, H*N) view): x alone is read in place
            _assert_uncopied(rec, x, None if layout == "heads_x_strided" else z)
            if layout != "heads_x_strided":
                assert all(size < x.numel() for size in copies.sizes), copies.sizes
            q2, scale2 = gatednorm.gated_norm_quant(xc, w, b, EPS, zc, group_size, **kwargs)
            assert q.shape == x.shape and q.is_contiguous()
            assert torch.equal(_bits(q), _bits(q2)), (group_size, block, column_major)
            assert scale.shape == scale2.shape and torch.equal(scale.view(torch.int32), scale2.view(torch.int32))
            blocks = scale.shape[-1]
            if column_major:  # the block index outermost in memory
                assert scale.stride()[-1] == x.numel() // N and scale.movedim(-1, 0).is_contiguous()
            else:
                assert scale.is_contiguous() and blocks == N // (block or N)


def test_strided_quant_column_major_scales_of_regrouped_heads_copy_only_the_scales():
    """A regrouped (T, H, N) call with column-major scales: the scales (N / k times fewer than q) are the one copy."""
    _, x, _, z = _strided("heads", torch.float32)
    _, _, w, b = make_inputs(1, N, torch.float32)
    with _Copies() as copies:
        q, scale = gatednorm.gated_norm_quant(x, w, b, EPS, z, GS, quant_group_size=GS, column_major_scales=True)
    assert copies.sizes == [T * H * (N // GS)]
    assert scale.shape == (T * H, N // GS) and scale.stride() == (1, T * H)


# ---------------------------------------------------------------------------
# Norm + gate + linear
# ---------------------------------------------------------------------------


def _linear_case(layout, dtype, is_rms, has_linear_bias):
    xp, x, zp, z = _strided(layout, dtype, requires_grad=True)
    _, _, w, b = make_inputs(1, N, dtype, bias=not is_rms)
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    lw = _rand(24, N, dtype=dtype, scale=0.125, requires_grad=True)
    lb = _rand(24, dtype=dtype, scale=0.5, requires_grad=True) if has_linear_bias else None
    return xp, x, zp, z, w, b, lw, lb


def _assert_linear_matches(got, want, regrouped: bool):
    """got/want: (out, dweight, dbias, dlinear_weight, dlinear_bias); dweight/dbias of a regrouped call are
    summed per head, then across heads: the contiguous call's sum in another order."""
    names = ("out", "dweight", "dbias", "dlinear_weight", "dlinear_bias")
    for name, a, c in zip(names, got, want, strict=True):
        if a is None or c is None:
            assert a is None and c is None, name
        elif regrouped and name in ("dweight", "dbias"):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * float(c.abs().max()), msg=name)
        else:
            assert torch.equal(a, c), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["cols", "heads", "lead"])
@pytest.mark.parametrize("has_linear_bias", [True, False], ids=["linear_bias", "no_linear_bias"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_strided_linear_uncopied_and_bitwise(backend, layout, has_linear_bias, is_rms):
    dtype = torch.bfloat16 if is_rms else torch.float32
    xp, x, zp, z, w, b, lw, lb = _linear_case(layout, dtype, is_rms, has_linear_bias)
    fn = gatednorm.rmsnorm_linear_fn if is_rms else gatednorm.layernorm_linear_fn
    extra = () if is_rms else (False,)  # layernorm_linear_fn's is_rms_norm
    params = [p for p in (w, b, lw, lb) if p is not None]
    rec, registered = _recording(backend)
    with registered, _Copies() as copies:
        out = fn(x, w, b, z, lw, lb, EPS, GS, True, *extra, backend=backend)
        dout = make_like(out)
        grads = torch.autograd.grad(out, (xp, zp, *params), dout)
    # the forward, the backward's recomputation of y, the norm's backward
    _assert_uncopied(rec, x, z, ["forward", "forward", "backward"])
    assert all(size < x.numel() for size in copies.sizes), copies.sizes
    assert out.shape == (*x.shape[:-1], 24)

    xc, zc = _contiguous(x, z, requires_grad=True)
    out2 = fn(xc, w, b, zc, lw, lb, EPS, GS, True, *extra, backend=backend)
    grads2 = torch.autograd.grad(out2, (xc, zc, *params), dout)
    dxp, dzp, *dparams = grads
    _assert_grad_in_place(dxp, layout, "x", grads2[0])
    _assert_grad_in_place(dzp, layout, "z", grads2[1])
    full = iter(dparams)
    mine = [next(full) if p is not None else None for p in (w, b, lw, lb)]
    full2 = iter(grads2[2:])
    theirs = [next(full2) if p is not None else None for p in (w, b, lw, lb)]
    _assert_linear_matches((out, *mine), (out2, *theirs), regrouped=layout == "heads")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_linear_heads_gate_with_residual_and_prenorm(backend):
    """The residual is regrouped with x (a view of a contiguous residual): same outputs and gradients."""
    dtype = torch.bfloat16
    xp, x, zp, z, w, b, lw, lb = _linear_case("heads", dtype, False, True)
    r = _rand(T * H, N, dtype=torch.float32, requires_grad=True)
    rec, registered = _recording(backend)
    with registered:
        out, res_out = gatednorm.layernorm_linear_fn(x, w, b, z, lw, lb, EPS, GS, residual=r, prenorm=True,
                                                     backend=backend)
        dout, dres = make_like(out), make_like(res_out)
        grads = torch.autograd.grad((out, res_out), (xp, zp, r, lw, lb), (dout, dres))
    _assert_uncopied(rec, None, z, ["forward", "forward", "backward"])
    xc, zc = _contiguous(x, z, requires_grad=True)
    out2, res_out2 = gatednorm.layernorm_linear_fn(xc, w, b, zc, lw, lb, EPS, GS, residual=r, prenorm=True,
                                                   backend=backend)
    grads2 = torch.autograd.grad((out2, res_out2), (xc, zc, r, lw, lb), (dout, dres))
    assert torch.equal(out, out2) and torch.equal(res_out, res_out2)
    assert torch.equal(grads[0], grads2[0])  # x is the whole parent here
    _assert_grad_in_place(grads[1], "heads", "z", grads2[1])
    for a, c in zip(grads[2:], grads2[2:], strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize("module", [gatednorm.LayerNormLinear, gatednorm.RMSNormLinear])
@pytest.mark.parametrize("layout", ["cols", "heads"])
def test_strided_linear_modules(module, layout):
    dtype = torch.float32
    xp, x, zp, z, _, _, lw, lb = _linear_case(layout, dtype, True, True)
    mod = module(N, eps=EPS, group_size=GS, dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(make_inputs(1, N)[2])
        if mod.bias is not None:
            mod.bias.copy_(make_inputs(1, N)[3])
    rec, registered = _recording("native")
    with registered:
        out = mod(x, z, lw, lb)
        dout = make_like(out)
        dxp, dzp, dlw = torch.autograd.grad(out, (xp, zp, lw), dout)
    _assert_uncopied(rec, x, z, ["forward", "forward", "backward"])
    xc, zc = _contiguous(x, z, requires_grad=True)
    out2 = mod(xc, zc, lw, lb)
    dx2, dz2, dlw2 = torch.autograd.grad(out2, (xc, zc, lw), dout)
    assert torch.equal(out, out2) and torch.equal(dlw, dlw2)
    _assert_grad_in_place(dxp, layout, "x", dx2)
    _assert_grad_in_place(dzp, layout, "z", dz2)
