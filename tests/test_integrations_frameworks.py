"""gatednorm.patch() against the installed frameworks: their own functions and modules, on CPU tensors,
run gatednorm (counted by the integrations' call log) and match the float64 reference; undo()
restores the original objects; patching twice is harmless.

sglang, vLLM and mamba_ssm run their real gated-norm module files with framework helpers stubbed
(tests/integrations_support.py says why); fla and transformers are imported normally.
"""

from __future__ import annotations

import inspect
import os
import sys
import types

import pytest
import torch
from helpers import assert_within, check_forward, check_gradients, magnitudes, make_inputs
from integrations_support import (
    MAMBA_MODULES,
    MAMBA_PACKAGES,
    SGLANG_MIXER2,
    SGLANG_PACKAGES,
    SGLANG_STUBS,
    TOL,
    TP,
    VLLM_MODULES,
    VLLM_PACKAGES,
    assert_restored,
    max_rel_error,
    package_root,
    sglang_module_names,
    snapshot,
    upstream_modules,
    vllm_mixer2_module,
    vllm_stubs,
)

import gatednorm
from gatednorm.integrations import call_counts, reset_call_counts
from gatednorm.reference import gated_norm_reference


def _ref(x, w, b, z, eps, gs, nbg, rms, act="swish"):
    return gated_norm_reference(x, w, b, z, eps, gs, nbg, rms, act)


def _calls(fragment: str) -> int:
    return sum(n for k, n in call_counts().items() if fragment in k)


def _ref_grads(x, w, b, z, eps, gs, nbg, rms, dy):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, z)]
    y = gated_norm_reference(leaves[0], leaves[1], leaves[2], leaves[3], eps, gs, nbg, rms)[0]
    y.backward(dy.double())
    return [t.grad if t is not None else None for t in leaves]


@pytest.fixture(autouse=True)
def _clean_calls():
    reset_call_counts()
    yield
    assert gatednorm.patched() == [], "a test left a patch in place"


# ---------------------------------------------------------------------------------------------- fla


@pytest.fixture(scope="module")
def fla_modules():
    pytest.importorskip("fla")
    import fla.modules.norm.fused_norm_gate as fused
    import fla.modules.norm.layernorm_gated as lng

    return lng, fused


def test_fla_functions_modules_and_backward(fla_modules):
    lng, fused = fla_modules
    snap = snapshot(lng, fused, lng.LayerNormFn, lng.RMSNormGated, lng.LayerNormGated, fused.FusedRMSNormGated,
                    fused.FusedLayerNormGated)
    x, z, w, b = make_inputs(6, 96, seed=0)
    with gatednorm.patch("fla", backend="native") as h:
        assert "fla: fla.modules.norm.layernorm_gated.layer_norm_bwd" in h.replaced
        # forward primitive: upstream's (out, mean, rstd), group-major stats
        y, mean, rstd = lng.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=32, norm_before_gate=False)
        rmean, rrstd = _ref(x, w, b, z, 1e-6, 32, False, False)[1:]
        check_forward(y, mean, rstd, x, w, b, z, 1e-6, 32, False, False)
        # the earlier fixed bounds on the statistics, kept beside the model's check
        assert torch.allclose(mean.double(), rmean, atol=1e-6) and torch.allclose(rstd.double(), rrstd, rtol=1e-5)
        # backward primitive: (dx, dw, db, dz), with dz= written in place and recompute_output
        dy = torch.randn_like(x)
        dz_buf = torch.empty_like(z)
        dx, dw, db, dz, y2 = lng.layer_norm_bwd(dy, x, w, b, 1e-6, mean, rstd, z=z, group_size=32,
                                                norm_before_gate=False, recompute_output=True, dz=dz_buf)
        gx, _, _, gz = _ref_grads(x, w, b, z, 1e-6, 32, False, False, dy)
        assert dz is dz_buf
        check_gradients((dx, dz, dw, db), x, w, b, z, dy, 1e-6, 32, False, False)
        # kept: the model allows dx, dz more than this earlier bound on this data (up to 1.3e-4, 4.2e-4)
        assert max_rel_error(dx, gx) < 1e-4 and max_rel_error(dz, gz) < 1e-4
        check_forward(y2, None, None, x, w, b, z, 1e-6, 32, False, False, stats=False)
        # fla's RMSNormGated defaults to norm_before_gate=False; its own attribute is honoured
        mod = lng.RMSNormGated(96, group_size=48)
        assert mod.norm_before_gate is False
        xr = x.clone().requires_grad_()
        out = mod(xr, z)
        check_forward(out, None, None, x, mod.weight, None, z, mod.eps, 48, False, True, stats=False)
        out.sum().backward()
        assert xr.grad is not None and mod.weight.grad is not None
        # LayerNormFn.apply with upstream's positional order, through autograd
        xr = x.clone().requires_grad_()
        zr = z.clone().requires_grad_()
        y3 = lng.LayerNormFn.apply(xr, w, b, zr, 1e-5, 32, True, False)
        y3.backward(dy)
        check_gradients((xr.grad, zr.grad, None, None), x, w, b, z, dy, 1e-5, 32, True, False)
        # fused_norm_gate without residual: norm(x) * act(g) over the whole row
        fmod = fused.FusedRMSNormGated(96, activation="sigmoid")
        out = fmod(x, z)
        check_forward(out, None, None, x, fmod.weight, None, z, fmod.eps, None, True, True, "sigmoid", stats=False)
        out = fused.layer_norm_gated(x, z, w, b)
        check_forward(out, None, None, x, w, b, z, 1e-6, None, True, False, stats=False)
        for name in ("layer_norm_fwd", "layer_norm_bwd", "RMSNormGated.forward", "LayerNormFn.forward",
                     "FusedRMSNormGated.forward", "fused_norm_gate.layer_norm_gated"):
            assert _calls(name) >= 1, name
        assert all(k.endswith("@native") for k in call_counts())
    assert_restored(snap)


