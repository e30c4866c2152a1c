"""Eager plans (docs/design.md, "Eager plans"): a repeated inference call skips the argument checks and
backend resolution through its signature's cached plan. These tests prove the plan computes what the full
path computes, never serves a call the full path would reject or route elsewhere, and follows the
environment and the registry. The triton plan's launches are compared bit for bit on a GPU
(tests/test_gpu.py::test_forward_plan_matches_plain_launch)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import RecordingBackend, check_forward, forget_forward_launch_shapes, make_inputs

import gatednorm
import gatednorm.functional as functional
from gatednorm import ops
from gatednorm.backends.base import GradsNeeded
from gatednorm.backends.native_cpu import NativeCPUBackend

#: torch's current-stream getter as the C++ entry was set up with it, read before any test stands in for it
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


@pytest.fixture(autouse=True)
def _fresh_plans():
    ops._PLANS.clear()
    yield
    ops._PLANS.clear()


@pytest.fixture
def count_prepare(monkeypatch):
    """How often the full path's argument checks ran (a planned call runs none)."""
    calls = []
    real = functional.prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "prepare", counting)
    return calls


def _full_path(x, w, b, z, eps, gs, nbg, is_rms):
    """The unplanned computation: prepare, then the internal entry point (what layer_norm_fwd runs)."""
    call = gatednorm.spec.prepare(x, w, b, z, eps, gs, nbg, is_rms, "swish", regroup_heads=True)
    y, mean, rstd = ops.gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, backend="native")
    return y.view_as(x), mean, rstd


@pytest.mark.parametrize(("shape", "gs", "nbg", "is_rms", "bias", "dtype", "z_layout"), [
    ((37, 128), 32, True, True, False, torch.bfloat16, "rows"),
    ((3, 5, 96), None, False, False, True, torch.float32, "rows"),      # 3-D, one group, gate before the norm
    ((19, 64), 16, True, False, True, torch.float16, "strided"),        # z a slice of a wider projection
    ((11, 48), 24, True, True, True, torch.float64, "none"),
    ((64,), None, True, True, False, torch.float32, "rows"),            # 1-D: one row
])
def test_planned_calls_equal_the_full_path(shape, gs, nbg, is_rms, bias, dtype, z_layout, count_prepare):
    """Second and later calls of a signature go through its plan (no argument checks run) and give the full
    path's bits, also for another M of the same signature."""
    n = shape[-1]
    for rows in (shape[:-1], (shape[0] + 5, *shape[1:-1]) if len(shape) > 1 else shape[:-1]):
        x, z, w, b = make_inputs(int(torch.tensor(rows).prod()), n, dtype, bias=bias, seed=len(rows) + n)
        x = x.view(*rows, n)
        if z_layout == "strided":
            z = torch.cat([z, torch.randn_like(z)], dim=-1)[:, n:]
        z = None if z_layout == "none" else z.reshape(x.shape) if z_layout == "rows" else z
        ref = _full_path(x, w, b, z, 1e-5, gs, nbg, is_rms)
        kw = dict(z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=is_rms)
        with torch.no_grad():
            gatednorm.layer_norm_fwd(x, w, b, 1e-5, **kw)
            count_prepare.clear()
            got = gatednorm.layer_norm_fwd(x, w, b, 1e-5, **kw)
            y_fn = gatednorm.layernorm_fn(x, w, b, z, 1e-5, gs, nbg, is_rms)
            y_mod_kw = dict(group_size=gs, norm_before_gate=nbg, eps=1e-5, device="cpu", dtype=dtype)
        assert count_prepare == [], "a repeated call ran the argument checks: no plan served it"
        assert got[0].shape == x.shape and torch.equal(got[0], ref[0]) and torch.equal(y_fn, ref[0])
        assert (got[1] is None) == is_rms and (is_rms or torch.equal(got[1], ref[1]))
        assert torch.equal(got[2], ref[2])
    module = (gatednorm.RMSNorm if is_rms else gatednorm.LayerNorm)(n, **y_mod_kw)
    if not bias:
        module.bias = None
    with torch.no_grad():
        module.weight.copy_(w)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(b)
        for _ in range(2):
            assert torch.equal(module(x, z), _full_path(x, module.weight, module.bias, z, 1e-5, gs, nbg, is_rms)[0])


def test_cpu_kernel_plan_serves_small_calls_with_the_full_paths_bits(monkeypatch):
    """The native backend's CPU plan (KernelForwardPlan: the C kernel's call decided per signature) serves the
    repeated calls of one block of rows, with the full path's bits: strided x rows, a 3-D contiguous x with a
    gate before the norm, LayerNorm with bias, rows whose groups are out of the float32 range (redone by the
    rescue), float32; calls above the block size, and every call once GATEDNORM_CPU_KERNEL=0 is set, are left
    to the backend's forward (the switch read on every call). Calls are served by the plan's Python or, once the
    CPU node's extension is loaded, by its C++ forward (native_cpu_node.served_plain), which leaves a call with a
    group out of range to the Python (its rescue)."""
    from gatednorm.backends import native_cpu_kernel, native_cpu_node

    if not native_cpu_kernel.ready():
        pytest.skip("the CPU kernel is not built here")
    served = []
    real = native_cpu_kernel.planned_forward
    monkeypatch.setattr(native_cpu_kernel, "planned_forward",
                        lambda *args: served.append(args[-1]) or real(*args))
    wide = make_inputs(9, 256, torch.bfloat16, seed=1)[0]
    huge = make_inputs(6, 64, torch.bfloat16, seed=2)[0]
    huge[2] *= 1e30  # its statistics overflow float32: the rescue redoes the row
    cases = [
        (wide[:, :128], torch.randn(9, 128).bfloat16(), 32, True, True, False),  # x rows strided (a slice)
        (torch.randn(2, 3, 96), torch.randn(2, 3, 96), None, False, False, True),  # 3-D, gate before, float32
        (huge, torch.randn(6, 64).bfloat16(), 16, True, False, True),  # LayerNorm + bias, a row rescued
        (torch.randn(400, 128).bfloat16(), torch.randn(400, 128).bfloat16(), 64, True, True, False),  # > one block
    ]
    for x, z, gs, nbg, is_rms, bias in cases:
        n = x.shape[-1]
        w = (1 + 0.1 * torch.randn(n)).to(x.dtype)
        b = torch.randn(n).to(x.dtype) if bias else None
        kw = dict(z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=is_rms)
        ref = _full_path(x, w, b, z, 1e-5, gs, nbg, is_rms)
        served.clear()
        before = native_cpu_node.served_plain()
        with torch.no_grad():
            got = [gatednorm.layer_norm_fwd(x, w, b, 1e-5, **kw) for _ in range(2)]
        small = x.numel() <= ops._impl_for("native", x.reshape(-1, n)).block_elements
        in_cxx = native_cpu_node.served_plain() - before
        assert len(served) + in_cxx == (2 if small else 0) and set(served) <= {x.numel() // n}, (x.shape, served)
        assert not (x is huge and in_cxx), "a row out of range goes to the Python plan's rescue"
        for out in got:
            assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
            assert (out[1] is None) == is_rms and (is_rms or torch.equal(out[1], ref[1]))
        if x is huge:
            assert torch.isfinite(got[1][0][2]).all() and got[1][2][2] < 1e-20  # the rescued row
    x, z, gs, nbg, is_rms, bias = cases[0]
    w = (1 + 0.1 * torch.randn(128)).bfloat16()
    kw = dict(z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=is_rms)
    with torch.no_grad():
        gatednorm.layer_norm_fwd(x, w, None, 1e-5, **kw)
        monkeypatch.setenv("GATEDNORM_CPU_KERNEL", "0")
        served.clear()
        got = gatednorm.layer_norm_fwd(x, w, None, 1e-5, **kw)
        ref = _full_path(x, w, None, z, 1e-5, gs, nbg, is_rms)
    assert served == [] and torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])


def test_plans_serve_only_calls_the_full_path_accepts():
    """After a signature is planned, calls that differ in any checked way raise what the full path raises
    (each has another key, or fails the plan's own per-call check of z's shape)."""
    x, z, w, b = make_inputs(6, 64, torch.float32, seed=3)
    with torch.no_grad():
        for _ in range(2):
            gatednorm.rmsnorm_fn(x, w, None, z, group_size=16)
        assert ops._PLANS
        bad = [
            (ValueError, "weight must have shape", lambda: gatednorm.rmsnorm_fn(x, w[:32], None, z)),
            (ValueError, "z must have x's shape", lambda: gatednorm.rmsnorm_fn(x, w, None, z[:, :32])),
            (ValueError, "z must have x's shape", lambda: gatednorm.rmsnorm_fn(x, w, None, z[:3], group_size=16)),
            (ValueError, "eps", lambda: gatednorm.rmsnorm_fn(x, w, None, z, eps=-1.0, group_size=16)),
            (ValueError, "group_size", lambda: gatednorm.rmsnorm_fn(x, w, None, z, group_size=24)),
            (TypeError, "group_size", lambda: gatednorm.rmsnorm_fn(x, w, None, z, group_size=16.0)),
            (TypeError, "norm_before_gate", lambda: gatednorm.rmsnorm_fn(x, w, None, z, 1e-6, 16, 1)),
            (ValueError, "activation", lambda: gatednorm.rmsnorm_fn(x, w, None, z, group_size=16, activation="relu")),
            (ValueError, "backend", lambda: gatednorm.rmsnorm_fn(x, w, None, z, group_size=16, backend="nope")),
            (TypeError, "weight", lambda: gatednorm.rmsnorm_fn(x, w.tolist(), None, z, group_size=16)),
            (TypeError, "x", lambda: gatednorm.rmsnorm_fn(x.int(), w, None, z, group_size=16)),
            (ValueError, "0-d", lambda: gatednorm.rmsnorm_fn(x[0, 0], w, None, None)),
            (TypeError, "residual_in_fp32", lambda: gatednorm.rmsnorm_fn(x, w, None, z, group_size=16,
                                                                        residual_in_fp32=1)),
        ]
        for exc, words, call in bad:
            with pytest.raises(exc, match=words):
                call()


def test_plans_follow_the_environment_and_the_registry(monkeypatch):
    """The backend variables are part of a plan's key (read on every call, as settings.py promises), and a
    registry change drops every plan, so an override serves the very next call."""
    x, z, w, _ = make_inputs(4, 32, torch.float32, seed=4)
    with torch.no_grad():
        for _ in range(2):
            gatednorm.rmsnorm_fn(x, w, None, z)
        monkeypatch.setenv("GATEDNORM_BACKEND", "bogus")
        with pytest.raises(ValueError, match="GATEDNORM_BACKEND"):
            gatednorm.rmsnorm_fn(x, w, None, z)
        monkeypatch.setenv("GATEDNORM_BACKEND", "compiled")
        monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")
        rec = RecordingBackend(NativeCPUBackend())
        with ops.override_impl("native", "cpu", rec):
            gatednorm.rmsnorm_fn(x, w, None, z)
            gatednorm.rmsnorm_fn(x, w, None, z)
        assert [c[0] for c in rec.seen] == ["forward", "forward"]
        gatednorm.rmsnorm_fn(x, w, None, z)
        assert len(rec.seen) == 2, "a plan outlived the override it resolved"


