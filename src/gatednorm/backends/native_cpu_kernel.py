"""The native backend's CPU forward and backward in C (``native_cpu_kernel.c``), built on first use where a C
compiler is.

Why a C kernel
--------------
The pure-PyTorch block kernels of :mod:`.native_cpu` run about a dozen ATen ops per block of rows, each
a full pass over the block: on a 2-core Xeon, 65536x128 bf16 gated RMSNorm forward, single-threaded,
those passes cost the dtype conversions that read and write memory (about 29% of the time), the fused
silu (13%) and ten small ops of a few microseconds each, and the block loop ran at 5.2x the straight-
forward float32 recipe with two threads where issue 12 asks 8x (benchmarks/results/cpu_bench.md).
Measured alternatives that did not close it: bigger blocks (6%), a lookup table for the bf16 gate
(slower than the fused silu). One pass per row in C reads x and z once and writes y once.

Why ctypes and not ``torch.utils.cpp_extension``: the file includes no PyTorch header, so it builds in
about a second with the system's ``cc`` (a C++ extension against torch's headers took 25 s here), it
needs no matching compiler ABI, and a ctypes call releases the GIL, so the worker pool of
:mod:`.native_cpu` runs it on every core.

When it is used
---------------
The native backend's quantized output (``forward_quant``) wherever the library is built: in the forward's pass
(:class:`QuantTarget`) for float32 / bf16 rows, else by :func:`quantize_rows` after the forward. Forward and
backward calls of the native backend on CPU whose x, z, dy and outputs are float32 or
bfloat16 with contiguous features (anything else, float16 and float64 included, takes the block
kernels), plain tensors (subclasses such as fake or functional tensors take the block kernels; an active
dispatch mode sees no ATen op of the kernel, as of any kernel). ``GATEDNORM_CPU_KERNEL=0`` turns it off;
without a compiler,
or when the build fails, the block kernels run and :func:`status` says why. The library is built with
``-march=native`` into ``$GATEDNORM_CACHE_DIR`` (default ``~/.cache/gatednorm``), keyed by the source,
the compiler and the CPU's feature flags, and written atomically (concurrent first uses are safe). Where
PyTorch runs GNU OpenMP, it is built with ``-fopenmp`` too, and pooled calls run on PyTorch's OpenMP team
(:func:`use_team`; ``native_cpu_kernel.c``, "The same calls on an OpenMP team").

Results
-------
Not the block kernels' bits: e^x is this file's (about 1 ulp, as ATen's vectorised exp), so the gate
can differ in its last bit and y by the float32 error the tolerances of docs/design.md section 3 allow.
The properties of section 2 hold for it as for the block kernels: a row's bits depend on that row only
(batch invariance, any thread count), the same inputs give the same bits, NaN and Inf propagate, and
groups whose sums overflow or underflow are redone by the range rescue (row by row, so a row's bits never
depend on its neighbours). dweight / dbias: each task sums its rows in chunks of 32, the tasks' partial
rows are summed in task order (deterministic for a given M, as the block kernels).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import platform
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from ..builds import build_once, cache_dir
from ..numerics import SAFE_RSTD_MAX
from ..settings import env_off, env_text

_SOURCE = Path(__file__).with_name("native_cpu_kernel.c")
#: Its header (the packed calls' structs), which native_cpu_node.cpp includes too.
HEADER = _SOURCE.with_suffix(".h")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux: /proc/self/maps; elsewhere empty)."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line}
    except OSError:
        return set()


def _build() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, '') or (None, why not). Built with OpenMP (the team entry points) where PyTorch's
    own runtime is GNU OpenMP and the compiler has it, else (or if that build fails) without."""
    compiler = env_text("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler or not _SOURCE.exists():
        return None, "no C compiler found (cc, gcc, clang)" if not compiler else f"{_SOURCE.name} missing"
    source = _SOURCE.read_bytes() + HEADER.read_bytes()
    runtimes = _openmp_runtimes()
    variants = [[*_FLAGS, "-fopenmp"], _FLAGS] if len(runtimes) == 1 and "libgomp" in next(iter(runtimes)) else [_FLAGS]
    why = ""
    for flags in variants:
        key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_flags(), sys.platform]).encode()).hexdigest()
        lib_path = cache_dir() / f"gatednorm_cpu_{key[:16]}.so"
        why = build_once([compiler, *flags, str(_SOURCE), "-lm"], lib_path, timeout=120)
        if why:
            continue
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError as exc:
            why = f"could not load {lib_path}: {exc}"
            continue
        _declare(lib)
        # The team runs on PyTorch's threads only if loading the library added no second runtime.
        _state["team"] = hasattr(lib, "gn_forward_team_packed") and _openmp_runtimes() == runtimes
        return lib, ""
    return None, why


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures of the packed entry points: one pointer to the call's arguments (:data:`_FORWARD_CALL`,
    :data:`_BACKWARD_CALL`), a count back."""
    for name in ("gn_forward_packed", "gn_backward_packed", "gn_forward_team_packed", "gn_backward_team_packed",
                 "gn_quantize_packed"):
        if hasattr(lib, name):
            entry = getattr(lib, name)
            entry.argtypes = [ctypes.c_char_p]
            entry.restype = ctypes.c_int64


#: The layouts of native_cpu_kernel.c's gn_forward_call and gn_backward_call: every field 8 bytes, pointers and
#: integers int64 (a NULL pointer is 0), eps and rstd_max double; the forward's last 8 fields are the quantized
#: output's. One struct.pack and one pointer per call: ctypes' conversion of 27-36 typed arguments took 5.3 us
#: per call on the 2-core VM, packing them 0.2 us.
_FORWARD_CALL = struct.Struct("=22q2d13q")
_BACKWARD_CALL = struct.Struct("=36q")
#: gn_quantize_call: 16 int64 fields, the last 8 a quantized output's (:func:`_quant_fields`).
_QUANTIZE_CALL = struct.Struct("=16q")
#: The C quantizer's format codes.
_QUANT_KINDS = {"int8": 0, "fp8_e4m3": 1, "fp8_e4m3fnuz": 2}


def _off_by_environment() -> bool:
    """``GATEDNORM_CPU_KERNEL=0`` (read on every call, as every setting: see gatednorm.settings)."""
    return env_off("GATEDNORM_CPU_KERNEL")


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on the first call), or None (see :func:`status`). Nothing is built
    while ``GATEDNORM_CPU_KERNEL=0``."""
    if _off_by_environment():
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state["why"] = why
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def _loaded() -> ctypes.CDLL:
    """The library, for the kernel calls: their callers asked :func:`handles` (which reads the environment and
    builds the library) just before, so the calls do not read the environment a second time (0.7 us)."""
    lib = _state.get("lib")
    assert lib is not None, "native_cpu_kernel: a kernel call without handles() first"
    return lib  # type: ignore[return-value]


