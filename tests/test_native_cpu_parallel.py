"""The native CPU path's worker pool: the same bits whoever runs which block, errors, threads, exits.

:mod:`gatednorm.backends.native_cpu` cuts the rows into blocks, groups them into tasks and lets the
calling thread and persistent helper threads take tasks from a shared counter. These tests hold it
to its promises: a row's bits depend on that row only (not on the number of workers, the order in
which tasks are taken, the block size, or the batch), dweight/dbias are deterministic, an error in
any worker reaches the caller, the helpers are reused, calls from several threads and under
``torch.set_num_threads(1)`` work, and a process that used the pool exits cleanly.

No timing is asserted. Budget: about 20 s (the exit test starts fresh interpreters).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import check_forward, check_gradients, make_inputs, make_like
from torch.utils._python_dispatch import TorchDispatchMode

from gatednorm.backends import native_cpu, native_cpu_kernel
from gatednorm.backends.base import GradsNeeded
from gatednorm.backends.native_cpu import NativeCPUBackend
from gatednorm.spec import NormSpec

#: (name, n, group_size, is_rms_norm, gate, bias): gate "after" = norm_before_gate, "before", "none"
VARIANTS = [
    ("rms-after", 128, 32, True, "after", False),
    ("ln-before-bias", 96, 48, False, "before", True),
    ("ln-none-bias", 72, 72, False, "none", True),
    ("rms-after-sigmoid", 64, 64, True, "after-sigmoid", False),
]

#: Small blocks (8 rows), so that a few hundred rows make dozens of tasks for the pool.
SMALL_BLOCK_ROWS = 8


@pytest.fixture(autouse=True)
def _block_kernels():
    """These tests hold the pure-PyTorch block kernels to their promises; the C kernel that the native
    backend uses where it was built has its own tests (tests/test_native_cpu_kernel.py)."""
    with native_cpu_kernel.enabled(False):
        yield


def _spec(n, gs, rms, gate):
    return NormSpec(1e-6, gs, gate != "before", rms, "sigmoid" if gate.endswith("sigmoid") else "swish")


def _bits(t: torch.Tensor | None):
    if t is None:
        return None
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for a test (the pool follows it); restored afterwards."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def _inputs(m, n, dtype, gate, bias, seed):
    x, z, w, b = make_inputs(m, n, dtype, gate=gate != "none", bias=bias, seed=seed)
    return x, z, w, b, make_like(x, seed=seed + 1)


def _run(impl, x, z, w, b, dy, spec):
    """(y, mean, rstd, dx, dz, dweight, dbias) through the backend itself."""
    out = torch.empty_like(x)
    mean, rstd = impl.forward(x, w, b, z, spec, out)
    grads = impl.backward(dy, x, w, b, z, mean, rstd, spec, GradsNeeded(True, z is not None, True, b is not None))
    return (out, mean, rstd, *grads)


def _pooled(impl: NativeCPUBackend, m: int, n: int) -> bool:
    plan = native_cpu._Plan(m, n, impl.block_elements, ())
    return plan.workers > 1


# ---------------------------------------------------------------------------
# Bits: workers, task order, block size, batch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_same_bits_for_any_number_of_workers(threads, variant, dtype):
    _, n, gs, rms, gate, bias = variant
    spec = _spec(n, gs, rms, gate)
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    m = 301  # 38 blocks, the last one short
    args = _inputs(m, n, dtype, gate, bias, seed=n)
    threads(1)
    assert not _pooled(impl, m, n)
    serial = _run(impl, *args, spec)
    for k in (2, 3, 4):
        threads(k)
        assert _pooled(impl, m, n)
        assert _same(_run(impl, *args, spec), serial), f"{k} workers changed the bits"
    assert native_cpu._POOL.threads() >= 3
    x, z, w, b, dy = args
    check_forward(*serial[:3], x, w, b, z, spec.eps, gs, spec.norm_before_gate, rms, spec.activation)


def test_same_bits_in_any_task_order(threads, monkeypatch):
    threads(2)
    n, gs = 128, 32
    spec = _spec(n, gs, False, "before")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(400, n, torch.bfloat16, "before", True, seed=4)
    reference = _run(impl, *args, spec)
    take = native_cpu._Job._take

    def shuffled(self):  # hand the tasks out in a random order (the same task set)
        i = take(self)
        if i is None:
            return None
        if not hasattr(self, "order"):
            self.order = random.Random(7).sample(range(self._tasks), self._tasks)
        return self.order[i]

    monkeypatch.setattr(native_cpu._Job, "_take", shuffled)
    for _ in range(3):
        assert _same(_run(impl, *args, spec), reference)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_rows_same_bits_for_any_block_size_and_alone(threads, variant):
    # Per-row results (y, statistics, dx, dz) do not depend on the block size, the task a row
    # lands in, or the batch: each row alone (M = 1) gives the bits it has inside the batch.
    # dweight/dbias sum over rows in task order, so other blocks give other (close) sums.
    threads(2)
    _, n, gs, rms, gate, bias = variant
    spec = _spec(n, gs, rms, gate)
    m = 257
    x, z, w, b, dy = _inputs(m, n, torch.bfloat16, gate, bias, seed=m)
    default = _run(NativeCPUBackend(), x, z, w, b, dy, spec)
    groups = n // gs
    for rows in (1, 3, SMALL_BLOCK_ROWS, 50):
        impl = NativeCPUBackend(block_elements=rows * n)
        got = _run(impl, x, z, w, b, dy, spec)
        assert _same(got[:5], default[:5]), f"blocks of {rows} rows changed per-row bits"
        check_gradients((None, None, *got[5:]), x, w, b, z, dy, spec.eps, gs, spec.norm_before_gate, rms,
                        spec.activation, against=(None, None, *default[5:]))
    for r in (0, 7, 128, m - 1):
        alone = _run(NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n), x[r : r + 1],
                     None if z is None else z[r : r + 1], w, b, dy[r : r + 1], spec)
        y, mean, rstd, dx, dz = default[:5]
        assert torch.equal(_bits(alone[0][0]), _bits(y[r]))
        assert torch.equal(alone[2], rstd.view(groups, m)[:, r])
        if mean is not None:
            assert torch.equal(alone[1], mean.view(groups, m)[:, r])
        assert torch.equal(_bits(alone[3][0]), _bits(dx[r]))
        if dz is not None:
            assert torch.equal(_bits(alone[4][0]), _bits(dz[r]))


def test_repeated_runs_same_bits(threads):
    threads(2)
    n = 256
    spec = _spec(n, 64, False, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(500, n, torch.float32, "after", True, seed=11)
    first = _run(impl, *args, spec)
    for _ in range(5):
        assert _same(_run(impl, *args, spec), first)


def test_default_blocks_pooled_rows_alone(threads):
    # The shipped block size with enough rows for the pool (4+ blocks): rows at block edges.
    threads(2)
    n = 128
    step = native_cpu.CPU_BLOCK_ELEMENTS // n
    m = 4 * step + 3
    spec = _spec(n, n, True, "after")
    impl = NativeCPUBackend()
    assert _pooled(impl, m, n)
    x, z, w, b, dy = _inputs(m, n, torch.bfloat16, "after", False, seed=5)
    y, _, rstd, dx, dz, _, _ = _run(impl, x, z, w, b, dy, spec)
    for r in (0, step - 1, step, 3 * step, m - 1):
        alone = _run(impl, x[r : r + 1], z[r : r + 1], w, b, dy[r : r + 1], spec)
        assert _same((alone[0][0], alone[2], alone[3][0], alone[4][0]), (y[r], rstd[r : r + 1], dx[r], dz[r]))


def test_rescued_rows_in_pooled_call(threads):
    # Rows beyond float32's range of the sums take the cold path after the tasks; every row still
    # equals itself alone, and ordinary rows keep their bits.
    threads(2)
    n = 64
    spec = _spec(n, 32, False, "before")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    x, z, w, b, dy = _inputs(200, n, torch.float32, "before", True, seed=3)
    plain = _run(impl, x, z, w, b, dy, spec)
    x = x.clone()
    x[[5, 77, 150], :20] *= 1e30  # one group of each of three rows
    got = _run(impl, x, z, w, b, dy, spec)
    assert torch.isfinite(got[0]).all()
    untouched = [r for r in range(200) if r not in (5, 77, 150)]
    assert torch.equal(got[0][untouched], plain[0][untouched])
    for r in (5, 77, 150, 151):
        alone = _run(impl, x[r : r + 1], z[r : r + 1], w, b, dy[r : r + 1], spec)
        assert torch.equal(alone[0][0], got[0][r]) and torch.equal(alone[2], got[2].view(2, 200)[:, r])


def test_python_kernels_equal_torchscript_kernels(threads, monkeypatch):
    # Where TorchScript is unavailable the same functions run as Python, serially: same bits.
    threads(2)
    n = 128
    spec = _spec(n, 64, False, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(300, n, torch.bfloat16, "after", True, seed=8)
    assert native_cpu._kernels().scripted, "TorchScript kernels expected in this environment"
    scripted = _run(impl, *args, spec)

    class PythonKernels:
        forward = staticmethod(native_cpu._forward_rows)
        backward = staticmethod(native_cpu._backward_rows)
        scripted = False

    monkeypatch.setattr(native_cpu, "_KERNELS", [PythonKernels()])
    assert not _pooled(impl, 300, n)
    assert _same(_run(impl, *args, spec), scripted)


# ---------------------------------------------------------------------------
# Errors, threads, modes
# ---------------------------------------------------------------------------


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["helper", "caller"])
def test_error_in_a_worker_reaches_the_caller(threads, monkeypatch, where):
    threads(2)
    n = 128
    spec = _spec(n, n, True, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(400, n, torch.float32, "after", False, seed=2)
    reference = _run(impl, *args, spec)
    real = native_cpu._kernels()
    want = where == "helper"  # the thread kind whose task raises
    calls = []

    class Failing:
        scripted = True
        backward = real.backward

        @staticmethod
        def forward(*a):
            helper = threading.current_thread().name.startswith("gatednorm-cpu")
            calls.append(helper)
            if helper == want:
                raise _Boom(where)
            return real.forward(*a)

    monkeypatch.setattr(native_cpu, "_KERNELS", [Failing()])
    out = torch.empty_like(args[0])
    for _ in range(50):  # until a thread of that kind took a task (the other may take them all)
        calls.clear()
        try:
            impl.forward(args[0], args[2], args[3], args[1], spec, out)
        except _Boom:
            assert want in calls
            break
        assert want not in calls
    else:
        pytest.fail(f"no {where} thread took a task in 50 calls")
    # the pool is not left in a bad state: the next calls run normally, with the same helpers
    monkeypatch.setattr(native_cpu, "_KERNELS", [real])
    helpers = native_cpu._POOL.threads()
    assert _same(_run(impl, *args, spec), reference)
    assert native_cpu._POOL.threads() == helpers


def test_helpers_are_reused_not_leaked(threads):
    threads(3)
    n = 128
    spec = _spec(n, n, True, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(300, n, torch.bfloat16, "after", False, seed=6)
    _run(impl, *args, spec)
    before = threading.active_count()
    helpers = native_cpu._POOL.threads()
    for _ in range(20):
        _run(impl, *args, spec)
    assert threading.active_count() == before
    assert native_cpu._POOL.threads() == helpers >= 2
    names = [t.name for t in threading.enumerate() if t.name.startswith("gatednorm-cpu")]
    assert len(names) == helpers and all(t.daemon for t in threading.enumerate() if t.name in names)


def test_calls_from_several_threads_at_once(threads):
    threads(2)
    n = 128
    spec = _spec(n, 32, False, "before")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    inputs = [_inputs(150 + 13 * i, n, torch.bfloat16, "before", True, seed=20 + i) for i in range(12)]
    serial = [_run(impl, *args, spec) for args in inputs]
    barrier = threading.Barrier(4)

    def work(args):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return _run(impl, *args, spec)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, inputs))
    for a, b in zip(serial, threaded, strict=True):
        assert _same(a, b)


def test_set_num_threads_one_runs_in_the_calling_thread(threads, monkeypatch):
    n = 128
    spec = _spec(n, 64, True, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(300, n, torch.float32, "after", False, seed=9)
    threads(2)
    pooled = _run(impl, *args, spec)
    threads(1)
    seen = set()
    real = native_cpu._kernels()

    class Recording:
        scripted = real.scripted
        backward = real.backward

        @staticmethod
        def forward(*a):
            seen.add(threading.current_thread().name)
            return real.forward(*a)

    monkeypatch.setattr(native_cpu, "_KERNELS", [Recording()])
    assert _same(_run(impl, *args, spec), pooled)
    assert seen == {threading.current_thread().name}


def test_inference_mode_and_grad_mode(threads):
    # Helpers take the caller's inference mode (inference tensors accept writes only inside it) and
    # never record autograd history, whatever the inputs require.
    threads(2)
    n = 128
    spec = _spec(n, 64, False, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    x, z, w, b, dy = _inputs(300, n, torch.bfloat16, "after", True, seed=12)
    reference = _run(impl, x, z, w, b, dy, spec)
    with torch.inference_mode():
        out = torch.empty_like(x)
        mean, rstd = impl.forward(x, w, b, z, spec, out)
    assert out.is_inference() and torch.equal(_bits(out), _bits(reference[0]))
    w_leaf = w.clone().requires_grad_()
    out = torch.empty_like(x)
    impl.forward(x, w_leaf, b, z, spec, out)
    assert not out.requires_grad and torch.equal(_bits(out), _bits(reference[0]))


def test_dispatch_mode_sees_every_op_in_the_calling_thread(threads):
    # A Python dispatch mode is thread-local: with one active, the call stays in this thread (as
    # Python), so the mode sees its ops; the bits are the same.
    threads(2)
    n = 128
    spec = _spec(n, 64, True, "after")
    impl = NativeCPUBackend(block_elements=SMALL_BLOCK_ROWS * n)
    args = _inputs(300, n, torch.float32, "after", False, seed=13)
    reference = _run(impl, *args, spec)
    callers = set()

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            callers.add(threading.current_thread().name)
            return func(*args, **(kwargs or {}))

    with Count():
        got = _run(impl, *args, spec)
    assert Count.ops > 300 and callers == {threading.current_thread().name}
    assert _same(got, reference)


# ---------------------------------------------------------------------------
# A process that used the pool exits cleanly
# ---------------------------------------------------------------------------

_EXIT_SCRIPT = textwrap.dedent(
    """
    import threading, torch
    from gatednorm.backends.base import GradsNeeded
    from gatednorm.backends.native_cpu import NativeCPUBackend
    from gatednorm.spec import NormSpec
    torch.set_num_threads(2)
    impl = NativeCPUBackend(block_elements=8 * 128)
    spec = NormSpec(1e-6, 128, True, True, "swish")

    def call(m):
        x, z = torch.randn(m, 128), torch.randn(m, 128)
        w = torch.ones(128)
        out = torch.empty_like(x)
        mean, rstd = impl.forward(x, w, None, z, spec, out)
        impl.backward(torch.randn_like(x), x, w, None, z, mean, rstd, spec, GradsNeeded(True, True, True, False))

    threads = [threading.Thread(target=lambda m=m: [call(m) for _ in range(5)]) for m in (300, 500)]
    for t in threads:
        t.start()
    for _ in range(5):
        call(400)
    for t in threads:
        t.join()
    print("done")
    """
)


@pytest.mark.slow  # fresh interpreters
def test_process_exits_cleanly_after_pooled_calls():
    # Helpers are daemon threads; one that freed a tensor while the interpreter shut down used to
    # abort the process ("terminate called without an active exception"): helpers now drop their
    # buffers before reporting back, and the call drops the job's tensors.
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