def _full_path_grads(x, w, b, z, eps, gs, nbg, is_rms, dy):
    """y and the gradients of the unplanned computation (prepare, then gated_norm_rows under autograd)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, z)]
    xl, wl, bl, zl = leaves
    call = gatednorm.spec.prepare(xl, wl, bl, zl, eps, gs, nbg, is_rms, "swish", regroup_heads=True)
    y = ops.gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, backend="native")[0].view_as(xl)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize(("shape", "gs", "nbg", "is_rms", "bias"), [
    ((23, 64), 16, True, True, False),
    ((2, 7, 96), 32, False, False, True),
])
def test_differentiable_planned_calls_equal_the_full_path(shape, gs, nbg, is_rms, bias, count_prepare):
    """With inputs that require grad, a repeated call runs GatedNormFunction with the plan deciding both
    directions (no argument checks run): y and every gradient equal the full path's bits."""
    n = shape[-1]
    m = int(torch.tensor(shape[:-1]).prod())
    x, z, w, b = make_inputs(m, n, torch.float32, bias=bias, seed=m)
    x, z = x.view(shape), z.view(shape)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ref_y, ref_grads = _full_path_grads(x, w, b, z, 1e-5, gs, nbg, is_rms, dy)
    for call in range(2):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, z)]
        xl, wl, bl, zl = leaves
        count_prepare.clear()
        y = gatednorm.layernorm_fn(xl, wl, bl, zl, 1e-5, gs, nbg, is_rms)
        assert call == 0 or count_prepare == [], "a repeated differentiable call ran the argument checks"
        y.backward(dy)
        assert torch.equal(y.detach(), ref_y)
        for got, ref in zip([None if t is None else t.grad for t in leaves], ref_grads, strict=True):
            assert (got is None) == (ref is None) and (got is None or torch.equal(got, ref))
    # double backward through the plan (the call's signature is planned by now) as through the full path
    second = []
    for planned in (True, False):
        xl = x.detach().clone().requires_grad_()
        if planned:
            y = gatednorm.layernorm_fn(xl, w, b, z, 1e-5, gs, nbg, is_rms)
        else:
            call = gatednorm.spec.prepare(xl, w, b, z, 1e-5, gs, nbg, is_rms, "swish", regroup_heads=True)
            y = ops.gated_norm_rows(call.x2d, w, b, call.z2d, call.spec, backend="native")[0].view_as(xl)
        (g,) = torch.autograd.grad(y, xl, dy, create_graph=True)
        g.square().sum().backward()
        second.append(xl.grad)
    assert torch.equal(second[0], second[1]) and bool(second[0].abs().sum() > 0)


def _small_differentiable_cases(gen: torch.Generator):
    """Differentiable CPU calls for the C kernel's eager plans, as (x, weight, bias, z, group size, norm before gate,
    rms, dy, dy expanded): bf16 rows strided (a slice) with a gate after the norm, a 3-D float32 call with a gate
    before it, LayerNorm with bias and dy in float32 for bf16 x, a dy without unit feature stride, more than one
    block of rows."""
    wide = torch.randn(9, 256, generator=gen).bfloat16()
    cases = [  # x, z, group size, norm before gate, rms, bias, dy dtype, dy expanded
        (wide[:, :128], torch.randn(9, 128, generator=gen).bfloat16(), 32, True, True, False, None, False),
        (torch.randn(2, 3, 96, generator=gen), torch.randn(2, 3, 96, generator=gen), None, False, False, True, None,
         False),
        (torch.randn(6, 64, generator=gen).bfloat16(), torch.randn(6, 64, generator=gen).bfloat16(), 16, True, False,
         True, torch.float32, False),
        (torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen), 16, True, True, False, None, True),
        (torch.randn(400, 128, generator=gen).bfloat16(), torch.randn(400, 128, generator=gen).bfloat16(), 64, True,
         True, False, None, False),
    ]
    for x, z, gs, nbg, is_rms, bias, dy_dtype, expanded in cases:
        n = x.shape[-1]
        w = (1 + 0.1 * torch.randn(n, generator=gen)).to(x.dtype)
        b = torch.randn(n, generator=gen).to(x.dtype) if bias else None
        dy = torch.randn(x.shape, generator=gen).to(dy_dtype or x.dtype)
        yield x, w, b, z, gs, nbg, is_rms, (dy[..., :1].expand(x.shape) if expanded else dy), expanded


def _twice_equal_the_full_path(x, w, b, z, gs, nbg, is_rms, dy, ref_y, ref_grads) -> None:
    """Two differentiable layernorm_fn calls (the first plans the signature, the second runs the plans): y and every
    gradient bit for bit the full path's (ref_y, ref_grads from _full_path_grads)."""
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, z)]
        y = gatednorm.layernorm_fn(*leaves[:3], leaves[3], 1e-5, gs, nbg, is_rms)
        y.backward(dy)
        assert torch.equal(y.detach(), ref_y)
        for got, ref in zip([None if t is None else t.grad for t in leaves], ref_grads, strict=True):
            assert (got is None) == (ref is None) and (got is None or torch.equal(got, ref)), (x.shape, got, ref)


def test_cpu_kernel_backward_plan_serves_small_calls_with_the_full_paths_bits(monkeypatch):
    """The native backend's CPU backward plan (KernelBackwardPlan) serves the backward of repeated differentiable
    calls of one block of rows, with the full path's bits for every gradient: bf16 x rows strided (a slice) with
    a gate after the norm, a 3-D float32 call with a gate before it, LayerNorm with bias and dy in float32 for bf16
    x; it declines, leaving the backend's backward to run (the same bits), a dy without unit feature stride, calls
    above the block size and every call once GATEDNORM_CPU_KERNEL=0 is set."""
    from gatednorm.backends import native_cpu_kernel

    if not native_cpu_kernel.ready():
        pytest.skip("the CPU kernel is not built here")
    monkeypatch.setenv("GATEDNORM_CPU_NODE", "0")  # the Python plans' Function (the C++ node: test_cpu_node_*)
    served = []
    real = native_cpu_kernel.planned_backward
    monkeypatch.setattr(native_cpu_kernel, "planned_backward", lambda *args: served.append(args[2].shape[0])
                        or real(*args))
    gen = torch.Generator().manual_seed(28)
    for x, w, b, z, gs, nbg, is_rms, dy, expanded in _small_differentiable_cases(gen):
        n = x.shape[-1]
        m = x.numel() // n
        ref_y, ref_grads = _full_path_grads(x, w, b, z, 1e-5, gs, nbg, is_rms, dy)
        served.clear()
        _twice_equal_the_full_path(x, w, b, z, gs, nbg, is_rms, dy, ref_y, ref_grads)
        small = x.numel() <= ops._impl_for("native", x.reshape(-1, n)).block_elements
        assert served == ([m] * 2 if small and not expanded else []), (x.shape, served)
    x, w, _, z, gs, _, _, dy, _ = next(_small_differentiable_cases(gen))  # bf16 rows, a gate after, RMSNorm
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, z)]
    gatednorm.rmsnorm_fn(leaves[0], leaves[1], None, z=leaves[2], group_size=gs).backward(dy)
    monkeypatch.setenv("GATEDNORM_CPU_KERNEL", "0")
    served.clear()
    ref_y, ref_grads = _full_path_grads(x, w, None, z, 1e-6, gs, True, True, dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, z)]
    gatednorm.rmsnorm_fn(leaves[0], leaves[1], None, z=leaves[2], group_size=gs).backward(dy)
    refs = (ref_grads[0], ref_grads[1], ref_grads[3])  # x, weight, z (no bias)
    assert served == [] and all(torch.equal(t.grad, ref) for t, ref in zip(leaves, refs, strict=True))


def _cpu_node_or_skip():
    """native_cpu_node, its extension built and loaded now (not on the background thread), or a skip."""
    from gatednorm.backends import native_cpu_kernel, native_cpu_node

    if not native_cpu_kernel.ready() or native_cpu_node.extension() is None:
        pytest.skip(f"the CPU node is not in use here: {native_cpu_node.status()}")
    return native_cpu_node


def _served_since(node, before: tuple[int, int]) -> tuple[int, int]:
    now = node.served()
    return now[0] - before[0], now[1] - before[1]


def test_cpu_node_serves_small_differentiable_calls_with_the_full_paths_bits():
    """Differentiable calls of one block of rows whose plans the C kernel serves run through the C++ node
    (native_cpu_node.cpp, GatedNormCPUBackward), first call of a signature included: y and every gradient equal
    the full path's bits (bf16 rows strided, gate after; 3-D float32, gate before; LayerNorm with bias and dy in
    float32 for bf16 x). A dy without unit feature stride goes to the Function's backward (the forward still the
    node's), a call above one block to the Function both ways. The same calls without autograd: the plan's forward
    in C++ (``forward``), the same bits."""
    node = _cpu_node_or_skip()
    gen = torch.Generator().manual_seed(29)
    for x, w, b, z, gs, nbg, is_rms, dy, expanded in _small_differentiable_cases(gen):
        n = x.shape[-1]
        ref_y, ref_grads = _full_path_grads(x, w, b, z, 1e-5, gs, nbg, is_rms, dy)
        before = node.served()
        _twice_equal_the_full_path(x, w, b, z, gs, nbg, is_rms, dy, ref_y, ref_grads)
        small = x.numel() <= ops._impl_for("native", x.reshape(-1, n)).block_elements
        assert _served_since(node, before) == ((2, 0 if expanded else 2) if small else (0, 0)), x.shape
        plain = node.served_plain()
        with torch.no_grad():  # the same signature without autograd: the plan's forward in C++
            assert torch.equal(gatednorm.layernorm_fn(x, w, b, z, 1e-5, gs, nbg, is_rms), ref_y)
        assert node.served_plain() - plain == small, x.shape
    x = torch.randn(4, 64, generator=gen).bfloat16().requires_grad_()
    y = gatednorm.rmsnorm_fn(x, torch.ones(64).bfloat16(), None, group_size=32)
    assert y.grad_fn.name() == "GatedNormCPUBackward"


