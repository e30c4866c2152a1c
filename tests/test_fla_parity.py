"""Parity with flash-linear-attention's fused_norm_gate: residual / prenorm, norm + gate + linear, strided gates.

* Residual and prenorm (docs/design.md, "Residual and prenorm"): y = norm(s) [gated] with s = x + residual
  summed in float32 and not rounded before the norm; the prenorm output is s rounded to the residual's
  dtype. Judged against float64 (gatednorm.reference on the float64 sum) with the shared tolerance model
  (tests/helpers.py), against fla-core 0.6.0's kernels (Triton's interpreter on CPU, tests/conftest.py),
  and by gradcheck in float64.
* Norm + gate + linear: bit for bit the unfused ``F.linear(layernorm_fn(...))`` of the same backend, within
  the model (carried through the matmul) of float64 and of fla's fused kernel, and keeping no (M, N)
  activation for the backward (saved-tensor accounting; peak RSS in the slow part).
* Strided gates: a (T, H, N) gate sliced out of a packed projection reaches the backend as a view of the
  projection (no copy) and gives the contiguous call's bits.
* ``patch("fla")`` / ``patch("sglang")`` route all of these to gatednorm (call counters); the cases of
  fla's own tests/modules/test_layernorm_gated.py that used to be handed back run here against float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    VARIANTS,
    RecordingBackend,
    assert_within,
    magnitudes,
    make_inputs,
    make_like,
    reference_gradients,
    variant_id,
)

import gatednorm
from gatednorm import ops
from gatednorm.integrations import call_counts, reset_call_counts
from gatednorm.reference import gated_norm_reference
from gatednorm.spec import prepare
from gatednorm.verify import tolerance as model

INTERPRETED = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED) or not gatednorm.triton_available(),
                                  reason="the triton backend needs CUDA or TRITON_INTERPRET=1")
BACKENDS = ["native", pytest.param("triton", marks=needs_triton)]
# (x dtype, residual dtype): the residual stream in bf16 beside bf16 activations, in fp32 beside bf16, all fp32
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


def _dtype_id(p) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in p)


@pytest.fixture(autouse=True)
def _clean_calls():
    reset_call_counts()
    yield
    assert gatednorm.patched() == [], "a test left a patch in place"


# ---------------------------------------------------------------------------
# Reference checks for the residual variant
# ---------------------------------------------------------------------------


def _sum64(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x.detach().double() + r.detach().double()


def _check_residual_forward(y, res_out, x, r, w, b, z, *, gs, nbg, rms, act, eps=1e-6, res_dtype=None,
                            stats=None):
    """y (and mean/rstd) against float64 on the float64 sum; the prenorm output is exactly the float32 sum
    rounded to the residual's dtype, and within one rounding of the float64 sum."""
    s64 = _sum64(x, r)
    ref = gated_norm_reference(s64, w, b, z, eps, gs, nbg, rms, act)
    mag = magnitudes(s64, w, b, z, eps, gs, nbg, rms, act)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_within(y, ref[0], mag["y"], gs, what="y of x + residual")
    if stats is not None:
        mean, rstd = stats
        assert_within(rstd, ref[2], mag["rstd"], gs, out_dtype=torch.float32, what="rstd of x + residual")
        if rms:
            assert mean is None
        else:
            assert_within(mean, ref[1], mag["mean"], gs, out_dtype=torch.float32, what="mean of x + residual")
    if res_out is not None:
        res_dtype = res_dtype or r.dtype
        assert res_out.dtype == res_dtype and res_out.shape == x.shape
        assert torch.equal(res_out, (x.detach().float() + r.detach().float()).to(res_dtype))
        assert_within(res_out, s64, s64.abs(), 1, what="prenorm output")
    return ref


def _check_residual_grads(got: dict, x, r, w, b, z, dy, dres, *, gs, nbg, rms, act, eps=1e-6, against=None):
    """dx, dresidual, dz, dweight, dbias against float64 autograd of norm(x + residual) (+ the prenorm
    output's gradient dres, which reaches x and residual unchanged); ``against``: another approximation
    (same names), judged with the bound of two approximations taken at the float64 value."""
    s64 = _sum64(x, r)
    ref = reference_gradients(s64, w, b, z, dy, eps, gs, nbg, rms, act)
    mag = magnitudes(s64, w, b, z, eps, gs, nbg, rms, act, dy=dy)
    extra = torch.zeros_like(s64) if dres is None else dres.double()
    ds, ds_mag = ref["dx"] + extra, mag["dx"] + extra.abs()
    want = {"dx": (ds, ds_mag, False), "dresidual": (ds, ds_mag, False),
            "dz": (ref["dz"], mag.get("dz"), False), "dweight": (ref["dweight"], mag["dweight"], True),
            "dbias": (ref["dbias"], mag.get("dbias"), True)}
    rows = s64[..., 0].numel()
    for name, value in got.items():
        if value is None:
            continue
        exact, a, over = want[name]
        assert value.shape == exact.shape, (name, value.shape)
        if against is None:
            assert_within(value, exact, a, gs, rows=rows, over_rows=over, what=name)
        else:
            assert_within(value, against[name].double(), a, gs, rows=rows, over_rows=over, pairs=2, exact=exact,
                          what=f"{name} against fla")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


# ---------------------------------------------------------------------------
# 1. residual / prenorm against float64, every variant
# ---------------------------------------------------------------------------


def _residual_case(variant, dtypes, backend, m=8, n=96):
    rms, nbg, act, has_bias, has_z = variant
    x_dtype, r_dtype = dtypes
    gs = 48
    x, z, w, b = make_inputs(m, n, x_dtype, gate=has_z, bias=has_bias, param_dtype=torch.float32)
    r = make_inputs(m, n, r_dtype, gate=False, bias=False)[0]
    xl, rl, zl, wl, bl = _leaves(x, r, z, w, b)
    y, res_out = gatednorm.layernorm_fn(xl, wl, bl, zl, 1e-6, gs, nbg, rms, activation=act, residual=rl,
                                        prenorm=True, backend=backend)
    _check_residual_forward(y, res_out, x, r, w, b, z, gs=gs, nbg=nbg, rms=rms, act=act)
    dy, dres = make_like(y), make_like(res_out)
    grads = torch.autograd.grad((y, res_out), [t for t in (xl, rl, zl, wl, bl) if t is not None], (dy, dres))
    it = iter(grads)
    got = {"dx": next(it), "dresidual": next(it), "dz": next(it) if has_z else None, "dweight": next(it),
           "dbias": next(it) if has_bias else None}
    assert got["dx"].dtype == x_dtype and got["dresidual"].dtype == r_dtype
    _check_residual_grads(got, x, r, w, b, z, dy, dres, gs=gs, nbg=nbg, rms=rms, act=act)


