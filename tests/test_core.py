"""Core contract of the native backend: the formula, layouts, statistics, gradients, modules, names."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_within,
    check_forward,
    check_gradients,
    check_pair,
    magnitudes,
    make_inputs,
    make_like,
)

import gatednorm

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# FIXED: every comparison uses the shared tolerance model (tests/helpers.py, gatednorm.verify.tolerance).
# A ``fixed=(rtol, atol)`` next to it is the bound the test asserted before the model, kept where the model
# is looser on this test's data (measured: it allowed more than 1.5x that bound on some elements; mostly
# float32 means, gradients through the gate, float32 outputs where A is large), so no check got weaker.
GATES = ["none", "after", "before"]  # gate after the norm = norm_before_gate=True


# x, z as given (2-D), as (2, M/2, N), or non-contiguous: x with feature stride 2 (NaN between, never
# read), z in column-major storage
LAYOUTS = {"2d": "contiguous", "3d": "contiguous", "noncontig": ("strided_cols", "transposed")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["onegroup", "groups"])
@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
def test_matches_float64_reference(dtype, rms, gate, activation, bias, group_size, layout):
    x, z, w, b = make_inputs(24, 96, dtype, gate=gate != "none", bias=bias, layout=LAYOUTS[layout])
    if layout == "3d":
        x, z = x.view(2, 12, 96), (z.view(2, 12, 96) if z is not None else None)
    nbg = gate != "before"
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=group_size, norm_before_gate=nbg,
                                             is_rms_norm=rms, activation=activation)
    # float32 means and float32 outputs also keep the fixed bounds asserted before the shared model (see FIXED)
    fixed = {"y": (1e-5, 1e-5)} if dtype == torch.float32 else {}
    if dtype != torch.float64:
        fixed["mean"] = (1e-6, 1e-6)
    check_forward(y, mean, rstd, x, w, b, z, 1e-6, group_size, nbg, rms, activation, fixed=fixed)


def test_tolerance_rejects_double_rounding():
    """The bf16 tolerance is tight enough to tell one rounding from the usual two-step recipe."""
    x, z, w, _ = make_inputs(256, 128, torch.bfloat16, bias=False, seed=0)
    two_step = F.rms_norm(x, (128,), w, 1e-6) * F.silu(z)  # rounds to bf16 after the norm, again after the gate
    with pytest.raises(AssertionError, match="y beyond the tolerance"):
        check_forward(two_step, None, None, x, w, None, z, 1e-6, None, True, True, stats=False)
    check_forward(gatednorm.rmsnorm_fn(x, w, None, z), None, None, x, w, None, z, 1e-6, None, True, True, stats=False)


def test_float32_tolerance_rejects_a_half_precision_intermediate():
    """The float32 tolerance allows float32 compute error (K * u(float32) * A), not a narrower rounding on
    the way: the norm rounded to bf16 before the gate (an error of up to 2^-9, relative) fails it."""
    x, z, w, _ = make_inputs(256, 128, torch.float32, bias=False, seed=0)
    via_bf16 = F.rms_norm(x, (128,), w, 1e-6).bfloat16().float() * F.silu(z)
    with pytest.raises(AssertionError, match="y beyond the tolerance"):
        check_forward(via_bf16, None, None, x, w, None, z, 1e-6, None, True, True, stats=False)
    check_forward(gatednorm.rmsnorm_fn(x, w, None, z), None, None, x, w, None, z, 1e-6, None, True, True, stats=False)


def test_gate_layout_t_h_n():
    """x (T*H, N) with z (T, H, N), as the newest sglang kernel accepts."""
    t, h, n = 5, 4, 64
    x, z, w, b = make_inputs(t * h, n, torch.bfloat16)
    z = z.view(t, h, n)
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=16, is_rms_norm=True)
    check_forward(y, mean, rstd, x, w, b, z, 1e-6, 16, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_torch_layer_norm_and_rms_norm(dtype):
    x, _, w, b = make_inputs(64, 256, dtype, gate=False)
    n = x.shape[-1]
    got_ln = gatednorm.layernorm_fn(x, w, b, eps=1e-5)
    want_ln = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-5).to(dtype)
    got_rms = gatednorm.rmsnorm_fn(x, w, None, eps=1e-5)
    want_rms = F.rms_norm(x.float(), (n,), w.float(), 1e-5).to(dtype)
    # both sides are rounded once from float32: at most one ulp apart
    check_pair(got_ln, want_ln, x, w, b, None, 1e-5)
    check_pair(got_rms, want_rms, x, w, None, None, 1e-5, is_rms_norm=True)
    assert torch.equal(gatednorm.simple_layernorm_native(x, w, b), gatednorm.layernorm_fn(x, w, b, eps=1e-5))


def test_against_torch_group_norm():
    """Grouped LayerNorm with per-channel affine is F.group_norm on (M, N) with G groups."""
    x, _, w, b = make_inputs(32, 512, torch.float32, gate=False)
    got = gatednorm.layernorm_fn(x, w, b, eps=1e-5, group_size=128)
    want = F.group_norm(x, 4, w, b, 1e-5)
    check_pair(got, want, x, w, b, None, 1e-5, 128)


@pytest.mark.parametrize("nbg", [True, False])
def test_gate_composed_from_silu(nbg):
    x, z, w, b = make_inputs(16, 128, torch.float32)
    got = gatednorm.layernorm_fn(x, w, b, z, eps=1e-5, norm_before_gate=nbg)
    if nbg:
        want = F.layer_norm(x, (128,), w, b, 1e-5) * F.silu(z)
    else:
        want = F.layer_norm(x * F.silu(z), (128,), w, b, 1e-5)
    check_pair(got, want, x, w, b, z, 1e-5, None, nbg, fixed=(1e-5, 1e-5))
    got_sig = gatednorm.rmsnorm_fn(x, w, None, z, eps=1e-5, norm_before_gate=nbg, activation="sigmoid")
    if nbg:
        want_sig = F.rms_norm(x, (128,), w, 1e-5) * torch.sigmoid(z)
    else:
        want_sig = F.rms_norm(x * torch.sigmoid(z), (128,), w, 1e-5)
    check_pair(got_sig, want_sig, x, w, None, z, 1e-5, None, nbg, True, "sigmoid", fixed=(1e-5, 1e-5))
    # "silu" is the same activation as "swish"
    assert torch.equal(gatednorm.rmsnorm_fn(x, w, None, z, activation="silu"), gatednorm.rmsnorm_fn(x, w, None, z))


@pytest.mark.parametrize("rms", [False, True])
def test_statistics_are_group_major(rms):
    m, n, gs = 7, 96, 32
    x, _, w, b = make_inputs(m, n, torch.float32, gate=False)
    _, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, group_size=gs, is_rms_norm=rms)
    groups = n // gs
    assert rstd.shape == (groups * m,)
    # statistic of (row, group) at index group * M + row, computed here one segment at a time
    want_mean = torch.empty(groups * m, dtype=torch.float64)
    want_rstd = torch.empty(groups * m, dtype=torch.float64)
    xd = x.double()
    for row, g in itertools.product(range(m), range(groups)):
        seg = xd[row, g * gs:(g + 1) * gs]
        mu = 0.0 if rms else float(seg.mean())
        want_mean[g * m + row] = mu
        want_rstd[g * m + row] = 1 / (float(((seg - mu) ** 2).mean()) + 1e-6) ** 0.5
    mag = magnitudes(x, w, b, None, 1e-6, gs, True, rms)
    assert_within(rstd, want_rstd, mag["rstd"], gs, fixed=(1e-6, 1e-12))  # fixed bounds: see FIXED
    if not rms:
        assert_within(mean, want_mean, mag["mean"], gs, fixed=(1e-5, 1e-6))


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
    leaves = [t.requires_grad_() if t is not None else None for t in (x, z, w, b)]
    y = gatednorm.layernorm_fn(x, w, b, z, 1e-5, gs, nbg, rms, activation=activation)
    dy = make_like(y)
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    it = iter(got)
    grads = [next(it) if t is not None else None for t in leaves]
    assert all(g.dtype == torch.float32 for g in got)
    check_gradients(grads, x, w, b, z, dy, 1e-5, gs, nbg, rms, activation,
                    fixed=dict.fromkeys(("dx", "dz", "dweight"), (1e-4, 1e-5, "max1")))  # see FIXED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype):
    """dx/dz in x's and z's dtype, dweight/dbias in the parameters' dtype, each rounded once."""
    x, z, w, b = make_inputs(40, 64, dtype, param_dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (x, z, w, b)]
    y = gatednorm.layernorm_fn(x, w, b, z, 1e-5, 16, False, False)
    dy = make_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    assert [g.dtype for g in got] == [dtype, dtype, torch.float32, torch.float32]
    check_gradients(got, x, w, b, z, dy, 1e-5, 16, False, False,
                    fixed=dict.fromkeys(("dx", "dz"), (2.0**-8 if dtype == torch.bfloat16 else 2.0**-10, 1e-5)))