def test_cpu_node_leaves_to_python_what_it_does_not_serve(monkeypatch):
    """The node's backward with create_graph=True is the Function's (a gradient of the gradient, bit for bit the
    same as with the node off); a call holding a group out of range runs the Python path (its rescue), right; the
    kernel switched off (GATEDNORM_CPU_KERNEL=0, read on every call) or the node (GATEDNORM_CPU_NODE=0, read when
    a signature is planned): the Function, the same bits."""
    node = _cpu_node_or_skip()
    x, z, w, _ = make_inputs(6, 64, torch.float32, seed=29)
    v = torch.randn(6, 64, generator=torch.Generator().manual_seed(30))

    def double_backward():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, z)]
        y = gatednorm.rmsnorm_fn(leaves[0], leaves[1], None, z=leaves[2], group_size=16)
        (gx,) = torch.autograd.grad(y, leaves[0], v, create_graph=True)
        (gx * v).sum().backward()
        return y.grad_fn, [t.grad for t in leaves]

    before = node.served()
    node_fn, node_grads = double_backward()
    assert node_fn.name() == "GatedNormCPUBackward" and _served_since(node, before) == (1, 0)
    monkeypatch.setenv("GATEDNORM_CPU_NODE", "0")
    ops._PLANS.clear()
    before = node.served()
    function_fn, function_grads = double_backward()
    assert function_fn.name() != "GatedNormCPUBackward" and _served_since(node, before) == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(node_grads, function_grads, strict=True))
    monkeypatch.delenv("GATEDNORM_CPU_NODE")
    ops._PLANS.clear()
    big = x.clone()
    big[2] = 3e37 * torch.randn(64, generator=torch.Generator().manual_seed(31))
    dy = torch.randn(6, 64, generator=torch.Generator().manual_seed(32))
    for inputs, off in ((big, False), (x, True)):
        if off:  # the block kernels' bits (the C kernel's e^x is its own), on the full path too
            monkeypatch.setenv("GATEDNORM_CPU_KERNEL", "0")
        ref_y, ref_grads = _full_path_grads(inputs, w, None, z, 1e-6, 16, True, True, dy)
        before = node.served()
        leaves = [t.detach().clone().requires_grad_() for t in (inputs, w, z)]
        y = gatednorm.rmsnorm_fn(leaves[0], leaves[1], None, z=leaves[2], group_size=16)
        y.backward(dy)
        assert _served_since(node, before) == (0, 0)
        assert torch.equal(y.detach(), ref_y) and torch.isfinite(y).all()
        refs = (ref_grads[0], ref_grads[1], ref_grads[3])
        assert all(torch.equal(t.grad, ref) for t, ref in zip(leaves, refs, strict=True))


def test_cpu_node_build_failure_leaves_the_function(monkeypatch):
    """A node whose build failed (no compiler, say) serves nothing and says why; the plans' Function runs, and is
    asked once per signature."""
    from gatednorm.backends import native_cpu_kernel, native_cpu_node
    from gatednorm.builds import BackgroundBuild

    if not native_cpu_kernel.ready():
        pytest.skip("the CPU kernel is not built here")
    monkeypatch.setattr(native_cpu_node, "_BUILD", BackgroundBuild("test-build", lambda: (None, "no C++ compiler")))
    assert native_cpu_node.status(build=False).startswith("not built yet")  # gatednorm info: builds nothing
    assert native_cpu_node.status() == "no C++ compiler" and native_cpu_node.served() == (0, 0)
    assert native_cpu_node.status(build=False) == "no C++ compiler"
    x, z, w, _ = make_inputs(4, 32, torch.bfloat16, seed=33)
    for _ in range(2):
        y = gatednorm.rmsnorm_fn(x.clone().requires_grad_(), w, None, z=z, group_size=16)
        assert type(y.grad_fn).__name__ == "GatedNormOutputFunctionBackward"
    (plan,) = ops._PLANS.values()
    assert plan.fused_autograd is None and plan.autograd_planner is None


def test_calls_that_discard_the_statistics_run_the_one_output_function(monkeypatch):
    """layernorm_fn, rmsnorm_fn and the modules return y only, so their differentiable calls run
    GatedNormOutputFunction (no mean / rstd outputs for autograd to wrap and track), on the full path (first
    call) and through the plan (repeated call) alike; layer_norm_fwd returns the statistics and keeps
    GatedNormFunction, with mean and rstd outside the graph. The gradients of both are compared bit for bit
    in test_differentiable_planned_calls_equal_the_full_path."""
    monkeypatch.setenv("GATEDNORM_CPU_NODE", "0")  # the plans' Functions (the node: test_cpu_node_*)
    x, z, w, b = make_inputs(12, 64, torch.float32, bias=True, seed=12)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, z)]
    module = gatednorm.RMSNorm(64, group_size=32)
    for _ in range(2):  # the first call plans, the second runs the plan
        y = gatednorm.layernorm_fn(*leaves, 1e-5, 32)
        assert type(y.grad_fn).__name__ == "GatedNormOutputFunctionBackward"
        y = gatednorm.rmsnorm_fn(leaves[0], leaves[1], None, z=leaves[3], group_size=16)
        assert type(y.grad_fn).__name__ == "GatedNormOutputFunctionBackward"
        assert type(module(leaves[0], leaves[3]).grad_fn).__name__ == "GatedNormOutputFunctionBackward"
        y, mean, rstd = gatednorm.layer_norm_fwd(leaves[0], leaves[1], leaves[2], 1e-5, z=leaves[3], group_size=32)
        assert type(y.grad_fn).__name__ == "GatedNormFunctionBackward"
        assert not mean.requires_grad and not rstd.requires_grad
        assert mean.shape == rstd.shape == (12 * 2,)
    # a (T, H, N) gate of (T*H, N) rows: plans do not serve it, gated_norm_rows runs the call
    y = gatednorm.layernorm_fn(leaves[0], leaves[1], leaves[2], leaves[3].view(4, 3, 64), 1e-5, 32)
    assert type(y.grad_fn).__name__ == "GatedNormOutputFunctionBackward"


class _TwoTileBackend:
    """The native backend with a forward plan for calls that keep the statistics and another for calls that
    discard them (PlannedBackend.plan_forward_output), each recording its name when it serves a call."""

    def __init__(self):
        self.inner = NativeCPUBackend()
        self.name, self.supports_float64 = self.inner.name, self.inner.supports_float64
        self.served: list[str] = []

    def forward(self, x, weight, bias, z, spec, out):
        return self.inner.forward(x, weight, bias, z, spec, out)

    def backward(self, dy, x, weight, bias, z, mean, rstd, spec, needs):
        return self.inner.backward(dy, x, weight, bias, z, mean, rstd, spec, needs)

    def _plan(self, name, spec):
        def launch(x, weight, bias, z):
            self.served.append(name)
            x2d = x.reshape(-1, x.shape[-1])
            y = torch.empty_like(x2d)
            mean, rstd = self.inner.forward(x2d, weight, bias, None if z is None else z.reshape(x2d.shape), spec, y)
            return y.view_as(x), mean, rstd
        return launch

    def plan_forward(self, x, weight, bias, z, spec):
        return self._plan("stats", spec)

    def plan_forward_output(self, x, weight, bias, z, spec):
        return self._plan("output", spec)


def test_calls_that_discard_the_statistics_take_the_backends_output_plan(monkeypatch):
    """A backend with plan_forward_output (the triton backend on a GPU model with an output-only launch shape,
    launch.FWD_OUTPUT_TUNED_BY_MODEL) serves layernorm_fn / rmsnorm_fn without autograd through that plan, and
    layer_norm_fwd (which returns the statistics) and differentiable calls through plan_forward's: the forward a
    backward follows keeps the training tile."""
    monkeypatch.setenv("GATEDNORM_CPU_NODE", "0")  # the plans' Functions, whose forward runs the plan
    backend = _TwoTileBackend()
    x, z, w, _ = make_inputs(12, 64, torch.float32, seed=31)
    ref = _full_path(x, w, None, z, 1e-5, 32, True, True)[0]
    with ops.override_impl("native", "cpu", backend):
        for _ in range(2):  # the first call plans, the second runs the plan
            backend.served.clear()
            with torch.no_grad():
                y_out = gatednorm.rmsnorm_fn(x, w, None, z=z, eps=1e-5, group_size=32)
                y_stats = gatednorm.layer_norm_fwd(x, w, None, 1e-5, z=z, group_size=32, is_rms_norm=True)[0]
            xg = x.detach().clone().requires_grad_()
            y_grad = gatednorm.rmsnorm_fn(xg, w, None, z=z, eps=1e-5, group_size=32)
            y_grad.sum().backward()
            assert backend.served == ["output", "stats", "stats"]
            assert torch.equal(y_out, ref) and torch.equal(y_stats, ref) and torch.equal(y_grad.detach(), ref)
            assert xg.grad is not None


def test_meta_and_empty_calls_take_the_full_path():
    """Meta tensors and empty batches keep their shapes-only handling (no plan serves them)."""
    x, z, w, b = make_inputs(5, 32, torch.float32, seed=5)
    for _ in range(2):
        ym = gatednorm.layernorm_fn(x.to("meta"), w.to("meta"), b.to("meta"), z.to("meta"), group_size=16)
        assert ym.shape == x.shape and ym.is_meta
        ye = gatednorm.layernorm_fn(x[:0], w, b, z[:0], group_size=16)
        assert ye.shape == (0, 32)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.int8 else t


@pytest.mark.parametrize(("shape", "gs", "is_rms", "bias", "quant", "k", "fmt", "round_to", "col"), [
    ((33, 256), 128, True, False, "fp8_e4m3", 128, "float32", None, False),
    ((2, 9, 256), 64, False, True, "int8", None, "float32", None, False),      # 3-D, per token
    ((40, 512), 128, True, False, "fp8_e4m3", 128, "ue8m0", torch.bfloat16, True),  # DeepGEMM's layout
    ((17, 96), None, True, True, "fp8_e4m3fnuz", 32, "float32", None, True),
])
def test_planned_quant_calls_equal_the_full_path(shape, gs, is_rms, bias, quant, k, fmt, round_to, col, monkeypatch):
    """gated_norm_quant's repeated calls go through the signature's plan (no argument checks run) and give the full
    path's codes and scales bit for bit, in the same shapes and strides (column-major scales included)."""
    checks = []
    real = functional.prepare_quant
    monkeypatch.setattr(functional, "prepare_quant", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    n = shape[-1]
    m = int(torch.tensor(shape[:-1]).prod())
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, seed=m + n)
    x, z = x.view(shape), z.view(shape)
    qkw = dict(quant=quant, quant_group_size=k, scale_format=fmt, round_to=round_to, column_major_scales=col)
    call, qspec = gatednorm.spec.prepare_quant(x, w, b, z, 1e-6, gs, True, is_rms, "swish", quant, k, fmt, round_to,
                                               col, regroup_heads=True)
    q_ref, s_ref = functional._quant_shaped(*ops.gated_norm_quant_rows(call.x2d, w, b, call.z2d, call.spec, qspec),
                                            x.shape, col)
    with torch.no_grad():
        for call_index in range(3):
            checks.clear()
            q, scale = gatednorm.gated_norm_quant(x, w, b, 1e-6, z, gs, True, is_rms, **qkw)
            assert call_index == 0 or checks == [], "a repeated call ran the argument checks"
            assert q.shape == q_ref.shape and q.stride() == q_ref.stride() and torch.equal(_bits(q), _bits(q_ref))
            assert scale.shape == s_ref.shape and scale.stride() == s_ref.stride() and torch.equal(scale, s_ref)
    xg = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="not differentiable"):
        gatednorm.gated_norm_quant(xg, w, b, 1e-6, z, gs, True, is_rms, **qkw)
    for bad, exc in ((dict(qkw, quant="fp9"), ValueError), (dict(qkw, quant_group_size=7), ValueError),
                     (dict(qkw, scale_format="e8m0"), ValueError), (dict(qkw, round_to=torch.float32), TypeError)):
        with torch.no_grad(), pytest.raises(exc):
            gatednorm.gated_norm_quant(x, w, b, 1e-6, z, gs, True, is_rms, **bad)


