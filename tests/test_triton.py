"""The Triton backend against the float64 reference and the native backend.

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py), so shapes stay small. Skipped when
triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # every test runs Triton's interpreter on CPU
pytest.importorskip("triton")

from helpers import (  # noqa: E402
    VARIANTS,
    check_forward,
    check_forward_pair,
    check_gradients,
    check_pair,
    make_inputs,
    make_like,
    relayout,
    variant_id,
)

from gatednorm import native  # noqa: E402
from gatednorm.functional import layer_norm_fwd, layernorm_fn  # noqa: E402
from gatednorm.spec import NormSpec  # noqa: E402

tk = pytest.importorskip("gatednorm.backends.triton.launch")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
GRADS = ("dx", "dz", "dweight", "dbias")


def _spec(gs, v):
    rms, nbg, act, _, _ = v
    return NormSpec(EPS, gs, nbg, rms, act)


def _args(spec):
    """The float64 helpers' trailing arguments for a spec."""
    return spec.eps, spec.group_size, spec.norm_before_gate, spec.is_rms_norm, spec.activation


# Every comparison uses the shared tolerance model (tests/helpers.py). A ``fixed=(rtol, atol, "max")`` next to it,
# |a - b| <= rtol * |b| + atol * max|b| elementwise, is the bound the test asserted before, kept where the model is
# looser on this data (it allowed more than 1.5x that bound on some elements), so no check got weaker.


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("m,n,gs", [(7, 192, 96), (5, 64, 64)])
def test_fp32_against_float64_reference(v, m, n, gs):
    spec = _spec(gs, v)
    x, z, w, b = make_inputs(m, n, torch.float32, gate=v[4], bias=v[3], seed=m * n + gs, device=DEV)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEV)  # poisoned: every element written
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    check_forward(out, mean, rstd, x, w, b, z, *_args(spec), fixed={"mean": (1e-5, 1e-6, "max")})
    dy = make_like(x)
    grads = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    check_gradients(grads, x, w, b, z, dy, *_args(spec), fixed=dict.fromkeys(("dx", "dz"), (1e-4, 1e-5, "max")))
    assert all((g is None) == (t is None) for g, t in zip(grads, (x, z, w, b), strict=True))


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
def test_bf16_against_native(v):
    # group of 640 (not a power of two: padded lanes of x and z are filled), 2 groups a row
    m, n, gs = 5, 1280, 640
    spec = _spec(gs, v)
    x, z, w, b = make_inputs(m, n, torch.bfloat16, gate=v[4], bias=v[3], seed=11, device=DEV)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
    out_n = torch.empty_like(out)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    mean_n, rstd_n = native.forward(x, w, b, z, spec, out_n)
    # same fp32 function, one bf16 rounding each: at most an ulp apart
    check_forward_pair((out, mean, rstd), (out_n, mean_n, rstd_n), x, w, b, z, *_args(spec), what="native",
                       fixed={"rstd": (1e-5, 0.0, "max"), "mean": (1e-5, 1e-6, "max")})
    dy = make_like(x)
    got = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    ref = native.backward(dy, x, w, b, z, mean_n, rstd_n, spec, True, True, True, True)
    for a, r in zip(got, ref, strict=True):
        assert (a is None) == (r is None) and (a is None or a.dtype == r.dtype)
    check_gradients(got, x, w, b, z, dy, *_args(spec), against=ref)