_switch = {"on": True}


@contextlib.contextmanager
def _switched(state: dict, on: bool) -> Iterator[None]:
    """``state["on"] = on`` inside the block, restored after it."""
    before = state["on"]
    state["on"] = on
    try:
        yield
    finally:
        state["on"] = before


def enabled(on: bool) -> contextlib.AbstractContextManager[None]:
    """Use the C kernel (``on``) or the block kernels for native forward and backward calls made inside the
    block (process-wide; for tests and A/B timing). ``GATEDNORM_CPU_KERNEL=0`` turns it off as well."""
    return _switched(_switch, on)


def status() -> str:
    """'in use' (and on which threads) or why the block kernels run instead."""
    if _off_by_environment():
        return "disabled by GATEDNORM_CPU_KERNEL=0"
    if library() is None:
        return str(_state.get("why", ""))
    if not _state.get("team"):
        return "in use (threads: gatednorm's pool; no OpenMP team: not PyTorch's GNU OpenMP, or no -fopenmp)"
    if _team_off_by_environment():
        return "in use (threads: gatednorm's pool; OpenMP team off by GATEDNORM_CPU_OPENMP=0)"
    return "in use (threads: PyTorch's OpenMP team, gatednorm's pool after a late start)"


# ---------------------------------------------------------------------------
# The OpenMP team and the pool (see native_cpu_kernel.c, "The same calls on an OpenMP team")
# ---------------------------------------------------------------------------

