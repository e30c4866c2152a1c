"""The triton backend's fused residual forward (issue 15): x + residual summed in the kernel.

``ops.gated_norm_residual_rows`` hands a call with a residual to a backend's ``forward_residual`` where it has
one (backends.base.FusedResidualBackend): the kernel reads x and residual, sums them in float32 and writes y
and the prenorm output (or, when gradients are recorded, the float32 sum the backward keeps). Proven here:

* every output and every gradient equals the generic path's (the float32 sum by a torch op, then the
  backend's own forward/backward on it) bit for bit: the generic path is what the same triton backend runs
  when served through a wrapper without ``forward_residual``;
* the kernel paths that read the input more than once (the in-kernel range rescue, the separate rescue
  kernel, wide groups looped in chunks) read x + residual there too: same bits as the kernel run on the
  precomputed sum, rescued rows included;
* the fused path makes no (M, N) float32 sum in memory when no gradient is recorded.

On CPU the kernels run under Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from helpers import RecordingBackend
from torch.utils._python_dispatch import TorchDispatchMode

import gatednorm
from gatednorm import ops
from gatednorm.spec import NormSpec

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_runs = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.skipif(not _runs or not gatednorm.triton_available(),
                       reason="the triton backend needs CUDA or TRITON_INTERPRET=1"),
    # the interpreter runs kernels in numpy, which may warn about values in masked-off lanes (never stored)
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# helpers.RecordingBackend serves forward and backward only: through it, ops takes the generic residual path.
_GenericOnly = RecordingBackend


class _CountingFused(RecordingBackend):
    """The triton backend, counting its fused residual forwards."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.fused_calls = 0

    def forward_residual(self, *args):
        self.fused_calls += 1
        return self.inner.forward_residual(*args)


def _run(impl, x, residual, z, weight, bias, *, rms, nbg, gs, prenorm, residual_in_fp32, grad):
    """Outputs (and with ``grad`` the gradients of a fixed random loss) of one call served by ``impl``."""
    leaves = [t.detach().clone().requires_grad_(grad) if t is not None else None
              for t in (x, residual, z, weight, bias)]
    lx, lr, lz, lw, lb = leaves
    with ops.override_impl("triton", DEVICE.type, impl):
        fn = gatednorm.rmsnorm_fn if rms else gatednorm.layernorm_fn
        out = fn(lx, lw, lb, lz, eps=1e-5, group_size=gs, norm_before_gate=nbg, residual=lr, prenorm=prenorm,
                 residual_in_fp32=residual_in_fp32, backend="triton")
        y, residual_out = out if prenorm else (out, None)
        results = [y, residual_out]
        if grad:
            gen = torch.Generator(device="cpu").manual_seed(7)
            loss = (y.float() * torch.randn(y.shape, generator=gen).to(DEVICE)).sum()
            if residual_out is not None:
                loss = loss + (residual_out.float() * torch.randn(y.shape, generator=gen).to(DEVICE)).sum()
            loss.backward()
            results += [t.grad if t is not None else None for t in leaves]
    return results


# (rms, norm_before_gate, with z, with bias, x dtype, residual dtype, group size, N)
CASES = [
    (True, True, True, False, BF16, BF16, 16, 48),
    (True, False, True, False, BF16, F32, 48, 48),
    (False, True, True, True, F32, F32, 16, 32),
    (False, False, True, True, F16, BF16, 24, 48),
    (False, True, False, True, BF16, BF16, 32, 32),
    (True, True, False, False, F16, F32, 12, 36),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
@pytest.mark.parametrize("prenorm,residual_in_fp32,grad",
                         list(itertools.product((False, True), (False, True), (False, True))))
def test_fused_residual_equals_the_generic_path_bit_for_bit(case, prenorm, residual_in_fp32, grad):
    rms, nbg, with_z, with_bias, xdt, rdt, gs, n = case
    m = 7
    # row 2 far out of the float32 statistics' range (bf16/fp32; fp16 cannot get there): the rescue runs
    x = torch.randn(m, n, device=DEVICE)
    x[2] *= 100.0 if xdt == F16 else 1e25
    x = x.to(xdt)
    residual = torch.randn(m, n, device=DEVICE)
    residual[2] *= 100.0 if rdt == F16 else 1e25
    residual = residual.to(rdt)
    z = torch.randn(m, n, device=DEVICE).to(xdt) if with_z else None
    weight = torch.randn(n, device=DEVICE).to(xdt)
    bias = torch.randn(n, device=DEVICE).to(xdt) if with_bias else None
    kw = dict(rms=rms, nbg=nbg, gs=gs, prenorm=prenorm, residual_in_fp32=residual_in_fp32, grad=grad)
    triton = ops.select_impl("triton", DEVICE)
    fused = _CountingFused(triton)
    got = _run(fused, x, residual, z, weight, bias, **kw)
    want = _run(_GenericOnly(triton), x, residual, z, weight, bias, **kw)
    assert fused.fused_calls == 1
    names = ["y", "residual_out", "dx", "dresidual", "dz", "dweight", "dbias"]
    for name, a, b in zip(names, got, want, strict=False):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
                a.nan_to_num(), b.nan_to_num()), f"{name} differs from the generic path"