@pytest.mark.parametrize("dtypes", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_residual_prenorm_native_matches_float64(variant, dtypes):
    _residual_case(variant, dtypes, "native")


# The triton backend under the interpreter: one dtype pair per variant here, all of them in the slow part.
@needs_triton
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_residual_prenorm_triton_matches_float64(variant):
    _residual_case(variant, DTYPES[VARIANTS.index(variant) % len(DTYPES)], "triton")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtypes", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_residual_prenorm_triton_every_dtype_matches_float64(variant, dtypes):
    _residual_case(variant, dtypes, "triton")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_residual_prenorm_compiled_matches_float64(variant):
    # one dtype pair per variant (another than the triton one above): each new variant compiles
    _residual_case(variant, DTYPES[(VARIANTS.index(variant) + 1) % len(DTYPES)], "compiled")


@pytest.mark.parametrize("variant", VARIANTS[::5], ids=variant_id)
def test_residual_prenorm_on_the_accelerator_path(variant):
    # the native backend's whole-tensor path (GPUs without Triton, NPU, ...), run here on CPU tensors;
    # its backward gets a bf16 dy beside the float32 sum
    from gatednorm.backends.native_accel import NativeAccelBackend

    with ops.override_impl("native", "cpu", NativeAccelBackend()):
        _residual_case(variant, DTYPES[1], "native")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_fwd_residual_statistics_and_out(backend, rms):
    x, z, w, b = make_inputs(12, 64, torch.bfloat16, bias=not rms)
    r = make_inputs(12, 64, torch.float32, gate=False, bias=False)[0]
    y, mean, rstd, res_out = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=32, is_rms_norm=rms,
                                                      residual=r, prenorm=True, backend=backend)
    ref = _check_residual_forward(y, res_out, x, r, w, b, z, gs=32, nbg=True, rms=rms, act="swish", eps=1e-5,
                                  stats=(mean, rstd))
    # out= (here float32) takes the one rounding; without prenorm the upstream 3-tuple
    out = torch.empty(12, 64, dtype=torch.float32)
    y32, mean2, rstd2 = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, out=out, group_size=32, is_rms_norm=rms,
                                                 residual=r, backend=backend)
    assert y32 is out
    assert torch.equal(rstd2, rstd) and (rms or torch.equal(mean2, mean))
    mag = magnitudes(_sum64(x, r), w, b, z, 1e-5, 32, True, rms)
    assert_within(out, ref[0], mag["y"], 32, what="y written into a float32 out=")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prenorm_without_residual(backend):
    x, z, w, _ = make_inputs(6, 64, torch.bfloat16, bias=False)
    # fla: the prenorm output is x itself ...
    y, res_out = gatednorm.rmsnorm_fn(x, w, None, z, prenorm=True, backend=backend)
    assert res_out.data_ptr() == x.data_ptr() and torch.equal(res_out, x)
    assert torch.equal(y, gatednorm.rmsnorm_fn(x, w, None, z, backend=backend))
    # ... or x in float32 with residual_in_fp32 (the first layer of an fp32 residual stream)
    y2, res32 = gatednorm.rmsnorm_fn(x, w, None, z, prenorm=True, residual_in_fp32=True, backend=backend)
    assert res32.dtype == torch.float32 and torch.equal(res32, x.float()) and torch.equal(y2, y)
    # both outputs carry gradient to x
    xl = x.clone().requires_grad_()
    y3, res3 = gatednorm.rmsnorm_fn(xl, w, None, z, prenorm=True, residual_in_fp32=True, backend=backend)
    dy, dres = make_like(y3), make_like(res3)
    (dx,) = torch.autograd.grad((y3, res3), xl, (dy, dres))
    _check_residual_grads({"dx": dx}, x, torch.zeros_like(x), w, None, z, dy, dres, gs=64, nbg=True, rms=True,
                          act="swish")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_prenorm_without_residual_matches_the_unfused_pair(backend):
    """norm + gate + linear with prenorm and no residual: the linear output's and the prenorm output's
    gradients meet at x in float32 and reach it rounded once, exactly as for layernorm_fn followed by
    F.linear (both outputs equal too)."""
    x, z, w, _ = make_inputs(24, 128, torch.bfloat16, bias=False, seed=11)
    lw = make_inputs(48, 128, torch.bfloat16, gate=False, bias=False, seed=12)[0] * 0.1
    xl = x.clone().requires_grad_()
    out, res = gatednorm.rmsnorm_linear_fn(xl, w, None, z, lw, None, prenorm=True, backend=backend)
    y_ref, res_ref = gatednorm.rmsnorm_fn(xl, w, None, z, prenorm=True, backend=backend)
    out_ref = torch.nn.functional.linear(y_ref, lw)
    assert torch.equal(out, out_ref) and torch.equal(res, res_ref)
    dout, dres = make_like(out), make_like(res)
    (dx,) = torch.autograd.grad((out, res), xl, (dout, dres))
    (dx_ref,) = torch.autograd.grad((out_ref, res_ref), xl, (dout, dres))
    assert torch.equal(dx, dx_ref)


def test_residual_in_fp32_keeps_a_given_residuals_dtype():
    x, z, w, _ = make_inputs(4, 32, torch.bfloat16, bias=False)
    r = make_inputs(4, 32, torch.bfloat16, gate=False, bias=False)[0]
    _, res_out = gatednorm.rmsnorm_fn(x, w, None, z, residual=r, prenorm=True, residual_in_fp32=True)
    assert res_out.dtype == torch.bfloat16  # fla's rule: residual_in_fp32 only starts a stream