@pytest.mark.parametrize(("is_rms", "nbg", "act", "bias"),
                         [(True, True, "swish", False), (False, False, "sigmoid", True), (False, True, "swish", True)])
def test_double_backward(is_rms, nbg, act, bias):
    """create_graph=True gives gradients that are differentiable again (ops._differentiable_grads: the forward
    recomputed in numerics' torch ops): second derivatives against finite differences (gradgradcheck, float64),
    and the recorded first-order gradients against float64 as the analytic ones are (float32)."""
    x, z, w, b = make_inputs(3, 16, torch.float64, bias=bias, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, z, w) + ((b,) if bias else ())]

    def norm(x, z, w, b=None):
        return gatednorm.layernorm_fn(x, w, b, z, 1e-5, 8, nbg, is_rms, activation=act)

    assert torch.autograd.gradgradcheck(norm, leaves)
    x, z, w, b = make_inputs(6, 32, torch.float32, bias=bias, seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, z, w, b) if t is not None]
    dy = make_like(x)
    y = gatednorm.layernorm_fn(leaves[0], leaves[2], leaves[3] if bias else None, leaves[1], 1e-5, 8, nbg, is_rms,
                               activation=act)
    dx, dz, dw, *db = torch.autograd.grad(y, leaves, dy, create_graph=True)
    assert dx.requires_grad and dz.requires_grad and dw.requires_grad
    check_gradients((dx, dz, dw, db[0] if bias else None), x, w, b, z, dy, 1e-5, 8, nbg, is_rms, act)