@pytest.mark.parametrize("path", ["in-kernel rescue", "rescue kernel", "chunked wide group"])
@pytest.mark.parametrize("rdt,out_dt", [(BF16, BF16), (F32, F32), (BF16, F32)])
def test_kernel_reads_x_plus_residual_on_every_path(path, rdt, out_dt):
    from gatednorm.backends.triton import launch

    m, n, gs = 9, 48, 48
    spec = NormSpec(1e-6, gs, False, False, "swish")
    x = torch.randn(m, n, device=DEVICE).to(BF16)
    residual = torch.randn(m, n, device=DEVICE).to(rdt)
    x[[1, 5]] *= 1e30  # rows the rescue redoes (the residual as large: s is not x there)
    residual[[1, 5]] *= 1e30
    z = torch.randn(m, n, device=DEVICE).to(BF16)
    w = torch.randn(n, device=DEVICE).to(BF16)
    b = torch.randn(n, device=DEVICE).to(BF16)
    s = ops.residual_sum(x, residual)
    kw = {"rescue kernel": dict(rescue_kernel_min_elements=0),
          "chunked wide group": dict(config=(16, 1, 1, launch.ORDER_ROWS_FASTEST))}.get(path, {})
    y_ref = torch.empty(m, n, device=DEVICE, dtype=BF16)
    mean_ref, rstd_ref = launch.forward(s, w, b, z, spec, y_ref, **kw)
    y = torch.empty_like(y_ref)
    residual_out = torch.empty(m, n, device=DEVICE, dtype=out_dt)
    mean, rstd = launch.forward(x, w, b, z, spec, y, residual=residual, residual_out=residual_out, **kw)
    assert torch.equal(y, y_ref)
    assert torch.equal(mean, mean_ref) and torch.equal(rstd, rstd_ref)
    assert torch.equal(residual_out, s.to(out_dt))
    # the rows of 1e30 were rescued: unrescued, their float32 variance overflows, rstd is 0 and y is the bias
    assert torch.isfinite(y[[1, 5]].float()).all()
    assert not torch.equal(y[[1, 5]], b.expand(2, n))


class _Allocations(TorchDispatchMode):
    """(op, shape, dtype) of every float32 tensor of at least ``numel`` elements an op returns."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == F32 and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_float32_sum_in_memory_without_gradients():
    m, n = 8, 32
    x, residual, z = (torch.randn(m, n, device=DEVICE).to(BF16) for _ in range(3))
    w = torch.randn(n, device=DEVICE).to(BF16)
    with torch.no_grad(), _Allocations(m * n) as seen:
        y, residual_out = gatednorm.rmsnorm_fn(x, w, None, z, group_size=16, residual=residual, prenorm=True,
                                               backend="triton")
    assert seen.seen == [], seen.seen
    s = x.float() + residual.float()
    assert torch.equal(residual_out, s.to(BF16))


def test_double_backward_through_the_fused_residual_is_refused_by_name():
    """create_graph=True through the fused residual forward (which keeps the float32 sum, not x and the residual)
    raises, naming the way out; the generic path (native) differentiates twice."""
    m, n = 6, 32
    x, residual, z = (torch.randn(m, n, device=DEVICE, requires_grad=True) for _ in range(3))
    w = torch.randn(n, device=DEVICE)
    y = gatednorm.rmsnorm_fn(x, w, None, z, group_size=16, residual=residual, backend="triton")
    with pytest.raises(RuntimeError, match="fused residual forward: pass backend='native'"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    y = gatednorm.rmsnorm_fn(x, w, None, z, group_size=16, residual=residual, backend="native")
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g.requires_grad and torch.isfinite(torch.autograd.grad(g.square().sum(), residual)[0]).all()


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("heads", [False, True])
def test_linear_with_residual_without_gradients_equals_the_recorded_path(backend, prenorm, heads):
    """norm + gate + linear with a residual and no gradient recorded goes through gated_norm_residual_rows (the
    fused forward on triton): the same bits as the path that records gradients (GatedNormLinearFunction)."""
    t, h, n, o = 6, 4, 16, 24
    x = torch.randn(t * h if heads else t, n, device=DEVICE).to(BF16)
    residual = torch.randn_like(x, dtype=F32)
    proj = torch.randn(t, 2 * h * n, device=DEVICE).to(BF16)
    z = proj[:, h * n:].view(t, h, n) if heads else torch.randn_like(x)  # heads: a strided (T, H, N) gate
    w = torch.randn(n, device=DEVICE).to(BF16)
    lw = (torch.randn(o, n, device=DEVICE) / 4).to(BF16)
    lb = torch.randn(o, device=DEVICE).to(BF16)

    def call(x_, r_):
        return gatednorm.rmsnorm_linear_fn(x_, w, None, z, lw, lb, 1e-5, 8, residual=r_, prenorm=prenorm,
                                           backend=backend)

    counting = _CountingFused(ops.select_impl(backend, DEVICE)) if backend == "triton" else None
    with torch.no_grad(), ops.override_impl(backend, DEVICE.type, counting or ops.select_impl(backend, DEVICE)):
        got = call(x, residual)
    if counting is not None:
        assert counting.fused_calls == 1  # the fused forward served the call
    want = call(x.clone().requires_grad_(), residual.clone().requires_grad_())
    got, want = (got, want) if prenorm else ((got,), (want,))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b.detach())