def test_residual_argument_errors():
    x, z, w, _ = make_inputs(4, 32, bias=False)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        gatednorm.rmsnorm_fn(x, w, None, z, residual=torch.zeros(4, 16))
    with pytest.raises(TypeError, match="residual must have a floating dtype"):
        gatednorm.rmsnorm_fn(x, w, None, z, residual=torch.zeros(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="residual is on meta"):
        gatednorm.rmsnorm_fn(x, w, None, z, residual=torch.zeros(4, 32, device="meta"))
    with pytest.raises(TypeError, match="prenorm must be a bool"):
        gatednorm.rmsnorm_fn(x, w, None, z, residual=x, prenorm=1)
    with pytest.raises(TypeError, match="residual_in_fp32 must be a bool"):
        gatednorm.layer_norm_fwd(x, w, None, 1e-6, z=z, residual_in_fp32="yes")
    with pytest.raises(ValueError, match="out= cannot be used"):
        gatednorm.layer_norm_fwd(x, w, None, 1e-6, z=z, out=torch.empty_like(x),
                                 residual=x.clone().requires_grad_())
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        gatednorm.rmsnorm_linear_fn(x, w, None, z, torch.zeros(8, 16))
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        gatednorm.rmsnorm_linear_fn(x, w, None, z, torch.zeros(8, 32), torch.zeros(7))


def test_residual_gradcheck_float64():
    for rms, nbg, act in [(False, True, "swish"), (True, False, "sigmoid")]:
        x, z, w, b = (t.requires_grad_() for t in make_inputs(3, 16, torch.float64))
        r = make_inputs(3, 16, torch.float64, gate=False, bias=False)[0].requires_grad_()

        def fn(x, r, z, w, b, rms=rms, nbg=nbg, act=act):
            return gatednorm.layernorm_fn(x, w, b, z, 1e-5, 8, nbg, rms, activation=act, residual=r, prenorm=True,
                                          backend="native")

        assert torch.autograd.gradcheck(fn, (x, r, z, w, b))
    lw = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def linear(x, r, z, w, b, lw, lb):
        return gatednorm.layernorm_linear_fn(x, w, b, z, lw, lb, 1e-5, 8, residual=r, prenorm=True)

    assert torch.autograd.gradcheck(linear, (x, r, z, w, b, lw, lb))


# ---------------------------------------------------------------------------
# 2. against fla-core's fused_norm_gate kernels
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fla_fused():
    if not (torch.cuda.is_available() or INTERPRETED):
        pytest.skip("fla's kernels need CUDA or TRITON_INTERPRET=1")
    fused = pytest.importorskip("fla.modules.norm.fused_norm_gate")
    from triton.runtime.autotuner import Autotuner

    # The interpreter has no benchmarker: with one config the autotuner does not benchmark (GPUs tune as usual).
    saved = []
    if INTERPRETED:
        for name in ("layer_norm_gated_fwd_kernel", "layer_norm_gated_fwd_kernel_row", "layer_norm_gated_bwd_kernel",
                     "layer_norm_gated_bwd_kernel_row"):
            k = getattr(fused, name)
            while not isinstance(k, Autotuner):
                k = k.fn
            saved.append((k, k.configs))
            k.configs = k.configs[:1]
    yield fused
    for k, configs in saved:
        k.configs = configs


FLA_CASES = [  # (rms, activation, bias, prenorm, residual_in_fp32)
    (False, "swish", True, True, False),
    (True, "sigmoid", False, True, False),
    (True, "swish", True, False, False),
    (False, "sigmoid", False, True, True),
]


@pytest.mark.upstream
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", FLA_CASES, ids=lambda c: f"{'rms' if c[0] else 'ln'}-{c[1]}-b{c[2]:d}-p{c[3]:d}")
def test_residual_matches_fla_kernel(fla_fused, case, dtypes, backend):
    rms, act, has_bias, prenorm, in_fp32 = case
    x_dtype, r_dtype = dtypes
    n = 96
    x, z, w, b = make_inputs(16, n, x_dtype, bias=has_bias, param_dtype=torch.float32, device=DEVICE)
    r = None if in_fp32 else make_inputs(16, n, r_dtype, gate=False, bias=False, device=DEVICE)[0]
    fn = fla_fused.rms_norm_gated if rms else fla_fused.layer_norm_gated

    def run(impl):
        xl, zl, wl, bl, rl = _leaves(x, z, w, b, r)
        if impl == "fla":
            res = fn(xl, zl, wl, bl, act, rl, prenorm, in_fp32, 1e-6)
        else:
            res = gatednorm.layernorm_fn(xl, wl, bl, zl, 1e-6, None, True, rms, activation=act, residual=rl,
                                         prenorm=prenorm, residual_in_fp32=in_fp32, backend=backend)
        y, res_out = res if prenorm else (res, None)
        dy = make_like(y, seed=1)
        dres = make_like(res_out, seed=2) if prenorm else None
        outs, cots = (y, res_out) if prenorm else (y,), (dy, dres) if prenorm else (dy,)
        leaves = [t for t in (xl, rl, zl, wl, bl) if t is not None]
        grads = iter(torch.autograd.grad(outs, leaves, cots))
        got = {"dx": next(grads), "dresidual": next(grads) if r is not None else None, "dz": next(grads),
               "dweight": next(grads), "dbias": next(grads) if has_bias else None}
        return y.detach(), None if res_out is None else res_out.detach(), got, dy, dres

    y_f, res_f, g_f, dy, dres = run("fla")
    y_o, res_o, g_o, _, _ = run("ours")
    r64 = torch.zeros_like(x) if r is None else r
    ref = _check_residual_forward(y_o, res_o, x, r64, w, b, z, gs=n, nbg=True, rms=rms, act=act,
                                  res_dtype=torch.float32 if in_fp32 else None)
    mag = magnitudes(_sum64(x, r64), w, b, z, 1e-6, n, True, rms, act)
    assert y_f.dtype == y_o.dtype
    assert_within(y_o, y_f.double(), mag["y"], n, pairs=2, exact=ref[0], what="y against fla")
    if prenorm:
        assert res_f.dtype == res_o.dtype
        if INTERPRETED and res_o.dtype == torch.bfloat16:
            # the interpreter converts fp32 -> bf16 toward zero (GPUs: to nearest even): within one ulp
            assert_within(res_f, _sum64(x, r64), _sum64(x, r64).abs(), 1, pairs=2, what="fla's prenorm output")
        else:
            assert torch.equal(res_o, res_f)  # the same float32 sum, rounded once
    _check_residual_grads(g_o, x, r64, w, b, z, dy, dres, gs=n, nbg=True, rms=rms, act=act)
    if r_dtype == torch.bfloat16 and r is not None:
        # fla's backward recomputes xhat from the bf16-rounded sum (its statistics are the float32 sum's),
        # an error of about one bf16 rounding of s in every gradient: judged against float64 alone.
        return
    _check_residual_grads(g_o, x, r64, w, b, z, dy, dres, gs=n, nbg=True, rms=rms, act=act, against=g_f)


# ---------------------------------------------------------------------------
# 3. norm + gate + linear
# ---------------------------------------------------------------------------


def _linear_allowed(y64, y_mag, y_dtype, gs, lw64, out64, out_dtype, pairs=1):
    """The tolerance model carried through ``out = y @ W.T + b``: every y within its bound (y in y_dtype, one
    rounding), times |W|; the matmul's own accumulation (K = 8 + log2(N), float32); the final rounding."""
    n = y64.shape[-1]
    ey = model.allowed_error(y64, y_mag, y_dtype, model.k_factor(gs)) / pairs
    e = ey @ lw64.abs().t() + model.k_factor(n) * model.unit_roundoff(torch.float32) * (y64.abs() @ lw64.abs().t())
    return pairs * (model.unit_roundoff(out_dtype) * (out64.abs() + e) + e + model.min_spacing(out_dtype) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_linear_is_the_unfused_composition_bit_for_bit(backend, dtype, residual):
    x, z, w, b = make_inputs(16, 64, dtype)
    lw, lb = make_inputs(40, 64, dtype, gate=False)[0] / 8, make_inputs(40, 1, dtype, gate=False)[0].view(40)
    r = make_inputs(16, 64, torch.float32, gate=False, bias=False)[0] if residual else None

    def run(fused):
        xl, zl, wl, bl, lwl, lbl, rl = _leaves(x, z, w, b, lw, lb, r)
        if fused:
            out = gatednorm.layernorm_linear_fn(xl, wl, bl, zl, lwl, lbl, 1e-5, 32, residual=rl, prenorm=residual,
                                                backend=backend)
        else:
            out = gatednorm.layernorm_fn(xl, wl, bl, zl, 1e-5, 32, residual=rl, prenorm=residual, backend=backend)
            out = (F.linear(out[0], lwl, lbl), out[1]) if residual else F.linear(out, lwl, lbl)
        outs = out if residual else (out,)
        cots = [make_like(o, seed=i) for i, o in enumerate(outs)]
        leaves = [t for t in (xl, zl, wl, bl, lwl, lbl, rl) if t is not None]
        return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, cots)

    (outs_f, grads_f), (outs_u, grads_u) = run(True), run(False)
    for a, c in zip(outs_f + list(grads_f), outs_u + list(grads_u), strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms,nbg,act", [(False, True, "swish"), (True, False, "sigmoid")])
def test_linear_matches_float64(backend, rms, nbg, act):
    x, z, w, b = make_inputs(24, 64, torch.float32, bias=not rms)
    lw = make_inputs(48, 64, gate=False)[0] / 8
    lb = make_inputs(48, 1, gate=False)[0].view(48)
    xl, zl, wl, bl, lwl, lbl = _leaves(x, z, w, b, lw, lb)
    out = gatednorm.layernorm_linear_fn(xl, wl, bl, zl, lwl, lbl, 1e-5, 16, nbg, rms, activation=act,
                                        backend=backend)
    y64 = gated_norm_reference(x, w, b, z, 1e-5, 16, nbg, rms, act)[0]
    out64 = F.linear(y64, lw.double(), lb.double())
    y_mag = magnitudes(x, w, b, z, 1e-5, 16, nbg, rms, act)["y"]
    res = model.compare(out, out64, _linear_allowed(y64, y_mag, torch.float32, 16, lw.double(), out64, out.dtype))
    assert res.passed, res
    # gradients: the linear layer's exactly from y; the norm's from dy = dout @ W, judged by the model at |dout| @ |W|
    dout = make_like(out)
    leaves = [t for t in (xl, zl, wl, bl, lwl, lbl) if t is not None]
    grads = dict(zip(["dx", "dz", "dweight", "dbias", "dlw", "dlb"] if not rms else ["dx", "dz", "dweight", "dlw",
                                                                                     "dlb"],
                     torch.autograd.grad(out, leaves, dout), strict=True))
    dy64 = dout.double() @ lw.double()
    ref = reference_gradients(x, w, b, z, dy64, 1e-5, 16, nbg, rms, act)
    mag = magnitudes(x, w, b, z, 1e-5, 16, nbg, rms, act, dy=dout.double().abs() @ lw.double().abs())
    for name in ("dx", "dz", "dweight", "dbias"):
        if name in grads:
            assert_within(grads[name], ref[name], mag[name], 16, rows=24, over_rows=name in ("dweight", "dbias"),
                          what=name)
    dlw64 = dout.double().t() @ y64
    allowed = model.k_factor(24) * model.unit_roundoff(torch.float32) * (dout.double().abs().t() @ (y64.abs() + y_mag))
    assert model.compare(grads["dlw"], dlw64, allowed).passed
    assert torch.allclose(grads["dlb"].double(), dout.double().sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.upstream
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms,linear_bias,residual", [(False, False, False), (True, True, True)])
def test_linear_matches_fla_kernel(fla_fused, backend, dtype, rms, linear_bias, residual):
    n, o = 64, 32
    x, z, w, _ = make_inputs(2 * 16, n, dtype, bias=False, device=DEVICE)
    x, z = x.view(2, 16, n), z.view(2, 16, n)
    lw = (make_inputs(o, n, dtype, gate=False, device=DEVICE)[0] / 8)
    lb = make_inputs(o, 1, dtype, gate=False, device=DEVICE)[0].view(o) if linear_bias else None
    r = make_inputs(32, n, torch.float32, gate=False, bias=False, device=DEVICE)[0].view(2, 16, n) if residual \
        else None
    fn = fla_fused.rms_norm_swish_gate_linear if rms else fla_fused.layer_norm_swish_gate_linear

    def run(impl):
        xl, zl, wl, lwl, lbl, rl = _leaves(x, z, w, lw, lb, r)
        if impl == "fla":
            res = fn(xl, zl, wl, None, lwl, lbl, rl, residual, False, 1e-5)
        else:
            res = gatednorm.layernorm_linear_fn(xl, wl, None, zl, lwl, lbl, 1e-5, None, True, rms, residual=rl,
                                                prenorm=residual, backend=backend)
        outs = res if residual else (res,)
        cots = [make_like(t, seed=i) for i, t in enumerate(outs)]
        leaves = [t for t in (xl, zl, wl, lwl, lbl, rl) if t is not None]
        return [t.detach() for t in outs], torch.autograd.grad(outs, leaves, cots)

    (outs_f, g_f), (outs_o, g_o) = run("fla"), run("ours")
    s64 = x.double() if r is None else _sum64(x, r)
    y64 = gated_norm_reference(s64, w, None, z, 1e-5, n, True, rms)[0]
    out64 = F.linear(y64, lw.double(), None if lb is None else lb.double())
    y_mag = magnitudes(s64, w, None, z, 1e-5, n, True, rms)["y"]
    allowed = _linear_allowed(y64, y_mag, dtype, n, lw.double(), out64, dtype, pairs=2)
    assert outs_o[0].dtype == outs_f[0].dtype == dtype
    assert model.compare(outs_o[0], outs_f[0].double(), allowed).passed
    assert model.compare(outs_o[0], out64, allowed / 2).passed
    if residual:
        assert torch.equal(outs_o[1], outs_f[1])
    # gradients: within a few roundings of the gradient's dtype, relative to the largest of each
    tol = 8 * model.unit_roundoff(dtype) + 1e-5
    for a, c in zip(g_o, g_f, strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert float((a.double() - c.double()).abs().max()) <= tol * float(c.double().abs().max())


def _saved_extra_bytes(fn, *inputs) -> tuple[int, int]:
    """(bytes the autograd graph saves beyond the inputs' own storages, bytes of all saved storages)."""
    saved: dict[int, int] = {}
    own = {t.untyped_storage().data_ptr() for t in inputs if t is not None}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(v for k, v in saved.items() if k not in own), sum(saved.values())


@pytest.mark.upstream
def test_linear_saves_no_activation_for_backward(fla_fused):
    m, n, o = 64, 128, 96
    x, z, w, _ = (t.requires_grad_() if t is not None else None
                  for t in make_inputs(m, n, torch.bfloat16, bias=False, device=DEVICE))
    lw = (make_inputs(o, n, torch.bfloat16, gate=False, device=DEVICE)[0] / 8).requires_grad_()
    inputs = (x, z, w, lw)
    stats = m * 4  # rstd: one float32 per row (RMSNorm, one group)
    ours, _ = _saved_extra_bytes(lambda: gatednorm.rmsnorm_linear_fn(x, w, None, z, lw), *inputs)
    unfused, _ = _saved_extra_bytes(lambda: F.linear(gatednorm.rmsnorm_fn(x, w, None, z), lw), *inputs)
    fla_unfused, _ = _saved_extra_bytes(lambda: F.linear(fla_fused.rms_norm_gated(x, z, w, None), lw), *inputs)
    fla_fused_linear, _ = _saved_extra_bytes(lambda: fla_fused.rms_norm_swish_gate_linear(x, z, w, None, lw, None),
                                             *inputs)
    y_bytes = m * n * x.element_size()
    assert ours == stats  # nothing of size (M, N) besides the inputs themselves
    assert unfused == fla_unfused == stats + y_bytes  # the linear layer keeps y
    assert fla_fused_linear == stats  # fla's fused path keeps as little: gatednorm's matches it


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_linear_peak_rss_below_the_unfused_path(tmp_path):
    """Peak RSS of 4 stacked norm + gate + linear layers, forward and backward, in fresh interpreters: the
    unfused path (what fla's non-fused path keeps too: test_linear_saves_no_activation_for_backward) holds
    one more (M, N) activation per layer until the backward. Native backend (fla's kernels under the
    interpreter would measure the interpreter)."""
    script = textwrap.dedent("""
        import gc, sys, torch, gatednorm
        import torch.nn.functional as F
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        m, n = 8192, 512
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, n, generator=g).bfloat16().requires_grad_()
        z = torch.randn(m, n, generator=g).bfloat16()
        w = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        lw = (torch.randn(n, n, generator=g) / 32).bfloat16().requires_grad_()
        dout = torch.randn(m, n, generator=g).bfloat16()
        def run():
            h = x
            for _ in range(4):
                if sys.argv[1] == "fused":
                    h = gatednorm.rmsnorm_linear_fn(h, w, None, z, lw, backend="native")
                else:
                    h = F.linear(gatednorm.rmsnorm_fn(h, w, None, z, backend="native"), lw)
            h.backward(dout)
            x.grad = w.grad = lw.grad = None
        run()
        gc.collect()
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        run()
        print((status("VmHWM") - base) / (m * n * 2))
    """)
    path = tmp_path / "peak.py"
    path.write_text(script)
    # a fixed mmap threshold: every tensor gets its own mapping, returned on free, so RSS follows live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    peaks = {}
    for mode in ("fused", "unfused"):
        proc = subprocess.run([sys.executable, str(path), mode], capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0 and "clear_refs" in proc.stderr:
            pytest.skip("/proc/self/clear_refs cannot be written here")
        assert proc.returncode == 0, proc.stderr
        peaks[mode] = float(proc.stdout.split()[-1])
    # in units of one (M, N) bf16 activation: measured about 5.2 (fused) against 8.2 (unfused)
    assert peaks["fused"] <= peaks["unfused"] - 2.0, peaks


# ---------------------------------------------------------------------------
# 4. strided gates: read through their strides, never copied
# ---------------------------------------------------------------------------


def _packed_projection(t, h, n, dtype, requires_grad=False):
    """A (T, 4*H*N) projection (q | k | v | z, NaN outside z) and z = its (T, H, N) slice: token stride 4*H*N, heads
    adjacent. No (T*H, N) view of z exists."""
    proj = torch.full((t, 4 * h * n), float("nan"), dtype=dtype)
    proj[:, 3 * h * n:] = make_inputs(t * h, n, dtype, bias=False)[1].view(t, h * n)
    proj.requires_grad_(requires_grad)
    return proj, proj[:, 3 * h * n:].view(t, h, n)


def test_prepare_keeps_strided_gates_as_views():
    t, h, n = 5, 4, 32
    proj, z3 = _packed_projection(t, h, n, torch.float32)
    x, _, w, b = make_inputs(t * h, n)
    call = prepare(x, w, b, z3, 1e-6, 16, True, False, "swish", regroup_heads=True)
    assert call.heads == h and call.z2d.shape == (t, h * n) and call.x2d.shape == (t, h * n)
    assert call.z2d.data_ptr() == z3.data_ptr() and call.z2d.stride() == (4 * h * n, 1)
    assert call.x2d.data_ptr() == x.data_ptr()
    # rows with a stride (a 2-D slice of a projection) and (T, H, N) views that merge stay views as well
    wide = torch.randn(t * h, 3 * n)
    call = prepare(wide[:, :n], w, b, wide[:, 2 * n:], 1e-6, None, True, False, "swish")
    assert call.x2d.data_ptr() == wide.data_ptr() and call.z2d.data_ptr() == wide[:, 2 * n:].data_ptr()
    z_merge = torch.randn(t, h, 2 * n)[..., :n]  # heads n apart within a token: no (T*H, N) view either ...
    assert prepare(x, w, b, z_merge, 1e-6, None, True, False, "swish", regroup_heads=True).heads == 1  # ... copied
    z_view = torch.randn(t, 2, h, n)[:, 0]  # token stride 2*H*N, heads packed: regrouped as well
    assert prepare(x, w, b, z_view, 1e-6, None, True, False, "swish", regroup_heads=True).heads == h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [None, 16])
def test_strided_gate_reaches_the_backend_uncopied_and_matches_bit_for_bit(backend, dtype, group_size):
    t, h, n = 6, 4, 32
    proj, z3 = _packed_projection(t, h, n, dtype, requires_grad=True)
    x, _, w, b = make_inputs(t * h, n, dtype, bias=True)
    impl = ops.select_impl(backend, torch.device("cpu"))
    rec = RecordingBackend(impl)
    with ops.override_impl(backend, "cpu", rec):
        got = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z3, group_size=group_size, backend=backend)
        xl = x.clone().requires_grad_()
        y = gatednorm.layernorm_fn(xl, w, b, z3, 1e-6, group_size, backend=backend)
        dy = make_like(y)
        dx, dproj = torch.autograd.grad(y, (xl, proj), dy)
    assert [kind for kind, _, _ in rec.seen] == ["forward", "forward", "backward"]
    for _, _, zs in rec.seen:  # views of the caller's tensors: nothing was copied on the way in
        assert zs.untyped_storage().data_ptr() == proj.untyped_storage().data_ptr()
        assert zs.stride(0) == 4 * h * n and zs.stride(1) == 1
    assert rec.seen[0][1].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    # the same bits as the call with a contiguous (T*H, N) gate: y, the statistics (in the same order), dx, dz
    zc = z3.detach().reshape(t * h, n).clone().requires_grad_()
    want = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=zc.detach(), group_size=group_size, backend=backend)
    for a, c in zip(got, want, strict=True):
        assert torch.equal(a, c)
    xl = x.clone().requires_grad_()
    y2 = gatednorm.layernorm_fn(xl, w, b, zc, 1e-6, group_size, backend=backend)
    dx2, dz2 = torch.autograd.grad(y2, (xl, zc), dy)
    assert torch.equal(y, y2) and torch.equal(dx, dx2)
    assert torch.equal(dproj[:, 3 * h * n:], dz2.view(t, h * n)) and (dproj[:, :3 * h * n] == 0).all()


@needs_triton
def test_triton_reads_strided_gates_without_copies():
    """No copy, clone or cast of an x- or z-sized tensor on the whole triton path (dispatch included),
    forward and backward: torch ops seen by a dispatch mode (the kernels themselves run outside it). Triton's
    interpreter stages every kernel argument through host copies to emulate device memory: its own copies
    (made from triton/runtime/interpreter.py) are not gatednorm's and are left out."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    copies = {torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
    interpreter = os.path.join("triton", "runtime", "interpreter.py")

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in copies and not any(f.filename.endswith(interpreter) for f in traceback.extract_stack()):
                self.sizes.append(out.numel())
            return out

    t, h, n = 6, 4, 32
    proj, z3 = _packed_projection(t, h, n, torch.bfloat16, requires_grad=True)
    x = make_inputs(t * h, n, torch.bfloat16)[0].requires_grad_()
    w = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
    r = make_inputs(t * h, n, torch.float32, gate=False, bias=False)[0]
    with Copies() as mode:
        y = gatednorm.rmsnorm_fn(x, w, None, z3, group_size=16, backend="triton")
        torch.autograd.grad(y, (x, proj, w), torch.ones_like(y))
        gatednorm.layer_norm_fwd(x.detach(), w.detach(), None, 1e-6, z=z3.detach(), backend="triton")
        # with a float32 residual: s is the one new (M, N) tensor (an add, not a copy)
        gatednorm.rmsnorm_fn(x.detach(), w.detach(), None, z3.detach(), residual=r, backend="triton")
    assert all(size < x.numel() for size in mode.sizes), mode.sizes


# ---------------------------------------------------------------------------
# 5. patch("fla") / patch("sglang") route every fused_norm_gate entry point to gatednorm
# ---------------------------------------------------------------------------


def _calls(fragment: str) -> int:
    return sum(v for k, v in call_counts().items() if fragment in k)


@pytest.mark.upstream
def test_patch_fla_routes_residual_prenorm_and_linear(fla_fused, monkeypatch):
    fused = fla_fused

    def no_fla_kernel(*args, **kwargs):
        raise AssertionError("fla's kernel was reached")

    x, z, w, b = make_inputs(8, 64, torch.bfloat16, param_dtype=torch.float32)
    r = make_inputs(8, 64, torch.float32, gate=False, bias=False)[0]
    lw = make_inputs(24, 64, torch.bfloat16, gate=False)[0] / 8
    with gatednorm.patch("fla", backend="native") as handle:
        for name in ("layer_norm_swish_gate_linear", "rms_norm_swish_gate_linear", "FusedRMSNormGatedLinear.forward",
                     "FusedLayerNormGatedLinear.forward"):
            assert any(name in item for item in handle.replaced), name
        monkeypatch.setattr(fused, "layer_norm_gated_fwd", no_fla_kernel)
        monkeypatch.setattr(fused, "layer_norm_gated_bwd", no_fla_kernel)
        y, res = fused.layer_norm_gated(x, z, w, b, "sigmoid", r, True, False, 1e-5)
        want = gatednorm.layernorm_fn(x, w, b, z, 1e-5, activation="sigmoid", residual=r, prenorm=True)
        assert torch.equal(y, want[0]) and torch.equal(res, want[1]) and res.dtype == torch.float32
        y, res = fused.rms_norm_gated(x, z, w, None, prenorm=True, residual_in_fp32=True)
        assert res.dtype == torch.float32 and torch.equal(res, x.float())
        mod = fused.FusedRMSNormSwishGate(64)
        xl = x.clone().requires_grad_()
        rl = r.clone().requires_grad_()
        y, res = mod(xl, z, rl, True)
        (y.float().sum() + res.sum()).backward()
        assert xl.grad is not None and rl.grad is not None and mod.weight.grad is not None
        mod = fused.FusedLayerNormGated(64, bias=True, activation="sigmoid")
        assert torch.equal(mod(x, z, r), gatednorm.layernorm_fn(x, mod.weight, mod.bias, z, mod.eps,
                                                                activation="sigmoid", residual=r))
        out = fused.rms_norm_swish_gate_linear(x, z, w, None, lw, None, r, False, False, 1e-5)
        assert torch.equal(out, gatednorm.rmsnorm_linear_fn(x, w, None, z, lw, None, 1e-5, residual=r))
        lin = fused.FusedLayerNormSwishGateLinear(64)
        xl = x.clone().requires_grad_()
        lwl = lw.clone().requires_grad_()
        out, res = lin(xl, z, lwl, None, r, True)
        out.float().sum().backward()
        assert lwl.grad is not None and xl.grad is not None and res.dtype == torch.float32
        assert torch.equal(fused.FusedRMSNormGatedLinear(64)(x, z, lw), gatednorm.rmsnorm_linear_fn(
            x, torch.ones(64, dtype=torch.bfloat16), None, z, lw, eps=1e-5))
        for name in ("fused_norm_gate.layer_norm_gated@native", "fused_norm_gate.rms_norm_gated@native",
                     "FusedRMSNormGated.forward@native", "FusedLayerNormGated.forward@native",
                     "rms_norm_swish_gate_linear@native", "FusedLayerNormGatedLinear.forward@native",
                     "FusedRMSNormGatedLinear.forward@native"):
            assert _calls(name) >= 1, (name, call_counts())


@pytest.fixture(scope="module")
def sglang_fused():
    from integrations_support import (
        SGLANG_PACKAGES,
        SGLANG_STUBS,
        package_root,
        sglang_module_names,
        upstream_modules,
    )

    if package_root("sglang") is None:
        pytest.skip("sglang is not installed")
    names = [n for n in sglang_module_names() if n.endswith("fused_norm_gate")]
    if not names:
        pytest.skip("this sglang has no fused_norm_gate module")
    with upstream_modules("sglang", SGLANG_PACKAGES, SGLANG_STUBS, names) as mods:
        yield mods[-1]


def test_patch_sglang_routes_residual_prenorm_and_strided_gate(sglang_fused):
    m = sglang_fused
    t, h, n = 4, 4, 64
    proj, g3 = _packed_projection(t, h, n, torch.bfloat16)
    x, _, w, _ = make_inputs(t * h, n, torch.bfloat16, bias=False)
    r = make_inputs(t * h, n, torch.bfloat16, gate=False, bias=False)[0]
    rec = RecordingBackend(ops.select_impl("native", torch.device("cpu")))
    with gatednorm.patch("sglang", backend="native"), ops.override_impl("native", "cpu", rec):
        mod = m.FusedRMSNormGated(n, activation="sigmoid")
        with torch.no_grad():
            mod.weight.copy_(w)
        # Qwen3-Next's call: a strided (T, H, D) slice of the packed projection for a (T*H, D) input
        y, res = mod(x, g3, r, True)
        assert rec.seen[-1][2].untyped_storage().data_ptr() == proj.untyped_storage().data_ptr()  # not copied
        _check_residual_forward(y, res, x, r, w, None, g3, gs=n, nbg=True, rms=True, act="sigmoid", eps=mod.eps)
        y2 = m.rms_norm_gated(x, g3.reshape(t * h, n), w, None, "swish", r, False, False, 1e-6)
        _check_residual_forward(y2, None, x, r, w, None, g3.reshape(t * h, n), gs=n, nbg=True, rms=True,
                                act="swish")
        assert _calls("FusedRMSNormGated.forward@native") == 1 and _calls("fused_norm_gate.rms_norm_gated") == 1


# ---------------------------------------------------------------------------
# 6. the cases of fla's own tests/modules/test_layernorm_gated.py that gatednorm used to hand back
# ---------------------------------------------------------------------------
# There: the prenorm functions (8 cases) and the norm + swish gate + linear modules (4), against
# fla's float32 references. Here: the same shapes and dtypes through patch("fla"), against float64.

FLA_PRENORM = [(1, 50, torch.float32, "swish"), (63, 128, torch.float16, "silu"), (65, 512, torch.bfloat16, "sigmoid"),
               (33, 513, torch.bfloat16, "swish")]
FLA_LINEAR = [(2, 64, 64, 32, False, False), (2, 64, 64, 32, True, True), (2, 500, 1024, 256, False, True),
              (2, 500, 1024, 256, True, False)]


@pytest.mark.upstream
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("t,d,dtype,act", FLA_PRENORM, ids=lambda v: str(v).removeprefix("torch."))
def test_fla_prenorm_cases_through_the_patch(fla_fused, t, d, dtype, act, rms):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2, t, d, generator=g).to(dtype)
    z = torch.randn(2, t, d, generator=g).to(dtype)
    r = torch.randn(2, t, d, generator=g)  # float32 residual stream beside narrow activations
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    leaves = _leaves(x, z, r, w, b)
    with gatednorm.patch("fla", backend="native"):
        fn = fla_fused.rms_norm_gated if rms else fla_fused.layer_norm_gated  # looked up after patching
        y, res = fn(x=leaves[0], g=leaves[1], weight=leaves[3], bias=leaves[4], activation=act, residual=leaves[2],
                    prenorm=True, eps=1e-5)
    assert _calls("fused_norm_gate.") == 1
    act = "swish" if act == "silu" else act
    _check_residual_forward(y, res, x, r, w, b, z, gs=d, nbg=True, rms=rms, act=act, eps=1e-5)
    dy, dres = make_like(y, seed=1), make_like(res, seed=2)
    dx, dz, dr, dw, db = torch.autograd.grad((y, res), leaves, (dy, dres))
    _check_residual_grads({"dx": dx, "dz": dz, "dresidual": dr, "dweight": dw, "dbias": db}, x, r, w, b, z, dy, dres,
                          gs=d, nbg=True, rms=rms, act=act, eps=1e-5)


@pytest.mark.upstream
@pytest.mark.parametrize("b_,t,d,o,rms,linear_bias", FLA_LINEAR, ids=lambda v: str(v))
def test_fla_norm_swish_gate_linear_cases_through_the_patch(fla_fused, b_, t, d, o, rms, linear_bias):
    g = torch.Generator().manual_seed(42)
    x, z = torch.randn(b_, t, d, generator=g), torch.randn(b_, t, d, generator=g)
    nw = torch.randn(d, generator=g)
    lw = torch.randn(o, d, generator=g) / d ** 0.5
    lb = torch.randn(o, generator=g) if linear_bias else None
    dout = torch.randn(b_, t, o, generator=g)
    cls = fla_fused.FusedRMSNormSwishGateLinear if rms else fla_fused.FusedLayerNormSwishGateLinear
    xl, zl, lwl, lbl = _leaves(x, z, lw, lb)
    with gatednorm.patch("fla", backend="native"):
        mod = cls(d, eps=1e-5)
        with torch.no_grad():
            mod.weight.copy_(nw)
        mod(xl, zl, lwl, lbl).backward(dout)
    assert _calls("GatedLinear.forward@native") == 1
    # float64 composition: F.linear(norm(x) * silu(g)), by autograd
    x64, z64, nw64, lw64 = (t_.double().requires_grad_() for t_ in (x, z, nw, lw))
    lb64 = None if lb is None else lb.double().requires_grad_()
    y64 = gated_norm_reference(x64, nw64, None, z64, 1e-5, d, True, rms)[0]
    F.linear(y64, lw64, lb64).backward(dout.double())
    rows = b_ * t
    mag = magnitudes(x, nw, None, z, 1e-5, d, True, rms, dy=dout.double().abs() @ lw.double().abs())
    assert_within(xl.grad, x64.grad, mag["dx"], d, what="dx")
    assert_within(zl.grad, z64.grad, mag["dz"], d, what="dz")
    assert_within(mod.weight.grad, nw64.grad, mag["dweight"], d, rows=rows, over_rows=True, what="dweight")
    y_mag = magnitudes(x, nw, None, z, 1e-5, d, True, rms)["y"].reshape(rows, d)
    dout2 = dout.double().reshape(rows, o)
    allowed = model.k_factor(rows) * model.unit_roundoff(torch.float32) * (
        dout2.abs().t() @ (y64.detach().reshape(rows, d).abs() + y_mag))
    assert model.compare(lwl.grad, lw64.grad, allowed).passed
    if linear_bias:
        assert torch.allclose(lbl.grad.double(), lb64.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# 7. the modules
# ---------------------------------------------------------------------------


def test_modules_take_residual_and_the_linear_layer():
    x, z, w, b = make_inputs(6, 32)
    r = make_inputs(6, 32, gate=False, bias=False)[0]
    ln = gatednorm.LayerNorm(32, group_size=16)
    y, res = ln(x, z, r, True)
    assert torch.equal(y, gatednorm.layernorm_fn(x, ln.weight, ln.bias, z, ln.eps, 16, residual=r))
    assert torch.equal(res, x + r)
    lin = gatednorm.RMSNormLinear(32, group_size=16, norm_before_gate=False)
    lw, lb = torch.randn(8, 32), torch.randn(8)
    out = lin(x.view(2, 3, 32), z.view(2, 3, 32), lw, lb)
    assert out.shape == (2, 3, 8)
    ref = F.linear(gatednorm.rmsnorm_fn(x, lin.weight, None, z, lin.eps, 16, False), lw, lb)
    assert torch.equal(out, ref.view(2, 3, 8))
    assert set(dict(lin.named_parameters())) == {"weight"}  # the linear layer's parameters are the caller's


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_under_autocast_rounds_the_norm_once_to_the_autocast_dtype(backend):
    x, z, w, b = make_inputs(8, 64, torch.float32)
    lw = make_inputs(16, 64, gate=False)[0] / 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gatednorm.layernorm_linear_fn(x, w, b, z, lw, None, 1e-6, 32, backend=backend)
    assert out.dtype == torch.bfloat16
    y = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, out=torch.empty(8, 64, dtype=torch.bfloat16), group_size=32,
                                 backend=backend)[0]
    assert torch.equal(out, F.linear(y, lw.bfloat16()))


@pytest.mark.slow
def test_residual_and_linear_compile_fullgraph():
    x, z, w, _ = make_inputs(8, 64, torch.bfloat16, bias=False)
    r = make_inputs(8, 64, torch.float32, gate=False, bias=False)[0]
    lw = make_inputs(16, 64, torch.bfloat16, gate=False)[0]

    _, z3 = _packed_projection(2, 4, 64, torch.bfloat16)  # a strided (T, H, N) gate: regrouped while tracing

    def f(x, r, z, w, lw, z3):
        y, res = gatednorm.rmsnorm_fn(x, w, None, z, residual=r, prenorm=True, backend="native")
        return (y, res, gatednorm.rmsnorm_linear_fn(x, w, None, z, lw, residual=r, backend="native"),
                gatednorm.rmsnorm_fn(x, w, None, z3, backend="native"))

    compiled = torch.compile(f, fullgraph=True)
    for a, c in zip(compiled(x, r, z, w, lw, z3), f(x, r, z, w, lw, z3), strict=True):
        assert torch.equal(a, c)