def test_double_backward_of_norm_and_linear():
    """layernorm_linear_fn with create_graph=True: its gradients are differentiable again (the norm and the linear
    layer recomputed in torch ops), second derivatives against finite differences (gradgradcheck, float64), the
    (T, H, N) gate's regrouped rows and the linear bias included."""
    t, h, n = 2, 3, 8
    x, z, w, b = make_inputs(t * h, n, torch.float64, bias=True, seed=11)
    lw, lb = make_like(torch.empty(5, n, dtype=torch.float64)), make_like(torch.empty(5, dtype=torch.float64))
    leaves = [v.clone().requires_grad_() for v in (x, z.view(t, h, n), w, b, lw, lb)]

    def norm_linear(x, z, w, b, lw, lb):
        return gatednorm.layernorm_linear_fn(x, w, b, z, lw, lb, 1e-5, 4, False, False)

    assert torch.autograd.gradgradcheck(norm_linear, leaves)


def test_mixed_parameter_and_gate_dtypes():
    x, _, _, _ = make_inputs(16, 64, torch.bfloat16, gate=False)
    _, z, w, b = make_inputs(16, 64, torch.float32)
    y = gatednorm.layernorm_fn(x, w, b, z, group_size=16)
    assert y.dtype == torch.bfloat16
    check_forward(y, None, None, x, w, b, z, 1e-6, 16, True, False, stats=False)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_argument(out_dtype):
    x, z, w, b = make_inputs(12, 64, torch.float32)
    out = torch.full((12, 64), float("nan"), dtype=out_dtype)
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=out, group_size=32)
    assert y is out
    check_forward(out, mean, rstd, x, w, b, z, 1e-6, 32, True, False, out_dtype=out_dtype)
    # non-contiguous out is written in place too
    big = torch.full((12, 128), float("nan"), dtype=out_dtype)
    gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=big[:, ::2], group_size=32)
    check_forward(big[:, ::2], None, None, x, w, b, z, 1e-6, 32, True, False, out_dtype=out_dtype, stats=False)
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


def _fake_mode_calls(x, z, w, b, res, lw):
    """Each public entry point once, returning tensors (and the leaves' gradients after a backward)."""
    yield "layer_norm_fwd", gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=16)
    yield "rmsnorm_fn (T, H, N) gate", (gatednorm.rmsnorm_fn(x.view(-1, 64), w, None, z=z.view(3, 5, 64),
                                                             group_size=32),)
    yield "quant fp8 column-major", gatednorm.gated_norm_quant(x, w, None, 1e-6, z=z, group_size=32,
                                                                 is_rms_norm=True, quant_group_size=32,
                                                                 column_major_scales=True)
    yield "quant int8 per token", gatednorm.gated_norm_quant(x, w, b, 1e-6, z=z, quant="int8")
    yield "residual prenorm", gatednorm.layernorm_fn(x, w, b, z, residual=res, prenorm=True, residual_in_fp32=True)
    yield "norm + linear", (gatednorm.layernorm_linear_fn(x, w, b, z, lw),)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, z)]
    gatednorm.layernorm_fn(*leaves, group_size=16).backward(torch.ones_like(x))
    yield "layernorm_fn gradients", tuple(t.grad for t in leaves)