#: After a team call that was this late (seconds: a helper's start after the call began, or the master's wait at
#: the closing barrier for a helper taken off its core), calls go back to the pool: helpers that spin after an
#: ATen op start within microseconds, sleeping ones are woken in tens of microseconds (2-core VM), and a core
#: that another process keeps busy costs milliseconds.
TEAM_LATE_SECONDS = 300e-6
#: ... for this long after the first late call; then the next call tries the team again. Each further late
#: call in a row doubles the pause, up to TEAM_PAUSE_MAX_SECONDS, and a call on time resets it: while other
#: processes keep the cores busy, few calls pay the team's barrier, however far apart the calls are (in
#: bench_cpu a native call comes every 0.4 s; with a fixed quarter second each one tried the team, and the
#: 2048x5120 row with one core busy took 14.7 ms against 9.9 on the pool).
TEAM_PAUSE_SECONDS = 0.25
TEAM_PAUSE_MAX_SECONDS = 16.0

_team = {"on": True, "pool_until": 0.0, "pause": TEAM_PAUSE_SECONDS}


def _team_off_by_environment() -> bool:
    return env_off("GATEDNORM_CPU_OPENMP")


def team(on: bool) -> contextlib.AbstractContextManager[None]:
    """Run pooled calls on PyTorch's OpenMP team (``on``, where built: the default) or always on gatednorm's own
    pool, inside the block (process-wide; for tests and A/B timing)."""
    return _switched(_team, on)


def use_team() -> bool:
    """Whether the next pooled call runs on the OpenMP team: built with it, switched on, not
    ``GATEDNORM_CPU_OPENMP=0``, called from the main thread (another thread's OpenMP region would start a team
    of its own), and not paused after a late team call (:data:`TEAM_PAUSE_SECONDS`, doubling)."""
    return (_team["on"] and bool(_state.get("team")) and time.monotonic() >= _team["pool_until"]
            and threading.current_thread() is threading.main_thread() and not _team_off_by_environment())


def _after_team_call(late: float) -> None:
    if late > TEAM_LATE_SECONDS:
        pause = _team.get("pause", TEAM_PAUSE_SECONDS)
        _team["pool_until"] = time.monotonic() + pause
        _team["pause"] = min(2 * pause, TEAM_PAUSE_MAX_SECONDS)
    else:
        _team["pause"] = TEAM_PAUSE_SECONDS


def handles(*rows: torch.Tensor | None) -> bool:
    """Whether the kernel takes these (M, N) tensors (None: absent): float32 / bfloat16 with unit feature
    stride, the kernel switched on and built. The forward passes x, z, out; the backward dy, x, z (dx and dz
    take x's and z's dtypes)."""
    if not _switch["on"]:
        return False
    for t in rows:  # a loop, not all() over a generator: this runs on every CPU call
        if t is not None and (t.dtype not in _DTYPES or t.stride(1) != 1):
            return False
    return library() is not None


def ready() -> bool:
    """Whether the kernel runs calls now: switched on and built (:func:`handles` without the tensors; the eager
    plans ask it on every call, as the environment may have turned the kernel off since)."""
    return _switch["on"] and library() is not None


