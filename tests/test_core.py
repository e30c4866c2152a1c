"""Core contract of the native backend: the formula, layouts, statistics, gradients, modules, names."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_rounding, make_inputs, tolerance

import gatednorm
from gatednorm.reference import gated_norm_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GATES = ["none", "after", "before"]  # gate after the norm = norm_before_gate=True


def _layout(x, z, layout):
    """Return x, z in the requested layout, same values."""
    if layout == "2d":
        return x, z
    if layout == "3d":
        m, n = x.shape
        return x.view(2, m // 2, n), (z.view(2, m // 2, n) if z is not None else None)
    # non-contiguous: x with last-dim stride 2, z transposed storage
    big = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    big[:, ::2] = x
    big[:, 1::2] = float("nan")  # never read
    zt = z.t().contiguous().t() if z is not None else None
    return big[:, ::2], zt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["onegroup", "groups"])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_matches_float64_reference(dtype, rms, gate, activation, bias, group_size, layout):
    x, z, w, b = make_inputs(24, 96, dtype, gate=gate != "none", bias=bias)
    x, z = _layout(x, z, layout)
    nbg = gate != "before"
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=group_size, norm_before_gate=nbg,
                                             is_rms_norm=rms, activation=activation)
    ref, ref_mean, ref_rstd = gated_norm_reference(x, w, b, z, 1e-6, group_size, nbg, rms, activation)
    assert y.shape == x.shape and y.dtype == dtype
    assert_one_rounding(y, ref)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert rstd.dtype == stat_dtype and rstd.shape == ref_rstd.shape
    assert_one_rounding(rstd, ref_rstd, stat_dtype)
    if rms:
        assert mean is None
    else:
        assert mean.dtype == stat_dtype
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)


def test_tolerance_rejects_double_rounding():
    """The bf16 tolerance is tight enough to tell one rounding from the usual two-step recipe."""
    x, z, w, _ = make_inputs(256, 128, torch.bfloat16, bias=False, seed=0)
    ref, _, _ = gated_norm_reference(x, w, None, z, 1e-6, None, True, True)
    two_step = F.rms_norm(x, (128,), w, 1e-6) * F.silu(z)  # rounds to bf16 after the norm, again after the gate
    with pytest.raises(AssertionError, match="beyond one rounding"):
        assert_one_rounding(two_step, ref)
    assert_one_rounding(gatednorm.rmsnorm_fn(x, w, None, z), ref)


def test_gate_layout_t_h_n():
    """x (T*H, N) with z (T, H, N), as the newest sglang kernel accepts."""
    t, h, n = 5, 4, 64
    x, _, w, b = make_inputs(t * h, n, torch.bfloat16)
    z = torch.randn(t, h, n).to(torch.bfloat16)
    y, _, _ = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=16, is_rms_norm=True)
    ref, _, _ = gated_norm_reference(x, w, b, z.reshape(t * h, n), 1e-6, 16, True, True)
    assert_one_rounding(y, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_torch_layer_norm_and_rms_norm(dtype):
    x, _, w, b = make_inputs(64, 256, dtype, gate=False)
    n = x.shape[-1]
    got_ln = gatednorm.layernorm_fn(x, w, b, eps=1e-5)
    want_ln = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-5).to(dtype)
    got_rms = gatednorm.rmsnorm_fn(x, w, None, eps=1e-5)
    want_rms = F.rms_norm(x.float(), (n,), w.float(), 1e-5).to(dtype)
    rtol, atol = tolerance(dtype)
    # both sides are rounded once from float32: at most one ulp apart
    torch.testing.assert_close(got_ln, want_ln, rtol=2 * rtol, atol=2 * atol)
    torch.testing.assert_close(got_rms, want_rms, rtol=2 * rtol, atol=2 * atol)
    assert torch.equal(gatednorm.simple_layernorm_native(x, w, b), gatednorm.layernorm_fn(x, w, b, eps=1e-5))


def test_against_torch_group_norm():
    """Grouped LayerNorm with per-channel affine is F.group_norm on (M, N) with G groups."""
    x, _, w, b = make_inputs(32, 512, torch.float32, gate=False)
    got = gatednorm.layernorm_fn(x, w, b, eps=1e-5, group_size=128)
    want = F.group_norm(x, 4, w, b, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nbg", [True, False])
def test_gate_composed_from_silu(nbg):
    x, z, w, b = make_inputs(16, 128, torch.float32)
    got = gatednorm.layernorm_fn(x, w, b, z, eps=1e-5, norm_before_gate=nbg)
    if nbg:
        want = F.layer_norm(x, (128,), w, b, 1e-5) * F.silu(z)
    else:
        want = F.layer_norm(x * F.silu(z), (128,), w, b, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_sig = gatednorm.rmsnorm_fn(x, w, None, z, eps=1e-5, norm_before_gate=nbg, activation="sigmoid")
    if nbg:
        want_sig = F.rms_norm(x, (128,), w, 1e-5) * torch.sigmoid(z)
    else:
        want_sig = F.rms_norm(x * torch.sigmoid(z), (128,), w, 1e-5)
    torch.testing.assert_close(got_sig, want_sig, rtol=1e-5, atol=1e-5)
    # "silu" is the same activation as "swish"
    assert torch.equal(gatednorm.rmsnorm_fn(x, w, None, z, activation="silu"), gatednorm.rmsnorm_fn(x, w, None, z))


@pytest.mark.parametrize("rms", [False, True])
def test_statistics_are_group_major(rms):
    m, n, gs = 7, 96, 32
    x, _, w, b = make_inputs(m, n, torch.float32, gate=False)
    _, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, group_size=gs, is_rms_norm=rms)
    groups = n // gs
    assert rstd.shape == (groups * m,)
    xd = x.double()
    for row, g in itertools.product(range(m), range(groups)):
        seg = xd[row, g * gs:(g + 1) * gs]
        mu = 0.0 if rms else float(seg.mean())
        var = float(((seg - mu) ** 2).mean())
        assert rstd[g * m + row].item() == pytest.approx(1 / (var + 1e-6) ** 0.5, rel=1e-6)
        if not rms:
            assert mean[g * m + row].item() == pytest.approx(mu, rel=1e-5, abs=1e-6)


VARIANTS = list(itertools.product([False, True], GATES, ["swish", "sigmoid"], [True, False], [None, 4]))


@pytest.mark.parametrize("rms,gate,activation,bias,group_size", VARIANTS)
def test_gradcheck_float64(rms, gate, activation, bias, group_size):
    x, z, w, b = make_inputs(5, 12, torch.float64, gate=gate != "none", bias=bias)
    inputs = [t.requires_grad_() for t in (x, w, b, z) if t is not None]

    def fn(*args):
        it = iter(args)
        xx, ww = next(it), next(it)
        bb = next(it) if bias else None
        zz = next(it) if gate != "none" else None
        return gatednorm.layernorm_fn(xx, ww, bb, zz, 1e-5, group_size, gate != "before", rms, activation=activation)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rms,gate,activation,bias,group_size", VARIANTS)
def test_float32_gradients_match_float64_autograd(rms, gate, activation, bias, group_size):
    x, z, w, b = make_inputs(33, 64, torch.float32, gate=gate != "none", bias=bias)
    gs = None if group_size is None else 16
    nbg = gate != "before"
    leaves = [t.requires_grad_() for t in (x, z, w, b) if t is not None]
    y = gatednorm.layernorm_fn(x, w, b, z, 1e-5, gs, nbg, rms, activation=activation)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    x64 = next(it)
    z64 = next(it) if z is not None else None
    w64 = next(it)
    b64 = next(it) if b is not None else None
    ref, _, _ = gated_norm_reference(x64, w64, b64, z64, 1e-5, gs, nbg, rms, activation)
    want = torch.autograd.grad(ref, leaves64, dy.double())
    for g, r in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype):
    """dx/dz in x's and z's dtype, dweight/dbias in the parameters' dtype, each rounded once."""
    x, z, w, b = make_inputs(40, 64, dtype, param_dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, z, w, b)]
    y = gatednorm.layernorm_fn(x, w, b, z, 1e-5, 16, False, False)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    assert [g.dtype for g in got] == [dtype, dtype, torch.float32, torch.float32]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref, _, _ = gated_norm_reference(leaves64[0], leaves64[2], leaves64[3], leaves64[1], 1e-5, 16, False, False)
    want = torch.autograd.grad(ref, leaves64, dy.double())
    for g, r in zip(got[:2], want[:2], strict=True):
        assert_one_rounding(g, r)  # rounded once from float32
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-4, atol=1e-4)


