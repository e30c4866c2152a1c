"""The native backend's C kernel, forward and backward (gatednorm/backends/native_cpu_kernel.c), where a C
compiler built it.

Held to the contract of docs/design.md section 2 as the block kernels are: float64 within the tolerance
model, a row's bits independent of the batch, its position, the row stride and the thread count, the same
bits every call, NaN/Inf where the formula puts them, the range rescue for rows whose sums overflow or
underflow; and the fallback to the block kernels where the kernel is off or cannot be built.

Budget: a few seconds (the library is built once per machine, about a second).
"""

from __future__ import annotations

import shutil
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import bits, check_forward, check_gradients, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode

import gatednorm
from gatednorm.backends import native_cpu, native_cpu_kernel, native_cpu_node
from gatednorm.spec import NormSpec

pytestmark = pytest.mark.skipif(
    native_cpu_kernel.library() is None, reason=f"C kernel not built here: {native_cpu_kernel.status()}")

#: (name, n, group_size, is_rms_norm, norm_before_gate (None: no gate), bias, activation)
VARIANTS = [
    ("rms-after-g128", 256, 128, True, True, False, "swish"),
    ("rms-before-g640", 1280, 640, True, False, False, "swish"),
    ("ln-none-bias", 2048, 2048, False, None, True, "swish"),
    ("ln-before-g96-sigmoid", 288, 96, False, False, True, "sigmoid"),
    ("ln-after-g50-bias", 100, 50, False, True, True, "swish"),
    ("rms-after-g7", 21, 7, True, True, True, "sigmoid"),
]


def _spec(n, gs, rms, nbg, act, eps=1e-6):
    return NormSpec(eps, gs, nbg is not False, rms, act)


def _forward(x, w, b, z, spec, out_dtype=None):
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype)
    mean, rstd = native_cpu.forward(x, w, b, z, spec, out)
    return out, mean, rstd


def _count_calls(monkeypatch, name: str) -> list[int]:
    """Counts the calls of native_cpu_kernel.<name> (each task of a call makes one)."""
    calls: list[int] = []
    real = getattr(native_cpu_kernel, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native_cpu_kernel, name, counting)
    return calls