def test_plan_table_is_bounded(monkeypatch):
    monkeypatch.setattr(ops, "MAX_PLANS", 2)
    with torch.no_grad():
        for n in (16, 32, 48, 64, 80):
            x, z, w, _ = make_inputs(3, n, torch.float32, seed=n)
            gatednorm.rmsnorm_fn(x, w, None, z)
            assert len(ops._PLANS) <= 2


def test_triton_plan_key_is_the_launch_key():
    """The triton plan finds the launcher the plain launch cached by rebuilding its key with every tensor
    taken as 16-byte aligned; on aligned tensors the two keys agree (ints, None, floats alike)."""
    launch = pytest.importorskip("gatednorm.backends.triton.launch")
    from gatednorm.backends.triton import plans

    x = torch.randn(40, 64, dtype=torch.bfloat16)
    rstd = torch.empty(40, dtype=torch.float32)
    for m in (1, 16, 40, 2**31):
        args = (x, None, x, x[0], None, x, None, None, rstd, m, 64, 0, 64, 64, 0, 1e-6)
        proto = (x.dtype, None, x.dtype, x.dtype, None, x.dtype, None, None, torch.float32, m, 64, 0, 64, 64, 0,
                 1e-6)
        assert all(t is None or isinstance(t, (int, float)) or t.data_ptr() % 16 == 0 for t in args)
        assert plans._aligned_spec(proto) == launch._spec_key(args)[0]
    assert plans.plan_forward(x, x[0], None, x, gatednorm.spec.NormSpec(1e-6, 64, True, True, "swish")) is None