def test_double_backward_raises_clearly():
    x, z, w, _ = make_inputs(4, 16, torch.float64, bias=False)
    x.requires_grad_()
    y = gatednorm.rmsnorm_fn(x, w, None, z)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_mixed_parameter_and_gate_dtypes():
    x, _, _, _ = make_inputs(16, 64, torch.bfloat16, gate=False)
    _, z, w, b = make_inputs(16, 64, torch.float32)
    y = gatednorm.layernorm_fn(x, w, b, z, group_size=16)
    assert y.dtype == torch.bfloat16
    ref, _, _ = gated_norm_reference(x, w, b, z, 1e-6, 16, True, False)
    assert_one_rounding(y, ref)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_argument(out_dtype):
    x, z, w, b = make_inputs(12, 64, torch.float32)
    out = torch.full((12, 64), float("nan"), dtype=out_dtype)
    y, _, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=out, group_size=32)
    assert y is out
    ref, _, ref_rstd = gated_norm_reference(x, w, b, z, 1e-6, 32, True, False)
    assert_one_rounding(out, ref)
    assert_one_rounding(rstd, ref_rstd)
    # non-contiguous out is written in place too
    big = torch.full((12, 128), float("nan"), dtype=out_dtype)
    gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=big[:, ::2], group_size=32)
    assert_one_rounding(big[:, ::2], ref)
    assert torch.isnan(big[:, 1::2]).all()