@pytest.mark.parametrize("is_rms,nbg", [(False, False), (True, True), (False, True)])
def test_wide_group_loop_path(is_rms, nbg):
    """Groups wider than MAX_BLOCK are looped over in chunks (here 2.5 * MAX_BLOCK: two full chunks and a half)."""
    gs = 5 * tk.MAX_BLOCK // 2
    assert tk._fwd_config(gs, 4)[1] == 3 and tk._bwd_config(gs, 4)[1] == 3
    m, n = 2, gs
    spec = NormSpec(EPS, gs, nbg, is_rms, "swish")
    x, z, w, b = make_inputs(m, n, torch.float32, seed=3, device=DEV)
    x = x + 100.0  # a large common offset: a one-pass E[x^2]-E[x]^2 variance would lose digits here
    out = torch.empty(m, n, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    check_forward(out, mean, rstd, x, w, b, z, *_args(spec),
                  fixed={"y": (1e-5, 1e-5, "max"), "rstd": (1e-5, 0.0, "max"), "mean": (1e-6, 0.0, "max")})
    dy = make_like(x)
    grads = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    check_gradients(grads, x, w, b, z, dy, *_args(spec),
                    fixed=dict.fromkeys(("dx", "dz", "dweight"), (1e-4, 1e-5, "max")))


@pytest.mark.parametrize("is_rms,nbg,bias", [(True, False, False), (False, False, True)])
def test_group_of_two_max_blocks_runs_the_forward_in_one_tile(is_rms, nbg, bias):
    """A group of exactly FWD_ONE_TILE_GROUP (2 * MAX_BLOCK) features: the forward holds it in one 32-warp tile (one
    pass over the row, no chunks), against float64 with every output element written, LayerNorm + bias included;
    the chunked launch shape the group had before gives the same function; the backward keeps its two chunks."""
    gs = tk.FWD_ONE_TILE_GROUP
    assert tk._fwd_config(gs, 2) == (gs, 1, 1, 32, tk.ORDER_ROWS_FASTEST) and tk._bwd_config(gs, 2)[1] == 2
    assert tk._fwd_config(gs + 1024, 2)[1] > 1  # other wide groups keep the chunks
    spec = NormSpec(EPS, gs, nbg, is_rms, "swish")
    x, z, w, b = make_inputs(3, gs, torch.float32, bias=bias, seed=17, device=DEV)
    x = x + 30.0  # a common offset: a one-pass variance would lose digits
    out = torch.full_like(x, float("nan"))
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    check_forward(out, mean, rstd, x, w, b, z, *_args(spec))
    chunked = torch.full_like(x, float("nan"))
    mean_c, rstd_c = tk.forward(x, w, b, z, spec, chunked, config=(tk.MAX_BLOCK, 1, 16, tk.ORDER_ROWS_FASTEST))
    check_forward(chunked, mean_c, rstd_c, x, w, b, z, *_args(spec))
    torch.testing.assert_close(out, chunked, rtol=1e-5, atol=1e-5)


def test_forward_launch_shape_per_gpu_model():
    """FWD_TUNED_BY_MODEL overrides FWD_TUNED's entries for the GPU model it names only: other models (and the
    interpreter's CPU tensors, model "") take the shared table; either way the shape depends on the group size and
    dtype, never on M."""
    h100 = "NVIDIA H100 80GB HBM3"
    assert tk._fwd_config(2048, 2, h100)[2:] == (2, 8, tk.ORDER_ROWS_FASTEST)
    assert tk._fwd_config(5120, 2, h100)[2:] == (1, 8, tk.ORDER_ROWS_FASTEST)
    for model in ("", "NVIDIA H200"):
        assert tk._fwd_config(2048, 2, model)[2:] == tk.FWD_TUNED[(2048, True)]
        assert tk._fwd_config(5120, 2, model)[2:] == tk.FWD_TUNED[(8192, False)]
    for gs in (96, 128, 640, 16384):  # entries the model does not name
        assert tk._fwd_config(gs, 2, h100) == tk._fwd_config(gs, 2)
    assert tk.gpu_model_of(torch.zeros(1)) == ""
    assert tk.fwd_tuned("") == tk.FWD_TUNED and tk.fwd_tuned(h100) == {**tk.FWD_TUNED, **tk.FWD_TUNED_BY_MODEL[h100]}


@pytest.mark.parametrize("is_rms,nbg,bias", [(True, False, False), (False, True, True)])
def test_two_chunk_backward_keeps_partials_in_registers(is_rms, nbg, bias, monkeypatch):
    """Groups of two chunks (MAX_BLOCK < group <= 2 * MAX_BLOCK; here 1.5 * MAX_BLOCK, the second chunk half
    masked) keep each chunk's dweight / dbias sums in registers across a program's row tiles and write its partial
    row once, into memory left uninitialised (here poisoned with NaN: a column left unwritten would show). Against
    float64, and against the same group read in four chunks (the read-modify-write of zeroed partial rows) at the
    same program count, one row a tile: under the interpreter the same dweight / dbias bits (the same additions in
    the same order; dx differs in how the row sums were reduced). Compiled for a GPU, the register sums may take
    the product in a fused multiply-add where the read-modify-write adds it rounded, so there only close."""
    gs = 3 * tk.MAX_BLOCK // 2
    assert tk._bwd_config(gs, 4)[:3] == (tk.MAX_BLOCK, 2, 1)
    m = 9  # several row tiles a program: the register sums run across tiles
    spec = NormSpec(EPS, gs, nbg, is_rms, "swish")
    x, z, w, b = make_inputs(m, gs, torch.float32, bias=bias, seed=5, device=DEV)
    out = torch.empty(m, gs, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    dy = make_like(x)
    assert tk._partials_alloc(3) is torch.zeros and tk._partials_alloc(2) is torch.empty
    poisoned = []

    def alloc(chunks):
        if chunks > 2:
            return torch.zeros
        poisoned.append(chunks)
        return lambda shape, **kw: torch.full(shape, float("nan"), **kw)

    monkeypatch.setattr(tk, "_partials_alloc", alloc)
    two = tk.backward(dy, x, w, b, z, mean, rstd, spec, config=(tk.MAX_BLOCK, 1, 4, 2, False))
    four = tk.backward(dy, x, w, b, z, mean, rstd, spec, config=(tk.MAX_BLOCK // 2, 1, 4, 2, False))
    assert poisoned == [2]
    check_gradients(two, x, w, b, z, dy, *_args(spec),
                    fixed=dict.fromkeys(("dx", "dz", "dweight"), (1e-4, 1e-5, "max")))
    if DEV == "cpu":
        assert torch.equal(two[2], four[2]) and (not bias or torch.equal(two[3], four[3]))
    check_gradients(two, x, w, b, z, dy, *_args(spec), against=four)


def test_non_contiguous_inputs_and_out():
    m, n, gs = 6, 128, 64
    spec = NormSpec(EPS, gs, False, False, "swish")
    # x with feature stride 2 (copied), z transposed, a strided weight
    x, z, w, b = make_inputs(m, n, layout=("strided_cols", "transposed"), device=DEV)
    w = relayout(w[None], "strided_cols")[0]
    out_base = torch.full((m, n + 32), float("nan"), device=DEV)
    out = out_base[:, 16:16 + n]  # row stride n + 32
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    check_forward(out, mean, rstd, x, w, b, z, *_args(spec))
    assert torch.isnan(out_base[:, :16]).all() and torch.isnan(out_base[:, 16 + n:]).all()  # nothing outside
    out_t = torch.empty(n, m, device=DEV).t()  # out with feature stride != 1
    tk.forward(x, w, b, z, spec, out_t)
    check_forward(out_t, None, None, x, w, b, z, *_args(spec), stats=False)
    dy = make_like(x[:1, :1]).expand(m, n)  # stride 0, as from y.sum().backward()
    got = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
    ref = native.backward(dy.contiguous(), x.contiguous(), w.contiguous(), b, z.contiguous(), mean, rstd, spec)
    check_gradients(got, x, w, b, z, dy, *_args(spec), against=ref,
                    fixed=dict.fromkeys(("dx", "dz", "dweight"), (1e-5, 1e-6, "max")))


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_out_dtype(x_dtype, out_dtype):
    m, n, gs = 4, 96, 96
    spec = NormSpec(EPS, gs, True, True, "swish")
    x, z, w, b = make_inputs(m, n, x_dtype, bias=False, seed=5, device=DEV)
    out = torch.empty(m, n, dtype=out_dtype, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    check_forward(out, mean, rstd, x, w, b, z, *_args(spec), out_dtype=out_dtype)


def test_float64_routed_to_native():
    """The kernels compute in float32: ops routes float64 calls for the triton backend to native."""
    m, n = 3, 32
    x, z, w, b = make_inputs(m, n, torch.float64, seed=9, device=DEV)
    out, mean, rstd = layer_norm_fwd(x, w, b, EPS, z=z, group_size=16, norm_before_gate=False, backend="triton")
    assert rstd.dtype == torch.float64 and mean.dtype == torch.float64
    check_forward(out, mean, rstd, x, w, b, z, EPS, 16, False)


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
    x, z, w, b = make_inputs(70, n, torch.bfloat16, bias=False, seed=21, device=DEV)
    dy = make_like(x)

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
    x, z, w, b = make_inputs(m, n, torch.float32, seed=33, device=DEV)
    out = torch.empty(m, n, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out)
    dy = make_like(x)
    first = tk.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    again = tk.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    assert first[0] is None and first[1] is None
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    ref = native.backward(dy, x, w, b, z, mean, rstd, spec, False, False, True, True)
    check_gradients(first, x, w, b, z, dy, *_args(spec), against=ref,
                    fixed=dict.fromkeys(GRADS, (1e-5, 1e-6, "max")))


def test_public_api_with_triton_backend():
    """layernorm_fn / layer_norm_fwd route to the kernels (3-D gate layout, autograd, out=)."""
    t, h, n, gs = 3, 4, 64, 32
    x, z, w, b = make_inputs(t * h, n, device=DEV)
    z = z.view(t, h, n)
    leaves = [v.requires_grad_() for v in (x, z, w, b)]
    y = layernorm_fn(x, w, b, z, eps=EPS, group_size=gs, norm_before_gate=True, backend="triton")
    dy = make_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    y_n = layernorm_fn(x, w, b, z, eps=EPS, group_size=gs, norm_before_gate=True, backend="native")
    grads_n = torch.autograd.grad(y_n, leaves, dy)
    args = (x, w, b, z, EPS, gs, True, False)
    check_pair(y.detach(), y_n.detach(), *args, fixed=(1e-5, 1e-6, "max"))
    check_gradients(grads, *args[:4], dy, *args[4:], against=grads_n, fixed=dict.fromkeys(GRADS, (1e-5, 1e-6, "max")))
    out = torch.empty(t * h, n, dtype=torch.bfloat16, device=DEV)
    with torch.no_grad():
        res, mean, rstd = layer_norm_fwd(x, w, b, EPS, z=z, out=out, group_size=gs, is_rms_norm=True,
                                         backend="triton")
    assert res is out and mean is None and rstd.shape == (t * h * n // gs,)
    check_forward(out, mean, rstd, x, w, b, z, EPS, gs, True, True, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
def test_launch_orders_give_the_same_bits(v, monkeypatch):
    """The program order of the forward (row tiles first, groups first, or the flat (M * G, GS) view) changes
    which program computes a (row, group), never its arithmetic: equal bits, and equal to float64 within the
    model; the flat view also with rows whose range must be rescued (its rescue runs as a separate kernel).
    With the padded tile (SPLIT_GROUPS off): the flat view has no three-part tiles."""
    monkeypatch.setattr(tk, "SPLIT_GROUPS", False)
    m, n, gs = 37, 288, 96
    spec = _spec(gs, v)
    x, z, w, b = make_inputs(m, n, torch.bfloat16, gate=v[4], bias=v[3], seed=71, device=DEV)
    x[5, :gs] *= 1e36  # group 0 of row 5 overflows float32 sums: the range rescue redoes it
    x[9, gs:2 * gs] *= 1e-30
    results = []
    for order in (tk.ORDER_ROWS_FASTEST, tk.ORDER_GROUPS_FASTEST, tk.ORDER_FLAT):
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        mean, rstd = tk.forward(x, w, b, z, spec, out, config=(128, 4, 2, order))
        results.append((out, mean, rstd))
    assert results[0][2].view(3, m)[0, 5] < 1e-30  # the rescue did run (var ~ 1e72)
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert (a is None and c is None) or torch.equal(a, c)
    check_forward(*results[0], x, w, b, z, *_args(spec))


@pytest.mark.parametrize("v", VARIANTS, ids=variant_id)
def test_three_part_groups(v, monkeypatch):
    """Groups of three power-of-two parts (48 = 3 x 16, 96, 192, 384; launch.fwd_parts), which fwd_kernel and
    bwd_kernel read as three unpadded tiles: y, mean and rstd against float64 (every element of a poisoned output
    written), the backward from those statistics, the residual sum stored (prenorm), and rows whose range must be
    rescued, redone in the kernel and by rescue_kernel with the same bits (the rescue keeps the padded width's
    code). Under the interpreter spies prove the three-part paths ran."""
    from gatednorm.backends.triton import kernels

    monkeypatch.setattr(tk, "SPLIT_GROUPS", False)  # GATEDNORM_TRITON_SPLIT_GROUPS=0: one padded tile
    assert tk.fwd_parts(96) == 1
    monkeypatch.setattr(tk, "SPLIT_GROUPS", True)  # the default
    assert [tk.fwd_parts(g) for g in (48, 96, 192, 384, 768, 3072)] == [3] * 6
    assert [tk.fwd_parts(g) for g in (24, 64, 128, 160, 288, 640)] == [1] * 6  # parts < 16, pow2, 5 or 9 parts
    part_calls = {"_three_part_stats": 0, "_bwd_three_parts": 0}  # the forward's and the backward's
    if DEV == "cpu":
        for name in part_calls:
            inner = getattr(kernels, name)

            def counted(*args, _inner=inner, _name=name, **kwargs):
                part_calls[_name] += 1
                return _inner.fn(*args, **kwargs)

            monkeypatch.setattr(kernels, name, counted)
    for m, n, gs in ((7, 192, 96), (5, 384, 384), (9, 96, 48), (4, 384, 192)):
        spec = _spec(gs, v)
        assert tk.fwd_parts(gs) == 3
        x, z, w, b = make_inputs(m, n, torch.float32, gate=v[4], bias=v[3], seed=m * n + gs, device=DEV)
        out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEV)
        calls = dict(part_calls)
        mean, rstd = tk.forward(x, w, b, z, spec, out)
        check_forward(out, mean, rstd, x, w, b, z, *_args(spec), fixed={"mean": (1e-5, 1e-6, "max")})
        dy = make_like(x)
        grads = tk.backward(dy, x, w, b, z, mean, rstd, spec, True, True, True, True)
        check_gradients(grads, x, w, b, z, dy, *_args(spec), fixed=dict.fromkeys(("dx", "dz"), (1e-4, 1e-5, "max")))
        assert DEV != "cpu" or all(part_calls[k] > calls[k] for k in calls), (gs, part_calls)

    m, n, gs = 37, 288, 96
    spec = _spec(gs, v)
    x, z, w, b = make_inputs(m, n, torch.bfloat16, gate=v[4], bias=v[3], seed=72, device=DEV)
    res = make_like(x)
    s = torch.empty(m, n, dtype=torch.float32, device=DEV)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    mean, rstd = tk.forward(x, w, b, z, spec, out, residual=res, residual_out=s)
    assert torch.equal(s, x.float() + res.float())  # one float32 rounding of the sum, stored part by part
    check_forward(out, mean, rstd, s, w, b, z, *_args(spec), out_dtype=torch.bfloat16)

    x[5, :gs] *= 1e36  # group 0 of row 5 overflows float32 sums: the range rescue redoes it
    x[9, gs:2 * gs] *= 1e-30
    results = []
    for threshold in (1 << 24, 1):  # the rescue in the kernel, then as rescue_kernel after it
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
        results.append((out, *tk.forward(x, w, b, z, spec, out, threshold)))
    assert results[0][2].view(3, m)[0, 5] < 1e-30  # the rescue did run (var ~ 1e72)
    for a, c in zip(*results, strict=True):
        assert (a is None and c is None) or torch.equal(a, c)
    check_forward(*results[0], x, w, b, z, *_args(spec))
