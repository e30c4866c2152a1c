"""The blocked native path: exact at block boundaries, batch invariant, bounded memory; the compiled backend.

Budget: about 30 s warm (the two torch.compile tests dominate; a cold Inductor cache
adds compile time on first run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import bits, check_forward, check_gradients, check_pair, make_inputs, make_like

import gatednorm
from gatednorm import native, ops
from gatednorm.backends import native_cpu_kernel
from gatednorm.backends.native_cpu import CPU_BLOCK_ELEMENTS, NativeCPUBackend
from gatednorm.spec import NormSpec

GATES = {"none": None, "after": True, "before": False}  # value: norm_before_gate

# Every comparison uses the shared tolerance model (tests/helpers.py). A ``fixed=(rtol, atol)`` next to it is the
# bound the test asserted before, kept where the model is looser on this data (it allowed more than 1.5x that
# bound on some elements), so no check got weaker.


@pytest.fixture(autouse=True)
def _block_kernels():
    """These tests hold the pure-PyTorch block kernels to their promises; the C kernel that the native
    backend uses where it was built has its own tests (tests/test_native_cpu_kernel.py)."""
    with native_cpu_kernel.enabled(False):
        yield


def _spec(n, group_size, gate, rms, activation="swish", eps=1e-6):
    return NormSpec(eps, group_size or n, GATES[gate] is not False, rms, activation)


def _run_forward(x, w, b, z, spec, backend=native):
    out = torch.empty(x.shape, dtype=x.dtype)
    mean, rstd = backend.forward(x, w, b, z, spec, out)
    return out, mean, rstd


def _assert_rows_alone_equal(x, w, b, z, spec, out, mean, rstd, rows):
    """Each listed row, computed on its own (M = 1), gives the same output and statistics bits."""
    m = x.shape[0]
    groups = x.shape[1] // spec.group_size
    for r in rows:
        o1, m1, r1 = _run_forward(x[r : r + 1], w, b, z[r : r + 1] if z is not None else None, spec)
        assert torch.equal(bits(o1[0]), bits(out[r])), f"row {r} of {m}: output bits depend on the batch"
        assert torch.equal(r1, rstd.view(groups, m)[:, r]), f"row {r} of {m}: rstd depends on the batch"
        if mean is not None:
            assert torch.equal(m1, mean.view(groups, m)[:, r]), f"row {r} of {m}: mean depends on the batch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "n,group_size,gate,rms,activation",
    [
        (96, None, "after", True, "swish"),  # N not a multiple of the vector width
        (100, 20, "before", False, "swish"),  # odd group size, gate before (LayerNorm)
        (128, 32, "none", False, "swish"),
        (72, 24, "after", False, "sigmoid"),
    ],
)
def test_block_boundaries_bitwise(dtype, n, group_size, gate, rms, activation):
    # Tiny blocks (3 rows): rows straddle block ends, M is not a multiple of the block, M = 1.
    spec = _spec(n, group_size, gate, rms, activation)
    for m in (1, 2, 3, 4, 7, 11):
        x, z, w, b = make_inputs(m, n, dtype, gate=gate != "none", seed=m)
        with ops.override_impl("native", "cpu", NativeCPUBackend(block_elements=3 * n)):
            out, mean, rstd = _run_forward(x, w, b, z, spec)
        _assert_rows_alone_equal(x, w, b, z, spec, out, mean, rstd, range(m))
        check_forward(out, mean, rstd, x, w, b, z, spec.eps, spec.group_size, GATES[gate] is not False, rms,
                      activation)
    # and the same bits as with the default (large) blocks
    out_big, _, rstd_big = _run_forward(x, w, b, z, spec)
    assert torch.equal(bits(out_big), bits(out)) and torch.equal(rstd_big, rstd)


def test_default_blocks_rows_straddling():
    # Default block = 2048 rows of 128: M = 2 blocks + 5 rows; check the rows around each boundary.
    n = 128
    m = 2 * (CPU_BLOCK_ELEMENTS // n) + 5
    x, z, w, b = make_inputs(m, n, torch.bfloat16, seed=1)
    spec = _spec(n, 32, "after", False)
    out, mean, rstd = _run_forward(x, w, b, z, spec)
    step = CPU_BLOCK_ELEMENTS // n
    rows = [0, step - 1, step, step + 1, 2 * step - 1, 2 * step, m - 1]
    _assert_rows_alone_equal(x, w, b, z, spec, out, mean, rstd, rows)


@pytest.mark.parametrize("n", [40_000, 300_000], ids=["wide", "wider-than-block"])
def test_very_wide_rows(n):
    # One group per row: a lone (row, group) in a block must not take ATen's split single-output reduction.
    m = 7 if n < CPU_BLOCK_ELEMENTS else 3
    x, z, w, b = make_inputs(m, n, torch.float32, seed=n)
    spec = _spec(n, None, "before", False)
    out, mean, rstd = _run_forward(x, w, b, z, spec)
    _assert_rows_alone_equal(x, w, b, z, spec, out, mean, rstd, range(m))
    check_forward(out, mean, rstd, x, w, b, z, spec.eps, None, False, False, fixed={"y": (1e-5, 1e-5)})


def test_strided_rows_and_out():
    n = 96
    x, z, w, b = make_inputs(10, 2 * n, torch.bfloat16, seed=3)
    xs, zs = x[:, ::2], z[:, 1::2]  # last-dim stride 2
    out_store = torch.full((10, 3 * n), float("nan"), dtype=torch.bfloat16)
    out = out_store[:, n : 2 * n]
    spec = _spec(n, 32, "after", True)
    native.forward(xs, w[:n], None, zs, spec, out)
    ref, _, _ = _run_forward(xs.contiguous(), w[:n], None, zs.contiguous(), spec)
    assert torch.equal(bits(out), bits(ref))
    assert torch.isnan(out_store[:, :n]).all() and torch.isnan(out_store[:, 2 * n :]).all()


@pytest.mark.parametrize("gate", ["after", "before"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_backward_blocks(gate, rms):
    m, n = 11, 96
    x, z, w, b = make_inputs(m, n, torch.float32, seed=5)
    dy = make_like(x)
    spec = _spec(n, 32, gate, rms)
    _, mean, rstd = _run_forward(x, w, b, z, spec)
    big = native.backward(dy, x, w, b, z, mean, rstd, spec)
    with ops.override_impl("native", "cpu", NativeCPUBackend(block_elements=3 * n)):
        small = native.backward(dy, x, w, b, z, mean, rstd, spec)
    assert torch.equal(big[0], small[0]) and torch.equal(big[1], small[1])  # dx, dz are per row
    args = (x, w, b, z, dy, spec.eps, 32, gate == "after", rms)
    check_gradients((None, None, *small[2:]), *args, against=big,  # dw, db sum over blocks
                    fixed=dict.fromkeys(("dweight", "dbias"), (1e-5, 1e-5)))
    check_gradients(small, *args, fixed=dict.fromkeys(("dx", "dz"), (1e-4, 1e-4)))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from gatednorm import native
    from gatednorm.spec import NormSpec
    torch.set_num_threads(2)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    results = []
    for m in map(int, sys.argv[1:]):
        n = 128
        x = torch.randn(m, n, dtype=torch.bfloat16)
        z = torch.randn_like(x)
        dy = torch.randn_like(x)
        w, b = torch.randn(n), torch.randn(n)
        spec = NormSpec(1e-6, 32, True, False, "swish")
        out = torch.empty_like(x)
        native.forward(x, w, b, z, spec, out)  # warm up (lazy init inside torch)
        res = {}
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
        mean, rstd = native.forward(x, w, b, z, spec, out)
        res["fwd"] = status("VmHWM") - base - sum(s.numel() * s.element_size() for s in (mean, rstd))
        base = status("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        grads = native.backward(dy, x, w, b, z, mean, rstd, spec)
        res["bwd"] = status("VmHWM") - base - sum(g.numel() * g.element_size() for g in grads)
        res["x_bytes"] = x.numel() * x.element_size()
        results.append(res)
        del x, z, dy, out, mean, rstd, grads
    print(json.dumps(results))
    """
)