def test_fla_imported_names_are_rebound_and_restored(fla_modules):
    lng, fused = fla_modules
    model_file = types.ModuleType("fake_fla_model_file")
    model_file.rmsnorm_fn = lng.rmsnorm_fn  # as `from fla.modules.norm.layernorm_gated import rmsnorm_fn`
    model_file.rms_norm_gated = fused.rms_norm_gated
    originals = (lng.rmsnorm_fn, fused.rms_norm_gated)
    sys.modules[model_file.__name__] = model_file
    try:
        h1 = gatednorm.patch("fla")
        h2 = gatednorm.patch("fla")  # twice: harmless, nothing more replaced
        assert h2.replaced == []
        assert model_file.rmsnorm_fn is lng.rmsnorm_fn is not originals[0]
        assert model_file.rms_norm_gated is fused.rms_norm_gated is not originals[1]
        assert "fla: fake_fla_model_file.rmsnorm_fn (imported name)" in gatednorm.patched()
        x, z, w, _ = make_inputs(3, 64, seed=0)
        out = model_file.rmsnorm_fn(x, w, None, z, group_size=16)
        check_forward(out, None, None, x, w, None, z, 1e-6, 16, True, True, stats=False)
        h2.undo()
        assert model_file.rmsnorm_fn is lng.rmsnorm_fn is not originals[0]  # h1 still holds it
        h1.undo()
        h1.undo()  # idempotent
        assert model_file.rmsnorm_fn is originals[0] and lng.rmsnorm_fn is originals[0]
        assert model_file.rms_norm_gated is originals[1] and fused.rms_norm_gated is originals[1]
    finally:
        del sys.modules[model_file.__name__]


def test_fla_residual_and_prenorm_calls_run_gatednorm(fla_modules):
    # residual= / prenorm= used to be handed back to fla's kernel; they now run gatednorm
    # (tests/test_fla_parity.py holds them against fla's kernel and float64)
    from gatednorm.integrations import _wrappers

    fn = _wrappers.fused_function("t", "native", True)
    x, z, w, _ = make_inputs(2, 32, seed=0)
    r = make_inputs(2, 32, seed=1)[0]
    y = fn(x, z, w, None, "swish", residual=r)
    s64 = x.double() + r.double()  # y of x + residual: float64 reference and A on the float64 sum, C = float32
    assert_within(y, _ref(s64, w, None, z, 1e-6, None, True, True)[0],
                  magnitudes(s64, w, None, z, 1e-6, None, True, True)["y"], 32, what="y of x + residual")
    y, res_out = fn(x, z, w, None, prenorm=True)
    assert res_out.data_ptr() == x.data_ptr() and torch.equal(res_out, x)  # no residual: x itself, as fla
    assert _calls("t@native") == 2


# ------------------------------------------------------------------------------------------- sglang


#: (full hidden size, n_groups, tensor-parallel size) of Mixer2RMSNormGated calls on 128 features a rank: groups
#: whole on every rank (gatednorm's), then a group split over ranks (upstream's, with the collective it runs)
MIXER2_LOCAL = ((128, 1, 1), (128, 4, 1), (256, 4, 2))
MIXER2_SPLIT = ((256, 1, 2, "all_reduce"), (384, 4, 3, "all_gather"))