def test_out_with_autograd_raises_and_leaves_out_untouched():
    x, z, w, b = make_inputs(4, 32, torch.float32)
    w.requires_grad_()
    out = torch.full_like(x, 7.0)
    with pytest.raises(ValueError, match="out"):
        gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=out)
    assert (out == 7.0).all()
    with torch.no_grad():
        gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=out)
    assert not (out == 7.0).any()


def test_empty_batch_and_meta_device():
    x, z, w, b = make_inputs(0, 64, torch.bfloat16)
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=16)
    assert y.shape == (0, 64) and mean.shape == (0,) and rstd.shape == (0,)
    xr = x.clone().requires_grad_()
    gatednorm.layernorm_fn(xr, w, b, z).sum().backward()
    assert xr.grad.shape == (0, 64)

    xm = torch.empty(3, 5, 64, device="meta", dtype=torch.bfloat16)
    wm = torch.empty(64, device="meta")
    y, mean, rstd = gatednorm.layer_norm_fwd(xm, wm, None, 1e-6, z=xm, group_size=16, is_rms_norm=True)
    assert y.device.type == "meta" and y.shape == xm.shape and rstd.shape == (60,) and mean is None


def test_layernorm_fwd_is_differentiable_without_out():
    x, z, w, b = make_inputs(6, 32, torch.float64)
    x.requires_grad_()
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z)
    assert y.requires_grad and not rstd.requires_grad and not mean.requires_grad
    ref, _, _ = gated_norm_reference(x, w, b, z, 1e-6)
    (g1,) = torch.autograd.grad(y.sum(), x)
    (g2,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g1, g2)


# --- errors -------------------------------------------------------------------------------

def _err_cases():
    x, z, w, b = make_inputs(4, 32, torch.float32)
    ok = dict(x=x, weight=w, bias=b, eps=1e-6, z=z, group_size=None)
    yield "weight shape", dict(ok, weight=torch.ones(31)), ValueError, "weight"
    yield "bias shape", dict(ok, bias=torch.ones(2, 16)), ValueError, "bias"
    yield "z shape", dict(ok, z=torch.ones(4, 16)), ValueError, "z"
    yield "group_size zero", dict(ok, group_size=0), ValueError, "group_size"
    yield "group_size negative", dict(ok, group_size=-8), ValueError, "group_size"
    yield "group_size not dividing", dict(ok, group_size=12), ValueError, "group_size"
    yield "group_size float", dict(ok, group_size=16.0), TypeError, "group_size"
    yield "integer x", dict(ok, x=torch.ones(4, 32, dtype=torch.int32)), TypeError, "x"
    yield "complex x", dict(ok, x=torch.ones(4, 32, dtype=torch.complex64)), TypeError, "x"
    yield "integer weight", dict(ok, weight=torch.ones(32, dtype=torch.int64)), TypeError, "weight"
    yield "integer z", dict(ok, z=torch.ones(4, 32, dtype=torch.int64)), TypeError, "z"
    yield "x not a tensor", dict(ok, x=[[1.0] * 32]), TypeError, "x"
    yield "weight on meta", dict(ok, weight=torch.ones(32, device="meta")), ValueError, "weight"
    yield "z on meta", dict(ok, z=torch.ones(4, 32, device="meta")), ValueError, "z"
    yield "bias on meta", dict(ok, bias=torch.ones(32, device="meta")), ValueError, "bias"
    yield "negative eps", dict(ok, eps=-1e-6), ValueError, "eps"
    yield "nan eps", dict(ok, eps=float("nan")), ValueError, "eps"
    yield "eps tensor", dict(ok, eps=torch.tensor(1e-6)), TypeError, "eps"
    yield "activation", dict(ok, activation="relu"), ValueError, "activation"
    yield "backend", dict(ok, backend="cuda"), ValueError, "backend"
    yield "out shape", dict(ok, out=torch.empty(4, 16)), ValueError, "out"
    yield "out dtype", dict(ok, out=torch.empty(4, 32, dtype=torch.int32)), TypeError, "out"
    yield "out device", dict(ok, out=torch.empty(4, 32, device="meta")), ValueError, "out"
    yield "0-d x", dict(ok, x=torch.tensor(1.0), z=None), ValueError, "x"
    yield "N = 0", dict(ok, x=torch.ones(4, 0), weight=torch.ones(0), bias=None, z=None), ValueError, "N"
    yield "flag not bool", dict(ok, is_rms_norm="yes"), TypeError, "is_rms_norm"