@pytest.fixture(params=["direct", "run"])
def recorded_launches(monkeypatch, request):
    """The triton plans against the plain launch, without a GPU: launch._launch is replaced by a recorder that
    files, under the key the real _launch would use (index 0), a fake launcher recording what a plan passes it
    (the C launch function with addresses, Triton 3.6's path, or compiled.run with tensors, the others'); the
    CUDA calls a plan makes are stubbed. A plan that finds its launcher built the plain launch's key."""
    launch = pytest.importorskip("gatednorm.backends.triton.launch")
    from gatednorm.backends.triton import plans

    calls = []

    def fake_launch(kernel, grid, args, constexprs, num_warps, dev, fast=True, pdl=False):
        spec, values = launch._spec_key(args)
        calls.append(("plain", kernel, tuple(grid), values, tuple(constexprs)))

        def direct(g0, g1, g2, stream, function, cooperative, pdl_flag, gscratch, pscratch, packed, meta, enter,
                   leave, *rest):
            calls.append(("plan", kernel, (g0, g1, g2), list(rest[:len(args)]), tuple(rest[len(args):])))

        def run(g0, g1, g2, stream, function, packed, meta, enter, leave, *rest):
            addresses = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in rest[:len(args)]]
            calls.append(("plan", kernel, (g0, g1, g2), addresses, tuple(rest[len(args):])))

        entry = ((None, None, "function", "packed", direct, 0, int(pdl)) if request.param == "direct"
                 else (None, run, "function", "packed", None, 0, 0))
        monkeypatch.setitem(launch._COMPILED, (kernel, 0, num_warps, pdl, tuple(constexprs), spec), entry)

    monkeypatch.setattr(launch, "_launch", fake_launch)
    monkeypatch.setattr(plans, "_current_cuda_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    return launch, plans, calls


def _same_launch(plain, planned, fresh):
    """A plain launch and a planned one: the same kernel, grid, constexprs and arguments, except the addresses
    of the outputs each allocates itself (positions ``fresh``), which must still be both present or both None."""
    assert plain[0] == "plain" and planned[0] == "plan"
    assert plain[1] is planned[1] and plain[2] == planned[2] and plain[4] == planned[4]
    assert len(plain[3]) == len(planned[3])
    for i, (a, b) in enumerate(zip(plain[3], planned[3], strict=True)):
        if i in fresh:
            assert (a is None) == (b is None), i
        else:
            assert a == b and a.__class__ is b.__class__, i


@pytest.mark.parametrize(("m", "n", "gs", "is_rms", "bias", "gate", "threshold"), [
    (40, 128, 128, True, False, True, 1 << 24),
    (17, 96, 32, False, True, True, 1 << 24),       # LayerNorm: mean too
    (33, 64, 64, True, False, False, 1024),        # past the threshold: rescue_kernel after fwd_kernel
    (5, 20000, 10000, True, True, True, 1 << 24),  # wide groups: chunks, partial rows zeroed
])
def test_triton_plans_launch_what_the_plain_launch_launches(recorded_launches, m, n, gs, is_rms, bias, gate,
                                                             threshold):
    """ForwardPlan / BackwardPlan against launch.forward / launch.backward on the same tensors: each launch of
    the plain path is repeated by the plan with the same kernel, grid, constexprs, integers and input
    addresses (checked on CPU with the launches recorded; tests/test_gpu.py runs both on a GPU, bit for bit)."""
    launch, plans, calls = recorded_launches
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, gate=gate, seed=m)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, is_rms, "swish")
    fplan = plans.ForwardPlan(x, w, b, z, spec, threshold, 16, False)
    bplan = plans.BackwardPlan(x, w, b, z, spec, False)

    launch.forward(x, w, b, z, spec, torch.empty_like(x), threshold, 16, pdl=False)
    plain = list(calls)
    calls.clear()
    y, mean, rstd = fplan(x, w, b, z)
    chunks = launch._fwd_config(gs, x.element_size())[1]
    assert len(plain) == len(calls) == (2 if m * n >= threshold and chunks == 1 else 1)
    for a, c in zip(plain, calls, strict=True):
        _same_launch(a, c, fresh={5, 7, 8})  # y, mean, rstd
    assert y.shape == x.shape and (mean is None) == is_rms and rstd.shape == (n // gs * m,)

    calls.clear()
    dy = torch.randn_like(x)
    needs = GradsNeeded(True, gate, True, bias)
    launch.backward(dy, x, w, b, z, mean, rstd, spec, *needs, pdl=False)
    plain = list(calls)
    calls.clear()
    grads = bplan(dy, x, w, b, z, mean, rstd, needs)
    assert grads is not None and len(plain) == len(calls) == 2
    _same_launch(plain[0], calls[0], fresh={7, 8, 9, 10})  # dx, dz, the partial rows
    _same_launch(plain[1], calls[1], fresh={0, 1, 2, 3})  # the partial rows, dweight, dbias
    assert [g is not None for g in grads] == list(needs)


@pytest.fixture
def output_tile(monkeypatch):
    """An output-only launch shape for groups of 128 on the interpreter's model (""), as the H100's entry of
    launch.FWD_OUTPUT_TUNED_BY_MODEL gives there: 16 rows / 8 warps against FWD_TUNED's 32 / 8 (the cached launch
    shapes forgotten on both sides)."""
    launch = pytest.importorskip("gatednorm.backends.triton.launch")
    monkeypatch.setitem(launch.FWD_OUTPUT_TUNED_BY_MODEL, "", {(128, True): (16, 8, launch.ORDER_GROUPS_FASTEST)})
    forget_forward_launch_shapes(launch)
    yield launch
    forget_forward_launch_shapes(launch)


def test_triton_output_plan_launches_what_the_plain_output_forward_launches(recorded_launches, output_tile,
                                                                           monkeypatch):
    """TritonBackend.plan_forward_output: the plan of calls that discard the statistics launches what
    forward_output (launch.forward with output_only) launches, the output-only tile (ROWS 16 here) where the
    model has one, while plan_forward keeps FWD_TUNED's (ROWS 32); None where the two tiles are the same."""
    launch, plans, calls = recorded_launches
    monkeypatch.setattr(plans, "_rows_plannable", lambda *args: True)  # CPU tensors, as on a GPU
    backend = launch.TritonBackend(pdl=False)
    x, z, w, _ = make_inputs(40, 256, torch.bfloat16, seed=40)
    spec = gatednorm.spec.NormSpec(1e-6, 128, True, True, "swish")
    assert launch.output_tile_differs(128, 2) and not launch.output_tile_differs(64, 2)
    assert backend.plan_forward_output(x, w, None, z, gatednorm.spec.NormSpec(1e-6, 64, True, True, "swish")) is None
    oplan, fplan = backend.plan_forward_output(x, w, None, z, spec), backend.plan_forward(x, w, None, z, spec)
    assert (oplan.rows, oplan.warps, fplan.rows, fplan.warps) == (16, 8, 32, 8)
    for plan, plain in ((oplan, backend.forward_output), (fplan, None)):
        calls.clear()
        if plain is None:
            backend.forward(x, w, None, z, spec, torch.empty_like(x))
        else:
            plain(x, w, None, z, spec)
        recorded = list(calls)
        calls.clear()
        assert plan(x, w, None, z) is not None
        assert len(recorded) == len(calls) == 1
        _same_launch(recorded[0], calls[0], fresh={5, 7, 8})
        assert recorded[0][2] == (2, -(-40 // plan.rows), 1)  # groups fastest: (groups, row tiles)


def test_triton_output_tile_gives_the_forwards_bits(output_tile):
    """The output-only tile computes each row as the training tile does (the same register layout per row; on a
    GPU too, tests/test_gpu.py): forward_output's y equals forward's bit for bit, and against float64."""
    launch = output_tile
    backend = launch.TritonBackend()
    for m in (1, 37, 64):
        x, z, w, _ = make_inputs(m, 256, torch.bfloat16, seed=m)
        spec = gatednorm.spec.NormSpec(1e-6, 128, True, True, "swish")
        y = torch.empty_like(x)
        mean, rstd = backend.forward(x, w, None, z, spec, y)
        y_out = backend.forward_output(x, w, None, z, spec)  # new rows (garbage where a tile missed one)
        assert torch.equal(y_out, y)
        check_forward(y_out, mean, rstd, x, w, None, z, 1e-6, 128, True, True, "swish")


@pytest.mark.parametrize(("m", "gs", "is_rms", "threshold"), [(17, 96, False, 1 << 24), (9, 384, True, 1024)])
def test_triton_plans_launch_three_part_groups(recorded_launches, monkeypatch, m, gs, is_rms, threshold):
    """As above for groups of three parts (launch.fwd_parts, SPLIT_GROUPS on): the plans launch the plain launch's
    variants, PARTS = 3 (bwd_kernel's checked here; fwd_kernel's by the recorded launches' equal constexprs and
    the forward's own spy in tests/test_triton.py)."""
    launch, plans, calls = recorded_launches
    monkeypatch.setattr(launch, "SPLIT_GROUPS", True)
    test_triton_plans_launch_what_the_plain_launch_launches(recorded_launches, m, 2 * gs, gs, is_rms, not is_rms,
                                                            True, threshold)
    # the backward's launches are what the recorder holds last: bwd_kernel's constexprs end with PARTS
    parts = [c[4][-1] for c in calls if c[1] is plans.bwd_kernel]
    assert parts and set(parts) == {3}


@pytest.mark.parametrize(("m", "n", "gs", "block", "quant", "fmt", "col", "gate", "bias", "threshold", "order"), [
    (40, 128, 128, 128, "fp8_e4m3", "float32", False, True, False, 1 << 24, None),
    (17, 256, 64, 256, "int8", "float32", True, True, True, 1 << 24, None),  # per token over 4 groups, col-major
    (33, 640, 640, 128, "fp8_e4m3", "ue8m0", True, False, False, 1024, None),  # padded group; the rescue kernel after
    (16, 384, 128, 128, "fp8_e4m3fnuz", "float32", False, True, True, 1 << 24, None),
    (72, 384, 128, 128, "int8", "float32", False, True, False, 1 << 24, "groups"),  # tiles of a row side by side
    (9, 1920, 640, 128, "fp8_e4m3", "float32", True, True, False, 1024, "groups"),  # and the rescue kernel after
])
def test_triton_quant_plan_launches_what_the_plain_launch_launches(recorded_launches, m, n, gs, block, quant, fmt,
                                                                   col, gate, bias, threshold, order):
    """QuantPlan against launch.forward_quant on the same tensors, as above: the same kernels, grids, constexprs,
    integers (the scales' strides, row-major or column-major, included) and input addresses; q and the scale
    storage in the shapes and dtypes ops._quant_outputs gives them. "groups": the tile's QUANT_TUNED entry set to
    the groups-fastest program order (the grid's axes swapped)."""
    launch, plans, calls = recorded_launches
    key = launch.quant_tile_key(gs, block)
    shipped = launch.QUANT_TUNED.get(key)
    try:
        if order == "groups":
            rows, warps, _ = launch._quant_config(gs, block)
            launch.QUANT_TUNED[key] = (rows, warps, launch.ORDER_GROUPS_FASTEST)
            launch._quant_config.cache_clear()
            assert launch._quant_grid(m, rows, n // gs, launch._quant_config(gs, block)[2])[1]
        x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, gate=gate, seed=m + n)
        spec = gatednorm.spec.NormSpec(1e-6, gs, True, True, "swish")
        qspec = gatednorm.spec.QuantSpec(quant, block, fmt, "none", col)
        plan = plans.QuantPlan(x, w, b, z, spec, qspec, threshold, 16, False)
        q, storage = ops._quant_outputs(x, qspec)
        assert launch.forward_quant(x, w, b, z, spec, qspec, q, ops._scale_view(storage, qspec), threshold, 16,
                                    pdl=False)
        plain = list(calls)
        calls.clear()
        q2, storage2 = plan(x, w, b, z)
    finally:
        if shipped is not None:
            launch.QUANT_TUNED[key] = shipped
        else:
            launch.QUANT_TUNED.pop(key, None)
        launch._quant_config.cache_clear()
    assert len(plain) == len(calls) == (2 if m * n >= threshold else 1)
    for a, c in zip(plain, calls, strict=True):
        _same_launch(a, c, fresh={4, 5})  # q, the scales
    assert q2.shape == q.shape and q2.dtype == q.dtype and storage2.shape == storage.shape


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("option", [None, False])
def test_triton_scan_after_a_large_forward_is_a_dependent_launch(recorded_launches, monkeypatch, quant, option):
    """Where the GPU supports PDL, the range rescue's scan kernel after a forward too large for PDL is launched as a
    programmatic dependent (its USE_PDL set, and the PDL launch, which the recorder's key holds), the forward not;
    the backend's plain path and the plan agree (the plan finds the scan's launcher under the same key); with
    the backend's pdl=False neither is. Forward and fused quantized forward alike."""
    launch, plans, calls = recorded_launches
    for module in (launch, plans):
        monkeypatch.setattr(module, "pdl_supported", lambda device: True)
        monkeypatch.setattr(module, "PDL_MAX_ELEMENTS", 256)  # every call of this test is "large"
    backend = launch.TritonBackend(rescue_kernel_min_elements=1024, rescue_scan_rows=16, pdl=option)
    m, n = 40, 128
    x, z, w, _ = make_inputs(m, n, torch.bfloat16, bias=False, gate=True, seed=5)
    spec = gatednorm.spec.NormSpec(1e-6, 128, True, True, "swish")
    if quant:
        qspec = gatednorm.spec.QuantSpec("fp8_e4m3", 128, "float32", "none", False)
        q, storage = ops._quant_outputs(x, qspec)
        assert backend.forward_quant(x, w, None, z, spec, qspec, q, ops._scale_view(storage, qspec))
        plan = plans.QuantPlan(x, w, None, z, spec, qspec, 1024, 16, option)
        kernels = (plans.fwd_quant_kernel, plans.quant_rescue_kernel)
    else:
        backend.forward(x, w, None, z, spec, torch.empty_like(x))
        plan = plans.ForwardPlan(x, w, None, z, spec, 1024, 16, option)
        kernels = (plans.fwd_kernel, plans.rescue_kernel)
    plain = list(calls)
    calls.clear()
    assert plan(x, w, None, z) is not None
    assert [c[1] for c in plain] == list(kernels) and len(calls) == 2
    for a, c in zip(plain, calls, strict=True):
        _same_launch(a, c, fresh={4, 5} if quant else {5, 7, 8})
    use_pdl = [c[4][k.arg_names[len(c[3]):].index("USE_PDL")] for c, k in zip(plain, kernels, strict=True)]
    assert use_pdl == [False, option is None]
    assert {key[3] for key in launch._COMPILED if key[0] is kernels[1]} == {option is None}  # the launch's PDL


@pytest.mark.parametrize(("gs", "scan_sizes", "scan"), [
    (128, None, False), (5120, None, False), (8192, None, False), (16384, None, False),
    (8192, frozenset({8192}), True), (128, frozenset({8192}), False)])
def test_triton_range_rescue_follows_the_group_width_rule(recorded_launches, monkeypatch, gs, scan_sizes, scan):
    """With the backend's default threshold (None), a large call checks the range in fwd_kernel except for groups
    of a width in RESCUE_SCAN_GROUP_SIZES, where it runs rescue_kernel after it; the plan decides the same; an
    explicit threshold applies at every width (what the other tests use to reach the scan). The set is empty as
    shipped (None: every width, 8192 since session 30 and the 16384 of one 32-warp tile since session 29, checks
    in the kernel); a width put in it takes the scan, others do not."""
    launch, plans, calls = recorded_launches
    monkeypatch.setattr(launch, "RESCUE_KERNEL_MIN_ELEMENTS", 1024)  # every call of this test is "large"
    if scan_sizes is not None:
        monkeypatch.setattr(launch, "RESCUE_SCAN_GROUP_SIZES", scan_sizes)
    assert launch.rescue_scan_min_elements(None, gs) == (1024 if scan else launch._NEVER)
    assert launch.rescue_scan_min_elements(0, gs) == 0
    m, n = 8, 2 * gs
    x, z, w, _ = make_inputs(m, n, torch.bfloat16, bias=False, gate=True, seed=gs)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, True, "swish")
    backend = launch.TritonBackend(pdl=False)
    backend.forward(x, w, None, z, spec, torch.empty_like(x))
    plain = list(calls)
    calls.clear()
    assert plans.ForwardPlan(x, w, None, z, spec, None, launch.RESCUE_SCAN_ROWS, False)(x, w, None, z) is not None
    kernels = [plans.fwd_kernel, plans.rescue_kernel] if scan else [plans.fwd_kernel]
    assert [c[1] for c in plain] == [c[1] for c in calls] == kernels
    in_kernel = plain[0][4][plans.fwd_kernel.arg_names[len(plain[0][3]):].index("RESCUE_IN_KERNEL")]
    assert in_kernel is (not scan)
    calls.clear()
    launch.TritonBackend(rescue_kernel_min_elements=m * n, pdl=False).forward(x, w, None, z, spec, torch.empty_like(x))
    assert [c[1] for c in calls] == [plans.fwd_kernel, plans.rescue_kernel]


@pytest.mark.parametrize(("quant", "gs", "block", "scan"), [
    ("fp8_e4m3", 128, 128, False), ("int8", 128, 128, False), ("fp8_e4m3", 4096, 128, False),
    ("fp8_e4m3", 640, 128, False), ("int8", 640, 128, True), ("fp8_e4m3", 64, 2048, False),
    ("fp8_e4m3", 64, 4096, True), ("int8", 4096, 4096, True),
])
def test_triton_quant_range_rescue_follows_the_block_width_rule(recorded_launches, monkeypatch, quant, gs, block,
                                                                scan):
    """With the backend's default threshold (None), a large fused quantized call checks the range in
    fwd_quant_kernel for scale blocks up to QUANT_RESCUE_KERNEL_MAX_BLOCK wide, and runs quant_rescue_kernel after
    it for wider blocks (per-token scales of long rows) and for int8 on padded groups; the plan decides the same
    (its C++ entry launches what it records); an explicit threshold applies to every call."""
    launch, plans, calls = recorded_launches
    monkeypatch.setattr(launch, "RESCUE_KERNEL_MIN_ELEMENTS", 1024)  # every call of this test is "large"
    m, n = 8, max(2 * gs, block)
    x, z, w, _ = make_inputs(m, n, torch.bfloat16, bias=False, gate=True, seed=gs + block)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, True, "swish")
    qspec = gatednorm.spec.QuantSpec(quant, block, "float32", "none", False)
    assert launch.quant_rescue_scan_min_elements(None, spec, qspec) == (1024 if scan else launch._NEVER)
    expected = [plans.fwd_quant_kernel, plans.quant_rescue_kernel] if scan else [plans.fwd_quant_kernel]
    for option, kernels in ((None, expected), (m * n, [plans.fwd_quant_kernel, plans.quant_rescue_kernel])):
        calls.clear()
        q, storage = ops._quant_outputs(x, qspec)
        backend = launch.TritonBackend(rescue_kernel_min_elements=option, pdl=False)
        assert backend.forward_quant(x, w, None, z, spec, qspec, q, ops._scale_view(storage, qspec))
        assert [c[1] for c in calls] == kernels
        in_kernel = calls[0][4][plans.fwd_quant_kernel.arg_names[len(calls[0][3]):].index("RESCUE_IN_KERNEL")]
        assert in_kernel is (len(kernels) == 1)
    calls.clear()
    plan = plans.QuantPlan(x, w, None, z, spec, qspec, None, launch.RESCUE_SCAN_ROWS, False)
    assert plan(x, w, None, z) is not None
    assert [c[1] for c in calls] == expected


@pytest.fixture(params=["python key", "C key"])
def key_kind(request, monkeypatch):
    """The eager plans' keys built in Python, or their tensors' part by a C++ extension's call_key (what a process
    with the native CPU node or the triton backend's C++ plans loaded uses: the CPU node's here)."""
    from gatednorm.backends import base, native_cpu_node
    # the CPU node's build settled first either way: its end sets base.call_key, which must not happen mid-test
    if request.param == "C key":
        call_key = _c_call_key("cpu node")
    else:
        call_key = None
        if native_cpu_node.wanted():
            native_cpu_node.extension()  # waits for the build (loaded or failed)
    monkeypatch.setattr(base, "call_key", call_key)
    return call_key


def _c_call_key(extension: str):
    """The call_key (backends/call_key.h) of one of the two extensions that compile it, 'cpu node' or 'triton
    plans' (the test skips where that extension cannot be built)."""
    if extension == "cpu node":
        return _cpu_node_or_skip().extension().call_key
    built = pytest.importorskip("gatednorm.backends.triton.cxx_plans")
    module = built.extension()
    if module is None:
        pytest.skip(built.status())
    return module.call_key


class _OtherTensor(torch.Tensor):
    """A tensor subclass: neither torch.Tensor nor torch.nn.Parameter."""


@pytest.mark.parametrize("extension", ["cpu node", "triton plans"])
def test_c_call_key_is_equal_exactly_where_the_python_key_is(extension):
    """The C++ call_key's bytes (each extension that compiles backends/call_key.h) are equal for two calls exactly
    where ops._signature_key's tensor fields are (x and z: class, dtype, device, rank, row strides or contiguity,
    N; weight and bias: class, dtype, device, shape, strides), over every pair of many calls that differ in one
    field; its flag is needs_autograd's; it declines (None: the Python key decides) x that is not exactly a
    torch.Tensor, of rank 0 or empty, other classes, sparse tensors and parameters of more than four dims."""
    call_key = _c_call_key(extension)
    g = torch.Generator().manual_seed(7)
    base_x = torch.randn(6, 32, generator=g)
    wide = torch.randn(6, 64, generator=g)
    w, w2 = torch.randn(32, generator=g), torch.randn(64, generator=g)
    xs = [base_x, base_x.bfloat16(), base_x.double(), wide[:, :32], wide[:, ::2], base_x.view(2, 3, 32),
          base_x.view(2, 3, 32).transpose(0, 1), torch.randn(6, 48, generator=g), base_x.to("meta"),
          base_x[:1], base_x[0]]
    zs = [None, base_x, wide[:, 32:], base_x.bfloat16(), base_x.view(2, 3, 32)]
    ws = [w, torch.nn.Parameter(w.clone()), w.bfloat16(), w2[::2], w.view(1, 32), w.to("meta")]
    bs = [None, w.clone(), torch.nn.Parameter(w.clone()), w2[1::2]]
    calls = [(x, ws[0], None, None) for x in xs] + [(xs[0], ws[0], None, z) for z in zs]
    calls += [(xs[0], wt, bt, zs[1]) for wt in ws for bt in bs]
    python_keys = [ops._signature_key(x, wt, bt, z, 1e-6, None, True, True, "swish", None)[0]
                   for x, wt, bt, z in calls]
    c_keys = [call_key(x, wt, bt, z) for x, wt, bt, z in calls]
    assert all(k is not None for k in c_keys)
    for i, j in itertools.product(range(len(calls)), repeat=2):
        assert (c_keys[i][0] == c_keys[j][0]) == (python_keys[i] == python_keys[j]), (i, j)
    assert len(set(python_keys)) > 30  # the calls do differ
    # the differentiable flag: grad mode on and an input that requires grad (ops.needs_autograd)
    for needs in itertools.product((False, True), repeat=4):
        x, wt, bt, z = (t.clone().requires_grad_(r) for t, r in zip((base_x, w, w, base_x), needs, strict=True))
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                assert call_key(x, wt, bt, z)[1] is ops.needs_autograd(x, wt, bt, z) is (grad and any(needs))
    # declined: the Python path decides these
    declined = [(torch.nn.Parameter(base_x), w, None, None), (base_x.as_subclass(_OtherTensor), w, None, None),
                (torch.tensor(1.0), w, None, None), (base_x[:0], w, None, None),
                (base_x, w.as_subclass(_OtherTensor), None, None), (base_x, w, None, base_x.as_subclass(_OtherTensor)),
                (base_x.to_sparse(), w, None, None), (base_x, w.view(1, 1, 1, 1, 32), None, None)]
    assert [call_key(*c) for c in declined] == [None] * len(declined)
    with pytest.raises(TypeError):
        call_key(base_x, w, None)


def test_interleaved_signatures_keep_their_own_plans(key_kind):
    """Many signatures that share most of their key (dtypes of x and of the parameters, rank, strides, group
    size, gate side, norm, activation, bias, N), called in a shuffled order so that each call after the first
    of its signature is planned while the table holds its neighbours: every result equals the full path's bits,
    and each signature has a plan of its own (a field missing from the key would merge two; on CPU the merged
    plan may still compute right, on a GPU it would launch another signature's kernel)."""
    g = torch.Generator().manual_seed(1234)
    cases = []
    for dtype, param_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.bfloat16, torch.float32)):
        for n, gs in ((64, 16), (64, 32), (64, None), (96, 32)):
            for layout in ("2d", "3d", "strided x", "strided z"):
                for nbg, is_rms, act, bias in itertools.product((True, False), (True, False), ("swish", "sigmoid"),
                                                                (False, True)):
                    cases.append((dtype, param_dtype, n, gs, layout, nbg, is_rms, act, bias))
    order = [i for i in range(len(cases)) for _ in range(2)]
    order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    for i in order:
        dtype, param_dtype, n, gs, layout, nbg, is_rms, act, bias = cases[i]
        m = 6 + i % 5
        x, z, w, b = make_inputs(m, n, dtype, bias=bias, param_dtype=param_dtype, seed=i)
        if layout == "3d":
            x, z = x.view(2, m // 2, n) if m % 2 == 0 else x.view(1, m, n), z.view(-1, n)
            z = z.view(x.shape)
        elif layout == "strided x":
            x = torch.cat([x, x], dim=1)[:, :n]
        elif layout == "strided z":
            z = torch.cat([z, z], dim=1)[:, n:]
        call = gatednorm.spec.prepare(x, w, b, z, 1e-5, gs, nbg, is_rms, act, regroup_heads=True)
        y_ref, mean_ref, rstd_ref = ops.gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec,
                                                        backend="native")
        with torch.no_grad():
            y, mean, rstd = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=gs, norm_before_gate=nbg,
                                                     is_rms_norm=is_rms, activation=act)
        assert torch.equal(y, y_ref.view_as(x)) and torch.equal(rstd, rstd_ref), cases[i]
        assert (mean is None and mean_ref is None) or torch.equal(mean, mean_ref), cases[i]
    assert len(ops._PLANS) == len(cases)
    assert all(isinstance(key[0], bytes if key_kind else tuple) for key in ops._PLANS)  # the keys of key_kind