def _check_mixer2(cls, framework: str, monkeypatch) -> None:
    """The Mamba2 mixer's norm, ``Mixer2RMSNormGated`` (sglang's or vLLM's), patched: calls whose groups lie whole on
    every rank give the float64 RMSNorm of x * silu(z) per group, rounded once (upstream's torch ops round twice:
    within a few bf16 roundings of theirs), instances built before the patch included; a group split over ranks and
    ``use_rms_norm=False`` run upstream's own code, bit for bit, collectives included; a float32 weight beside bf16
    activations gives upstream's float32 output; all restored after."""
    monkeypatch.setattr(TP, "calls", [])
    snap = snapshot(cls)
    x, z, _, _ = make_inputs(6, 128, torch.bfloat16, seed=12)
    w = (torch.randn(128) * 0.5 + 1).bfloat16()
    before, upstream = {}, {}
    for full, groups, tp, *_ in MIXER2_LOCAL + MIXER2_SPLIT:
        monkeypatch.setattr(TP, "size", tp)
        mod = cls(full, groups, eps=1e-5).to(torch.bfloat16)
        with torch.no_grad():
            mod.weight.copy_(w)
        local = groups % tp == 0
        upstream[full, groups, tp] = mod.forward_native(x, z) if local else mod(x, z)
        before[full, groups, tp] = mod
    monkeypatch.setattr(TP, "size", 1)
    plain_upstream = cls(128, 4, use_rms_norm=False)(x, z)
    wide_upstream = cls(128, 4, eps=1e-5).forward_native(x, z)
    assert TP.calls == [c[3] for c in MIXER2_SPLIT]
    with gatednorm.patch(framework):
        for full, groups, tp in MIXER2_LOCAL:
            monkeypatch.setattr(TP, "size", tp)
            up = upstream[full, groups, tp].float()
            for mod in (before[full, groups, tp], cls(full, groups, eps=1e-5).to(torch.bfloat16)):
                with torch.no_grad():
                    mod.weight.copy_(w)
                calls = sum(call_counts().values())
                y = mod(x, z)
                assert sum(call_counts().values()) == calls + 1, (full, groups, tp)
                check_forward(y, None, None, x, mod.weight, None, z, 1e-5, full // groups, False, True, stats=False)
                assert bool(((y.float() - up).abs() <= 2.0**-6 * up.abs() + 1e-6).all()), (full, groups, tp)
        assert _calls("Mixer2RMSNormGated.forward_native") >= 3
        for full, groups, tp, collective in MIXER2_SPLIT:
            monkeypatch.setattr(TP, "size", tp)
            TP.calls.clear()
            calls = sum(call_counts().values())
            assert torch.equal(before[full, groups, tp](x, z), upstream[full, groups, tp])
            assert TP.calls == [collective] and sum(call_counts().values()) == calls
        monkeypatch.setattr(TP, "size", 1)
        calls = sum(call_counts().values())
        assert torch.equal(cls(128, 4, use_rms_norm=False)(x, z), plain_upstream)
        assert sum(call_counts().values()) == calls
        # a float32 weight beside bf16 activations: upstream's weight * y.to(bf16) is float32, and so is ours
        wide = cls(128, 4, eps=1e-5)
        with torch.no_grad():
            wide.weight.copy_(w.float() + torch.rand(128) * 2.0**-9)  # not a bf16 value
        y = wide(x, z)
        assert y.dtype == wide_upstream.dtype == torch.float32
        check_forward(y, None, None, x.float(), wide.weight, None, z.float(), 1e-5, 32, False, True, stats=False)
    assert_restored(snap)


@pytest.fixture(scope="module")
def sglang_modules():
    if package_root("sglang") is None:
        pytest.skip("sglang is not installed")
    names = sglang_module_names()
    if os.path.isfile(os.path.join(package_root("sglang"), *SGLANG_MIXER2.split(".")[1:]) + ".py"):
        names.append(SGLANG_MIXER2)
    with upstream_modules("sglang", SGLANG_PACKAGES, SGLANG_STUBS, names) as mods:
        yield dict(zip(names, mods, strict=True))


def test_sglang_layernorm_gated(sglang_modules):
    lngs = [m for n, m in sglang_modules.items() if n.endswith("layernorm_gated")]
    assert lngs
    for m in lngs:
        snap = snapshot(m, m.LayerNormFn, m.RMSNorm, m.LayerNorm)
        assert "backward" not in vars(m.LayerNormFn)  # sglang's is forward-only
        t, h, n = 5, 4, 64
        x, _, w, b = make_inputs(t * h, n, seed=1)
        z3 = torch.randn(t, h, n)
        with gatednorm.patch("sglang"):
            # the newest kernel's (T, H, N) gate beside a (T*H, N) input, and the sigmoid activation
            y = m.rms_norm_gated(x=x, weight=w, bias=None, z=z3, group_size=32, norm_before_gate=True,
                                 is_rms_norm=True, activation="sigmoid")
            check_forward(y, None, None, x, w, None, z3.reshape(t * h, n), 1e-6, 32, True, True, "sigmoid",
                          stats=False)
            out = torch.empty_like(x)
            y, mean, rstd = m._layer_norm_fwd(x, w, b, 1e-5, z=z3.reshape(t * h, n), out=out, group_size=16,
                                              norm_before_gate=False)
            rrstd = _ref(x, w, b, z3.reshape(t * h, n), 1e-5, 16, False, False)[2]
            assert y is out
            check_forward(y, mean, rstd, x, w, b, z3.reshape(t * h, n), 1e-5, 16, False, False)
            # the earlier fixed bound on rstd, kept beside the model's check
            assert mean.dtype == torch.float32 and torch.allclose(rstd.double(), rrstd, rtol=1e-5)
            # RMSNorm as the model files use it (RMSNormGated): norm_before_gate defaults to True
            mod = m.RMSNorm(n, eps=1e-5, group_size=32)
            xb, zb = x.bfloat16(), z3.reshape(t * h, n).bfloat16()
            yb = mod.to(torch.bfloat16)(xb, zb)
            assert yb.dtype == torch.bfloat16
            check_forward(yb, None, None, xb, mod.weight, None, zb, 1e-5, 32, True, True, stats=False)
            # layernorm_fn -> LayerNormFn.apply, now differentiable
            xr = x.clone().requires_grad_()
            m.layernorm_fn(xr, w, b, z3.reshape(t * h, n), 1e-6, 32, True, False).sum().backward()
            assert xr.grad is not None
            # LayerNormFn.apply in sglang's argument order (with activation); forward-only upstream, ours has a backward
            xr = x.clone().requires_grad_()
            y = m.LayerNormFn.apply(xr, w, b, z3.reshape(t * h, n), 1e-6, 32, False, False, "sigmoid")
            check_forward(y, None, None, x, w, b, z3.reshape(t * h, n), 1e-6, 32, False, False, "sigmoid", stats=False)
            y.sum().backward()
            assert xr.grad is not None
            ln = m.LayerNorm(n, group_size=16)
            check_forward(ln(x), None, None, x, ln.weight, ln.bias, None, 1e-5, 16, True, False, stats=False)
            for name in ("rms_norm_gated", "_layer_norm_fwd", "RMSNorm.forward", "LayerNormFn.forward",
                         "LayerNorm.forward"):
                assert _calls(name) >= 1, name
        assert_restored(snap)
        reset_call_counts()


def test_sglang_quant_heads_epilogue(sglang_modules, monkeypatch):
    """sglang's FP8 epilogue, ``_layer_norm_fwd(quant_heads=H)`` as Qwen3.5's gated delta net calls it: the H
    head rows of a token normalised and quantized together (one float32 scale per token, y rounded to bf16
    first), routed to gated_norm_quant. Judged against the float64 norm quantized by the documented rule, and
    against sglang's own kernel (under Triton's interpreter): scales within a bf16 rounding of y's largest value,
    dequantized values within a float8 step. Bad quant_heads / group sizes raise ValueError."""
    from gatednorm.verify.quantized import check_quant, reference_y

    mods = [m for n, m in sglang_modules.items()
            if n.endswith("layernorm_gated") and "quant_heads" in inspect.signature(m._layer_norm_fwd).parameters]
    if not mods:
        pytest.skip("this sglang's _layer_norm_fwd has no quant_heads")
    t, h, n, eps = 6, 4, 64, 1e-6
    x, _, w, _ = make_inputs(t * h, n, torch.bfloat16, seed=7)
    z3 = torch.randn(t, h, n, dtype=torch.bfloat16)
    x = x.clone()
    x[2 * h:3 * h] *= 1e-15  # eps dominates: largest |y| ~ 1e-11, under sglang's floor of 1e-10 (ours: 2^-126)
    for m in mods:
        monkeypatch.setattr(m, "_get_sm_count", lambda device: 132, raising=False)  # sglang asks CUDA (an H100's)
        (q_up, s_up), _, _ = m._layer_norm_fwd(x, w, None, eps, z=z3, is_rms_norm=True, activation="silu",
                                               quant_heads=h)
        with gatednorm.patch("sglang"):
            (q, s), mean, rstd = m._layer_norm_fwd(x, w, None, eps, z=z3, is_rms_norm=True, activation="silu",
                                                   quant_heads=h)
            with pytest.raises(ValueError, match="quant_heads"):
                m._layer_norm_fwd(x, w, None, eps, z=z3, is_rms_norm=True, quant_heads=5)
            with pytest.raises(ValueError, match="group_size"):
                m._layer_norm_fwd(x, w, None, eps, z=z3, group_size=32, is_rms_norm=True, quant_heads=h)
            assert _calls("_layer_norm_fwd") >= 1
        assert q.shape == q_up.shape == (t, h * n) and q.dtype == q_up.dtype == torch.float8_e4m3fn
        assert s.shape == s_up.shape == (t, 1) and s.dtype == torch.float32 and mean is None and rstd is None
        y64, err = reference_y(x.view(t, h * n), w.repeat(h), None, z3.view(t, h * n), eps, n, True, True, "swish",
                               torch.bfloat16)
        res = check_quant(q, s, y64, err, "fp8_e4m3", None, "float32")
        assert res.passed, res
        normal = torch.ones(t, dtype=torch.bool)
        normal[2] = False
        assert bool(((s - s_up).abs() <= 2.0**-7 * s_up)[normal].all()), (s, s_up)  # amax of a bf16-rounded y
        deq, deq_up = q.float() * s, q_up.float() * s_up
        step = torch.maximum(deq.abs(), deq_up.abs()) * 2.0**-3 + s * 2.0**-9  # one e4m3 step, subnormals incl.
        close = (deq - deq_up).abs() <= 1.01 * step + 2.0**-7 * deq_up.abs()
        if not x.is_cuda:
            # Triton's interpreter casts fp32 to fp8 wrongly next to a binade edge: sglang's code there is a power
            # of two, half the right one (32 for 64, 0.0625 for 0.125: gatednorm's kernels compute those bits
            # themselves under the interpreter)
            codes = q_up.float().abs()
            halved = (codes > 0) & (torch.frexp(codes).mantissa == 0.5) & ((deq - 2 * deq_up).abs() <= 1.01 * step)
            assert int(halved.sum()) < close.numel() // 10
            close |= halved
        assert bool(close[normal].all())
        # the tiny token: sglang's scale is its floor, 1e-10 / 448, ours the rule's amax / 448 below it (q then
        # spans the whole fp8 range: check_quant above judged it)
        assert float(s_up[2]) == pytest.approx(1e-10 / 448, rel=1e-6) and float(s[2]) < float(s_up[2])
        assert float(q[2].float().abs().max()) == 448.0
    reset_call_counts()


def test_sglang_fused_norm_gate_and_rebinding(sglang_modules):
    fused = [m for n, m in sglang_modules.items() if n.endswith("fused_norm_gate")]
    if not fused:
        pytest.skip("this sglang has no fused_norm_gate module")
    m = fused[0]
    model_file = types.ModuleType("fake_sglang_qwen3_next")
    model_file.rms_norm_gated = m.rms_norm_gated
    original = m.rms_norm_gated
    sys.modules[model_file.__name__] = model_file
    try:
        snap = snapshot(m, m.FusedRMSNormGated)
        x, z, w, _ = make_inputs(8, 128, seed=0)
        with gatednorm.patch("sglang"):
            assert model_file.rms_norm_gated is m.rms_norm_gated is not original
            mod = m.FusedRMSNormGated(128, activation="sigmoid")
            with torch.no_grad():
                mod.weight.copy_(w)
            g3 = z.reshape(2, 4, 128)
            y = mod(x, g3)
            check_forward(y, None, None, x, w, None, z, mod.eps, None, True, True, "sigmoid", stats=False)
            assert _calls("FusedRMSNormGated.forward") == 1
        assert model_file.rms_norm_gated is original
        assert_restored(snap)
    finally:
        del sys.modules[model_file.__name__]


def _assert_kept_native_routed(cls, framework: str, mod, x, z) -> None:
    """Inside ``gatednorm.patch(framework)``: ``mod``, a Mixer2RMSNormGated whose dispatch holds the original
    forward_native (bound before the patch), goes to gatednorm through the ``forward`` the patch adds to ``cls``
    (one call, the float64 RMSNorm of x * silu(z) over groups of 32 within tolerance); that forward is gone after."""
    reset_call_counts()
    with gatednorm.patch(framework):
        assert "forward" in vars(cls)
        y = mod(x, z)
        assert _calls("Mixer2RMSNormGated.forward_native") == 1
        check_forward(y, None, None, x, mod.weight, None, z, 1e-6, 32, False, True, stats=False)
    assert "forward" not in vars(cls)


def test_sglang_mixer2_norm(sglang_modules, monkeypatch):
    """sglang's Mamba2 mixer norm (mixer2_rms_norm_gated.py, executed with its imports stood in for): what
    _check_mixer2 says, through BaseFusedOp's dispatch on a CPU (forward_native); an instance whose dispatch kept
    the original forward_native from a call before the patch is routed by the added forward, and runs sglang's
    method again, bit for bit, after the patch."""
    if SGLANG_MIXER2 not in sglang_modules:
        pytest.skip("this sglang has no mixer2_rms_norm_gated module")
    cls = sglang_modules[SGLANG_MIXER2].Mixer2RMSNormGated
    _check_mixer2(cls, "sglang", monkeypatch)
    x, z, _, _ = make_inputs(4, 128, seed=14)
    ran_early = cls(128, 4)
    upstream = ran_early(x, z)  # BaseFusedOp resolves the path now and keeps the bound original forward_native
    if getattr(ran_early.__dict__.get("_forward_method"), "__func__", None) is not cls.forward_native:
        pytest.skip("this sglang does not keep the resolved method in _forward_method")
    _assert_kept_native_routed(cls, "sglang", ran_early, x, z)
    assert torch.equal(ran_early(x, z), upstream)


def test_route1_native_function_used_as_the_frameworks_layer_norm_fwd(sglang_modules, monkeypatch):
    """Migration guide route 1: `from layernorm_native_implementation import _layer_norm_fwd_native`
    assigned to the framework's `_layer_norm_fwd`; the framework's own wrappers then run it."""
    from layernorm_native_implementation import _layer_norm_fwd_native

    m = next(m for n, m in sglang_modules.items() if n.endswith("layernorm_gated"))
    # The route is this assignment to the framework's own (private) name, so the test makes it; monkeypatch
    # undoes it afterwards. No name of gatednorm's is patched.
    monkeypatch.setattr(m, "_layer_norm_fwd", _layer_norm_fwd_native)
    x, z, w, _ = make_inputs(12, 64, seed=3)
    y = m.rms_norm_gated(x=x, weight=w, bias=None, z=z, group_size=16, norm_before_gate=False, is_rms_norm=True)
    check_forward(y, None, None, x, w, None, z, 1e-6, 16, False, True, stats=False)


# --------------------------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_modules():
    if package_root("vllm") is None:
        pytest.skip("vllm is not installed")
    pytest.importorskip("triton")
    with upstream_modules("vllm", VLLM_PACKAGES, vllm_stubs(), VLLM_MODULES) as mods:
        yield [*mods, vllm_mixer2_module(mods[2])]


def test_vllm_layernorm_guard_and_custom_op(vllm_modules):
    guard, layernorm = vllm_modules[:2]
    cls = layernorm.RMSNormGated
    snap = snapshot(guard, guard.RMSNormGated, cls)
    x, z, w, _ = make_inputs(10, 128, seed=4)
    built_before = cls(128, group_size=64)  # its _forward_method is bound to vLLM's original forward_cuda
    with gatednorm.patch("vllm"):
        assert "forward" in vars(cls)
        for mod in (built_before, cls(128, group_size=64)):
            assert mod.norm_before_gate is False  # vLLM's default
            y = mod(x, z)
            check_forward(y, None, None, x, mod.weight, None, z, mod.eps, 64, False, True, stats=False)
        y = built_before.forward_native(x, z)
        assert _calls("RMSNormGated.forward_native") >= 2 and _calls("forward_cuda") >= 1
        y = guard.rmsnorm_fn(x, w, None, z, 1e-6, 32, True, "sigmoid")
        check_forward(y, None, None, x, w, None, z, 1e-6, 32, True, True, "sigmoid", stats=False)
        y, mean, rstd = guard.layer_norm_fwd(x, w, None, 1e-6, z=z, is_rms_norm=True)
        assert mean is None and rstd.shape == (10,)
        gmod = guard.RMSNormGated(128, group_size=32)
        check_forward(gmod(x, z), None, None, x, gmod.weight, None, z, gmod.eps, 32, False, True, stats=False)
    assert_restored(snap)
    assert "forward" not in vars(cls)


def test_vllm_mamba_ops_copy(vllm_modules):
    """vLLM's copy of mamba_ssm's kernel file (its Mamba2 mixer's ``rms_norm_gated``): both functions replaced,
    a module that imported ``rms_norm_gated`` by name (as mamba_mixer2.py does) rebound while patched, all
    restored after."""
    m = vllm_modules[2]
    snap = snapshot(m)
    original = m.rms_norm_gated
    mixer_file = types.ModuleType("vllm_mixer_like_for_test")
    mixer_file.rms_norm_gated = original  # `from ...mamba.ops.layernorm_gated import rms_norm_gated`
    sys.modules[mixer_file.__name__] = mixer_file
    try:
        x2, z2, w, _ = make_inputs(18, 128, seed=8)
        with gatednorm.patch("vllm"):
            assert mixer_file.rms_norm_gated is m.rms_norm_gated is not original
            # as Mixer2RMSNormGated.forward_cuda calls it: one group, the gate first, (batch, tokens, features)
            y = mixer_file.rms_norm_gated(x2.reshape(6, 3, 128), w, bias=None, z=z2.reshape(6, 3, 128), eps=1e-5,
                                          norm_before_gate=False)
            assert y.shape == (6, 3, 128)
            check_forward(y.reshape(18, 128), None, None, x2, w, None, z2, 1e-5, None, False, True, stats=False)
            y, mean, rstd = m._layer_norm_fwd(x2, w, None, 1e-6, z=z2, group_size=32, is_rms_norm=True)
            assert mean is None and rstd.shape == (18 * 4,)
            check_forward(y, mean, rstd, x2, w, None, z2, 1e-6, 32, True, True)
            assert _calls("layernorm_gated.rms_norm_gated") == 1 and _calls("layernorm_gated._layer_norm_fwd") == 1
        assert mixer_file.rms_norm_gated is original
        assert_restored(snap)
    finally:
        del sys.modules[mixer_file.__name__]


def test_vllm_mixer2_norm(vllm_modules, monkeypatch):
    """vLLM's Mamba2 mixer norm (the installed class, executed alone): what _check_mixer2 says, through the
    CustomOp's forward_cuda (forward_native by name for several groups, the rebound rms_norm_gated for one); an
    instance vLLM bound to the original forward_native before the patch is routed by the added forward."""
    cls = vllm_modules[4].Mixer2RMSNormGated
    _check_mixer2(cls, "vllm", monkeypatch)
    x, z, _, _ = make_inputs(4, 128, seed=13)
    bound_early = cls(128, 4)
    bound_early._forward_method = bound_early.forward_native  # custom op disabled: vLLM binds forward_native
    _assert_kept_native_routed(cls, "vllm", bound_early, x, z)


def test_vllm_fused_norm_gate_copy_and_kda_custom_op(vllm_modules):
    """vLLM's fla fused_norm_gate copy (Kimi Linear's, Bailing-MoE v3's ``o_norm``): both ``rms_norm_gated`` (in
    fused_norm_gate and in kda), and ``kda.FusedRMSNormGated``, a CustomOp re-exported by fused_norm_gate, with
    instances built before the patch; residual / prenorm and a (T, H, D) gate; all restored after."""
    fused = vllm_modules[3]
    kda = sys.modules["vllm.third_party.flash_linear_attention.ops.kda"]
    cls = kda.FusedRMSNormGated
    assert fused.FusedRMSNormGated is cls
    snap = snapshot(fused, kda, cls)
    x, z, w, _ = make_inputs(12, 64, seed=9)
    r = torch.randn_like(x)
    built_before = cls(64, activation="sigmoid")
    with torch.no_grad():
        built_before.weight.copy_(w)
    with gatednorm.patch("vllm"):
        assert "forward" in vars(cls)
        for mod in (built_before, cls(64, activation="sigmoid")):
            with torch.no_grad():
                mod.weight.copy_(w)
            y = mod(x, z)
            check_forward(y, None, None, x, w, None, z, mod.eps, None, True, True, "sigmoid", stats=False)
        # the instance built before: its bound original sent to ours (forward_native's); the new one binds ours
        assert _calls("FusedRMSNormGated.forward_native") == 1 and _calls("FusedRMSNormGated.forward_cuda") == 1
        for m in (fused, kda):
            # (T, H, D) gate for (T * H, D) rows, as the KDA layers pass them; the residual summed first
            y, res = m.rms_norm_gated(x, z.reshape(4, 3, 64), w, None, "swish", residual=r, prenorm=True, eps=1e-5)
            check_forward(y, None, None, x + r, w, None, z, 1e-5, None, True, True, stats=False)
            assert torch.equal(res, x + r)
        # no weight, (T, H, D) rows and gate, as vLLM's muse_spark model calls fused_norm_gate's
        y = fused.rms_norm_gated(x.reshape(4, 3, 64), z.reshape(4, 3, 64), None, None, "sigmoid", eps=1e-5)
        check_forward(y.reshape(12, 64), None, None, x, torch.ones_like(w), None, z, 1e-5, None, True, True,
                      "sigmoid", stats=False)
        assert _calls("fused_norm_gate.rms_norm_gated") == 2 and _calls("kda.rms_norm_gated") == 1
    assert_restored(snap)
    assert "forward" not in vars(cls)


def test_vllm_patch_survives_a_kernel_copy_that_fails_to_import(vllm_modules, monkeypatch):
    """A vLLM build whose KDA file fails to import (it pulls in vLLM's delta-rule kernels) still gets its main
    gated norm patched: both fused_norm_gate copies (fused_norm_gate imports kda) are left alone, named in
    ``handle.skipped`` with the import error, and a RuntimeWarning says so; all restored after."""
    from gatednorm.integrations import vllm as vllm_plan

    guard = vllm_modules[0]
    snap = snapshot(guard)
    kda_path = vllm_plan.FUSED_NORM_GATE[1]
    for path in vllm_plan.FUSED_NORM_GATE:
        monkeypatch.delitem(sys.modules, path)

    class _BrokenKda:
        def find_spec(self, name, path=None, target=None):
            if name == kda_path:
                raise ImportError("kda kernels need another triton (simulated)")
            return None

    monkeypatch.setattr(sys, "meta_path", [_BrokenKda(), *sys.meta_path])
    x, z, w, _ = make_inputs(10, 128, seed=11)
    with pytest.warns(RuntimeWarning, match="not patched") as warned, gatednorm.patch("vllm") as handle:
        assert set(handle.skipped) == set(vllm_plan.FUSED_NORM_GATE)
        assert all("simulated" in why for why in handle.skipped.values())
        y = guard.rmsnorm_fn(x, w, None, z, 1e-6, 32, True, "sigmoid")
        check_forward(y, None, None, x, w, None, z, 1e-6, 32, True, True, "sigmoid", stats=False)
        assert _calls("layernorm_guard.rmsnorm_fn") == 1
    # one warning per skipped copy, each naming its module
    assert sorted(str(m.message).split()[1] for m in warned) == sorted(vllm_plan.FUSED_NORM_GATE)
    assert_restored(snap)


def test_vllm_patch_survives_a_mixer_file_whose_import_raises(vllm_modules, monkeypatch):
    """The Mamba2 mixer's file imports much of vLLM, whose modules can raise more than ImportError at import (a
    platform or config check): any exception leaves only that file unpatched, named in ``handle.skipped``, with a
    RuntimeWarning; the rest of vLLM is patched; all restored after."""
    from gatednorm.integrations import vllm as vllm_plan

    guard = vllm_modules[0]
    snap = snapshot(guard, vllm_modules[4].Mixer2RMSNormGated)
    monkeypatch.delitem(sys.modules, vllm_plan.MIXER2)

    class _RaisingMixer:
        def find_spec(self, name, path=None, target=None):
            if name == vllm_plan.MIXER2:
                raise RuntimeError("no platform detected (simulated)")
            return None

    monkeypatch.setattr(sys, "meta_path", [_RaisingMixer(), *sys.meta_path])
    x, z, w, _ = make_inputs(10, 128, seed=14)
    with pytest.warns(RuntimeWarning, match="not patched") as warned, gatednorm.patch("vllm") as handle:
        assert list(handle.skipped) == [vllm_plan.MIXER2] and "simulated" in handle.skipped[vllm_plan.MIXER2]
        y = guard.rmsnorm_fn(x, w, None, z, 1e-6, 32, True, "sigmoid")
        check_forward(y, None, None, x, w, None, z, 1e-6, 32, True, True, "sigmoid", stats=False)
        assert _calls("layernorm_guard.rmsnorm_fn") == 1
    assert [str(m.message).split()[1] for m in warned] == [vllm_plan.MIXER2]
    assert_restored(snap)


# ---------------------------------------------------------------------------------------- mamba_ssm


@pytest.fixture(scope="module")
def mamba_module():
    if package_root("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not installed")
    pytest.importorskip("triton")
    pytest.importorskip("einops")
    with upstream_modules("mamba_ssm", MAMBA_PACKAGES, {}, MAMBA_MODULES) as mods:
        yield mods[0]


def test_mamba_ssm_forward_backward_modules(mamba_module):
    m = mamba_module
    snap = snapshot(m, m.LayerNormFn, m.RMSNorm, m.LayerNorm)
    x, z, w, b = make_inputs(7, 96, seed=5)
    with gatednorm.patch("mamba_ssm"):
        y, mean, rstd = m._layer_norm_fwd(x, w, None, 1e-6, z=z, group_size=48, is_rms_norm=True)
        assert mean is None
        check_forward(y, mean, rstd, x, w, None, z, 1e-6, 48, True, True)
        dy = torch.randn_like(x)
        dx, dw, db, dz = m._layer_norm_bwd(dy, x, w, None, 1e-6, None, rstd, z, 48, True, True)
        assert db is None
        check_gradients((dx, dz, dw, None), x, w, None, z, dy, 1e-6, 48, True, True)
        mod = m.RMSNorm(96, group_size=32)  # mamba_ssm: norm_before_gate=True by default
        xr = x.clone().requires_grad_()
        out = mod(xr, z)
        check_forward(out, None, None, x, mod.weight, None, z, 1e-5, 32, True, True, stats=False)
        out.sum().backward()
        assert mod.weight.grad is not None
        y = m.layernorm_fn(x, w, b, z, 1e-6, None, False, False)
        check_forward(y, None, None, x, w, b, z, 1e-6, None, False, False, stats=False)
        xr = x.clone().requires_grad_()
        m.LayerNormFn.apply(xr, w, b, z, 1e-6, 32, True, False).backward(dy)
        check_gradients((xr.grad, None, None, None), x, w, b, z, dy, 1e-6, 32, True, False)
        assert _calls("_layer_norm_bwd") == 1 and _calls("LayerNormFn.forward") == 1
        assert _calls("RMSNorm.forward") == 1 and _calls("layernorm_fn") == 1
    assert_restored(snap)


def test_route1_mamba_ssm_with_native_forward(mamba_module, monkeypatch):
    from layernorm_native_implementation import _layer_norm_fwd_native

    # route 1 is this assignment to the framework's own name (see the sglang test above)
    monkeypatch.setattr(mamba_module, "_layer_norm_fwd", _layer_norm_fwd_native)
    x, z, w, _ = make_inputs(9, 64, seed=6)
    with torch.no_grad():  # mamba_ssm's backward kernel needs CUDA; its forward now runs natively
        y = mamba_module.rmsnorm_fn(x, w, None, z, group_size=32, norm_before_gate=False)
    check_forward(y, None, None, x, w, None, z, 1e-6, 32, False, True, stats=False)


# ------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next, modeling_mamba2


def test_transformers_qwen3_next_model_sized(hf):
    q, _ = hf
    cls = q.Qwen3NextRMSNormGated
    snap = snapshot(cls)
    g = torch.Generator().manual_seed(7)
    b, t, h, d = 2, 16, 32, 128
    x = torch.randn(b, t, h, d, generator=g)
    z = torch.randn(b, t, h, d, generator=g)
    norm = cls(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
    ref = _ref(x.reshape(-1, d), norm.weight, None, z.reshape(-1, d), 1e-6, None, True, True)[0]
    w32 = norm.weight.detach().clone()
    expected_unpatched = norm(x.reshape(-1, d), z.reshape(-1, d))
    keys = set(norm.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        nd = norm.to(dtype)
        with gatednorm.patch("transformers"):
            y = nd(x.reshape(-1, d).to(dtype), z.reshape(-1, d).to(dtype))
            assert set(nd.state_dict()) == keys
        assert y.dtype == dtype
        check_forward(y, None, None, x.reshape(-1, d).to(dtype), nd.weight, None, z.reshape(-1, d).to(dtype), 1e-6,
                      None, True, True, stats=False)
        if dtype == torch.float32:  # upstream agrees with float64 too
            check_forward(expected_unpatched, None, None, x.reshape(-1, d), w32, None, z.reshape(-1, d), 1e-6,
                          None, True, True, stats=False)
            # kept: the model allows more than this earlier bound on this data (up to 1.14e-5)
            assert max_rel_error(expected_unpatched, ref) < 1e-5
    assert _calls("Qwen3NextRMSNormGated.forward") == 2
    assert_restored(snap)


def test_transformers_mamba2_gate_before_norm_and_dtype(hf):
    _, mb = hf
    cls = mb.MambaRMSNormGated
    g = torch.Generator().manual_seed(8)
    n = 128
    kwargs = {"group_size": 32} if "group_size" in cls.__init__.__code__.co_varnames else {}
    norm = cls(n, eps=1e-5, **kwargs)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
    gs = getattr(norm, "group_size", None)  # releases without it normalise over the whole row
    x = torch.randn(4, 6, n, generator=g).to(torch.bfloat16)
    z = torch.randn(4, 6, n, generator=g).to(torch.bfloat16)
    up = norm(x, z)  # upstream: fp32 weight times a bf16 result -> fp32
    with gatednorm.patch("transformers"):
        y = norm(x, z)
        y_nogate = norm(x)
    assert y.dtype == up.dtype == torch.float32
    check_forward(y, None, None, x, norm.weight, None, z, 1e-5, gs, False, True, out_dtype=torch.float32, stats=False)
    # upstream rounds to bf16 once in between, which the model's float32 pair bound does not cover: the
    # earlier bound against upstream's own output, kept
    assert max_rel_error(y, up) < TOL[torch.bfloat16]
    check_forward(y_nogate, None, None, x, norm.weight, None, None, 1e-5, gs, False, True, out_dtype=torch.float32,
                  stats=False)


def test_transformers_every_patched_class_matches_its_own_forward_in_float64(hf):
    """Each family's replacement computes what the class's own forward computes (checked in float64)."""
    h = gatednorm.patch("transformers")
    try:
        classes = sorted({r.split(": ")[1].rsplit(".", 1)[0] for r in h.replaced if not r.endswith("(imported name)")})
    finally:
        h.undo()
    assert any(c.endswith("Qwen3NextRMSNormGated") for c in classes)
    g = torch.Generator().manual_seed(9)
    for path in classes:
        mod_name, cls_name = path.rsplit(".", 1)
        cls = getattr(sys.modules[mod_name], cls_name)
        n = 64
        try:
            norm = cls(n, eps=1e-5)
        except TypeError:
            norm = cls(n, 16, eps=1e-5)  # Mamba2-style: (hidden_size, group_size)
        norm = norm.double()
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
        x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
        z = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
        # upstream computes in fp32 even for float64 input; compare at fp32 accuracy. Kept as max_rel_error: the
        # reference is upstream's own output, and each class's group size and flags are not known here
        want = norm(x, z)
        with gatednorm.patch("transformers"):
            got = norm(x, z)
        assert got.dtype == want.dtype, cls_name
        assert max_rel_error(got, want) < 1e-5, cls_name