@pytest.mark.parametrize("name,kwargs,exc,word", list(_err_cases()), ids=[c[0] for c in _err_cases()])
def test_bad_arguments_raise(name, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        gatednorm.layer_norm_fwd(**kwargs)


def test_errors_from_differentiable_api_and_modules():
    x, z, w, _ = make_inputs(4, 32, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        gatednorm.rmsnorm_fn(x, w, None, z, group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        gatednorm.RMSNorm(32, group_size=5)
    with pytest.raises(ValueError, match="hidden_size"):
        gatednorm.LayerNorm(0)
    with pytest.raises(ValueError, match="activation"):
        gatednorm.RMSNorm(32, activation="gelu")


def test_backend_selection(monkeypatch):
    x, z, w, _ = make_inputs(4, 32, torch.float32)
    assert gatednorm.resolve_backend(None, x.device) == "native"  # auto on CPU
    assert gatednorm.resolve_backend("native", x.device) == "native"
    monkeypatch.setenv("GATEDNORM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GATEDNORM_BACKEND"):
        gatednorm.rmsnorm_fn(x, w, None, z)
    monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")  # the migration guide's switch wins
    assert gatednorm.resolve_backend("triton", x.device) == "native"
    monkeypatch.delenv("USE_NATIVE_LAYERNORM")
    monkeypatch.delenv("GATEDNORM_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):  # explicit request that cannot be honoured
        gatednorm.resolve_backend("triton", x.device)


# --- modules and names --------------------------------------------------------------------

@pytest.mark.parametrize("cls,rms", [(gatednorm.LayerNorm, False), (gatednorm.RMSNorm, True)])
def test_modules(cls, rms):
    mod = cls(64, group_size=16, norm_before_gate=False)
    assert mod.eps == 1e-5
    assert (mod.weight == 1).all()
    assert (mod.bias is None) == rms
    with torch.no_grad():
        mod.weight.normal_()
        if mod.bias is not None:
            mod.bias.normal_()
    x, z, _, _ = make_inputs(10, 64, torch.bfloat16)
    y = mod(x.view(2, 5, 64), z.view(2, 5, 64))
    ref, _, _ = gated_norm_reference(x, mod.weight, mod.bias, z, 1e-5, 16, False, rms)
    assert_one_rounding(y.view(10, 64), ref)
    assert "group_size=16" in repr(mod) and "norm_before_gate=False" in repr(mod)
    y.float().sum().backward()
    assert mod.weight.grad is not None


def test_state_dict_matches_upstream_modules():
    fla = pytest.importorskip("fla.modules.norm.layernorm_gated")
    for ours, theirs in ((gatednorm.LayerNorm(64, group_size=16), fla.LayerNormGated(64, group_size=16)),
                         (gatednorm.RMSNorm(64, group_size=16), fla.RMSNormGated(64, group_size=16))):
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        for name, p in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[name], p)


def test_migration_guide_names():
    import layernorm_native_implementation as guide

    x, z, w, b = make_inputs(8, 64, torch.bfloat16)
    y1 = guide.layernorm_fn_native(x, w, b, z, group_size=16)
    y2 = gatednorm.layernorm_fn(x, w, b, z, group_size=16, backend="native")
    assert torch.equal(y1, y2)
    y3 = guide.rmsnorm_fn_native(x, w, None, z)
    assert torch.equal(y3, gatednorm.rmsnorm_fn(x, w, None, z, backend="native"))
    out, mean, rstd = guide._layer_norm_fwd_native(x, w, b, 1e-6, z=z, group_size=16)
    assert torch.equal(out, y2) and mean.shape == (32,)
    plain = guide.simple_layernorm_native(x, w, b)
    torch.testing.assert_close(plain.float(), F.layer_norm(x.float(), (64,), w.float(), b.float(), 1e-5),
                               rtol=2**-7, atol=1e-5)


def test_torch_compile_fullgraph():
    mod = gatednorm.RMSNorm(64, group_size=16)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    x, z, _, _ = make_inputs(8, 64, torch.float32)
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    y_c = compiled(xc, z)
    y_e = mod(xe, z)
    assert torch.equal(y_c, y_e)
    y_c.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