def takes_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernel reads and writes rows (and parameters) of this dtype."""
    return dtype in _DTYPES


def planned_forward_fields(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                           group_size: int, eps: float, is_rms: bool, gate_before: bool, sigmoid: bool) -> tuple:
    """What an eager plan's forward (:func:`planned_forward`) keeps of gn_forward_call for one call signature: the
    dtype codes, the row strides (x and z 2-D, or contiguous rows of any rank; y contiguous, x's dtype) and the
    fields after the rows' range, for a forward writing y in one call of this thread (no shared counter, no
    team, no quantized output), as :func:`forward_rows` packs them there."""
    n = x.shape[-1]
    return (_DTYPES[x.dtype], x.stride(0) if x.dim() == 2 else n, _code(z),
            0 if z is None else (z.stride(0) if z.dim() == 2 else n), _DTYPES[weight.dtype], _code(bias),
            (n, group_size, eps, SAFE_RSTD_MAX, is_rms, gate_before, sigmoid, 0, 0, *_quant_fields(None)))


def planned_forward(fields: tuple, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                    bias: torch.Tensor | None, y: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                    m: int) -> int:
    """:func:`forward_rows` over all M rows in this thread, with the signature's fields from
    :func:`planned_forward_fields` (y contiguous, x's dtype): the same kernel call, packed with no per-call
    lookups. Returns the out-of-range group count. The caller asked :func:`ready` just before."""
    code_x, x_stride, code_z, z_stride, code_w, code_b, tail = fields
    return _checked(_loaded().gn_forward_packed(_FORWARD_CALL.pack(
        x.data_ptr(), code_x, x_stride, 0 if z is None else z.data_ptr(), code_z, z_stride, weight.data_ptr(),
        code_w, 0 if bias is None else bias.data_ptr(), code_b, y.data_ptr(), code_x, tail[0],
        0 if mean is None else mean.data_ptr(), rstd.data_ptr(), m, 0, m, 0, 0, *tail)))


def planned_backward_fields(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                            bias: torch.Tensor | None, group_size: int, is_rms: bool, gate_before: bool,
                            sigmoid: bool) -> tuple:
    """What an eager plan's backward (:func:`planned_backward`) keeps of gn_backward_call for one call signature:
    the dtype codes of x, z, weight and bias and the fields after the rows' range, for a backward of all rows in
    one call of this thread (no shared counter), as :func:`backward_rows` packs them there."""
    return (_DTYPES[x.dtype], _code(z), _DTYPES[weight.dtype], _code(bias),
            (x.shape[-1], group_size, is_rms, gate_before, sigmoid, 0, 0))


def planned_backward(fields: tuple, dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
                     dx: torch.Tensor | None, dz: torch.Tensor | None, part_w: torch.Tensor | None,
                     part_b: torch.Tensor | None) -> None:
    """:func:`backward_rows` over all M rows of the (M, N) tensors in this thread, with the signature's fields from
    :func:`planned_backward_fields` (dy float32 / bf16 rows; dx, dz contiguous in x's and z's dtypes): the same
    kernel call, packed with fewer per-call lookups. The caller asked :func:`ready` just before."""
    code_x, code_z, code_w, code_b, tail = fields
    m, n = x.shape
    _checked(_loaded().gn_backward_packed(_BACKWARD_CALL.pack(
        dy.data_ptr(), _DTYPES[dy.dtype], dy.stride(0), x.data_ptr(), code_x, x.stride(0),
        0 if z is None else z.data_ptr(), code_z, 0 if z is None else z.stride(0), weight.data_ptr(), code_w,
        0 if bias is None else bias.data_ptr(), code_b, 0 if mean is None else mean.data_ptr(), rstd.data_ptr(),
        0 if dx is None else dx.data_ptr(), 0 if dx is None else code_x, 0 if dx is None else n,
        0 if dz is None else dz.data_ptr(), 0 if dz is None else code_z, 0 if dz is None else n,
        0 if part_w is None else part_w.data_ptr(), 0 if part_b is None else part_b.data_ptr(),
        m, 0, m, 0, 0, 0, *tail)))


def quantizer_ready() -> bool:
    """Whether :func:`quantize_rows` runs: the kernel switched on and built (:func:`ready`)."""
    return ready()


def params_ready(t: torch.Tensor | None) -> torch.Tensor | None:
    """weight / bias as the kernel reads them: float32 or bf16, contiguous (others converted to float32)."""
    if t is None or (t.dtype in _DTYPES and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


class WorkCounter:
    """The counter that the threads of one pooled call share: each makes one kernel call with it and takes
    the next rows (forward) or task (backward) from it inside C, without handing Python's GIL over per piece
    (with 2 threads, 4096x2048 LayerNorm bf16 forward: 4.5 ms as 55 calls of one task each, 3.4 with two
    tasks in all)."""

    def __init__(self) -> None:
        self._value = ctypes.c_int64(0)
        self.address = ctypes.addressof(self._value)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _code(t: torch.Tensor | None) -> int:
    return _DTYPES[t.dtype] if t is not None else 0


def _row_stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def backward_rows(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                  bias: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
                  dx: torch.Tensor | None, dz: torch.Tensor | None, part_w: torch.Tensor | None,
                  part_b: torch.Tensor | None, r0: int, r1: int, group_size: int, is_rms: bool, gate_before: bool,
                  sigmoid: bool, shared: tuple[WorkCounter, int, int] | None = None) -> None:
    """Gradients of rows [r0, r1): dx / dz rows written (None: not needed); part_w / part_b (N,) float32
    overwritten with these rows' dweight / dbias sums. weight / bias from :func:`params_ready`; mean/rstd as
    :func:`forward_rows` wrote them. ``shared=(counter, task_rows, tasks)``: instead, the tasks of task_rows
    rows of all M taken from the counter until none is left, task t into row t of part_w / part_b (tasks, N)."""
    lib = _loaded()
    m, n = x.shape
    counter, task_rows, tasks = (shared[0].address, shared[1], shared[2]) if shared else (0, 0, 0)
    _checked(lib.gn_backward_packed(_BACKWARD_CALL.pack(
        *_backward_tensors(dy, x, z, weight, bias, mean, rstd, dx, dz, part_w, part_b), m, r0, r1, counter,
        task_rows, tasks, n, group_size, is_rms, gate_before, sigmoid, 0, 0)))


class QuantTarget(NamedTuple):
    """Where a forward writes its rows quantized instead of y (docs/design.md, "Quantized output"): the codes
    (M, N) as one byte each with unit feature stride, the (M, N // block) float32 scales (any strides), the
    block, the format and whether scales are rounded up to powers of two."""

    codes: torch.Tensor
    scale: torch.Tensor
    block: int
    quant: str
    ue8m0: bool

    def rows(self, r0: int, r1: int) -> QuantTarget:
        """The target of rows [r0, r1) only."""
        return self._replace(codes=self.codes[r0:r1], scale=self.scale[r0:r1])


def _quant_fields(target: QuantTarget | None) -> tuple[int, ...]:
    """A packed call's quantized-output fields, gn_quant_fields (all 0: none, the forward writes y)."""
    if target is None:
        return (0,) * 8
    codes, scale = target.codes, target.scale
    return (codes.data_ptr(), codes.stride(0), scale.data_ptr(), scale.stride(0), scale.stride(1), target.block,
            _QUANT_KINDS[target.quant], target.ue8m0)


def forward_rows(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, r0: int, r1: int,
                 group_size: int, eps: float, is_rms: bool, gate_before: bool, sigmoid: bool,
                 shared: tuple[WorkCounter, int] | None = None, quant: QuantTarget | None = None) -> int:
    """Rows [r0, r1) of x (M, N) into out; mean/rstd 1-D group-major float32; weight / bias (N,) from
    :func:`params_ready`. ``shared=(counter, chunk_rows)``: instead, chunks of chunk_rows rows of all M taken
    from the counter until none is left. ``quant``: instead of writing y (out None), each row's float32 y
    quantized into the target as :func:`quantize_rows` would. Returns how many groups came out of the safe
    range (rstd outside (0, SAFE_RSTD_MAX) or NaN): they keep the rstd computed, and the caller redoes their
    rows (and quantizes them again)."""
    lib = _loaded()
    m, n = x.shape
    counter, chunk_rows = (shared[0].address, shared[1]) if shared else (0, 0)
    return _checked(lib.gn_forward_packed(_FORWARD_CALL.pack(
        *_forward_tensors(x, z, weight, bias, out, mean, rstd), m, r0, r1, counter, chunk_rows, n, group_size, eps,
        SAFE_RSTD_MAX, is_rms, gate_before, sigmoid, 0, 0, *_quant_fields(quant))))


def quantize_rows(y: torch.Tensor, target: QuantTarget) -> None:
    """The quantized output's last step on float32 rows y (M, N, unit feature stride) into the target's rows,
    as :func:`gatednorm.numerics.quantize_blocks` computes them (the same bits; ``native_cpu_kernel.c``, "The
    quantized output's last step"), in one pass, on this thread."""
    m, n = y.shape
    _loaded().gn_quantize_packed(_QUANTIZE_CALL.pack(y.data_ptr(), y.stride(0), m, 0, m, 0, 0, n,
                                                     *_quant_fields(target)))


def forward_rows_team(x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                      out: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, group_size: int,
                      eps: float, is_rms: bool, gate_before: bool, sigmoid: bool, chunk_rows: int, threads: int,
                      quant: QuantTarget | None = None) -> int:
    """:func:`forward_rows` over all rows with ``shared`` chunks of chunk_rows rows, on an OpenMP team of
    ``threads`` (:func:`use_team` said yes); then records whether the team was late."""
    lib = _loaded()
    m, n = x.shape
    return _team_call(lambda counter, late: lib.gn_forward_team_packed(_FORWARD_CALL.pack(
        *_forward_tensors(x, z, weight, bias, out, mean, rstd), m, 0, m, counter, chunk_rows, n, group_size, eps,
        SAFE_RSTD_MAX, is_rms, gate_before, sigmoid, threads, late, *_quant_fields(quant))))


def backward_rows_team(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor,
                       dx: torch.Tensor | None, dz: torch.Tensor | None, part_w: torch.Tensor | None,
                       part_b: torch.Tensor | None, group_size: int, is_rms: bool, gate_before: bool, sigmoid: bool,
                       task_rows: int, tasks: int, threads: int) -> None:
    """:func:`backward_rows` with ``shared`` tasks of task_rows rows, on an OpenMP team of ``threads``
    (:func:`use_team` said yes); then records whether the team was late."""
    lib = _loaded()
    m, n = x.shape
    _team_call(lambda counter, late: lib.gn_backward_team_packed(_BACKWARD_CALL.pack(
        *_backward_tensors(dy, x, z, weight, bias, mean, rstd, dx, dz, part_w, part_b), m, 0, m, counter, task_rows,
        tasks, n, group_size, is_rms, gate_before, sigmoid, threads, late)))


def _forward_tensors(x, z, weight, bias, out, mean, rstd) -> tuple[int, ...]:
    """The tensor fields of gn_forward_call (address, dtype code, row stride; parameters without a stride)."""
    return (x.data_ptr(), _code(x), x.stride(0), _ptr(z), _code(z), _row_stride(z), weight.data_ptr(), _code(weight),
            _ptr(bias), _code(bias), _ptr(out), _code(out), _row_stride(out), _ptr(mean), rstd.data_ptr())


def _backward_tensors(dy, x, z, weight, bias, mean, rstd, dx, dz, part_w, part_b) -> tuple[int, ...]:
    """The tensor fields of gn_backward_call, as :func:`_forward_tensors`."""
    return (dy.data_ptr(), _code(dy), dy.stride(0), x.data_ptr(), _code(x), x.stride(0), _ptr(z), _code(z),
            _row_stride(z), weight.data_ptr(), _code(weight), _ptr(bias), _code(bias), _ptr(mean), rstd.data_ptr(),
            _ptr(dx), _code(dx), _row_stride(dx), _ptr(dz), _code(dz), _row_stride(dz), _ptr(part_w), _ptr(part_b))


def _team_call(call: Callable[[int, int], int]) -> int:
    """``call(counter address, late address)``, a packed ``gn_*_team_packed`` call: a fresh shared counter and the
    late seconds, both held here until the call returns (the C code takes their addresses, not references);
    records whether the team was late."""
    late = ctypes.c_double(0.0)
    counter = WorkCounter()
    status = call(counter.address, ctypes.addressof(late))
    _after_team_call(late.value)
    return _checked(status)


def _checked(status: int) -> int:
    """A kernel call's return value; its -1 (a row buffer's malloc failed) as MemoryError."""
    if status < 0:
        raise MemoryError("gatednorm CPU kernel: out of memory for one row's buffers")
    return status