def _fake_signature(spec_key: tuple, constexprs: tuple) -> dict:
    """What Triton 3.6 would type a kernel's arguments as, from launch._spec_key's key of the runtime arguments:
    a tensor a pointer, None and an integer equal to 1 constexpr (specialised away), other integers i32 or i64 by
    size, floats fp32; then the constexprs."""
    types = []
    for k in spec_key:
        if k is None:
            types.append("constexpr")
        elif k is float:
            types.append("fp32")
        elif isinstance(k[0], torch.dtype):
            types.append("*" + str(k[0]).removeprefix("torch."))
        else:
            is_one, _, fits_32 = k
            types.append("constexpr" if is_one else ("i32" if fits_32 else "i64"))
    types += ["constexpr"] * len(constexprs)
    return {f"arg{i}": t for i, t in enumerate(types)}


@pytest.fixture
def cxx_recorded(monkeypatch):
    """The plans' C++ entry (cxx_plans.cpp) against their Python calls, without a GPU: launch._launch files fake
    compiled kernels (signatures typed as Triton types the arguments, see _fake_signature; a function id each)
    whose Triton 3.6 C launch function records what the Python plans pass it, and the extension's recorder
    records what the C++ entry would launch. Yields (launch, plans, kernels: function id -> (kernel, signature),
    python_calls, cxx_calls), each call (function id, grid, warps, PDL flag, arguments / kernel parameters)."""
    import struct  # noqa: F401 - the tests below

    launch = pytest.importorskip("gatednorm.backends.triton.launch")
    from gatednorm.backends.triton import cxx_plans, plans

    module = cxx_plans.extension()
    assert module is not None, cxx_plans.status()
    kernels: dict[int, tuple] = {}
    python_calls: list = []
    cxx_calls: list = []

    def fake_launch(kernel, grid, args, constexprs, num_warps, dev, fast=True, pdl=False):
        spec, _ = launch._spec_key(args)
        signature = _fake_signature(spec, constexprs)
        function = 1000 + len(kernels)
        kernels[function] = (kernel, signature)

        def direct(g0, g1, g2, stream, fn, cooperative, pdl_flag, gscratch, pscratch, packed, meta, enter, leave,
                   *rest):
            python_calls.append((fn, (g0, g1), packed[0], pdl_flag, list(rest)))

        compiled = type("Compiled", (), {"src": type("Src", (), {"signature": signature})()})()
        entry = (compiled, None, function, (num_warps, 1, 0), direct, 0, int(pdl))
        monkeypatch.setitem(launch._COMPILED, (kernel, 0, num_warps, pdl, tuple(constexprs), spec), entry)

    monkeypatch.setattr(launch, "_launch", fake_launch)
    monkeypatch.setattr(plans, "_current_cuda_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    monkeypatch.setattr(cxx_plans, "ENABLED", True)
    module.set_recorder(lambda g0, g1, fn, warps, shared, coop, pdl_flag, params: cxx_calls.append(
        (fn, (g0, g1), warps, pdl_flag, list(params))))
    try:
        yield launch, plans, kernels, python_calls, cxx_calls
    finally:
        module.set_recorder(None)


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """t's values in rows 8 elements longer than t's (NaN there): a row stride of its own, rows still 16-byte
    aligned for 2-byte dtypes, as the plans need them."""
    base = torch.full((t.shape[0], t.shape[1] + 8), float("nan"), dtype=t.dtype)
    base[:, :t.shape[1]] = t
    return base[:, :t.shape[1]]


def _same_kernel_parameters(kernels: dict, python_calls: list, cxx_calls: list, fresh: set[int]) -> None:
    """Each launch the C++ entry recorded is the Python plan's: the same kernel, grid, warps and PDL flag, and as
    parameters the signature's non-constexpr arguments (eps as its float32 bits) then two null scratch pointers;
    outputs each call allocates (positions ``fresh``) only need to be there and 16-byte aligned."""
    import struct

    assert len(cxx_calls) == len(python_calls)
    for (fn, grid, warps, pdl_flag, rest), (c_fn, c_grid, c_warps, c_pdl, params) in zip(python_calls, cxx_calls,
                                                                                         strict=True):
        assert (fn, grid, warps, pdl_flag) == (c_fn, c_grid, c_warps, c_pdl)
        want = []
        for i, (value, ty) in enumerate(zip(rest, kernels[fn][1].values(), strict=False)):
            if ty == "constexpr":
                continue
            want.append((i, struct.unpack("<I", struct.pack("<f", value))[0] if ty == "fp32" else value))
        assert len(params) == len(want) + 2 and params[-2:] == [0, 0]
        for (i, value), got in zip(want, params, strict=False):
            if i in fresh:
                assert got != 0 and got % 16 == 0, i
            else:
                assert got == value, (i, got, value)


@pytest.mark.parametrize(("m", "n", "gs", "is_rms", "bias", "gate", "threshold", "layout"), [
    (40, 128, 128, True, False, True, 1 << 24, "contiguous"),
    (1, 96, 32, False, True, True, 1 << 24, "contiguous"),        # M = 1: m specialised away, LayerNorm's mean
    (33, 64, 64, True, True, False, 1024, "contiguous"),          # rescue_kernel after fwd_kernel, no gate
    (48, 20000, 10000, False, False, True, 1 << 24, "contiguous"),  # wide groups: chunks; M % 16 == 0
    (24, 128, 64, True, False, True, 1 << 24, "padded_rows"),  # x and z with row strides of their own
])
def test_cxx_forward_launches_what_the_python_plan_launches(cxx_recorded, m, n, gs, is_rms, bias, gate, threshold,
                                                            layout):
    """ForwardPlan's C++ entry against its Python call (launches recorded, see cxx_recorded): the same launches
    and kernel parameters; outputs fresh and shaped as the plan's; the C++ entry declines (None, nothing launched)
    a variant not registered yet and a misaligned x."""
    launch, plans, kernels, python_calls, cxx_calls = cxx_recorded
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, gate=gate, seed=m + n)
    if layout == "padded_rows":
        x, z = _padded_rows(x), _padded_rows(z)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, is_rms, "swish")
    plan = plans.ForwardPlan(x, w, b, z, spec, threshold, 16, False)
    assert plan.native_forward is not None, "the plan did not attach to the C++ entry"
    launch.forward(x, w, b, z, spec, torch.empty_like(x), threshold, 16, pdl=False)  # compiles (fakes) the variant
    before = plans.forward_plan_launches()
    plan(x, w, b, z)  # the C++ entry declines (variant not registered), the Python call launches and registers
    assert cxx_calls == [] and plans.forward_plan_launches() == before + 1
    expected = list(python_calls)
    y, mean, rstd = plan(x, w, b, z)  # now the C++ entry
    assert len(python_calls) == len(expected), "the Python call ran again"
    assert plans.forward_plan_launches() == before + 2
    rescued = m * n >= threshold and launch._fwd_config(gs, 2)[1] == 1
    assert len(cxx_calls) == (2 if rescued else 1)
    _same_kernel_parameters(kernels, expected, cxx_calls, fresh={5, 7, 8})  # y, mean, rstd
    assert y.shape == x.shape and y.dtype == x.dtype and rstd.shape == (n // gs * m,) and rstd.dtype == torch.float32
    assert (mean is None) == is_rms and (is_rms or mean.shape == rstd.shape)
    if m > 1:  # a misaligned x (two bytes off): both entries decline, nothing is launched
        base = torch.randn(m, n + 1).to(torch.bfloat16)
        calls = len(cxx_calls)
        assert plan(base[:, 1:], w, b, z) is None and len(cxx_calls) == calls


@pytest.mark.parametrize(("m", "n", "gs", "block", "quant", "fmt", "col", "gate", "bias", "threshold"), [
    (40, 128, 128, 128, "fp8_e4m3", "float32", False, True, False, 1 << 24),
    (17, 256, 64, 256, "int8", "float32", True, True, True, 1 << 24),      # per token over 4 groups, column-major
    (33, 640, 640, 128, "fp8_e4m3", "ue8m0", True, False, False, 1024),    # padded group; quant_rescue_kernel after
    (1, 384, 128, 128, "fp8_e4m3fnuz", "float32", False, True, True, 1 << 24),  # M = 1: m specialised away
    (48, 1920, 640, 128, "fp8_e4m3", "float32", False, True, False, 1024),  # M % 16 == 0; the rescue after
])
def test_cxx_quant_launches_what_the_python_plan_launches(cxx_recorded, m, n, gs, block, quant, fmt, col, gate, bias,
                                                          threshold):
    """QuantPlan's C++ entry against its Python call (launches recorded, see cxx_recorded): the same launches and
    kernel parameters (the scales' strides, row- or column-major, included); q and the scale storage fresh, in
    the plan's shapes and dtypes; the C++ entry declines a variant not registered yet and a misaligned x."""
    launch, plans, kernels, python_calls, cxx_calls = cxx_recorded
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, gate=gate, seed=m + n)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, True, "swish")
    qspec = gatednorm.spec.QuantSpec(quant, block, fmt, "none", col)
    plan = plans.QuantPlan(x, w, b, z, spec, qspec, threshold, 16, False)
    assert plan.native_quant is not None, "the plan did not attach to the C++ entry"
    q, storage = ops._quant_outputs(x, qspec)
    assert launch.forward_quant(x, w, b, z, spec, qspec, q, ops._scale_view(storage, qspec), threshold, 16,
                                pdl=False)  # compiles (fakes) the variant
    before = plans.quant_plan_launches()
    assert plan(x, w, b, z) is not None  # the C++ entry declines (variant not registered), Python launches
    assert cxx_calls == [] and plans.quant_plan_launches() == before + 1
    expected = list(python_calls)
    q2, storage2 = plan(x, w, b, z)  # now the C++ entry
    assert len(python_calls) == len(expected), "the Python call ran again"
    assert plans.quant_plan_launches() == before + 2
    assert len(cxx_calls) == (2 if m * n >= threshold else 1)
    _same_kernel_parameters(kernels, expected, cxx_calls, fresh={4, 5})  # q, the scales
    assert q2.shape == q.shape and q2.dtype == q.dtype and q2.is_contiguous()
    assert storage2.shape == storage.shape and storage2.dtype == torch.float32
    if m > 1:  # a misaligned x (two bytes off): both entries decline, nothing is launched
        base = torch.randn(m, n + 1).to(torch.bfloat16)
        calls = len(cxx_calls)
        assert plan(base[:, 1:], w, b, z) is None and len(cxx_calls) == calls