def _measure_peak(*ms: int) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", _MEMORY_SCRIPT, *map(str, ms)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh processes
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc RSS high-water mark")
def test_peak_memory_bounded():
    # RSS high-water mark growth in a fresh process, with glibc returning freed large blocks at once
    # (fixed mmap threshold), so the figure is the live extra memory at the worst moment.
    res, res4 = _measure_peak(65536, 4 * 65536)  # x = 16 MiB of bf16, then 4x the rows
    assert res["fwd"] <= 0.5 * res["x_bytes"], res
    assert res["bwd"] <= 0.5 * res["x_bytes"], res
    # the block buffers do not grow with M
    assert res4["fwd"] <= 0.25 * res4["x_bytes"], res4
    assert res4["bwd"] <= 0.25 * res4["x_bytes"], res4


# ---------------------------------------------------------------------------
# backend="compiled"
# ---------------------------------------------------------------------------

compile_ok = pytest.mark.skipif(sys.platform == "win32", reason="torch.compile on CPU needs a C++ toolchain")


@pytest.mark.slow  # torch.compile
@compile_ok
def test_compiled_matches_native_without_recompiles():
    from torch._dynamo.utils import counters

    n = 96
    kwargs = dict(eps=1e-6, group_size=32, norm_before_gate=True, is_rms_norm=True, backend="compiled")
    before = counters["stats"]["unique_graphs"]
    outs = {}
    for m in (64, 1, 2, 5, 300):  # first call compiles; no batch size may recompile, M = 1 included
        x, z, w, _ = make_inputs(m, n, torch.bfloat16, seed=m)
        y, _, rstd = gatednorm.layer_norm_fwd(x, w, None, z=z, **kwargs)
        y_nat, _, rstd_nat = gatednorm.layer_norm_fwd(x, w, None, z=z, **{**kwargs, "backend": "native"})
        for yy, rr in ((y, rstd), (y_nat, rstd_nat)):  # both backends are one rounding from float64 ...
            check_forward(yy, None, rr, x, w, None, z, 1e-6, 32, True, True)
        check_pair(y, y_nat, x, w, None, z, 1e-6, 32, True, True, fixed=(2**-7, 1e-5))  # ... so within 1 ulp
        torch.testing.assert_close(rstd, rstd_nat, rtol=1e-6, atol=0)
        outs[m] = (x, z, w, y)
    assert counters["stats"]["unique_graphs"] - before == 1, "the compiled backend recompiled for a batch size"
    # batch invariance of the compiled kernel: row 3 of M = 300 equals row 3 computed alone
    x, z, w, y = outs[300]
    alone, _, _ = gatednorm.layer_norm_fwd(x[3:4], w, None, z=z[3:4], **kwargs)
    assert torch.equal(bits(alone[0]), bits(y[3]))