def test_rescue_runs_cover_only_rows_out_of_range_in_chunks():
    rstd = torch.ones(2 * 10)  # 2 groups x 10 rows, group-major
    rstd[[3, 4, 5, 6, 7, 9]] = float("nan")  # group 0, rows 3-7 and 9
    rstd[10 + 8] = 0.0  # group 1, row 8
    assert native_cpu._runs_out_of_range(rstd, 10, 3) == [(3, 6), (6, 9), (9, 10)]
    assert native_cpu._runs_out_of_range(torch.ones(20), 10, 3) == []


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls of the C forward: per task on the pool or in this thread, one per OpenMP team call."""
    calls = _count_calls(monkeypatch, "forward_rows")
    monkeypatch.setattr(native_cpu_kernel, "forward_rows_team", _counted(native_cpu_kernel.forward_rows_team, calls))
    return calls


class _BackwardCalls(list):
    """The C backward's calls made from Python, plus those the CPU autograd node (native_cpu_node) made in C++
    since the fixture began (it calls the kernel's entry point directly: its own counter)."""

    def __init__(self) -> None:
        super().__init__()
        self._node_before = native_cpu_node.served()[1]

    def __len__(self) -> int:
        return super().__len__() + native_cpu_node.served()[1] - self._node_before

    def __bool__(self) -> bool:
        return len(self) > 0


@pytest.fixture
def backward_calls(monkeypatch):
    calls = _BackwardCalls()
    monkeypatch.setattr(native_cpu_kernel, "backward_rows", _counted(native_cpu_kernel.backward_rows, calls))
    monkeypatch.setattr(native_cpu_kernel, "backward_rows_team", _counted(native_cpu_kernel.backward_rows_team, calls))
    # the eager plans' backward of a repeated small call (native_cpu.KernelBackwardPlan): the same kernel call
    monkeypatch.setattr(native_cpu_kernel, "planned_backward", _counted(native_cpu_kernel.planned_backward, calls))
    return calls


def _counted(fn, calls: list[int]):
    def counting(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counting


#: How pooled calls run: gatednorm's own pool, or PyTorch's OpenMP team where the library was built with one.
THREADS = ["pool", pytest.param("team", marks=pytest.mark.skipif(
    not native_cpu_kernel._state.get("team"), reason="no OpenMP team here: " + native_cpu_kernel.status()))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_matches_float64(variant, dtype, kernel_calls):
    _, n, gs, rms, nbg, has_bias, act = variant
    x, z, w, b = make_inputs(301, n, dtype, gate=nbg is not None, bias=has_bias)
    spec = _spec(n, gs, rms, nbg, act)
    y, mean, rstd = _forward(x, w, b, z, spec)
    assert kernel_calls, "the C kernel did not run"
    check_forward(y, mean, rstd, x, w, b, z, spec.eps, gs, spec.norm_before_gate, rms, act)


def test_mixed_dtypes_and_float32_output(kernel_calls):
    x, z, w, b = make_inputs(64, 256, torch.bfloat16, gate_dtype=torch.float32, param_dtype=torch.float32)
    spec = _spec(256, 128, False, True, "swish")
    y, mean, rstd = _forward(x, w, b, z, spec, out_dtype=torch.float32)
    assert kernel_calls
    check_forward(y, mean, rstd, x, w, b, z, spec.eps, 128, True, False, out_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_other_dtypes_take_the_block_kernels(dtype, kernel_calls):
    x, z, w, b = make_inputs(40, 64, dtype)
    y, mean, rstd = _forward(x, w, b, z, _spec(64, 32, True, True, "swish"))
    assert not kernel_calls
    check_forward(y, mean, rstd, x, w, b, z, 1e-6, 32, True, True)


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_do_not_depend_on_the_batch(threads):
    n, gs = 384, 96
    x, z, w, b = make_inputs(3000, n, torch.bfloat16, seed=7)
    spec = _spec(n, gs, False, False, "swish")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, mean, rstd = _forward(x, w, b, z, spec)
        # strided rows (a column slice of wider tensors: features contiguous, row stride 2n)
        xw, zw = torch.cat([x, x], dim=1)[:, n:], torch.cat([z, z], dim=1)[:, :n]
        ys, _, _ = _forward(xw, w, b, zw, spec)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(bits(ys), bits(y))
    groups = n // gs
    for r in (0, 1, 1499, 2998, 2999):
        y1, m1, r1 = _forward(x[r : r + 1], w, b, z[r : r + 1], spec)
        assert torch.equal(bits(y1[0]), bits(y[r])), f"row {r}: bits depend on the batch"
        assert torch.equal(r1, rstd.view(groups, -1)[:, r]) and torch.equal(m1, mean.view(groups, -1)[:, r])


def test_strided_output_rows_are_written_in_place_and_only_there(kernel_calls):
    n = 96
    x, z, w, b = make_inputs(33, n, torch.bfloat16, seed=4)
    store = torch.full((33, 3 * n), float("nan"), dtype=torch.bfloat16)
    out = store[:, n : 2 * n]  # features contiguous, row stride 3n
    spec = _spec(n, 32, False, True, "sigmoid")
    native_cpu.forward(x, w, b, z, spec, out)
    assert kernel_calls
    ref, _, _ = _forward(x, w, b, z, spec)
    assert torch.equal(bits(out), bits(ref))
    assert torch.isnan(store[:, :n]).all() and torch.isnan(store[:, 2 * n :]).all()


def test_calls_from_several_threads_at_once(kernel_calls):
    spec = _spec(256, 64, False, False, "swish")
    inputs = [make_inputs(700, 256, torch.bfloat16, seed=s) for s in range(6)]

    def work(args):
        x, z, w, b = args
        y, mean, rstd = _forward(x, w, b, z, spec)
        dy = torch.ones_like(y)
        return (y, rstd, *native_cpu.backward(dy, x, w, b, z, mean, rstd, spec))

    serial = [work(a) for a in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, inputs))
    assert kernel_calls
    for a, c in zip(serial, threaded, strict=True):
        assert all(torch.equal(bits(p), bits(q)) for p, q in zip(a, c, strict=True))


def test_same_bits_every_call():
    x, z, w, b = make_inputs(2000, 256, torch.float32, seed=3)
    spec = _spec(256, 64, True, True, "swish")
    first = _forward(x, w, b, z, spec)
    for _ in range(3):
        again = _forward(x, w, b, z, spec)
        assert all(torch.equal(bits(p), bits(q)) for p, q in zip(first[::2], again[::2], strict=True))


def test_nan_and_inf_propagate_like_the_block_kernels():
    x, z, w, b = make_inputs(8, 64, torch.float32, seed=11)
    x[1, 5] = float("nan")
    z[2, 7] = float("inf")
    z[3, 9] = -float("inf")
    z[4, 0] = float("nan")
    x[5, 3] = float("inf")
    spec = _spec(64, 32, False, True, "swish")
    y, _, rstd = _forward(x, w, b, z, spec)
    with native_cpu_kernel.enabled(False):
        y_ref, _, rstd_ref = _forward(x, w, b, z, spec)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.equal(torch.isinf(y), torch.isinf(y_ref))
    assert torch.equal(torch.isnan(rstd), torch.isnan(rstd_ref))
    assert torch.isnan(y[1, :32]).all() and torch.isfinite(y[1, 32:]).all()  # one group of row 1
    assert torch.isfinite(y[[0, 6, 7]]).all()


@pytest.mark.parametrize("scale", [1e30, 1e-30], ids=["huge", "tiny"])
def test_range_rescue_rows(scale):
    n, gs = 128, 64
    x, z, w, b = make_inputs(50, n, torch.float32, seed=5)
    bad = [3, *range(20, 40), 45]  # one group of these rows out of range (its squares overflow / underflow)
    x[bad, :gs] *= scale
    spec = _spec(n, gs, False, True, "swish", eps=0.0 if scale < 1 else 1e-6)
    y, mean, rstd = _forward(x, w, b, z, spec)
    check_forward(y, mean, rstd, x, w, b, z, spec.eps, gs, True, False)
    # the neighbours keep the kernel's bits: computed alone, they give the same
    for r in (2, 4, 19, 40, 44, 46):
        y1, _, _ = _forward(x[r : r + 1], w, b, z[r : r + 1], spec)
        assert torch.equal(bits(y1[0]), bits(y[r]))


@pytest.mark.parametrize("threads", THREADS)
def test_range_rescue_rows_on_the_pool(threads, monkeypatch, kernel_calls):
    """Rows out of range in different tasks of a pooled call (on the pool, or on the OpenMP team): the tasks'
    counts add up, every such row is redone and the others keep the bits they have when computed alone."""
    monkeypatch.setattr(native_cpu._Plan, "__init__", _pooled_plan_init(native_cpu._Plan.__init__))
    team_calls = _count_calls(monkeypatch, "forward_rows_team")
    monkeypatch.setattr(native_cpu_kernel, "_team", {"on": threads == "team", "pool_until": 0.0})
    monkeypatch.setattr(native_cpu_kernel, "TEAM_LATE_SECONDS", float("inf"))  # no switch to the pool mid-test
    n, gs = 128, 64
    x, z, w, b = make_inputs(1200, n, torch.bfloat16, seed=6)
    spec = _spec(n, gs, False, True, "swish")
    for bad in ([611], [7, 611, 1199]):  # in one task (a middle one); in the first, a middle and the last
        xb = x.clone()
        xb[bad, gs:] *= 1e30
        team_calls.clear()
        y, mean, rstd = _forward(xb, w, b, z, spec)
        if threads == "team":
            assert team_calls, "the call did not run on the OpenMP team"
        else:
            assert len(kernel_calls) > 1 and not team_calls, "the call was not shared out into tasks on the pool"
        check_forward(y, mean, rstd, xb, w, b, z, spec.eps, gs, True, False)
        for r in (6, 8, 610, 612, 1198):
            y1, _, _ = _forward(xb[r : r + 1], w, b, z[r : r + 1], spec)
            assert torch.equal(bits(y1[0]), bits(y[r]))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("variant", VARIANTS[:3], ids=[v[0] for v in VARIANTS[:3]])
def test_pooled_calls_give_the_serial_bits(variant, threads, monkeypatch):
    """Workers that take rows (forward) and tasks (backward) from a shared counter inside C, on the pool or on
    the OpenMP team, give the bits of one thread doing the same tasks in order: y, statistics, dx, dz and the
    dweight / dbias partial sums."""
    _, n, gs, rms, nbg, has_bias, act = variant
    x, z, w, b = make_inputs(700, n, torch.float32, gate=nbg is not None, bias=has_bias and not rms, seed=12)
    spec = _spec(n, gs, rms, nbg, act)
    dy = torch.randn(x.shape)
    monkeypatch.setattr(native_cpu_kernel, "_team", {"on": threads == "team", "pool_until": 0.0})
    monkeypatch.setattr(native_cpu_kernel, "TEAM_LATE_SECONDS", float("inf"))  # no switch to the pool mid-test
    shared_calls: list[bool] = []  # per kernel call: True where it shared rows or tasks (pool or team)
    team_calls: list[str] = []
    for name in ("forward_rows", "backward_rows", "forward_rows_team", "backward_rows_team"):
        real, on_team = getattr(native_cpu_kernel, name), name.endswith("_team")

        def spy(*args, _real=real, _team=on_team, _name=name, **kwargs):
            shared_calls.append(_team or kwargs.get("shared") is not None)
            if _team:
                team_calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(native_cpu_kernel, name, spy)
    real_init = native_cpu._Plan.__init__
    results = []
    for pooled in (False, True):
        def init(self, m, n_, block_elements, tensors, compiled_kernel=False, _pooled=pooled):
            real_init(self, m, n_, 4 * n_, tensors, compiled_kernel)  # blocks of 4 rows: many tasks
            self.workers = 2 if _pooled else 1

        monkeypatch.setattr(native_cpu._Plan, "__init__", init)
        shared_calls.clear()
        team_calls.clear()
        y, mean, rstd = _forward(x, w, b, z, spec)
        grads = native_cpu.backward(dy, x, w, b, z, mean, rstd, spec)
        assert shared_calls and (all(shared_calls) if pooled else not any(shared_calls))
        on_team = pooled and threads == "team"
        assert team_calls == (["forward_rows_team", "backward_rows_team"] if on_team else []), team_calls
        results.append([t for t in (y, mean, rstd, *grads) if t is not None])
    for serial, pooled in zip(*results, strict=True):
        assert torch.equal(bits(serial), bits(pooled))


def _pooled_plan_init(real_init):
    """_Plan.__init__ that shares any call with several blocks out to two workers (a 1-core machine too)."""
    def init(self, m, n, block_elements, tensors, compiled_kernel=False):
        real_init(self, m, n, 8 * n, tensors, compiled_kernel)
        if self.tasks > 1:
            self.workers = 2
    return init


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float32, "strided"], ids=str)
def test_parameters_of_any_dtype_and_stride(param_dtype, kernel_calls, backward_calls):
    """weight / bias are read in bf16 or float32 as they are (others converted to float32 first): the same bits
    as float32 parameters holding the same values, forward and backward."""
    n, gs = 192, 64
    x, z, w, b = make_inputs(37, n, torch.bfloat16, seed=8)
    if param_dtype == "strided":
        w2, b2 = torch.randn(2 * n), torch.randn(2 * n)
        w, b = w2[::2], b2[::2]
    else:
        w, b = w.to(param_dtype), b.to(param_dtype)
    spec = _spec(n, gs, False, True, "sigmoid")
    dy = torch.randn(x.shape).to(x.dtype)
    results = []
    for weight, bias in ((w, b), (w.float().contiguous(), b.float().contiguous())):
        y, mean, rstd = _forward(x, weight, bias, z, spec)
        grads = native_cpu.backward(dy, x, weight, bias, z, mean, rstd, spec)
        results.append((y, *grads))
    assert kernel_calls and backward_calls
    (y, dx, dz, dw, db), (y32, dx32, dz32, dw32, db32) = results
    for got, want in ((y, y32), (dx, dx32), (dz, dz32), (dw, dw32.to(dw.dtype)), (db, db32.to(db.dtype))):
        assert got.dtype == want.dtype
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_gradients_match_float64(variant, dtype, backward_calls):
    _, n, gs, rms, nbg, has_bias, act = variant
    x, z, w, b = make_inputs(257, n, dtype, gate=nbg is not None, bias=has_bias and not rms)
    inputs = (x, z, w, b)
    leaves = [t.requires_grad_(True) for t in inputs if t is not None]
    fn = gatednorm.rmsnorm_fn if rms else gatednorm.layernorm_fn
    y = fn(x, w, b, z, 1e-6, gs, norm_before_gate=nbg is not False, activation=act, backend="native")
    dy = torch.randn_like(y)
    grads = iter(torch.autograd.grad(y, leaves, dy))
    got = [next(grads) if t is not None else None for t in inputs]
    assert backward_calls, "the C backward did not run"
    x, z, w, b = (t.detach() if t is not None else None for t in inputs)
    check_gradients(got, x, w, b, z, dy, 1e-6, gs, nbg is not False, rms, act)


def test_gradients_do_not_depend_on_the_batch_and_repeat():
    n, gs = 256, 64
    x, z, w, b = make_inputs(1500, n, torch.bfloat16, seed=9)
    dy = torch.randn(1500, n).to(torch.bfloat16)
    spec = _spec(n, gs, False, False, "swish")
    _, mean, rstd = _forward(x, w, b, z, spec)
    full = native_cpu.backward(dy, x, w, b, z, mean, rstd, spec)
    again = native_cpu.backward(dy, x, w, b, z, mean, rstd, spec)
    assert all(torch.equal(bits(p), bits(q)) for p, q in zip(full, again, strict=True))
    groups = n // gs
    for r in (0, 777, 1499):
        sl = slice(r, r + 1)
        _, m1, r1 = _forward(x[sl], w, b, z[sl], spec)
        one = native_cpu.backward(dy[sl], x[sl], w, b, z[sl], m1, r1, spec)
        assert torch.equal(bits(one[0][0]), bits(full[0][r])) and torch.equal(bits(one[1][0]), bits(full[1][r]))
        assert torch.equal(r1, rstd.view(groups, -1)[:, r])


def test_one_block_backward_gives_the_planned_paths_bits(monkeypatch):
    """A call of one block takes one kernel call without a plan, its partial row rounded straight to the
    parameters' dtype: the same bits as the planned path (blocks of one row, one task, its row summed as
    torch.sum), a column whose products are all -0.0 summed to +0.0 in both; float32 parameters too."""
    m, n, gs = 8, 256, 64
    for dtype in (torch.bfloat16, torch.float32):
        x, z, w, b = make_inputs(m, n, dtype, seed=21)
        dy = torch.randn(m, n).to(dtype)
        dy[:, 3] = -0.0
        spec = _spec(n, gs, False, False, "swish")
        _, mean, rstd = _forward(x, w, b, z, spec)
        calls = _count_calls(monkeypatch, "backward_rows")
        one = native_cpu.backward(dy, x, w, b, z, mean, rstd, spec)
        assert len(calls) == 1
        planned = native_cpu.backward(dy, x, w, b, z, mean, rstd, spec, block_elements=n)
        assert len(calls) == 2  # blocks of one row, in one task (8 rows): one kernel call, summed by _sum_tasks
        for got, want in zip(one, planned, strict=True):
            assert got.dtype == want.dtype and torch.equal(bits(got), bits(want))
        assert not one[2][3].signbit() and not one[3][3].signbit() and one[3][3] == 0
        monkeypatch.undo()


def test_same_bits_under_a_dispatch_mode(kernel_calls):
    """A mode sees no ATen op of the kernel (as with any kernel), and results do not depend on one."""

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, z, w, b = make_inputs(64, 128, torch.bfloat16)
    spec = _spec(128, 128, True, True, "swish")
    with Passthrough():
        y, mean, rstd = _forward(x, w, b, z, spec)
    assert len(kernel_calls) == 1
    y2, _, rstd2 = _forward(x, w, b, z, spec)
    assert torch.equal(bits(y), bits(y2)) and torch.equal(rstd, rstd2)


def test_tensor_subclasses_take_the_block_kernels(kernel_calls):
    class Tagged(torch.Tensor):
        pass

    x, z, w, b = make_inputs(32, 64, torch.float32)
    y, mean, rstd = _forward(x.as_subclass(Tagged), w, b, z, _spec(64, 32, True, True, "swish"))
    assert not kernel_calls
    check_forward(torch.Tensor(y), mean, rstd, x, w, b, z, 1e-6, 32, True, True)


def test_switched_off_gives_the_block_kernels_bits(kernel_calls):
    x, z, w, b = make_inputs(100, 128, torch.float32)
    spec = _spec(128, 32, True, True, "swish")
    with native_cpu_kernel.enabled(False):
        y_off, _, _ = _forward(x, w, b, z, spec)
        assert not kernel_calls
    y_on, _, _ = _forward(x, w, b, z, spec)
    assert kernel_calls
    check_forward(y_on, None, None, x, w, b, z, 1e-6, 32, True, True, stats=False)
    check_forward(y_off, None, None, x, w, b, z, 1e-6, 32, True, True, stats=False)


def test_without_a_compiler_the_block_kernels_run(monkeypatch, tmp_path):
    monkeypatch.setattr(native_cpu_kernel, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("GATEDNORM_CACHE_DIR", str(tmp_path / "cache"))
    assert native_cpu_kernel.library() is None
    assert "failed" in native_cpu_kernel.status()
    x, z, w, b = make_inputs(30, 64, torch.bfloat16)
    y, mean, rstd = _forward(x, w, b, z, _spec(64, 64, True, True, "swish"))
    check_forward(y, mean, rstd, x, w, b, z, 1e-6, 64, True, True)


def test_switched_off_by_the_environment_on_the_next_call(monkeypatch, kernel_calls):
    x, z, w, b = make_inputs(20, 64, torch.float32)
    spec = _spec(64, 32, True, True, "swish")
    monkeypatch.setenv("GATEDNORM_CPU_KERNEL", "0")
    assert native_cpu_kernel.library() is None and "GATEDNORM_CPU_KERNEL" in native_cpu_kernel.status()
    _forward(x, w, b, z, spec)
    assert not kernel_calls
    monkeypatch.delenv("GATEDNORM_CPU_KERNEL")
    _forward(x, w, b, z, spec)
    assert kernel_calls and native_cpu_kernel.status().startswith("in use")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no cc")
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(native_cpu_kernel, "_state", {})
    monkeypatch.setenv("GATEDNORM_CACHE_DIR", str(tmp_path))
    assert native_cpu_kernel.library() is not None
    built = list(tmp_path.glob("gatednorm_cpu_*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temporary left
    monkeypatch.setattr(native_cpu_kernel, "_state", {})
    assert native_cpu_kernel.library() is not None and list(tmp_path.glob("gatednorm_cpu_*.so")) == built


def test_team_after_a_late_start_the_pool_then_the_team_again(monkeypatch):
    """Pooled calls run on the OpenMP team while its helpers start promptly; a late start sends the next calls
    to gatednorm's pool for TEAM_PAUSE_SECONDS; other threads, GATEDNORM_CPU_OPENMP=0 and team(False) use the
    pool."""
    monkeypatch.setattr(native_cpu_kernel, "_state", {**native_cpu_kernel._state, "lib": object(), "team": True})
    monkeypatch.setattr(native_cpu_kernel, "_team", {"on": True, "pool_until": 0.0,
                                                     "pause": native_cpu_kernel.TEAM_PAUSE_SECONDS})
    now = [100.0]
    monkeypatch.setattr(native_cpu_kernel, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    use_team = native_cpu_kernel.use_team
    assert use_team()
    native_cpu_kernel._after_team_call(native_cpu_kernel.TEAM_LATE_SECONDS / 2)
    assert use_team(), "helpers that started in time must keep the team"
    native_cpu_kernel._after_team_call(native_cpu_kernel.TEAM_LATE_SECONDS * 2)
    assert not use_team()
    now[0] += native_cpu_kernel.TEAM_PAUSE_SECONDS * 0.9
    assert not use_team()
    now[0] += native_cpu_kernel.TEAM_PAUSE_SECONDS * 0.2
    assert use_team(), "the team is tried again after the pause"
    pause = native_cpu_kernel.TEAM_PAUSE_SECONDS
    for _ in range(8):  # late again and again: each pause twice the last, up to the maximum
        native_cpu_kernel._after_team_call(1.0)
        pause = min(2 * pause, native_cpu_kernel.TEAM_PAUSE_MAX_SECONDS)
        now[0] += pause * 0.45
        assert not use_team()
        now[0] += pause * 0.6
        assert use_team()
    assert pause == native_cpu_kernel.TEAM_PAUSE_MAX_SECONDS
    native_cpu_kernel._after_team_call(0.0)  # on time: the next late call pauses the shortest time again
    native_cpu_kernel._after_team_call(1.0)
    now[0] += native_cpu_kernel.TEAM_PAUSE_SECONDS * 1.1
    assert use_team()
    with ThreadPoolExecutor(1) as pool:
        assert not pool.submit(use_team).result(), "a thread other than the main one started a team"
    with native_cpu_kernel.team(False):
        assert not use_team()
    assert use_team()
    monkeypatch.setenv("GATEDNORM_CPU_OPENMP", "0")
    assert not use_team() and "GATEDNORM_CPU_OPENMP=0" in native_cpu_kernel.status()
    monkeypatch.delenv("GATEDNORM_CPU_OPENMP")
    assert native_cpu_kernel.status().startswith("in use (threads: PyTorch's OpenMP team")


@pytest.mark.skipif(not native_cpu_kernel._state.get("team"), reason="no OpenMP team here")
def test_team_runs_on_pytorchs_openmp_runtime():
    """The library added no OpenMP runtime of its own: one is mapped, PyTorch's (else its team would be a
    second set of threads competing with ATen's)."""
    assert len(native_cpu_kernel._openmp_runtimes()) == 1


@pytest.mark.parametrize("threads", [t for t in THREADS if not isinstance(t, str)])  # the team only
def test_team_calls_hold_their_work_counter_during_the_call(threads, monkeypatch):
    """The C code takes the shared counter's address: the counter object must outlive the call (a temporary's
    memory is reused at once by the next small objects, and the threads would then take rows from garbage)."""
    created: list[weakref.ref] = []

    class Tracked(native_cpu_kernel.WorkCounter):
        def __init__(self) -> None:
            super().__init__()
            created.append(weakref.ref(self))

    real = native_cpu_kernel.library()
    alive_during_call: list[bool] = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if not name.endswith("_team_packed"):
                return fn

            def call(*args):
                alive_during_call.append(bool(created) and created[-1]() is not None)
                return fn(*args)
            return call

    monkeypatch.setattr(native_cpu_kernel, "WorkCounter", Tracked)
    monkeypatch.setattr(native_cpu_kernel, "_loaded", lambda: Spy())
    monkeypatch.setattr(native_cpu_kernel, "_team", {"on": True, "pool_until": 0.0})
    monkeypatch.setattr(native_cpu_kernel, "TEAM_LATE_SECONDS", float("inf"))
    monkeypatch.setattr(native_cpu._Plan, "__init__", _pooled_plan_init(native_cpu._Plan.__init__))
    x, z, w, _ = make_inputs(300, 128, torch.float32, seed=4)
    spec = _spec(128, 64, True, True, "swish")
    y, mean, rstd = _forward(x, w, None, z, spec)
    native_cpu.backward(torch.randn_like(x), x, w, None, z, mean, rstd, spec)
    assert alive_during_call == [True, True]


# ---------------------------------------------------------------------------
# The quantized output's last step in C (native_cpu_kernel.c, "The quantized output's last step")
# ---------------------------------------------------------------------------


def _quant_rows(k: int, quant: str) -> torch.Tensor:
    """float32 rows whose blocks of k hit the quantizer's edges: values on the fp8 / int8 grids' midpoints and
    their float32 neighbours (times a block scale), a NaN block, an Inf block, an all-zero block, -0, values
    that underflow the fp8 grid, a block of tiny values (the scale's floor) and random ones."""
    from gatednorm.spec import QUANT_FORMATS, quant_max

    g = torch.Generator().manual_seed(k)
    qmax = quant_max(quant)
    if quant == "int8":
        mids = torch.arange(-127, 127) + 0.5
    else:
        grid = torch.arange(256, dtype=torch.uint8).view(getattr(torch, QUANT_FORMATS[quant][0])).float()
        grid = grid[torch.isfinite(grid)].unique()
        mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, mids.nextafter(mids + 1), mids.nextafter(mids - 1), torch.tensor([qmax, -qmax])])
    rows = [(torch.rand(k, generator=g) * 2 - 1) * 10 for _ in range(12)]
    for i in range(0, vals.numel(), k - 1):  # blocks whose max is qmax: scale 1 (ue8m0: the power of two above)
        chunk = vals[i:i + k - 1]
        rows.append(torch.cat([torch.tensor([qmax]), chunk, torch.zeros(k - 1 - chunk.numel())]))
    special = torch.randn(6, k, generator=g)
    special[0, 3] = float("nan")
    special[1, 5] = -float("inf")
    special[2] = 0.0
    special[3, ::2] = -0.0
    special[3, 1::2] = 1e-30
    special[4] = torch.rand(k, generator=g) * 1e-38  # below qmax * 2^-126: the scale's floor
    special[5, 0] = 0.0 * float("inf")  # a NaN of the sign x86 gives 0 * Inf
    rows += list(special)
    return torch.stack(rows).float()


@pytest.mark.parametrize("quant", ["fp8_e4m3", "fp8_e4m3fnuz", "int8"])
@pytest.mark.parametrize("fmt", ["float32", "ue8m0"])
@pytest.mark.parametrize("k", [128, 64, 7])
@pytest.mark.parametrize("column_major", [False, True])
def test_c_quantizer_matches_quantize_blocks(quant, fmt, k, column_major):
    """quantize_rows (C) against numerics.quantize_blocks (torch ops) on the same float32 y: the same code
    bytes and the same scale bits (NaN scales the one quiet NaN on both), row-major and column-major storage."""
    from gatednorm import numerics
    from gatednorm.spec import QuantSpec, quant_dtype

    qspec = QuantSpec(quant, k, fmt, "none", column_major)
    rows = _quant_rows(k, quant)
    y = rows[: rows.shape[0] // 3 * 3].reshape(-1, 3 * k)  # three blocks per row
    m, n = y.shape
    q_ref, s_ref = numerics.quantize_blocks(y, qspec)
    q = torch.empty(m, n, dtype=quant_dtype(quant))
    storage = torch.full((n // k, m) if column_major else (m, n // k), 7.0)
    scale = storage.t() if column_major else storage
    native_cpu_kernel.quantize_rows(y, native_cpu_kernel.QuantTarget(q.view(torch.uint8), scale, k, quant,
                                                                     fmt == "ue8m0"))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale.contiguous().view(torch.int32), s_ref.view(torch.int32))
    assert bool(scale.isnan().any())  # the NaN blocks were exercised


def _generic_quant(x, w, b, z, gs, quant, block, **norm):
    """The generic path's result for the same call: the native forward into float32, then quantize_blocks."""
    from gatednorm import numerics
    from gatednorm.spec import QuantSpec

    y = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z, group_size=gs, backend="native",
                                 out=torch.empty(x.shape, dtype=torch.float32), **norm)[0]
    return numerics.quantize_blocks(y, QuantSpec(quant, block or x.shape[-1], "float32", "none", False))


@pytest.mark.parametrize(("n", "gs", "block", "norm"), [
    (288, 96, 32, dict(norm_before_gate=False, activation="sigmoid")),   # blocks inside groups, gate first
    (288, 96, 144, dict(is_rms_norm=True)),                               # blocks straddling groups
    (100, 50, None, dict()),                                              # per token, LayerNorm, odd sizes
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_quantized_forward_layouts(n, gs, block, norm, dtype):
    """The one-pass C path on other group / block layouts and dtypes (the row is quantized after all its groups,
    so blocks may cross groups): the generic path's bits."""
    x, z, w, b = make_inputs(37, n, dtype, bias=True, gate=True, seed=n + gs)
    for quant in ("fp8_e4m3", "fp8_e4m3fnuz", "int8"):
        q, s = gatednorm.gated_norm_quant(x, w, b, 1e-6, z, gs, quant=quant, quant_group_size=block, backend="native",
                                          **norm)
        q_ref, s_ref = _generic_quant(x, w, b, z, gs, quant, block, **norm)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref), (quant, block)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("quant", ["fp8_e4m3", "int8"])
def test_native_quantized_forward_in_one_pass(quant, threads, monkeypatch):
    """gated_norm_quant on the native backend with bf16 / float32 rows: the C forward quantizes each row as it
    computes it (no separate quantizer call, no y), on the pool or the team, and gives the generic path's bits:
    the C forward's float32 y then quantize_blocks. Rows out of range (|x| near bf16's maximum) are redone by
    the rescue and quantized again, to the same bits."""
    monkeypatch.setattr(native_cpu._Plan, "__init__", _pooled_plan_init(native_cpu._Plan.__init__))
    team_calls = _count_calls(monkeypatch, "forward_rows_team")
    pool_calls = _count_calls(monkeypatch, "forward_rows")
    monkeypatch.setattr(native_cpu_kernel, "_team", {"on": threads == "team", "pool_until": 0.0})
    monkeypatch.setattr(native_cpu_kernel, "TEAM_LATE_SECONDS", float("inf"))  # no switch to the pool mid-test
    calls = []
    real = native_cpu_kernel.quantize_rows
    monkeypatch.setattr(native_cpu_kernel, "quantize_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    x, z, w, b = make_inputs(300, 256, torch.bfloat16, bias=True, gate=True, seed=5)
    x[7] *= 1e36  # groups whose sums overflow float32: the range rescue's rows
    x[200, :128] = 0.0
    q, s = gatednorm.gated_norm_quant(x, w, b, 1e-6, z, 128, quant=quant, quant_group_size=64, backend="native")
    assert (team_calls if threads == "team" else len(pool_calls) > 1), "not run on the team / shared out on the pool"
    assert calls == [(1, 256)], calls  # row 7 only, through the rescue
    q_ref, s_ref = _generic_quant(x, w, b, z, 128, quant, 64)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert bool(torch.isfinite(s[7]).all()) and bool((q[7].float().abs() > 0).any())


def test_native_quantized_forward_other_rows_and_round_to(monkeypatch):
    """Rows the C forward does not take (float16): the block kernels' forward a step at a time, then the C
    quantizer per step, to the generic path's bits; a y rounded to bf16 first (round_to): the generic path."""
    calls = []
    real = native_cpu_kernel.quantize_rows
    monkeypatch.setattr(native_cpu_kernel, "quantize_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(native_cpu, "QUANT_STEP_ELEMENTS", 1024)  # several steps of rows
    x, z, w, b = make_inputs(40, 256, torch.float16, bias=True, gate=True, seed=3)
    for quant in ("fp8_e4m3", "int8"):
        calls.clear()
        q, s = gatednorm.gated_norm_quant(x, w, b, 1e-6, z, 128, quant=quant, quant_group_size=64, backend="native")
        assert sum(c[0] for c in calls) == 40 and all(c[0] <= 4 for c in calls), calls
        q_ref, s_ref = _generic_quant(x, w, b, z, 128, quant, 64)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        calls.clear()
        gatednorm.gated_norm_quant(x.bfloat16(), w, b, 1e-6, z.bfloat16(), 128, quant=quant, quant_group_size=64,
                                   round_to=torch.bfloat16, backend="native")
        assert calls == []