def test_cxx_entry_hands_calls_with_launch_hooks_back_to_python(cxx_recorded):
    """Triton's launch hooks (a profiler such as proton hooks in there): Triton 3.6's knobs hold HookChains, never
    None. While both chains are empty the C++ entry launches; with a hook in either, or an older Triton's plain
    callable, it declines and launches nothing, so the Python path (which passes the hooks) runs. On the GPU the
    first version took every empty HookChain for an installed hook and never launched."""
    import types

    import triton

    launch, plans, kernels, python_calls, cxx_calls = cxx_recorded
    from gatednorm.backends.triton import cxx_plans

    module = cxx_plans.extension()
    x, z, w, b = make_inputs(40, 128, torch.bfloat16, bias=False, gate=True, seed=21)
    spec = gatednorm.spec.NormSpec(1e-6, 128, True, True, "swish")
    plan = plans.ForwardPlan(x, w, b, z, spec, 1 << 24, 16, False)
    launch.forward(x, w, b, z, spec, torch.empty_like(x), 1 << 24, 16, pdl=False)
    plan(x, w, b, z)  # the Python call registers the variant
    runtime = triton.knobs.runtime

    def through_cxx() -> bool:
        calls = len(cxx_calls)
        plan.native_forward(plan.native_address, x, z, w, b)
        return len(cxx_calls) > calls

    assert through_cxx(), "no hook installed, and the C++ entry declined"
    chains = [getattr(runtime, name) for name in ("launch_enter_hook", "launch_exit_hook")]
    for chain in chains:
        if chain is None or not hasattr(chain, "add"):
            continue  # a Triton whose knobs hold plain callables: covered below
        hook = lambda *args, **kwargs: None  # noqa: E731
        chain.add(hook)
        try:
            assert not through_cxx(), "a launch hook is installed, and the C++ entry launched without it"
        finally:
            chain.remove(hook)
        assert through_cxx()
    try:
        for enter, leave in ((lambda *a: None, None), (None, lambda *a: None), (None, None)):
            module.setup(types.SimpleNamespace(launch_enter_hook=enter, launch_exit_hook=leave), _RAW_STREAM)
            assert through_cxx() == (enter is None and leave is None), (enter, leave)
    finally:
        module.setup(runtime, _RAW_STREAM)  # as cxx_plans set it up (the fixture's stand-in is not kept)
    assert through_cxx()


@pytest.mark.parametrize(("m", "n", "gs", "is_rms", "bias", "gate", "needs", "layout"), [
    (40, 128, 128, True, False, True, (True, True, True, False), "contiguous"),
    (17, 96, 32, False, True, True, (True, False, True, True), "contiguous"),   # LayerNorm: mean; no dz
    (1, 64, 64, True, True, False, (True, False, False, False), "contiguous"),  # M = 1, dx only: no partial sums
    (48, 20000, 10000, False, True, True, (False, True, True, True), "contiguous"),  # wide groups, zeroed partials
    (24, 128, 64, True, False, True, (True, True, True, False), "padded_rows"),  # x and z with row strides
])
def test_cxx_backward_launches_what_the_python_plan_launches(cxx_recorded, m, n, gs, is_rms, bias, gate, needs,
                                                             layout):
    """BackwardPlan's C++ entry against its Python call (as the forward's above): the same bwd_kernel and
    sum_partials_kernel launches and parameters, the gradients asked for (and only those) returned, shaped as
    their inputs; dy of another dtype declined."""
    launch, plans, kernels, python_calls, cxx_calls = cxx_recorded
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=bias, gate=gate, seed=m + n)
    if layout == "padded_rows":
        x, z = _padded_rows(x), _padded_rows(z)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, is_rms, "swish")
    needs = GradsNeeded(*needs)
    plan = plans.BackwardPlan(x, w, b, z, spec, False)
    assert plan.native_backward is not None, "the plan did not attach to the C++ entry"
    groups = n // gs
    mean = None if is_rms else torch.randn(groups * m)
    rstd = torch.rand(groups * m) + 0.5
    dy = torch.randn_like(x)
    launch.backward(dy, x, w, b, z, mean, rstd, spec, *needs, pdl=False)  # compiles (fakes) the variant
    python_calls.clear()
    before = plans.backward_plan_launches()
    assert plan(dy, x, w, b, z, mean, rstd, needs) is not None  # the Python call, which registers the variant
    assert cxx_calls == [] and plans.backward_plan_launches() == before + 1
    expected = list(python_calls)
    grads = plan(dy, x, w, b, z, mean, rstd, needs)  # now the C++ entry
    assert len(python_calls) == len(expected) and plans.backward_plan_launches() == before + 2
    assert len(cxx_calls) == (2 if needs.dweight or needs.dbias else 1)
    fresh = [{7, 8, 9, 10}, {0, 1, 2, 3}]  # dx, dz, the partial rows; the partial rows, dweight, dbias
    for i in range(len(cxx_calls)):
        _same_kernel_parameters(kernels, expected[i:i + 1], cxx_calls[i:i + 1], fresh[i])
    for grad, need, like in zip(grads, needs, (x, z, w, b), strict=True):
        assert (grad is not None) == need
        assert grad is None or (grad.shape == like.shape and grad.dtype == like.dtype)
    calls = len(cxx_calls)
    assert plan(dy.float(), x, w, b, z, mean, rstd, needs) is None and len(cxx_calls) == calls