@pytest.mark.slow  # torch.compile
@compile_ok
def test_compiled_backward_and_inside_user_compile():
    m, n = 33, 64
    x, z, w, b = make_inputs(m, n, torch.float32, seed=9)
    ref_leaves = [t.clone().requires_grad_() for t in (x, z, w, b)]
    leaves = [t.clone().requires_grad_() for t in (x, z, w, b)]

    def f(x, z, w, b, backend):
        return gatednorm.layernorm_fn(x, w, b, z, group_size=16, norm_before_gate=False, backend=backend)

    dy = make_like(x)
    f(*ref_leaves, "native").backward(dy)
    # the compiled backend called from inside a user's compiled region (custom ops, no nested tracing)
    user = torch.compile(f, fullgraph=True)
    y = user(*leaves, "compiled")
    y.backward(dy)
    check_pair(y.detach(), f(x, z, w, b, "native"), x, w, b, z, 1e-6, 16, False)
    check_gradients([t.grad for t in leaves], x, w, b, z, dy, 1e-6, 16, False,
                    against=[t.grad for t in ref_leaves],
                    fixed=dict.fromkeys(("dx", "dz", "dweight"), (1e-4, 1e-4)))


def test_compiled_empty_and_meta():
    for device in ("cpu", "meta"):
        x = torch.empty(0 if device == "cpu" else 5, 64, device=device)
        w = torch.ones(64, device=device)
        y, mean, rstd = gatednorm.layer_norm_fwd(x, w, None, 1e-6, backend="compiled")
        assert y.shape == x.shape and rstd.shape == (x.shape[0],) and mean.shape == (x.shape[0],)
