"""Reliability: property tests, hard numerics, batch invariance, determinism, bad input, thread safety.

Every check compares with the float64 evaluation (gatednorm.reference) through the documented
tolerance of gatednorm.verify (tests/helpers.py applies it). Runs on CPU on every backend available
there (native; triton too under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import bits, check_forward, check_gradients, check_pair, make_inputs, make_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatednorm
from gatednorm import layer_norm_fwd, layernorm_fn
from gatednorm.reference import gated_norm_reference
from gatednorm.verify import available_backends

CPU = torch.device("cpu")
BACKENDS = available_backends(CPU)
#: Backends for parametrize: triton (Triton's interpreter on CPU) and compiled (torch.compile per variant) are slow.
SLOW_BACKENDS = ("triton", "compiled")


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BACKENDS else n for n in names]


BACKEND_PARAMS = _params(BACKENDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_against_float64(y, mean, rstd, x, w, b, z, eps, gs, nbg, rms, act, out_dtype=None):
    """Assert y / mean / rstd are within the documented tolerance of float64 (non-finite: exact match)."""
    check_forward(y, mean, rstd, x, w, b, z, eps, gs, nbg, rms, act, out_dtype=out_dtype)


# ---------------------------------------------------------------------------
# Property tests: shapes, strides, dtypes, groups, flags; never writes outside `out`
# ---------------------------------------------------------------------------

@st.composite
def problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    gs = draw(st.sampled_from([1, 2, 5, 8, 32, 96, 128]))
    n = groups * gs
    m = draw(st.sampled_from([0, 1, 2, 3, 17, 64]))
    if n <= 4 and draw(st.booleans()):
        m = 3000  # huge M, tiny N
    if draw(st.integers(0, 9)) == 0:
        n, gs, m = 4096, draw(st.sampled_from([None, 128, 1024])), 3  # wide N
    return {
        "m": m, "n": n, "gs": gs if gs != n else draw(st.sampled_from([None, n])),
        "lead3": draw(st.booleans()) and m % 2 == 0 and m > 0,
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced_rows", "strided_cols"])),
        "expand_weight": draw(st.booleans()),
        "dtype": draw(st.sampled_from(DTYPES)),
        "out_dtype": draw(st.sampled_from([None, None, torch.float32])),
        "bias": draw(st.booleans()),
        "gate": draw(st.sampled_from(["none", "after", "before"])),
        "act": draw(st.sampled_from(["swish", "silu", "sigmoid"])),
        "rms": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "seed": draw(st.integers(0, 2**16)),
        "backend": draw(st.sampled_from(BACKENDS)),
    }


@pytest.mark.slow
@PROPERTY
@given(p=problems())
def test_property_matches_float64_and_stays_inside_out(p):
    m, n, dt = p["m"], p["n"], p["dtype"]
    x, z, w, b = make_inputs(m, n, dt, gate=p["gate"] != "none", bias=p["bias"], seed=p["seed"], layout=p["layout"])
    if p["expand_weight"]:
        w = w[:1].expand(n)
    if p["lead3"]:
        x = x.view(2, m // 2, n) if p["layout"] != "strided_cols" else x.unflatten(0, (2, m // 2))
        z = z.unflatten(0, (2, m // 2)) if z is not None else None
    out_dtype = p["out_dtype"] or dt
    # `out` is a view into a larger buffer whose border holds a sentinel
    big = torch.full((m + 2, n + 4), -7.25, dtype=out_dtype)
    out = big[1:m + 1, 2:n + 2].view(x.shape)
    before = big.clone()
    nbg, rms, act = p["gate"] != "before", p["rms"], p["act"]
    y, mean, rstd = layer_norm_fwd(x, w, b, p["eps"], z=z, out=out, group_size=p["gs"], norm_before_gate=nbg,
                                   is_rms_norm=rms, activation=act, backend=p["backend"])
    assert y is out
    inside = torch.zeros_like(big, dtype=torch.bool)
    inside[1:m + 1, 2:n + 2] = True
    assert torch.equal(big[~inside], before[~inside]), "wrote outside out"
    gs = p["gs"] or n
    assert rstd.shape == ((n // gs) * m,) and (mean is None) == rms
    _check_against_float64(y, mean, rstd, x, w, b, z, p["eps"], gs, nbg, rms, act, out_dtype)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(m=st.sampled_from([1, 5, 33]), groups=st.sampled_from([1, 3]), gs=st.sampled_from([4, 64, 96]),
       dtype=st.sampled_from(DTYPES), gate=st.sampled_from(["none", "after", "before"]),
       act=st.sampled_from(["swish", "sigmoid"]), rms=st.booleans(), bias=st.booleans(),
       transposed=st.booleans(), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**16))
def test_property_gradients_match_float64(m, groups, gs, dtype, gate, act, rms, bias, transposed, backend, seed):
    n = groups * gs
    x, z, w, b = make_inputs(m, n, dtype, gate=gate != "none", bias=bias, seed=seed,
                             layout=("transposed" if transposed else "contiguous", "contiguous"))
    dy = make_like(x, seed=seed + 1)
    nbg = gate != "before"
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    layernorm_fn(leaves[0], leaves[2], leaves[3], leaves[1], 1e-6, gs, nbg, rms, activation=act,
                 backend=backend).backward(dy)
    grads = [t.grad if t is not None else None for t in leaves]
    assert all(g is None or g.dtype == dtype for g in grads)
    check_gradients(grads, x, w, b, z, dy, 1e-6, gs, nbg, rms, act)


# ---------------------------------------------------------------------------
# Hard numerics, each against float64
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("gs", [None, 64])
def test_large_offset_rows(backend, gs):
    """mean 1e4, std 1e-2: a two-pass variance holds the tolerance, a one-pass variance would not."""
    g = _gen(1)
    x = 1e4 + 1e-2 * torch.randn(16, 256, generator=g)
    w, b = 1 + 0.1 * torch.randn(256, generator=g), 0.1 * torch.randn(256, generator=g)
    y, mean, rstd = layer_norm_fwd(x, w, b, 1e-6, group_size=gs, backend=backend)
    _check_against_float64(y, mean, rstd, x, w, b, None, 1e-6, gs, True, False, "swish")
    # the check has teeth: E[x^2] - E[x]^2 in float32 misses the tolerance by orders of magnitude
    xs = x.view(16, -1, gs or 256)
    one_pass = ((xs * xs).mean(-1) - xs.mean(-1) ** 2).clamp_min(0)
    rstd_one_pass = torch.rsqrt(one_pass + 1e-6).t().reshape(-1)
    ref_rstd = gated_norm_reference(x, w, b, None, 1e-6, gs)[2]
    assert (rstd_one_pass.double() - ref_rstd).abs().max() > 10 * (rstd.double() - ref_rstd).abs().max()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_fp16_subnormal_inputs(backend, rms, eps):
    g = _gen(2)
    x = (3e-6 * torch.randn(8, 128, generator=g)).half()  # below fp16's smallest normal (6.1e-5)
    assert (x.abs() < torch.finfo(torch.float16).smallest_normal).float().mean() > 0.9
    w = torch.ones(128, dtype=torch.float16)
    y, mean, rstd = layer_norm_fwd(x, w, None, eps, group_size=32, is_rms_norm=rms, backend=backend)
    _check_against_float64(y, mean, rstd, x, w, None, None, eps, 32, True, rms, "swish")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
def test_bf16_subnormal_inputs_with_eps(backend, rms):
    g = _gen(3)
    x = (1e-39 * torch.randn(8, 128, generator=g)).bfloat16()  # bf16 (and fp32) subnormals
    w = torch.ones(128, dtype=torch.bfloat16)
    y, mean, rstd = layer_norm_fwd(x, w, None, 1e-6, is_rms_norm=rms, backend=backend)
    _check_against_float64(y, mean, rstd, x, w, None, None, 1e-6, None, True, rms, "swish")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("gate", ["none", "after", "before"])
def test_fp16_near_max_no_overflow(backend, rms, gate):
    """|x| up to 65504: x^2 overflows float16 but not the float32 accumulation."""
    g = _gen(4)
    x = (2e4 * torch.randn(8, 256, generator=g)).clamp(-65504, 65504).half()
    x[0, 0] = 65504
    x[1, 5] = -65504
    z = torch.full_like(x, 3.0) if gate != "none" else None
    w = torch.ones(256, dtype=torch.float16)
    y, mean, rstd = layer_norm_fwd(x, w, None, 1e-6, z=z, group_size=64, norm_before_gate=gate != "before",
                                   is_rms_norm=rms, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    _check_against_float64(y, mean, rstd, x, w, None, z, 1e-6, 64, gate != "before", rms, "swish")


# The float32 sums of x and x^2 overflow for |x| above ~1.8e19 (bf16 and fp32 go to 3.4e38) and the
# squares underflow below ~1e-19; float64 has neither problem. Groups out of range are redone divided
# by a power of two of their max |x| (the "range rescue"), on every backend and path.
EXTREME = [(3e37, 1e-6), (-5e37, 1e-6), (1e25, 0.0), (1e-30, 0.0), (1e-39, 0.0)]

#: The backends plus the native backend's accelerator path, which CI runs on CPU tensors through the registry.
PATHS = [*BACKENDS, "native-accel"]


def _on_path(path: str):
    """(backend name, context that routes it): "native-accel" serves native on CPU with the accelerator path."""
    if path == "native-accel":
        from gatednorm import ops
        from gatednorm.backends.native_accel import NativeAccelBackend

        return "native", ops.override_impl("native", "cpu", NativeAccelBackend())
    return path, contextlib.nullcontext()


@pytest.mark.parametrize("path", _params(PATHS))
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("gate", ["none", "after", "before"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("scale", "eps"), EXTREME)
def test_extreme_range_matches_float64(path, rms, gate, dtype, scale, eps):
    g = _gen(5)
    x = (scale * (torch.randn(4, 128, generator=g, dtype=torch.float64) + (0.0 if rms else 2.0))).to(dtype)
    x[3, 64:] = torch.randn(64, generator=g, dtype=torch.float64).to(dtype)  # an ordinary group beside them
    z = (torch.rand(4, 128, generator=g) * 3 - 1).to(dtype) if gate != "none" else None
    w = (1 + 0.2 * torch.randn(128, generator=g)).to(dtype)
    b = (0.2 * torch.randn(128, generator=g)).to(dtype)
    backend, route = _on_path(path)
    with route:
        y, mean, rstd = layer_norm_fwd(x, w, b, eps, z=z, group_size=64, norm_before_gate=gate != "before",
                                       is_rms_norm=rms, backend=backend)
    assert torch.isfinite(y).all()
    _check_against_float64(y, mean, rstd, x, w, b, z, eps, 64, gate != "before", rms, "swish")


@pytest.mark.parametrize("path", _params(PATHS))
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(("scale", "eps"), [EXTREME[0], EXTREME[3], (1.0, 1e-6)])
@pytest.mark.parametrize(("dtype", "gate"), [(torch.bfloat16, "after"), (torch.bfloat16, "before"),
                                             (torch.float32, "after"), (torch.float32, "before")])
def test_inference_call_writes_what_the_forward_writes(path, rms, scale, eps, dtype, gate):
    """``layernorm_fn`` without autograd discards the statistics (a backend may then skip them: the compiled
    backend on CPU checks the range from the extremes of its sums, and on these small rows returns its graph's
    own output instead of writing into one): the same bits as ``layer_norm_fwd``'s y, also where rows are
    rescued beside ordinary ones."""
    g = _gen(11)
    x = (scale * (torch.randn(6, 128, generator=g, dtype=torch.float64) + (0.0 if rms else 2.0))).to(dtype)
    x[3] = torch.randn(128, generator=g).to(dtype)  # an ordinary row beside rescued ones
    z, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((6, 128), (128,), (128,)))
    before = gate == "before"
    backend, route = _on_path(path)
    with route, torch.no_grad():
        y, mean, rstd = layer_norm_fwd(x, w, b, eps, z=z, group_size=64, norm_before_gate=not before,
                                       is_rms_norm=rms, backend=backend)
        y_inference = layernorm_fn(x, w, b, z, eps, 64, norm_before_gate=not before, is_rms_norm=rms,
                                   backend=backend)
    assert y_inference.dtype == dtype and y_inference.is_contiguous()
    assert torch.equal(bits(y_inference), bits(y))
    _check_against_float64(y_inference, mean, rstd, x, w, b, z, eps, 64, not before, rms, "swish")


@pytest.mark.skipif("compiled" not in BACKENDS, reason="torch.compile unavailable")
@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("gate", ["after", "before"])
def test_compiled_inference_output_of_either_graph(fresh, gate, monkeypatch):
    """The compiled backend's inference call on CPU writes an output of its own, advised onto huge pages, where
    that output's memory is fresh, and otherwise takes the graph's own output (with the gate before the norm in
    float32 always): either way the bits of ``layer_norm_fwd``'s y, rescued rows included. The size threshold
    is lowered and freshness decided here, so that both ways run on small rows."""
    from gatednorm.backends import compiled

    asked: list[int] = []

    def advised_fresh(t: torch.Tensor) -> bool:
        asked.append(t.numel())
        return fresh

    monkeypatch.setattr(compiled, "MIN_BYTES", 0)
    monkeypatch.setattr(compiled, "advised_fresh", advised_fresh)
    g = _gen(13)
    x = torch.randn(6, 128, generator=g)
    x[1] *= 3e37  # a rescued row beside ordinary ones
    z, w, b = (torch.randn(*shape, generator=g) for shape in ((6, 128), (128,), (128,)))
    before = gate == "before"
    with torch.no_grad():
        y, mean, rstd = layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=64, norm_before_gate=not before,
                                       backend="compiled")
        y_inference = layernorm_fn(x, w, b, z, 1e-6, 64, norm_before_gate=not before, backend="compiled")
    assert asked == ([] if before else [x.numel()])  # gate before, float32: the graph's buffer, never asked
    assert y_inference.is_contiguous() and torch.equal(bits(y_inference), bits(y))
    _check_against_float64(y_inference, mean, rstd, x, w, b, z, 1e-6, 64, not before, False, "swish")


@pytest.mark.slow
@pytest.mark.skipif("compiled" not in BACKENDS, reason="torch.compile unavailable")
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(("scale", "eps"), EXTREME)
def test_compiled_in_graph_rescue(rms, scale, eps):
    """The compiled graph accelerators get (every group scaled in the graph, no host check), run on CPU."""
    from gatednorm import ops
    from gatednorm.backends.compiled import CompiledBackend

    g = _gen(9)
    x = (scale * (torch.randn(3, 128, generator=g, dtype=torch.float64) + (0.0 if rms else 2.0))).bfloat16()
    x[2] = torch.randn(128, generator=g).bfloat16()
    z = torch.randn(3, 128, generator=g).bfloat16()
    w = torch.ones(128, dtype=torch.bfloat16)
    with ops.override_impl("compiled", "cpu", CompiledBackend(rescue_inline=True)):
        y, mean, rstd = layer_norm_fwd(x, w, None, eps, z=z, group_size=64, is_rms_norm=rms, backend="compiled")
    _check_against_float64(y, mean, rstd, x, w, None, z, eps, 64, True, rms, "swish")
    plain_y = layer_norm_fwd(x[2:], w, None, eps, z=z[2:], group_size=64, is_rms_norm=rms, backend="native")[0]
    # the ordinary row: as usual (the fixed bound: the check before the shared model, kept)
    check_pair(y[2:], plain_y, x[2:], w, None, z[2:], eps, 64, True, rms, fixed=(0.0, 2**-7))


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("gate", ["after", "before"])
def test_triton_rescue_kernel_matches_in_kernel_rescue(rms, gate):
    """Large calls rescue in a separate kernel, small ones in-kernel: same rows, same bits, both right."""
    from gatednorm import ops
    from gatednorm.backends.triton import TritonBackend

    g = _gen(10)
    x = torch.randn(40, 256, generator=g).bfloat16()
    x[3] = (3e37 * torch.randn(256, generator=g)).bfloat16()
    x[17, 64:128] = (1e30 * torch.randn(64, generator=g)).bfloat16()
    x[39, 192:] = 1e-30  # tiny, eps = 0 below
    z = torch.randn(40, 256, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(256, generator=g)).bfloat16()

    def run(threshold):
        # rescue_scan_rows=16: several scan programs, a partial last one
        with ops.override_impl("triton", "cpu", TritonBackend(threshold, rescue_scan_rows=16)):
            return layer_norm_fwd(x, w, None, 0.0, z=z, group_size=64, norm_before_gate=gate == "after",
                                  is_rms_norm=rms, backend="triton")

    in_kernel, separate = run(1 << 40), run(0)
    for a, b in zip(in_kernel, separate, strict=True):
        if a is not None:  # bit for bit (NaN where LayerNorm meets the constant group with eps = 0)
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    _check_against_float64(*separate, x, w, None, z, 0.0, 64, gate == "after", rms, "swish")


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton unavailable")
@pytest.mark.parametrize("gs", [2048, 5120])
@pytest.mark.parametrize("rms", [False, True])
def test_triton_one_row_tiles_rescue_in_kernel_as_after(gs, rms):
    """The same for groups whose tile is one row (2048; 5120 padded to 8192): a program holds one group, which it
    redoes from memory when out of range, with the scan kernel's code. Rows far above and below float32's sums'
    range, beside ordinary ones, in both groups of a row; the in-kernel result bit for bit the scan's."""
    from gatednorm import ops
    from gatednorm.backends.triton import TritonBackend

    g = _gen(11)
    n = 2 * gs
    x = torch.randn(6, n, generator=g).bfloat16()
    x[1] = (3e37 * torch.randn(n, generator=g)).bfloat16()
    x[4, gs:] = (1e30 * torch.randn(gs, generator=g)).bfloat16()
    x[5, :gs] = (1e-30 * torch.randn(gs, generator=g)).bfloat16()  # tiny, eps = 0 below
    z = torch.randn(6, n, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(n, generator=g)).bfloat16()

    def run(threshold):
        with ops.override_impl("triton", "cpu", TritonBackend(threshold, rescue_scan_rows=4)):
            return layer_norm_fwd(x, w, None, 0.0, z=z, group_size=gs, norm_before_gate=True, is_rms_norm=rms,
                                  backend="triton")

    in_kernel, separate = run(1 << 40), run(0)
    for a, b in zip(in_kernel, separate, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _check_against_float64(*in_kernel, x, w, None, z, 0.0, gs, True, rms, "swish")


@pytest.mark.parametrize("path", _params(PATHS))
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("gate", ["after", "before"])
@pytest.mark.parametrize("scale", [3e37, 1e25])
def test_extreme_range_gradients(path, rms, gate, scale):
    """The backward needs no rescue of its own: from the rescued statistics its gradients match float64."""
    g = _gen(12)
    x = (scale * (torch.randn(4, 128, generator=g, dtype=torch.float64) + (0.0 if rms else 2.0))).float()
    z, dy = torch.randn(4, 128, generator=g), torch.randn(4, 128, generator=g)
    w = 1 + 0.1 * torch.randn(128, generator=g)
    ours = [t.clone().requires_grad_() for t in (x, z, w)]
    backend, route = _on_path(path)
    with route:
        y, _, _ = layer_norm_fwd(ours[0], ours[2], None, 1e-6, z=ours[1], group_size=64,
                                 norm_before_gate=gate == "after", is_rms_norm=rms, backend=backend)
        y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, z, w)]
    gated_norm_reference(ref[0], ref[2], None, ref[1], 1e-6, 64, gate == "after", rms, "swish")[0].backward(
        dy.double())
    for name, a, r in zip(("dx", "dz", "dweight"), ours, ref, strict=True):
        rel = ((a.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
        assert rel < 2e-6, f"{name}: {rel:.3g}"  # normwise, as before the shared model; kept
    check_gradients((ours[0].grad, ours[1].grad, ours[2].grad, None), x, w, None, z, dy, 1e-6, 64, gate == "after",
                    rms)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
def test_extreme_range_wide_groups(backend, rms):
    """Groups wider than the Triton kernel's register block take the chunked path (its own rescue)."""
    gs = 10000
    g = _gen(7)
    x = (3e37 * torch.randn(2, 2 * gs, generator=g, dtype=torch.float64)).bfloat16()
    x[1, gs:] = torch.randn(gs, generator=g).bfloat16()
    w = torch.ones(2 * gs, dtype=torch.bfloat16)
    y, mean, rstd = layer_norm_fwd(x, w, None, 1e-6, group_size=gs, is_rms_norm=rms, backend=backend)
    _check_against_float64(y, mean, rstd, x, w, None, None, 1e-6, gs, True, rms, "swish")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("value", [3e37, -3e38, 1e30])
def test_constant_group_far_from_zero(backend, value):
    """A constant LayerNorm group: var = 0, so rstd = 1/sqrt(eps) and y = bias, even where the rescued
    (scaled) eps underflows. bf16 values sum exactly in float32, so the mean is exact, as in float64."""
    x = torch.full((2, 128), value).bfloat16()
    x[1, :64] = 1.0
    w = torch.ones(128, dtype=torch.bfloat16)
    b = torch.full((128,), 0.5, dtype=torch.bfloat16)
    y, mean, rstd = layer_norm_fwd(x, w, b, 1e-6, group_size=64, backend=backend)
    assert torch.equal(y[0], b) and torch.equal(y[1, 64:], b[64:])
    ref_rstd = torch.tensor(1e-6, dtype=torch.float64).rsqrt()
    torch.testing.assert_close(rstd.double(), ref_rstd.expand(4), rtol=2e-7, atol=0)
    torch.testing.assert_close(mean.double().view(2, 2).t(),
                               torch.tensor([[value, value], [1.0, value]]).bfloat16().double(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
def test_rescue_leaves_ordinary_rows_bit_identical(backend, rms):
    """A rescued group changes nothing else: ordinary rows beside it keep the bits they have alone."""
    g = _gen(8)
    x, z, w, _ = make_inputs(16, 256, torch.bfloat16, bias=False, seed=8)

    def run(xx, zz):
        return layer_norm_fwd(xx, w, None, 1e-6, z=zz, group_size=64, is_rms_norm=rms, backend=backend)

    y_plain, _, rstd_plain = run(x, z)
    x_mixed = x.clone()
    x_mixed[5] = (1e36 * torch.randn(256, generator=g)).bfloat16()
    x_mixed[9, :64] = 1e-35  # one group near the bottom of the range (eps keeps it in range)
    y_mixed, _, rstd_mixed = run(x_mixed, z)
    keep = [i for i in range(16) if i not in (5, 9)]
    assert torch.equal(y_mixed[keep], y_plain[keep])
    assert torch.equal(y_mixed[9, 64:], y_plain[9, 64:])  # the row's other groups too
    assert torch.isfinite(y_mixed[5]).all() and torch.isfinite(y_mixed[9]).all()
    assert torch.equal(rstd_plain.view(4, 16)[:, keep], rstd_mixed.view(4, 16)[:, keep])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_constant_rows_with_eps_zero(backend, rms, dtype):
    """var = 0 and eps = 0: rstd = inf and y = 0 * inf = NaN, as the formula (and float64) says."""
    g = _gen(6)
    x = torch.randn(4, 64, generator=g).to(dtype)
    x[1] = 0
    x[2, :32] = 1.5  # a constant group: LayerNorm var 0, RMSNorm not
    w = torch.ones(64, dtype=dtype)
    y, mean, rstd = layer_norm_fwd(x, w, None, 0.0, group_size=32, is_rms_norm=rms, backend=backend)
    assert torch.isinf(rstd.view(2, 4)[:, 1]).all() and torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 3]]).all()
    _check_against_float64(y, mean, rstd, x, w, None, None, 0.0, 32, True, rms, "swish")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("gate,where", [("none", "x"), ("after", "x"), ("before", "x"), ("after", "z"),
                                        ("before", "z")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_propagates_to_its_row_and_group_only(backend, rms, gate, where, bad):
    m, n, gs = 6, 96, 32
    x, z, w, b = make_inputs(m, n, gate=gate != "none", seed=7)
    (x if where == "x" else z)[2, 40] = bad  # row 2, group 1
    nbg = gate != "before"
    y, mean, rstd = layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                   backend=backend)
    clean = torch.ones(m, n, dtype=torch.bool)
    clean[2, 32:64] = False
    assert torch.isfinite(y[clean]).all(), "a non-finite value leaked into another row or group"
    assert not torch.isfinite(y[2, 32:64]).all() or (where == "z" and nbg), "non-finite input was masked"
    _check_against_float64(y, mean, rstd, x, w, b, z, 1e-6, gs, nbg, rms, "swish")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("act", ["swish", "sigmoid"])
@pytest.mark.parametrize("gate", ["after", "before"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_saturation_pm80(backend, act, gate, dtype):
    g = _gen(8)
    x = torch.randn(8, 64, generator=g).to(dtype)
    z = (80.0 * torch.sign(torch.randn(8, 64, generator=g))).to(dtype)
    z[:, :4] = torch.tensor([80.0, -80.0, 40.0, -40.0])
    w = torch.ones(64, dtype=dtype)
    nbg = gate == "after"
    if not nbg:  # gating before the norm with z = -80 everywhere in a row would leave a ~1e-33 row
        z[:, 4] = 80.0
    y, mean, rstd = layer_norm_fwd(x, w, None, 1e-6, z=z, norm_before_gate=nbg, activation=act, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
    _check_against_float64(y, mean, rstd, x, w, None, z, 1e-6, None, nbg, False, act)
    xs, zs = x.clone().requires_grad_(), z.clone().requires_grad_()
    layernorm_fn(xs, w, None, zs, 1e-6, None, nbg, activation=act, backend=backend).sum().backward()
    assert torch.isfinite(xs.grad).all() and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------------------
# Batch invariance and determinism
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms,gate", [(False, "after"), (True, "before"), (False, "none")])
def test_batch_invariance(backend, dtype, rms, gate):
    """A row's output bits (and its dx, dz) do not depend on the batch size or the row's position."""
    n, gs = 256, 64
    row_x, row_z, w, b = make_inputs(1, n, dtype, gate=gate != "none", seed=9)
    row_dy = make_like(row_x, seed=10)
    kw = {"group_size": gs, "norm_before_gate": gate != "before", "is_rms_norm": rms, "backend": backend}

    def run(x, z, dy):
        xs = x.clone().requires_grad_()
        zs = z.clone().requires_grad_() if z is not None else None
        y = layernorm_fn(xs, w, b, zs, 1e-6, **kw)
        y.backward(dy)
        return y.detach(), xs.grad, (zs.grad if zs is not None else None)

    alone = run(row_x, row_z, row_dy)
    for batch in (1, 2, 3, 64, 1000, 4096):
        positions = sorted({0, batch // 2, batch - 1})
        # small batches: one call per position, the row among other rows; large ones: the row at every
        # position of one call (their other rows still differ; one call instead of three)
        for placed in ([[p] for p in positions] if batch <= 3 else [positions]):
            x, z, _, _ = make_inputs(batch, n, dtype, gate=gate != "none", bias=False)
            dy = make_like(x)
            x[placed], dy[placed] = row_x[0], row_dy[0]
            if z is not None:
                z[placed] = row_z[0]
            got = run(x, z, dy)
            for pos in placed:
                for a, c in zip(alone, got, strict=True):
                    if a is not None:
                        assert torch.equal(bits(a[0]), bits(c[pos])), f"batch {batch}, position {pos}"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_runs_same_bits_gradients_included(backend, dtype):
    m, n = 300, 640
    x, z, w, b = make_inputs(m, n, dtype, seed=10)
    dy = make_like(x, seed=11)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, b, z)]
        y, mean, rstd = layer_norm_fwd(*leaves[:3], 1e-6, z=leaves[3], group_size=128, backend=backend)
        y.backward(dy)
        return [y.detach(), mean, rstd] + [t.grad for t in leaves]

    first = run()
    for _ in range(3):
        for a, c in zip(first, run(), strict=True):
            assert torch.equal(bits(a), bits(c))


# ---------------------------------------------------------------------------
# Bad input: table-driven; the exception names the argument; `out` is left untouched
# ---------------------------------------------------------------------------

def _good():
    x, z, w, b = make_inputs(4, 64, seed=11)
    return {
        "x": x, "weight": w, "bias": b, "z": z, "eps": 1e-6,
        "group_size": 16, "norm_before_gate": True, "is_rms_norm": False, "activation": "swish",
        "backend": "native",
    }


_META = torch.device("meta")
BAD_INPUTS = [
    # (case id, overrides, exception type, the text the message must contain)
    ("x-not-tensor", {"x": [[1.0] * 64] * 4}, TypeError, "x"),
    ("x-int", {"x": torch.ones(4, 64, dtype=torch.int32)}, TypeError, "x"),
    ("x-bool", {"x": torch.ones(4, 64, dtype=torch.bool)}, TypeError, "x"),
    ("x-0d", {"x": torch.tensor(1.0)}, ValueError, "x"),
    ("x-empty-N", {"x": torch.randn(4, 0)}, ValueError, "x"),
    ("weight-shape", {"weight": torch.randn(63)}, ValueError, "weight"),
    ("weight-2d", {"weight": torch.randn(1, 64)}, ValueError, "weight"),
    ("weight-int", {"weight": torch.ones(64, dtype=torch.int64)}, TypeError, "weight"),
    ("weight-device", {"weight": torch.randn(64, device=_META)}, ValueError, "weight"),
    ("weight-none", {"weight": None}, TypeError, "weight"),
    ("bias-shape", {"bias": torch.randn(32)}, ValueError, "bias"),
    ("bias-int", {"bias": torch.ones(64, dtype=torch.int32)}, TypeError, "bias"),
    ("bias-device", {"bias": torch.randn(64, device=_META)}, ValueError, "bias"),
    ("z-shape", {"z": torch.randn(4, 32)}, ValueError, "z"),
    ("z-transposed-shape", {"z": torch.randn(64, 4)}, ValueError, "z"),
    ("z-int", {"z": torch.ones(4, 64, dtype=torch.int32)}, TypeError, "z"),
    ("z-device", {"z": torch.randn(4, 64, device=_META)}, ValueError, "z"),
    ("eps-negative", {"eps": -1e-6}, ValueError, "eps"),
    ("eps-nan", {"eps": float("nan")}, ValueError, "eps"),
    ("eps-str", {"eps": "1e-6"}, TypeError, "eps"),
    ("eps-bool", {"eps": True}, TypeError, "eps"),
    ("eps-tensor", {"eps": torch.tensor(1e-6)}, TypeError, "eps"),
    ("group_size-zero", {"group_size": 0}, ValueError, "group_size"),
    ("group_size-negative", {"group_size": -16}, ValueError, "group_size"),
    ("group_size-not-divisor", {"group_size": 24}, ValueError, "group_size"),
    ("group_size-too-big", {"group_size": 128}, ValueError, "group_size"),
    ("group_size-float", {"group_size": 16.0}, TypeError, "group_size"),
    ("group_size-bool", {"group_size": True}, TypeError, "group_size"),
    ("norm_before_gate-str", {"norm_before_gate": "yes"}, TypeError, "norm_before_gate"),
    ("is_rms_norm-int", {"is_rms_norm": 1}, TypeError, "is_rms_norm"),
    ("activation-unknown", {"activation": "relu"}, ValueError, "activation"),
    ("activation-none", {"activation": None}, ValueError, "activation"),
    ("activation-case", {"activation": "SiLU"}, ValueError, "activation"),
    ("backend-unknown", {"backend": "cudnn"}, ValueError, "backend"),
    ("backend-case", {"backend": "Native"}, ValueError, "backend"),
    ("out-shape", {"out": torch.empty(4, 63)}, ValueError, "out"),
    ("out-transposed-shape", {"out": torch.empty(64, 4)}, ValueError, "out"),
    ("out-int", {"out": torch.empty(4, 64, dtype=torch.int32)}, TypeError, "out"),
    ("out-device", {"out": torch.empty(4, 64, device=_META)}, ValueError, "out"),
    ("out-not-tensor", {"out": [0.0] * 256}, TypeError, "out"),
    ("out-with-autograd", {"x": torch.randn(4, 64, requires_grad=True)}, ValueError, "out"),
    ("x-device", {"x": torch.randn(4, 64, device=_META)}, ValueError, "weight"),  # names the first mismatch
]
if "triton" not in BACKENDS:
    BAD_INPUTS.append(("backend-triton-unavailable", {"backend": "triton"}, ValueError, "triton"))


@pytest.mark.parametrize(("case", "overrides", "exc", "names"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument_and_leaves_out_untouched(case, overrides, exc, names):
    kw = _good()
    out = torch.full((4, 64), -3.5)
    kw["out"] = out
    kw.update(overrides)
    x, w, b, eps = kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("eps")
    with pytest.raises(exc) as info:
        layer_norm_fwd(x, w, b, eps, **kw)
    assert names in str(info.value), f"message does not name {names!r}: {info.value}"
    assert torch.equal(out, torch.full((4, 64), -3.5)), "an invalid call wrote into out"


@pytest.mark.parametrize(("case", "overrides", "exc", "names"),
                         [c for c in BAD_INPUTS if not c[0].startswith("out")], ids=lambda c: str(c)[:30])
def test_bad_input_differentiable_entry_point(case, overrides, exc, names):
    kw = _good()
    kw.update(overrides)
    x, w, b, z = kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("z")
    eps, gs, nbg, rms = kw.pop("eps"), kw.pop("group_size"), kw.pop("norm_before_gate"), kw.pop("is_rms_norm")
    with pytest.raises(exc) as info:
        layernorm_fn(x, w, b, z, eps, gs, nbg, rms, **kw)
    assert names in str(info.value)


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("GATEDNORM_BACKEND", "fast")
    kw = _good()
    with pytest.raises(ValueError, match="GATEDNORM_BACKEND"):
        layer_norm_fwd(kw["x"], kw["weight"], kw["bias"], 1e-6)


@pytest.mark.parametrize("kwargs,names", [
    ({"hidden_size": 0}, "hidden_size"), ({"hidden_size": 64.0}, "hidden_size"),
    ({"hidden_size": 64, "group_size": 24}, "group_size"), ({"hidden_size": 64, "activation": "gelu"}, "activation"),
])
def test_bad_module_arguments(kwargs, names):
    with pytest.raises((TypeError, ValueError), match=names):  # TypeError for a float hidden_size
        gatednorm.LayerNorm(**kwargs)


# ---------------------------------------------------------------------------
# Thread safety
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_module_called_from_threads_equals_serial(backend):
    mod = gatednorm.RMSNorm(384, eps=1e-5, group_size=128, norm_before_gate=False, backend=backend)
    with torch.no_grad():
        mod.weight.copy_(make_inputs(1, 384, gate=False, bias=False, seed=12)[2])
    inputs = [(x.bfloat16().float(), z) for x, z, _, _ in (make_inputs(37 + i, 384, bias=False, seed=100 + i)
                                                          for i in range(24))]

    def work(pair):
        x, z = pair
        xs = x.clone().requires_grad_()
        y = mod(xs, z)
        (dx,) = torch.autograd.grad(y, (xs,), torch.ones_like(y))
        return y.detach(), dx, threading.get_ident()

    serial = [work(p) for p in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, inputs))
    assert len({t[2] for t in threaded}) > 1 or len(inputs) == 1
    for (y0, dx0, _), (y1, dx1, _) in zip(serial, threaded, strict=True):
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