def test_cxx_autograd_node_runs_the_backward_plan_or_its_fallback(cxx_recorded):
    """plans.plan_autograd's entry (cxx_plans.cpp, ``autograd``): y comes back differentiable through a C++
    GatedNormBackward node (no Python Function), mean and rstd not; its backward launches the backward plan's
    kernels from C++ (recorded, as the Python plan launches them) and fills the gradients of exactly the inputs
    that require grad; where the C++ core declines (dy with feature stride > 1) or a graph is recorded (create_graph),
    it calls the fallback with the saved tensors and what is needed, and its gradients are what the fallback
    returned."""
    launch, plans, kernels, python_calls, cxx_calls = cxx_recorded
    m, n, gs = 24, 128, 64
    x, z, w, b = make_inputs(m, n, torch.bfloat16, bias=True, gate=True, seed=7)
    spec = gatednorm.spec.NormSpec(1e-6, gs, True, False, "swish")
    fplan = plans.ForwardPlan(x, w, b, z, spec, 1 << 24, 16, False)
    bplan = plans.BackwardPlan(x, w, b, z, spec, False)
    entry = plans.plan_autograd(fplan, bplan)
    assert callable(entry) and plans.plan_autograd(None, bplan) is False
    fallback_calls = []

    def fallback(dy, xs, ws, bs, zs, mean, rstd, needs):
        fallback_calls.append((dy, xs, ws, bs, zs, mean, rstd, needs, torch.is_grad_enabled()))
        return tuple(None if not need else torch.full_like(t, 3.0) for need, t in zip(needs, (xs, zs, ws, bs),
                                                                                        strict=True))

    xl, zl, wl = (t.detach().clone().requires_grad_() for t in (x, z, w))  # bias does not require grad
    needs = GradsNeeded(True, True, True, False)
    # register the variants: the forward's and the backward's plain launches, then each plan's Python call
    launch.forward(x, w, b, z, spec, torch.empty_like(x), 1 << 24, 16, pdl=False)
    launch.backward(x, x, w, b, z, torch.zeros(2 * m), torch.ones(2 * m), spec, *needs, pdl=False)
    assert fplan(x, w, b, z) is not None
    assert bplan(x, x, w, b, z, torch.zeros(2 * m), torch.ones(2 * m), needs) is not None
    cxx_calls.clear()
    y, mean, rstd = entry(fallback, xl, zl, wl, b)
    assert y.grad_fn.name() == "GatedNormBackward" and y.requires_grad
    assert not mean.requires_grad and not rstd.requires_grad and mean.shape == rstd.shape == (2 * m,)
    assert len(cxx_calls) == 1  # the forward
    dy = torch.randn_like(x)
    y.backward(dy)
    assert fallback_calls == [] and len(cxx_calls) == 3  # bwd_kernel and sum_partials_kernel
    assert xl.grad.shape == x.shape and zl.grad.shape == z.shape and wl.grad.shape == w.shape
    bwd_params = cxx_calls[1][4]
    assert bwd_params[0] == dy.data_ptr() and bwd_params[1] == xl.data_ptr()  # dy and the saved x, unpacked
    # dy without unit stride along features: the core declines and the fallback computes
    for t in (xl, zl, wl):
        t.grad = None
    y, _, _ = entry(fallback, xl, zl, wl, b)
    dy_columns = dy.t().contiguous().t()
    y.backward(dy_columns)
    (dy_seen, x_seen, w_seen, b_seen, z_seen, mean_seen, rstd_seen, needs_seen, grad_mode) = fallback_calls[-1]
    assert needs_seen == (True, True, True, False) and not grad_mode
    assert x_seen.data_ptr() == xl.data_ptr() and z_seen.data_ptr() == zl.data_ptr() and b_seen is b
    assert dy_seen.stride() == dy_columns.stride() and mean_seen is not None and rstd_seen.shape == (2 * m,)
    assert torch.equal(xl.grad, torch.full_like(x, 3.0)) and torch.equal(wl.grad, torch.full_like(w, 3.0))
    # a backward that records its graph goes to the fallback with grad mode on
    y, _, _ = entry(fallback, xl, zl, wl, b)
    torch.autograd.grad(y, (xl,), dy, create_graph=True)
    assert fallback_calls[-1][-1] is True
    # a saved input modified in place after the forward: autograd's version check, as for any op
    y, _, _ = entry(fallback, xl, zl, wl, b)
    with torch.no_grad():
        wl.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


class _NodeOfFallback(torch.autograd.Function):
    """A stand-in for a backend's autograd node: y's backward is the fallback ops gave the entry."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, y, mean, rstd, fallback, seen):
        ctx.save_for_backward(x, weight, bias, z, mean, rstd)
        ctx.fallback, ctx.seen = fallback, seen
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, z, mean, rstd = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        ctx.seen.append(needs)
        dx, dz, dw, db = ctx.fallback(dy, x, weight, bias, z, mean, rstd, needs)
        return dx, dw, db, dz, None, None, None, None, None


class _AutogradPlannedBackend:
    """The native backend with a PlannedBackend.plan_autograd that answers None (not yet) on its first ask and then
    an entry whose node is _NodeOfFallback (or, with ``never``, False)."""

    def __init__(self, never: bool = False) -> None:
        self.inner = NativeCPUBackend()
        self.name, self.supports_float64 = self.inner.name, self.inner.supports_float64
        self.asks, self.entries, self.never = 0, 0, never
        self.node_backwards: list = []

    def forward(self, *args):
        return self.inner.forward(*args)

    def backward(self, *args):
        return self.inner.backward(*args)

    def plan_autograd(self, forward_plan, backward_plan):
        self.asks += 1
        if self.never:
            return False
        if self.asks == 1:
            return None

        def entry(fallback, x, z, weight, bias):
            self.entries += 1
            spec = gatednorm.spec.NormSpec(1e-6, 32, True, True, "swish")
            y = torch.empty_like(x)
            with torch.no_grad():
                mean, rstd = self.inner.forward(x, weight, bias, z, spec, y)
            y = _NodeOfFallback.apply(x, weight, bias, z, y, mean, rstd, fallback, self.node_backwards)
            return y, mean, rstd

        return entry


def test_planned_autograd_goes_through_the_backends_node_and_its_fallback():
    """ops' side of PlannedBackend.plan_autograd: asked until it answers (None: not yet; False: never again),
    then differentiable planned calls go through its entry with the (M, N) rows (y back in x's shape), and the
    fallback it is given computes the Function's gradients, bit for bit the full path's; with create_graph, the
    fallback's gradients are themselves differentiable and equal the full path's double backward."""
    x, z, w, _ = make_inputs(12, 64, torch.float32, seed=21)
    x3, z3 = x.view(3, 4, 64), z.view(3, 4, 64)
    dy = torch.randn_like(x3)
    want_y, want_grads = _full_path_grads(x3, w, None, z3, 1e-6, 32, True, True, dy)
    backend = _AutogradPlannedBackend()
    with ops.override_impl("native", "cpu", backend):
        for call in range(4):
            xl, wl, zl = (t.detach().clone().requires_grad_() for t in (x3, w, z3))
            y = gatednorm.rmsnorm_fn(xl, wl, None, zl, 1e-6, 32, backend="native")
            y.backward(dy)
            assert torch.equal(y.detach(), want_y) and y.shape == x3.shape
            for got, want in zip((xl.grad, wl.grad, zl.grad), (want_grads[0], want_grads[1], want_grads[3]),
                                 strict=True):
                assert torch.equal(got, want), call
        # the first call: asked (None), the Function ran; then asked again, and its entry served the other three
        assert backend.asks == 2 and backend.entries == 3, "asked until it answered, then its entry served"
        assert backend.node_backwards == [(True, True, True, False)] * 3  # dx, dz, dweight; no bias
        # create_graph: the fallback records the graph; double backward matches the full path's
        xl, wl, zl = (t.detach().clone().requires_grad_() for t in (x3, w, z3))
        y = gatednorm.rmsnorm_fn(xl, wl, None, zl, 1e-6, 32, backend="native")
        (gx,) = torch.autograd.grad(y, (xl,), dy, create_graph=True)
        assert gx.requires_grad and backend.entries == 4
        (ggx,) = torch.autograd.grad(gx.square().sum(), (xl,))
    xf, wf, zf = (t.detach().clone().requires_grad_() for t in (x3, w, z3))
    call = gatednorm.spec.prepare(xf, wf, None, zf, 1e-6, 32, True, True, "swish", regroup_heads=True)
    yf = ops.gated_norm_rows(call.x2d, call.weight, call.bias, call.z2d, call.spec, backend="native")[0].view_as(xf)
    (gf,) = torch.autograd.grad(yf, (xf,), dy, create_graph=True)
    assert torch.equal(gx, gf) and torch.equal(ggx, torch.autograd.grad(gf.square().sum(), (xf,))[0])
    never = _AutogradPlannedBackend(never=True)
    with ops.override_impl("native", "cpu", never):
        for _ in range(3):
            xl = x3.detach().clone().requires_grad_()
            gatednorm.rmsnorm_fn(xl, w, None, z3, 1e-6, 32, backend="native").sum().backward()
    assert never.asks == 1 and never.entries == 0


def test_cxx_plans_build_failure_leaves_the_plans_in_python(monkeypatch, tmp_path):
    """A build that fails (here a compiler that exits 1), or raises, settles with the reason in status() and no
    extension, so plans stop asking for it and run in Python; a background build (wait=False) settles the same."""
    pytest.importorskip("gatednorm.backends.triton.launch")
    from gatednorm.backends.triton import cxx_plans, plans
    from gatednorm.builds import BackgroundBuild

    monkeypatch.setattr(cxx_plans, "_BUILD", BackgroundBuild("test-build", cxx_plans._build))
    monkeypatch.setattr(cxx_plans, "ENABLED", True)
    monkeypatch.setenv("GATEDNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    assert cxx_plans.extension() is None and cxx_plans.settled()
    assert "false failed" in cxx_plans.status() and not list(tmp_path.glob("*.so"))
    monkeypatch.setattr(cxx_plans, "_BUILD", BackgroundBuild("test-build", lambda: 1 / 0))
    assert cxx_plans.extension(wait=False) is None
    cxx_plans._BUILD.join(30)
    assert cxx_plans.settled() and "ZeroDivisionError" in cxx_plans.status()
    x, z, w, _ = make_inputs(4, 64, torch.bfloat16, seed=3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plan = plans.ForwardPlan(x, w, None, z, gatednorm.spec.NormSpec(1e-6, 64, True, True, "swish"), 1 << 24, 16, False)
    assert plan.native_forward is None and not plan.native_wanted


def test_torch_compile_does_not_trace_the_c_call_key(key_kind):
    """With the C++ key in use (a process where the triton plans' extension has loaded), torch.compile with
    fullgraph=True still traces the operator (the context is checked before the C call, which dynamo cannot
    trace), and the eager calls around it stay planned."""
    mod = gatednorm.RMSNorm(64, group_size=16)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    x, z, _, _ = make_inputs(8, 64, torch.float32)
    with torch.no_grad():
        eager = mod(x, z)
        assert torch.equal(compiled(x, z), eager)
        assert torch.equal(mod(x, z), eager)
    assert len(ops._PLANS) == 1 and isinstance(next(iter(ops._PLANS))[0], bytes if key_kind else tuple)