def test_fake_tensor_mode_gives_the_real_calls_shapes_dtypes_and_strides():
    """Under FakeTensorMode (shape propagation, memory planning, non-compiled tracing) every entry point
    answers with outputs shaped, typed and laid out as the real call's, without reading data (a backend
    call would: the native CPU path read a value and raised DataDependentOutputException)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    x, z, w, b = make_inputs(15, 64, torch.bfloat16, seed=15)
    x, z = x.view(3, 5, 64), z.view(3, 5, 64)
    res = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    lw = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    real = dict(_fake_mode_calls(x, z, w, b, res, lw))
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (x, z, w, b, res, lw)]
        fake = dict(_fake_mode_calls(*fake_args))
    assert fake.keys() == real.keys()
    for name in real:
        for got, ref in zip(fake[name], real[name], strict=True):
            if ref is None:
                assert got is None, name
                continue
            assert isinstance(got, FakeTensor), name
            assert (got.shape, got.dtype, got.stride(), got.device) == (ref.shape, ref.dtype, ref.stride(),
                                                                         ref.device), name


@pytest.mark.parametrize(("is_rms", "nbg", "act", "bias"),
                         [(True, True, "swish", False), (False, False, "sigmoid", True)])
def test_torch_func_transforms(is_rms, nbg, act, bias):
    """torch.func sees through the operator (ops.formula_rows: numerics' formulas in torch ops, where the
    backends' kernels cannot take batched or wrapped tensors): vmap over a batch of calls gives each call's
    values (every sample against float64; the statistics too), grad and jacrev the analytic backward's gradients
    (float64 reference), jvp the jacobian's product, hessian a symmetric matrix; the residual / prenorm and the
    norm + linear entry points under vmap and grad as well. gated_norm_quant refuses the transforms by name."""
    import torch.func as tf

    eps, gs = 1e-5, 16
    x, z, w, b = make_inputs(5 * 3, 32, torch.float32, bias=bias, seed=31)
    x, z = x.view(5, 3, 32), z.view(5, 3, 32)
    args = dict(eps=eps, group_size=gs, norm_before_gate=nbg, is_rms_norm=is_rms, activation=act)

    def norm(xs, zs, ws=w):
        return gatednorm.layernorm_fn(xs, ws, b, zs, **args)

    y = tf.vmap(norm)(x, z)
    def with_stats(xs, zs):  # (y, [mean,] rstd): vmap returns tensors only
        out = gatednorm.layer_norm_fwd(xs, w, b, eps, z=zs, group_size=gs, norm_before_gate=nbg,
                                       is_rms_norm=is_rms, activation=act)
        assert (out[1] is None) == is_rms
        return tuple(t for t in out if t is not None)

    yf, *stats = tf.vmap(with_stats)(x, z)
    mean, rstd = (None, *stats) if is_rms else stats
    assert torch.equal(yf, y) and rstd.shape == (5, 3 * 32 // gs)
    for i in range(5):
        check_forward(y[i], None if is_rms else mean[i], rstd[i], x[i], w, b, z[i], eps, gs, nbg, is_rms, act)

    dy = make_like(x[0])
    got = tf.grad(lambda xs, zs, ws: (norm(xs, zs, ws) * dy).sum(), argnums=(0, 1, 2))(x[0], z[0], w)
    check_gradients((got[0], got[1], got[2], None), x[0], w, b, z[0], dy, eps, gs, nbg, is_rms, act)
    jac = tf.jacrev(norm)(x[0, :1], z[0, :1])  # (1, 32, 1, 32)
    vjp = torch.einsum("ij,ijkl->kl", dy[:1], jac)
    check_gradients((vjp, None, None, None), x[0, :1], w, b, z[0, :1], dy[:1], eps, gs, nbg, is_rms, act)
    tangent = make_like(x[0, :1])
    _, jvp = tf.jvp(lambda xs: norm(xs, z[0, :1]), (x[0, :1],), (tangent,))
    torch.testing.assert_close(jvp, torch.einsum("ijkl,kl->ij", jac, tangent), rtol=1e-4, atol=1e-5)
    hess = tf.hessian(lambda xs: norm(xs, z[0, :1]).pow(2).sum())(x[0, :1]).view(32, 32)
    assert torch.isfinite(hess).all() and torch.allclose(hess, hess.t(), rtol=1e-3, atol=1e-4)

    res = make_like(x)
    from gatednorm.backends.native_cpu import NativeCPUBackend

    class FusedResidual(NativeCPUBackend):  # a backend that fuses the residual sum (triton does), never entered
        def forward_residual(self, *_):
            raise AssertionError("a fused residual kernel ran under vmap")

    with gatednorm.ops.override_impl("native", "cpu", FusedResidual()):
        y_pre, res_out = tf.vmap(lambda xs, rs, zs: gatednorm.layernorm_fn(xs, w, b, zs, residual=rs, prenorm=True,
                                                                         **args))(x, res, z)
    torch.testing.assert_close(res_out, x + res)
    torch.testing.assert_close(y_pre, tf.vmap(norm)(x + res, z), rtol=0, atol=0)
    lw = make_like(torch.empty(24, 32))
    lin = tf.vmap(lambda xs, zs: gatednorm.layernorm_linear_fn(xs, w, b, zs, lw, **args))(x, z)
    torch.testing.assert_close(lin, y @ lw.t(), rtol=1e-5, atol=1e-5)
    dlw = tf.grad(lambda m: gatednorm.layernorm_linear_fn(x[0], w, b, z[0], m, **args).sum())(lw)
    torch.testing.assert_close(dlw, y[0].sum(0).expand(24, 32), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="gated_norm_quant does not support torch.func"):
        tf.vmap(lambda xs: gatednorm.gated_norm_quant(xs, w, b, eps, quant_group_size=16))(x)


def test_layernorm_fwd_is_differentiable_without_out():
    x, z, w, b = make_inputs(6, 32, torch.float64)
    x.requires_grad_()
    y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z)
    assert y.requires_grad and not rstd.requires_grad and not mean.requires_grad
    (dx,) = torch.autograd.grad(y.sum(), x)
    check_gradients((dx, None, None, None), x, w, b, z, torch.ones_like(y), 1e-6)


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
    monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")  # the migration guide's switch: the process default...
    monkeypatch.setenv("GATEDNORM_BACKEND", "compiled")
    assert gatednorm.resolve_backend(None, x.device) == "native"
    assert gatednorm.resolve_backend("compiled", x.device) == "compiled"  # ...an explicit backend= wins
    monkeypatch.delenv("USE_NATIVE_LAYERNORM")
    monkeypatch.delenv("GATEDNORM_BACKEND")
    # load Triton (when installed) before unsetting TRITON_INTERPRET: Triton reads it once, and kernels loaded
    # without it would fail later tests that run them on CPU tensors under the interpreter
    gatednorm.triton_available()
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
    check_forward(y.view(10, 64), None, None, x, mod.weight, mod.bias, z, 1e-5, 16, False, rms, stats=False)
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
    check_pair(plain, F.layer_norm(x.float(), (64,), w.float(), b.float(), 1e-5), x, w, b, None, 1e-5)


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
    check_gradients((xc.grad, None, None, None), x, mod.weight, None, z, torch.ones_like(y_e), 1e-5, 16,
                    is_rms_norm=True, against=(xe.grad, None, None, None), fixed={"dx": (1.3e-6, 1e-5)})  # FIXED


def test_torch_compile_inference_call_is_the_output_op():
    """Under torch.compile a call that discards the statistics (layernorm_fn / the modules without autograd) is the
    custom op gatednorm::forward_output, so a backend's output-only path (the triton backend's output-only tile)
    serves compiled inference too; its bits are the eager call's. Under vmap (per-sample weights: one call each;
    shared ones: one call over the stacked rows, test_vmap_rules_of_the_custom_ops) each sample's own call."""
    import torch.func as tf

    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    mod = gatednorm.RMSNorm(64, group_size=16)
    x, z, _, _ = make_inputs(8, 64, torch.float32, seed=44)
    with torch.no_grad():
        y_c = torch.compile(mod, fullgraph=True, backend=recording_backend)(x, z)
        y_e = mod(x, z)
    assert "gatednorm.forward_output.default" in targets and "gatednorm.forward.default" not in targets, targets
    assert torch.equal(y_c, y_e)
    consts = (1e-5, 16, True, True, "swish", "native")
    ws = mod.weight.detach() + torch.randn(3, 64)
    xs, zs = make_inputs(3 * 8, 64, torch.float32, seed=45)[:2]
    xs, zs = xs.view(3, 8, 64), zs.view(3, 8, 64)
    got = tf.vmap(lambda a, w_, c: torch.ops.gatednorm.forward_output(a, w_, None, c, *consts))(xs, ws, zs)
    for i in range(3):
        assert torch.equal(got[i], torch.ops.gatednorm.forward(xs[i], ws[i], None, zs[i], *consts)[0])


