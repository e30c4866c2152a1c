"""The native backend's accelerator path (fewest ops per call), run on CPU tensors.

On every device but CPU the native backend runs :class:`NativeAccelBackend`; CI has no GPU, so these
tests register it for CPU tensors through the backend registry (``ops.override_impl``) and check it
against the float64 reference. Budget: a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_one_rounding, make_inputs

import gatednorm
from gatednorm import native, ops
from gatednorm import verification as V
from gatednorm.backends.native_accel import NativeAccelBackend
from gatednorm.reference import gated_norm_reference
from gatednorm.spec import NormSpec

GATES = {"none": None, "after": True, "before": False}  # value: norm_before_gate
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def accel_path():
    with ops.override_impl("native", "cpu", NativeAccelBackend()):
        yield


def _spec(n, group_size, gate, rms, activation="swish", eps=1e-6):
    return NormSpec(eps, group_size or n, GATES[gate] is not False, rms, activation)


def _c(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_forward(x, w, b, z, spec, out, mean, rstd, out_dtype=None):
    nbg = spec.norm_before_gate
    ref, ref_mean, ref_rstd = gated_norm_reference(x, w, b, z, spec.eps, spec.group_size, nbg, spec.is_rms_norm,
                                                   spec.activation)
    assert_one_rounding(out, ref, out_dtype or x.dtype)
    c = _c(x.dtype)
    assert rstd.dtype == c and rstd.shape == ref_rstd.shape and rstd.is_contiguous()
    assert_one_rounding(rstd, ref_rstd, c)
    if spec.is_rms_norm:
        assert mean is None
    else:
        assert mean.dtype == c and mean.shape == ref_mean.shape
        tol = 1e-12 if c == torch.float64 else 1e-6
        torch.testing.assert_close(mean.double(), ref_mean, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["onegroup", "groups"])
def test_forward_matches_float64(dtype, rms, gate, activation, bias, group_size):
    x, z, w, b = make_inputs(24, 96, dtype, gate=gate != "none", bias=bias)
    spec = _spec(96, group_size, gate, rms, activation)
    out = torch.empty_like(x)
    mean, rstd = native.forward(x, w, b, z, spec, out)
    _check_forward(x, w, b, z, spec, out, mean, rstd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["onegroup", "groups"])
def test_gradients_match_float64_autograd(dtype, rms, gate, activation, group_size):
    m, n = 13, 96
    x, z, w, b = make_inputs(m, n, dtype, gate=gate != "none", seed=7)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(8)).to(dtype)
    spec = _spec(n, group_size, gate, rms, activation)
    mean, rstd = native.forward(x, w, b, z, spec, torch.empty_like(x))
    got = native.backward(dy, x, w, b, z, mean, rstd, spec)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    y, _, _ = gated_norm_reference(leaves[0], leaves[2], leaves[3], leaves[1], spec.eps, group_size,
                                   spec.norm_before_gate, rms, activation)
    y.backward(dy.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, g, leaf in zip(("dx", "dz", "dweight", "dbias"), got, leaves, strict=True):
        if leaf is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == leaf.shape, name
        torch.testing.assert_close(g.double(), leaf.grad, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, True), (False, True, True, False)])
@pytest.mark.parametrize("gate", ["after", "before"])
def test_partial_gradients(needs, gate):
    m, n = 9, 64
    x, z, w, b = make_inputs(m, n, torch.float32, seed=11)
    dy = torch.randn(m, n)
    spec = _spec(n, 16, gate, False)
    mean, rstd = native.forward(x, w, b, z, spec, torch.empty_like(x))
    full = native.backward(dy, x, w, b, z, mean, rstd, spec)
    part = native.backward(dy, x, w, b, z, mean, rstd, spec, *needs)
    for want, f, p in zip(needs, full, part, strict=True):
        assert (p is not None) == want
        if want:
            torch.testing.assert_close(p, f, rtol=1e-6, atol=1e-6)


def test_multiple_blocks_match_one_block():
    m, n = 11, 96
    x, z, w, b = make_inputs(m, n, torch.bfloat16, seed=3)
    dy = torch.randn(m, n).bfloat16()
    for rms, gate in ((False, "before"), (True, "after")):
        spec = _spec(n, 32, gate, rms)
        out1 = torch.empty_like(x)
        mean1, rstd1 = native.forward(x, w, b, z, spec, out1)
        g1 = native.backward(dy, x, w, b, z, mean1, rstd1, spec)
        with ops.override_impl("native", "cpu", NativeAccelBackend(block_elements=3 * n)):  # 3-row blocks
            out3 = torch.empty_like(x)
            mean3, rstd3 = native.forward(x, w, b, z, spec, out3)
            g3 = native.backward(dy, x, w, b, z, mean3, rstd3, spec)
        _check_forward(x, w, b, z, spec, out3, mean3, rstd3)
        torch.testing.assert_close(out3, out1, rtol=0, atol=0)
        torch.testing.assert_close(rstd3, rstd1, rtol=1e-6, atol=0)
        for a, c in zip(g1, g3, strict=True):
            if a is not None:
                torch.testing.assert_close(c.float(), a.float(), rtol=1e-2, atol=1e-2)


def test_strided_inputs_and_strided_out():
    n = 96
    x, z, w, b = make_inputs(10, 2 * n, torch.bfloat16, seed=3)
    xs, zs = x[:, ::2], z[:, 1::2]  # last-dim stride 2
    xt = xs.t().contiguous().t()  # column-major storage
    out_store = torch.full((10, 3 * n), float("nan"), dtype=torch.bfloat16)
    out = out_store[:, n : 2 * n]
    for xin in (xs, xt):
        for gate in ("after", "before"):
            spec = _spec(n, 32, gate, gate == "after")
            mean, rstd = native.forward(xin, w[:n], b[:n], zs, spec, out)
            _check_forward(xin, w[:n], b[:n], zs, spec, out, mean, rstd)
            assert torch.isnan(out_store[:, :n]).all() and torch.isnan(out_store[:, 2 * n :]).all()
            dy = torch.randn(10, 2 * n).bfloat16()[:, ::2]
            dx, dz, dw, db = native.backward(dy, xin, w[:n], b[:n], zs, mean, rstd, spec)
            ref = native.backward(dy.contiguous(), xin.contiguous(), w[:n], b[:n], zs.contiguous(), mean, rstd, spec)
            for got, want in zip((dx, dz, dw, db), ref, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.float64])
def test_out_of_another_dtype(out_dtype):
    x, z, w, b = make_inputs(16, 64, torch.bfloat16, seed=4)
    spec = _spec(64, 16, "after", False)
    out = torch.empty(16, 64, dtype=out_dtype)
    mean, rstd = native.forward(x, w, b, z, spec, out)
    tol_dtype = torch.float32 if out_dtype == torch.float64 else out_dtype  # an out wider than C holds C's rounding
    _check_forward(x, w, b, z, spec, out, mean, rstd, out_dtype=tol_dtype)


@pytest.mark.parametrize(
    "x_dtype,z_dtype,p_dtype",
    [(torch.float32, torch.bfloat16, torch.float64), (torch.bfloat16, torch.float32, torch.float32),
     (torch.float16, torch.float64, torch.bfloat16), (torch.float64, torch.float32, torch.float16)],
)
@pytest.mark.parametrize("gate", ["after", "before"])
def test_gate_and_parameters_of_other_dtypes(x_dtype, z_dtype, p_dtype, gate):
    m, n = 12, 64
    x, _, w, b = make_inputs(m, n, x_dtype, param_dtype=p_dtype, seed=6)
    z = torch.randn(m, n).mul(2).to(z_dtype)
    for rms in (False, True):
        spec = _spec(n, 32, gate, rms)
        out = torch.empty_like(x)
        mean, rstd = native.forward(x, w, b, z, spec, out)
        # the contract takes weight, bias and z in C: compare with the reference on C-rounded copies
        c = _c(x_dtype)
        _check_forward(x, w.to(c), b.to(c), z.to(c), spec, out, mean, rstd)
        dy = torch.randn(m, n).to(x_dtype)
        dx, dz, dw, db = native.backward(dy, x, w, b, z, mean, rstd, spec)
        assert (dx.dtype, dz.dtype, dw.dtype, db.dtype) == (x_dtype, z_dtype, p_dtype, p_dtype)


def test_empty_batch_and_meta():
    spec = _spec(64, 16, "after", False)
    for dev in ("cpu", "meta"):
        for m in (0, 5):
            if dev == "cpu" and m:
                continue
            x = torch.empty(m, 64, dtype=torch.bfloat16, device=dev)
            w = torch.ones(64, device=dev)
            # empty batches and meta tensors are answered by ops, before any backend runs
            _, mean, rstd = gatednorm.layer_norm_fwd(x, w, w, spec.eps, z=x, group_size=16, backend="native")
            assert mean.shape == rstd.shape == (4 * m,) and rstd.dtype == torch.float32
            grads = ops.gated_norm_rows_backward(x, x, w, w, x, mean, rstd, spec, backend="native")
            assert [g.shape for g in grads] == [(m, 64), (m, 64), (64,), (64,)]
            assert grads[0].dtype == torch.bfloat16 and grads[2].dtype == torch.float32


@pytest.mark.parametrize("gs", [None, 64])
def test_large_offset_rows(gs):
    """mean 1e4, std 1e-2 through torch.var_mean: as good as the two-pass CPU path (documented tolerance)."""
    g = torch.Generator().manual_seed(1)
    x = 1e4 + 1e-2 * torch.randn(16, 256, generator=g)
    w, b = 1 + 0.1 * torch.randn(256, generator=g), 0.1 * torch.randn(256, generator=g)
    spec = NormSpec(1e-6, gs or 256, True, False, "swish")
    y = torch.empty_like(x)
    mean, rstd = native.forward(x, w, b, None, spec, y)
    ry, rmean, rrstd = gated_norm_reference(x, w, b, None, 1e-6, gs)
    mag = V.magnitudes(x, w, b, None, None, spec.group_size, True, False, "swish", 1e-6)
    k = V.k_factor(spec.group_size)
    for name, got, ref in (("y", y, ry), ("rstd", rstd, rrstd), ("mean", mean, rmean)):
        res = V.compare(got, ref, V.allowed_error(ref, mag[name], torch.float32, k, torch.float32), torch.float32)
        assert res.passed, f"{name}: err/tol {res.worst_ratio:.3g}"


def test_public_api_autograd_on_accel_path():
    x, z, w, b = make_inputs(6, 64, torch.float32, seed=9)
    leaves = [t.clone().requires_grad_() for t in (x, z, w, b)]
    y = gatednorm.layernorm_fn(leaves[0], leaves[2], leaves[3], leaves[1], eps=1e-6, group_size=16,
                               norm_before_gate=False, backend="native")
    y.backward(torch.ones_like(y) * 0.5)
    ref_leaves = [t.double().requires_grad_() for t in (x, z, w, b)]
    ry, _, _ = gated_norm_reference(ref_leaves[0], ref_leaves[2], ref_leaves[3], ref_leaves[1], 1e-6, 16, False)
    ry.backward(torch.ones_like(ry) * 0.5)
    assert_one_rounding(y.detach(), ry.detach())
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
