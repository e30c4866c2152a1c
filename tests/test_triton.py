"""The Triton backend against the float64 reference and the native backend.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small. Skipped when
triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from helpers import VARIANTS, variant_id  # noqa: E402

from gatednorm import native  # noqa: E402
from gatednorm.functional import layer_norm_fwd, layernorm_fn  # noqa: E402
from gatednorm.reference import gated_norm_reference  # noqa: E402
from gatednorm.spec import NormSpec  # noqa: E402

tk = pytest.importorskip("gatednorm.backends.triton.launch")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5



def _inputs(m, n, dtype, has_bias, has_z, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(DEV)

    x = r(m, n, scale=2.0, shift=0.5)  # a nonzero mean exercises the centring
    z = r(m, n, scale=1.5) if has_z else None
    w = r(n, shift=1.0)
    b = r(n, scale=0.5) if has_bias else None
    return x, w, b, z


def _spec(gs, v):
    rms, nbg, act, _, _ = v
    return NormSpec(EPS, gs, nbg, rms, act)


def _reference_with_grads(x, w, b, z, dy, spec):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b, z)]
    y, mean, rstd = gated_norm_reference(leaves[0], leaves[1], leaves[2], leaves[3], spec.eps, spec.group_size,
                                         spec.norm_before_gate, spec.is_rms_norm, spec.activation)
    y.backward(dy.double())
    grads = [t.grad if t is not None else None for t in leaves]
    grads = [grads[0], grads[3], grads[1], grads[2]]  # the backends' order: dx, dz, dweight, dbias
    return y.detach(), (mean.detach() if mean is not None else None), rstd.detach(), grads


def _close(a, b, rtol, atol_frac):
    """|a - b| <= rtol * |b| + atol_frac * max|b| elementwise (a's dtype rounding on the scale of b)."""
    a = a.double().cpu()
    b = b.double().cpu()
    scale = b.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_frac * scale.item())


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("m,n,gs", [(7, 192, 96), (5, 64, 64)])
def test_fp32_against_float64_reference(v, m, n, gs):
    spec = _spec(gs, v)
    x, w, b, z = _inputs(m, n, torch.float32, v[3], v[4], seed=m * n + gs)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEV)  # poisoned: every element written
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    dy = torch.randn(m, n, dtype=torch.float32, device=DEV)
    y_ref, mean_ref, rstd_ref, grads_ref = _reference_with_grads(x, w, b, z, dy, spec)
    _close(out, y_ref, 1e-5, 1e-6)
    _close(rstd, rstd_ref, 1e-5, 0)
    assert rstd.dtype == torch.float32 and rstd.shape == (m * n // gs,)
    if spec.is_rms_norm:
        assert mean is None
    else:
        _close(mean, mean_ref, 1e-5, 1e-6)
    grads = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    for got, ref in zip(grads, grads_ref, strict=True):
        if ref is None:
            assert got is None
        else:
            _close(got, ref, 1e-4, 1e-5)


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
def test_bf16_against_native(v):
    # group of 640 (not a power of two: padded lanes of x and z are filled), 2 groups a row
    m, n, gs = 5, 1280, 640
    spec = _spec(gs, v)
    x, w, b, z = _inputs(m, n, torch.bfloat16, v[3], v[4], seed=11)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
    out_n = torch.empty_like(out)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    mean_n, rstd_n = native.forward(x, w, b, z, spec, out_n)
    _close(out, out_n, 2**-7, 2**-8)  # same fp32 function, one bf16 rounding each: at most an ulp apart
    _close(rstd, rstd_n, 1e-5, 0)
    if mean is not None:
        _close(mean, mean_n, 1e-5, 1e-6)
    dy = torch.randn(m, n, device=DEV).to(torch.bfloat16)
    got = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    ref = native.backward(dy, x, w, b, z, mean_n, rstd_n, spec, True, True, True, True)
    for a, r in zip(got, ref, strict=True):
        assert (a is None) == (r is None)
        if a is not None:
            assert a.dtype == r.dtype
            _close(a, r, 2**-7, 2**-7)


@pytest.mark.parametrize("is_rms,nbg", [(False, False), (True, True), (False, True)])
def test_wide_group_loop_path(monkeypatch, is_rms, nbg):
    """Groups wider than MAX_BLOCK are looped over in chunks (here 160 = 64 + 64 + 32)."""
    monkeypatch.setattr(tk, "MAX_BLOCK", 64)
    assert tk._fwd_config(160, 4)[1] == 3 and tk._bwd_config(160, 4)[1] == 3
    m, n, gs = 5, 320, 160
    spec = NormSpec(EPS, gs, nbg, is_rms, "swish")
    x, w, b, z = _inputs(m, n, torch.float32, True, True, seed=3)
    x = x + 100.0  # a large common offset: a one-pass E[x^2]-E[x]^2 variance would lose digits here
    out = torch.empty(m, n, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    dy = torch.randn(m, n, device=DEV)
    y_ref, mean_ref, rstd_ref, grads_ref = _reference_with_grads(x, w, b, z, dy, spec)
    _close(out, y_ref, 1e-5, 1e-5)
    _close(rstd, rstd_ref, 1e-5, 0)
    if not is_rms:
        _close(mean, mean_ref, 1e-6, 0)
    grads = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    for got, ref in zip(grads, grads_ref, strict=True):
        _close(got, ref, 1e-4, 1e-5)


def test_non_contiguous_inputs_and_out():
    m, n, gs = 6, 128, 64
    spec = NormSpec(EPS, gs, False, False, "swish")
    base_x = torch.randn(m, 2 * n, device=DEV)
    x = base_x[:, ::2]  # feature stride 2: copied
    z = torch.randn(n, m, device=DEV).t()  # transposed
    w = torch.randn(2 * n, device=DEV)[::2]  # strided weight
    b = torch.randn(n, device=DEV)
    out_base = torch.full((m, n + 32), float("nan"), device=DEV)
    out = out_base[:, 16:16 + n]  # row stride n + 32
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    y_ref, mean_ref, rstd_ref = gated_norm_reference(x, w, b, z, EPS, gs, False, False)
    _close(out, y_ref, 1e-5, 1e-6)
    assert torch.isnan(out_base[:, :16]).all() and torch.isnan(out_base[:, 16 + n:]).all()  # nothing outside
    out_t = torch.empty(n, m, device=DEV).t()  # out with feature stride != 1
    tk.forward(x, w, b, z, spec, out_t)
    _close(out_t, y_ref, 1e-5, 1e-6)
    dy = torch.ones(1, 1, device=DEV).expand(m, n)  # stride 0, as from y.sum().backward()
    got = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    ref = native.backward(dy.contiguous(), x.contiguous(), w.contiguous(), b, z.contiguous(), mean, rstd, spec)
    for a, r in zip(got, ref, strict=True):
        _close(a, r, 1e-5, 1e-6)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_out_dtype(x_dtype, out_dtype):
    m, n, gs = 4, 96, 96
    spec = NormSpec(EPS, gs, True, True, "swish")
    x, w, b, z = _inputs(m, n, x_dtype, False, True, seed=5)
    out = torch.empty(m, n, dtype=out_dtype, device=DEV)
    tk.forward(x, w, b, z, spec, out)
    y_ref = gated_norm_reference(x, w, b, z, EPS, gs, True, True)[0]
    tol = 2e-6 if out_dtype == torch.float32 else 2**-10
    _close(out, y_ref, tol, tol)


def test_float64_routed_to_native():
    """The kernels compute in float32: ops routes float64 calls for the triton backend to native."""
    m, n = 3, 32
    x, w, b, z = _inputs(m, n, torch.float64, True, True, seed=9)
    out, mean, rstd = layer_norm_fwd(x, w, b, EPS, z=z, group_size=16, norm_before_gate=False, backend="triton")
    assert rstd.dtype == torch.float64 and mean.dtype == torch.float64
    y_ref = gated_norm_reference(x, w, b, z, EPS, 16, False, False)[0]
    _close(out, y_ref, 1e-12, 1e-13)


def test_empty_batch():
    """Empty batches never reach the kernels (ops answers them): shapes and zero parameter gradients."""
    x = torch.empty(0, 64, device=DEV, requires_grad=True)
    z = torch.empty(0, 64, device=DEV, requires_grad=True)
    w = torch.ones(64, device=DEV, requires_grad=True)
    y, mean, rstd = layer_norm_fwd(x, w, None, EPS, z=z, group_size=32, backend="triton")
    assert y.shape == (0, 64) and mean.shape == (0,) and rstd.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and z.grad.shape == (0, 64) and w.grad.shape == (64,) and (w.grad == 0).all()


def test_batch_invariance():
    """A row's y, stats and dx bits do not depend on the other rows in the call."""
    n, gs = 256, 128
    spec = NormSpec(EPS, gs, True, True, "swish")
    x, w, b, z = _inputs(70, n, torch.bfloat16, False, True, seed=21)
    dy = torch.randn(70, n, device=DEV).to(torch.bfloat16)

    def run(rows):
        out = torch.empty(len(rows), n, dtype=torch.bfloat16, device=DEV)
        _, rstd = tk.forward(x[rows], w, b, z[rows], spec, out)
        dx, dz, _, _ = tk.backward(dy[rows], x[rows], w, b, z[rows], None, rstd, spec, True, True, False, False)
        return out, rstd.view(n // gs, len(rows)).t(), dx, dz

    full = run(torch.arange(70))
    for rows in (torch.tensor([37]), torch.arange(40, 43), torch.tensor([69, 0, 5])):
        part = run(rows)
        for a, f in zip(part, full, strict=True):
            assert torch.equal(a, f[rows])


def test_dweight_deterministic_and_reduced():
    m, n, gs = 67, 128, 64  # several persistent programs, each with several row tiles
    spec = NormSpec(EPS, gs, False, False, "swish")
    x, w, b, z = _inputs(m, n, torch.float32, True, True, seed=33)
    out = torch.empty(m, n, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    dy = torch.randn(m, n, device=DEV)
    first = tk.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    again = tk.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    assert first[0] is None and first[1] is None
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    ref = native.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    _close(first[2], ref[2], 1e-5, 1e-6)
    _close(first[3], ref[3], 1e-5, 1e-6)


def test_public_api_with_triton_backend():
    """layernorm_fn / layer_norm_fwd route to the kernels (3-D gate layout, autograd, out=)."""
    t, h, n, gs = 3, 4, 64, 32
    x = torch.randn(t * h, n, device=DEV, requires_grad=True)
    z = torch.randn(t, h, n, device=DEV, requires_grad=True)
    w = torch.randn(n, device=DEV, requires_grad=True)
    b = torch.randn(n, device=DEV, requires_grad=True)
    leaves = (x, w, b, z)
    y = layernorm_fn(x, w, b, z, eps=EPS, group_size=gs, norm_before_gate=True, backend="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    y_n = layernorm_fn(x, w, b, z, eps=EPS, group_size=gs, norm_before_gate=True, backend="native")
    grads_n = torch.autograd.grad(y_n, leaves, dy)
    _close(y, y_n, 1e-5, 1e-6)
    for a, r in zip(grads, grads_n, strict=True):
        _close(a, r, 1e-5, 1e-6)
    out = torch.empty(t * h, n, dtype=torch.bfloat16, device=DEV)
    with torch.no_grad():
        res, mean, rstd = layer_norm_fwd(x, w, b, EPS, z=z, out=out, group_size=gs, is_rms_norm=True,
                                         backend="triton")
    assert res is out and mean is None and rstd.shape == (t * h * n // gs,)
    y_ref = gated_norm_reference(x.detach(), w.detach(), b.detach(), z.detach(), EPS, gs, True, True)[0]
    _close(out, y_ref, 2**-8, 2**-8)