def test_vmap_rules_of_the_custom_ops(monkeypatch):
    """torch.func.vmap over the custom ops (reached where vmap runs inside torch.compile) stacks the batch's rows
    into one call when weight and bias are shared: (B, M, N) -> (B * M, N), statistics handed back in each
    sample's group-major layout; bit for bit each sample's own call (the operator is batch invariant). Per-sample
    weights, and parameter gradients, take one call per sample. The compiled vmap makes that one call too."""
    import torch.func as tf

    from gatednorm import ops

    calls = []
    forward_eager, backward_eager = ops._forward_eager, ops._backward_eager
    monkeypatch.setattr(ops, "_forward_eager", lambda x, *a, **k: calls.append(("fwd", *x.shape))
                        or forward_eager(x, *a, **k))
    monkeypatch.setattr(ops, "_backward_eager", lambda dy, x, *a, **k: calls.append(("bwd", *x.shape))
                        or backward_eager(dy, x, *a, **k))
    batch, m, n, gs, eps = 4, 6, 64, 16, 1e-5
    x, z, w, b = make_inputs(batch * m, n, torch.float32, bias=True, seed=41)
    x, z = x.view(batch, m, n), z.view(batch, m, n)
    consts = (eps, gs, False, False, "swish", "native")  # LayerNorm, gate first: mean and rstd both real
    fwd = torch.ops.gatednorm.forward

    def each(fn):  # each sample's own call, outputs stacked
        return tuple(torch.stack(parts) for parts in zip(*(fn(i) for i in range(batch)), strict=True))

    expect = each(lambda i: fwd(x[i], w, b, z[i], *consts))
    calls.clear()
    got = tf.vmap(lambda xs, zs: fwd(xs, w, b, zs, *consts))(x, z)
    assert calls == [("fwd", batch * m, n)]
    for g, e in zip(got, expect, strict=True):
        assert torch.equal(g, e)
    check_forward(got[0][1], got[1][1], got[2][1], x[1], w, b, z[1], eps, gs, False, False)
    # a weight per sample: one call each
    ws = w + torch.randn(batch, n)
    calls.clear()
    got = tf.vmap(lambda xs, ws_, zs: fwd(xs, ws_, b, zs, *consts))(x, ws, z)
    assert calls == [("fwd", m, n)] * batch
    for g, e in zip(got, each(lambda i: fwd(x[i], ws[i], b, z[i], *consts)), strict=True):
        assert torch.equal(g, e)

    # backward: dx and dz of the stacked rows in one call; dweight / dbias per sample
    _, mean, rstd = expect
    dy = torch.randn(batch, m, n)
    bwd = torch.ops.gatednorm.backward
    for needs in ((True, True, False, False), (True, True, True, True)):
        want = each(lambda i, needs=needs: bwd(dy[i], x[i], w, b, z[i], mean[i], rstd[i], *consts, *needs))
        calls.clear()
        got = tf.vmap(lambda d, xs, zs, mu, rs, needs=needs: bwd(d, xs, w, b, zs, mu, rs, *consts, *needs))(
            dy, x, z, mean, rstd)
        assert calls == ([("bwd", batch * m, n)] if not needs[2] else [("bwd", m, n)] * batch)
        for g, e, need in zip(got, want, needs, strict=True):
            if need:
                assert torch.equal(g, e)

    # vmap inside a compiled region reaches the op with batched tensors: one call over the stacked rows
    torch._dynamo.reset()
    compiled = torch.compile(lambda xs, zs: tf.vmap(lambda a, c: gatednorm.layernorm_fn(a, w, b, c, eps, gs))(xs, zs),
                             backend="aot_eager")
    calls.clear()
    y = compiled(x, z)
    assert calls == [("fwd", batch * m, n)]
    assert torch.equal(y, torch.stack([gatednorm.layernorm_fn(x[i], w, b, z[i], eps, gs) for i in range(batch)]))
