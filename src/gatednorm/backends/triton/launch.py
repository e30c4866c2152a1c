"""The triton backend: sizes and launches the kernels of :mod:`.kernels` (forward, backward).

Launch shapes depend only on the group size and dtype (the backward's number of programs also on M,
which changes only how rows are shared out, never a row's arithmetic), so a row's outputs do not depend
on how many rows are in the call (batch invariance). How they were chosen, the cached launcher and
programmatic dependent launch: docs/design.md, "The triton backend's launches".
"""

from __future__ import annotations

import functools
import threading

import torch
import triton

from ...settings import env_flag, env_off, env_text
from ...spec import NormSpec, QuantSpec, quant_max
from ..base import Grads, GradsNeeded
from .kernels import (
    bwd_kernel,
    fwd_flat_kernel,
    fwd_kernel,
    fwd_quant_kernel,
    quant_rescue_kernel,
    rescue_kernel,
    sum_partials_kernel,
)

#: Widest chunk of a group held in registers at once; wider groups are looped over.
MAX_BLOCK = 8192
#: Elements per tile when groups are small (several rows share a program), forward and backward.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 4096
#: fp32 values of a tile per thread: sets num_warps (tile elements / 32 / this, 1 to 16 warps).
FWD_ELEMS_PER_THREAD = 16
BWD_ELEMS_PER_THREAD = 16
#: Backward tiles of groups up to 1024 wide hold at least this many rows (H100: 640-wide groups ran
#: 8 rows x 1024 at 16 warps about 10% faster than 4 rows).
BWD_MIN_ROWS = 8
#: Persistent backward programs per multiprocessor (before dividing among groups).
BWD_PROGRAMS_PER_SM = 2
#: Rows of partials summed per step by the final dweight/dbias reduction, and its columns per program
#: (see _partials_config). H200, forward + backward in a CUDA graph (tune_gpu.py --small-backward): 8192x128
#: 21.7 -> 13.5 us with (128, 32) instead of (32, 256): few steps over the rows, several programs.
PARTIAL_ROWS = 128
PARTIAL_COLS = 32
#: CUDA's limit on the second and third grid dimensions.
MAX_GRID_Y = 65535
#: Forward program orders (the last field of a forward launch shape): the grid (row tiles, groups); the
#: grid (groups, row tiles); or fwd_flat_kernel over contiguous rows seen as (M * groups, group size).
ORDER_ROWS_FASTEST, ORDER_GROUPS_FASTEST, ORDER_FLAT = 0, 1, 2


# ---------------------------------------------------------------------------
# Low-overhead launches
# ---------------------------------------------------------------------------
# Triton's JITFunction.run binds and specialises every argument on every call (tens of microseconds
# of Python per launch, more than these kernels take on small inputs). After the first launch of a
# specialisation we keep its CompiledKernel and call its launcher directly. The key holds everything
# Triton specialises on (dtypes, 16-byte alignment of pointers, integers equal to 1 / divisible by
# 16 / needing 64 bits, constexprs, warps, device), so a hit is the kernel Triton would have picked.


#: Triton releases whose ``JITFunction.run`` ends in ``CompiledKernel.run(grid_0, grid_1, grid_2, stream,
#: function, packed_metadata, launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args)``, the
#: call :func:`_launch` repeats: 3.6 (the GPU image; tests/test_gpu.py compares the two launches bit for
#: bit there) through 3.9 (read in its source). Other versions take Triton's own launch path.
FAST_LAUNCH_TRITON_VERSIONS = ((3, 6), (3, 9))

#: Triton releases whose compiled launcher (``CompiledKernel.run``, a CudaLauncher) wraps a C function
#: ``launch(grid_0, grid_1, grid_2, stream, function, cooperative, pdl, global_scratch, profile_scratch,
#: packed_metadata, launch_metadata, launch_enter_hook, launch_exit_hook, *args)`` that takes a pointer
#: argument as a plain int: 3.6 (read in its source, measured on an H200). There :func:`_launch` calls that
#: function itself with the tensors' addresses. Why: for a tensor the C launcher calls its ``data_ptr``
#: method and then the CUDA driver (cuPointerGetAttribute, to reject host memory) per pointer, and the
#: Python wrapper around it builds two closures per call; an int takes neither path. The addresses come
#: from tensors that the callers checked to be on the launch's CUDA device.
DIRECT_LAUNCH_TRITON_VERSIONS = ((3, 6), (3, 6))


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton; (0, 0) when the version string is unusual."""
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def _fast_launch_supported() -> bool:
    low, high = FAST_LAUNCH_TRITON_VERSIONS
    return low <= triton_version() <= high and hasattr(triton, "knobs")


# Read once, when this backend loads (an exception to settings.py's read-per-call policy): looking the
# variable up costs about 0.8 us, a measurable share of a launch-bound call's few microseconds of host time.
_FAST_LAUNCH = _fast_launch_supported() and env_text("GATEDNORM_TRITON_FAST_LAUNCH") != "0"
_DIRECT_LAUNCH = DIRECT_LAUNCH_TRITON_VERSIONS[0] <= triton_version() <= DIRECT_LAUNCH_TRITON_VERSIONS[1]


def _fast_launch_enabled() -> bool:
    """The cached launch path, unless this Triton is outside FAST_LAUNCH_TRITON_VERSIONS or
    ``GATEDNORM_TRITON_FAST_LAUNCH=0`` was set when the backend loaded (then Triton's own launch)."""
    return _FAST_LAUNCH


#: Per specialisation: (CompiledKernel, its launcher, CUfunction, packed metadata, the launcher's C function
#: or None, cooperative flag, PDL flag); see :func:`_launcher_entry`.
_COMPILED: dict = {}
_INTERPRETER_LOCK = threading.Lock()
#: Launches that took the cached path (a diagnostic for benchmarks and tests).
fast_launches = 0


def _spec_key(args: tuple) -> tuple[tuple, list]:
    """(what Triton specialises a compiled kernel on, the arguments as the C launcher takes them).

    Per runtime argument: a tensor's dtype and whether its address is 16-byte aligned (the launcher gets
    the address); an integer's being 1, divisible by 16, and fitting 32 bits; for bool and float the type
    only. One pass over the arguments for both: this runs on every launch."""
    key = []
    values = []
    for v in args:
        if v is None:
            key.append(None)
            values.append(None)
        elif v.__class__ is int:
            key.append((v == 1, not v & 15, -(2**31) <= v < 2**31))
            values.append(v)
        elif isinstance(v, torch.Tensor):
            address = v.data_ptr()
            key.append((v.dtype, not address & 15))
            values.append(address)
        else:  # bool, float
            key.append(v.__class__)
            values.append(v)
    return tuple(key), values


def _launcher_entry(compiled) -> tuple:
    """What :func:`_launch` keeps for a compiled kernel: the C launch function where it can call it directly
    (a Triton in DIRECT_LAUNCH_TRITON_VERSIONS, no scratch memory to allocate per launch, no tensor
    descriptors), else None (``compiled.run`` with the tensors)."""
    run = compiled.run  # a property that loads the binary on first use: read once, here
    fixed = (compiled, run, compiled.function, compiled.packed_metadata)
    direct = getattr(run, "launch", None) if _DIRECT_LAUNCH else None
    if (direct is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or getattr(direct, "__name__", "") == "inner"):  # wrap_handle_tensordesc's wrapper
        return (*fixed, None, 0, 0)
    return (*fixed, direct, int(run.launch_cooperative_grid), int(run.launch_pdl))


def _launch(kernel, grid: tuple[int, int, int], args: tuple, constexprs: tuple, num_warps: int,
            dev: torch.device, fast: bool = True, pdl: bool = False) -> None:
    """kernel[grid](*args, **constexprs, num_warps=...), skipping Triton's binding once compiled.

    ``args`` are the runtime parameters in signature order; ``constexprs`` the values of the
    remaining (constexpr) parameters, also in signature order. ``fast``: the cached launcher where
    this Triton supports it (else Triton's own launch). ``pdl``: launch as a programmatic dependent
    launch (the kernel's ``USE_PDL`` constexpr must be set too, so that it waits for the previous
    kernel's memory before reading it).
    """
    options = {"num_warps": num_warps, "launch_pdl": True} if pdl else {"num_warps": num_warps}
    if dev.type != "cuda" or not (fast and _FAST_LAUNCH):
        names = kernel.arg_names[len(args):]
        if dev.type == "cpu":
            # Triton's interpreter keeps the grid of the running kernel in global state: one at a time.
            with _INTERPRETER_LOCK:
                kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), **options)
        else:
            kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), **options)
        return
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    spec, values = _spec_key(args)
    key = (kernel, index, num_warps, pdl, constexprs, spec)
    entry = _COMPILED.get(key)
    if entry is None:
        names = kernel.arg_names[len(args):]
        compiled = kernel[grid](*args, **dict(zip(names, constexprs, strict=True)), **options)
        if compiled is not None:
            _COMPILED[key] = _launcher_entry(compiled)
        return
    global fast_launches
    fast_launches += 1
    compiled, run, function, packed, direct, cooperative, pdl_flag = entry
    stream = torch._C._cuda_getCurrentRawStream(index)
    # The launch hooks exactly as JITFunction.run passes them (profilers such as proton hook in here);
    # launch metadata is only built when a hook is actually installed, and then from the tensors.
    hooks = triton.knobs.runtime
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    meta = None
    if enter is not None and getattr(enter, "calls", True):
        meta = compiled.launch_metadata(grid, stream, *args, *constexprs)
    if direct is not None:
        direct(grid[0], grid[1], grid[2], stream, function, cooperative, pdl_flag, None, None, packed, meta,
               enter, leave, *values, *constexprs)
    else:
        run(grid[0], grid[1], grid[2], stream, function, packed, meta, enter, leave, *args, *constexprs)


#: Programmatic dependent launch only for calls with fewer elements (H200, benchmarks/results): it shortens
#: launch-bound calls (8192x128 forward in a CUDA graph 3.02 -> 2.54 us, forward+backward 15.7 -> 13.9 us),
#: while on large calls it cost bandwidth (32768x5120 groups of 640: 96% of copy without, 74-75% with,
#: whether the next kernel was released at a program's start or its end). Bits are the same either way.
PDL_MAX_ELEMENTS = 1 << 24
# The range rescue's scan kernel after a forward of at least RESCUE_KERNEL_MIN_ELEMENTS (above that size) is
# launched as a programmatic dependent wherever the GPU supports it, even where the forward is not: the forward
# then triggers nothing early (no griddepcontrol in it), so the scan's programs start only as the forward's last
# programs exit, and its gdc_wait holds them until the forward's memory is visible; what PDL can save is the
# scan's launch latency between the two kernels (not timed yet: benchmarks/results/gpu_notes_h200.md, session 19).


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA GPUs of compute capability 9.0 and above (not ROCm)."""
    return (device.type == "cuda" and torch.version.hip is None and _TRITON_HAS_PDL
            and torch.cuda.get_device_capability(device)[0] >= 9)


def rescue_scan_pdl(option: bool | None, device: torch.device) -> bool:
    """Whether the range rescue's scan kernel after a large forward launches with PDL: the backend's ``pdl``
    option where set, else wherever the GPU supports it (see the comment under PDL_MAX_ELEMENTS)."""
    return option if option is not None else pdl_supported(device)


#: Triton releases with ``launch_pdl`` and ``tl.extra.cuda.gdc_wait`` (3.6 measured on an H200).
_TRITON_HAS_PDL = triton_version() >= (3, 6)

#: Triton's interpreter (3.9) converts bf16 <-> fp32 wrongly at the edges: fp32 -> bf16 rounds toward
#: zero (the GPU rounds to nearest even) and bf16 subnormals load as garbage. Under the interpreter the
#: kernels do these two conversions on the bits (bf16 is the top half of fp32), so CPU runs give the
#: GPU's results; compiled kernels use the hardware conversions. Read once: Triton itself decides at
#: kernel-definition time (when this backend is first loaded) whether it interprets.
_INTERPRET = env_flag("TRITON_INTERPRET")


#: Calls with at least this many elements, of groups of a width in RESCUE_SCAN_GROUP_SIZES, run the range rescue as
#: a separate kernel (see "Range rescue"); the fused quantized forward does so for the calls
#: :func:`quant_rescue_scan_min_elements` names.
RESCUE_KERNEL_MIN_ELEMENTS = 1 << 24
#: The group widths whose large calls (above) run the range rescue as rescue_kernel after fwd_kernel; every other
#: width checks in fwd_kernel at every call size (groups looped in chunks always do). H100, bench_triton_ab.py, the
#: check in fwd_kernel against the scan kernel after it: session 22 (two runs of 5 and 7 interleaved rounds) groups
#: of 96 to 5120 0.8-2.1% faster, the same time as with no rescue at all (the check costs nothing there), groups of
#: 8192 3.4-3.6% slower; session 29 (one run of 7 rounds, benchmarks/results/ab_rescue_evict_h100_session29.log)
#: groups of 8192 3.6% slower again (16384x8192), one group of 16384 (one tile of 32 warps, FWD_ONE_TILE_GROUP)
#: 0.8% and 1.6% faster (8192x16384 RMSNorm gated first; LayerNorm with bias gated first), so only 8192 kept
#: the scan. Session 30 (benchmarks/results/ab_rescue_branch_h100_session30.log, 7 rounds): with one-row tiles
#: branching on the range before writing y (kernels.fwd_kernel), 16384x8192 0.2698 -> 0.2678 ms against the scan
#: (100.7 -> 101.4% of copy), one group of 16384 0.996x / 1.005x (RMSNorm / LayerNorm + bias), 5120 and groups of
#: 640 within 0.1%: no width keeps the scan (benchmarks/results/gpu_notes_h200.md).
RESCUE_SCAN_GROUP_SIZES: frozenset[int] = frozenset()
#: The fused quantized forward checks in-kernel at every call size where its scale blocks are at most this wide
#: (and the call is not int8 on padded groups). H100 (session 23, bench_triton_ab.py --quant, two runs of 5 and 7
#: interleaved rounds, fp8 / int8 / fp8 with UE8M0 scales): with the check in fwd_quant_kernel rather than
#: quant_rescue_kernel after it, blocks of 128 (524288x128, groups of 128 and one group of 4096 in 32768x4096) ran
#: 1.6-3.9% faster, LayerNorm per token over 2048 0.9-1.6% faster; per-token scales over 4096 ran 1.1-2.8% slower in
#: fp8 and int8 (0.7-1.1% faster with UE8M0 scales), int8 on groups of 640 (padded to 1024) 6.2% slower
#: (benchmarks/results/gpu_notes_h200.md, session 23).
QUANT_RESCUE_KERNEL_MAX_BLOCK = 2048
#: A call size no call reaches: the range rescue always in-kernel.
_NEVER = 1 << 62
#: Rows whose stored rstd one program of rescue_kernel checks.
RESCUE_SCAN_ROWS = 1024


def rescue_scan_min_elements(option: int | None, group_size: int) -> int:
    """The call size (elements) from which :func:`forward` runs the range rescue of groups of ``group_size`` as
    rescue_kernel after fwd_kernel: ``option`` where given (any group width: tests lower it to compare the two),
    else RESCUE_KERNEL_MIN_ELEMENTS for the widths of RESCUE_SCAN_GROUP_SIZES and never for others. Wide groups
    looped in chunks check in-kernel whatever this says."""
    if option is not None:
        return option
    return RESCUE_KERNEL_MIN_ELEMENTS if group_size in RESCUE_SCAN_GROUP_SIZES else _NEVER


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (triton.cdiv is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    """The smallest power of two >= v (v >= 1), without triton.next_power_of_2's host overhead."""
    return 1 << (v - 1).bit_length()


@functools.cache
def _tile_config(group_size: int, tile_elements: int, elems_per_thread: int, max_block: int, min_rows: int = 1):
    """(BLOCK, NUM_CHUNKS, ROWS, num_warps) for a group size: BLOCK = group rounded up to a power of two
    (at most max_block; wider groups take NUM_CHUNKS chunks), ROWS rows a tile so a tile holds about
    tile_elements (at least min_rows for groups up to 1024 wide), and warps so each thread holds
    about elems_per_thread fp32 values of a tile."""
    block = min(_next_pow2(group_size), max_block)
    chunks = _cdiv(group_size, block)
    rows = max(1, tile_elements // block, min_rows if block <= 1024 else 1) if chunks == 1 else 1
    num_warps = max(1, min(16, rows * block // (32 * elems_per_thread)))
    return block, chunks, rows, num_warps


# Tuned launch shapes (benchmarks/tune_gpu.py on an H200, bf16, results in
# benchmarks/results/tune_gpu_h200.json), keyed by (BLOCK, whether the group size is a power of two):
# the padded lanes of a group that is not a power of two change what pays. A key not listed takes the
# general rule of _tile_config. Entries depend on the group size only, never on M (batch invariance).
#
# forward: (ROWS, num_warps, program order ORDER_*). Groups of 640 and one group of 5120 (BLOCK 1024 / 8192,
# padded) ran at 75-77% of copy with the general rule and at 96-100% with fewer warps (more loads in flight
# per thread). Padded groups of 640 and 96 run neighbouring groups of a row in neighbouring programs
# (groups fastest): 95 -> 100% and 77 -> 82% of copy (sweep of 2026-12-03, after the bare-MUFU sigmoid).
# Groups of 128: 32 rows on 8 warps, forward and backward together (H200, CUDA graphs, PDL as shipped,
# .gpu probes of 2026-12-04): 8192x128 forward 2.85 -> 2.30-2.38 us (1.39x -> 1.15x one torch.mul), forward +
# backward 9.5 -> 8.7 us, 16384x128 16.1 -> 13.9 us; 2048x128 forward 1.61 -> 1.69 us; 524288x128 and
# 32768x4096 forward unchanged (93.4-94.1% of copy), forward + backward within 1.5%. The forward alone at
# 32 rows / 8 warps with the old backward (16 rows / 8 warps) made forward + backward 1.6x slower at 4096-8192
# rows: under PDL the backward, released at the forward's start, then spread unevenly over the SMs. Groups of 128
# among several of a row (N > 128; with one group a row the order changes nothing) run groups fastest: H100
# (tune_gpu.py --fwd-only, 2026-12-05, Triton 3.6), 32768x4096 289.3 -> 275.1 us, 93.9 -> 98.8% of copy at the
# same 32 rows / 8 warps (every rows / warps pair of the sweep gained 4-5 points from it).
FWD_TUNED: dict[tuple[int, bool], tuple[int, int, int]] = {
    (128, True): (32, 8, ORDER_GROUPS_FASTEST),
    (128, False): (16, 1, ORDER_GROUPS_FASTEST),
    (1024, False): (1, 1, ORDER_GROUPS_FASTEST),
    (2048, True): (1, 4, ORDER_ROWS_FASTEST),
    (8192, False): (1, 4, ORDER_ROWS_FASTEST),
    (8192, True): (1, 16, ORDER_ROWS_FASTEST),
}
#: FWD_TUNED's entries that one GPU model runs faster otherwise, keyed by its name (torch.cuda.get_device_name, as
#: vLLM keys its tuned MoE launch configs), measured on that model; other models keep FWD_TUNED. H100 SXM (session
#: 28, bench_triton_ab.py, 7 interleaved rounds, copy 2967 GB/s, benchmarks/results/ab_ties_h100_session28.log):
#: 2048-wide groups at 2 rows / 8 warps (16 values a thread, as at 1 / 4), 65536x2048 LayerNorm + bias 185.2 ->
#: 183.2 us, 97.8 -> 98.8% of copy (sglang's kernel 184.3 us in session 27); groups padded to 8192 (one group of
#: 5120) at 8 warps, 32768x5120 gated first 336.7 -> 334.1 us (fla's 336.5). The H200 sweeps of an older kernel
#: found both slower there (2048: 1 / 4 ahead of 2 / 8 by more than 2%; 5120: 1 / 4 ahead of 1 / 8 by a third), so
#: FWD_TUNED keeps them until an H200 measures the current kernel.
FWD_TUNED_BY_MODEL: dict[str, dict[tuple[int, bool], tuple[int, int, int]]] = {
    "NVIDIA H100 80GB HBM3": {
        (2048, True): (2, 8, ORDER_ROWS_FASTEST),
        (8192, False): (1, 8, ORDER_ROWS_FASTEST),
    },
}
#: Launch shapes for forwards that keep no statistics (inference: ``layernorm_fn`` / ``rmsnorm_fn`` without autograd,
#: :meth:`TritonBackend.forward_output`), over :func:`fwd_tuned`'s, keyed by GPU model as FWD_TUNED_BY_MODEL. A
#: forward followed by its backward keeps FWD_TUNED's tile: under PDL the backward is released at the forward's
#: start and spreads over the SMs by the forward's tiles. H100 SXM (session 30, CUDA graphs of 100 calls,
#: benchmarks/results/g128_launch_shapes_h100_session30.log): groups of 128 at 16 rows / 8 warps, 8192x128 forward
#: 2.91 -> 2.45 us (1.35x -> 1.13x one torch.mul), 2048x128 1.66 -> 1.61 us, large shapes eagerly within 1%; as the
#: training tile the same shape made forward + backward 8.79 -> 10.44 us. Rows of a group of 128 keep their register
#: layout (8 values a thread, 16 threads a row) at 32 or 16 rows, so both tiles give the same bits.
FWD_OUTPUT_TUNED_BY_MODEL: dict[str, dict[tuple[int, bool], tuple[int, int, int]]] = {
    "NVIDIA H100 80GB HBM3": {
        (128, True): (16, 8, ORDER_GROUPS_FASTEST),
    },
}
#: A group of exactly this many features runs the forward as one register tile of 32 warps (16 fp32 values a
#: thread, as MAX_BLOCK at 16 warps), one pass over the row, instead of two chunks of MAX_BLOCK read twice (the
#: chunked loop reads each chunk for the statistics, then again for the output): H100 (tune_gpu.py --fwd-only,
#: 2026-12-05, Triton 3.6), 8192x16384 RMSNorm gated first 375.8 -> 273.4 us, 72 -> 99% of copy. Only this width
#: was measured (other widths between MAX_BLOCK and twice it keep the chunks); the backward keeps its chunks.
FWD_ONE_TILE_GROUP = 2 * MAX_BLOCK
# backward: (ROWS, num_warps, persistent programs per SM). Padded groups (640, 96) with fewer warps and,
# for 640, more programs per SM: 62 -> 83% and 65 -> 71% of copy (same sweep).
BWD_TUNED: dict[tuple[int, bool], tuple[int, int, int]] = {
    (128, True): (32, 8, 4),
    (128, False): (16, 2, 4),
    (1024, False): (1, 1, 8),
    (2048, True): (1, 4, 4),
    (8192, False): (1, 16, 1),
    (8192, True): (1, 16, 1),
}


def _is_pow2(v: int) -> bool:
    return v & (v - 1) == 0


#: The narrowest lower part of a group that fwd_quant_kernel splits in two (split_low): below it the second
#: tile's own reductions cost more than the padding they save (sm_90 SASS, Triton 3.9 on the CPU machine: groups of
#: 96 = 64 + 32 took 25-35% more instructions per element split than padded to 128; groups of 640 = 512 + 128
#: 30-35% fewer at two rows a warp).
SPLIT_MIN_LOW = 128
#: Whether groups that are not a power of two are read as unpadded parts: fwd_quant_kernel's two-part split tiles
#: (split_low) and fwd_kernel's / bwd_kernel's three-part tiles (fwd_parts). On since they ran on the H200
#: (session 14: their GPU tests passed; 32768x3072 groups of 96 forward 83 -> 90% of copy, forward + backward in a
#: graph 77 -> 87%; 32768x5120 groups of 640 quantized fp8 / ue8m0 / int8 in a graph 53 / 66 / 53 -> 72 / 84 / 75%).
#: GATEDNORM_TRITON_SPLIT_GROUPS=0, read when the triton backend loads, keeps one padded tile (docs/design.md,
#: "Quantized output" and "Groups of three parts").
SPLIT_GROUPS = not env_off("GATEDNORM_TRITON_SPLIT_GROUPS")


def split_parts(group_size: int) -> int:
    """For a group of two power-of-two parts, the lower one (640 = 512 + 128 -> 128); 0 for any other group (a
    power of two, three or more parts, or a lower part under SPLIT_MIN_LOW)."""
    low = group_size & -group_size
    rest = group_size - low
    return low if rest and _is_pow2(rest) and low >= SPLIT_MIN_LOW else 0


def split_low(group_size: int) -> int:
    """GLO of fwd_quant_kernel: :func:`split_parts` where SPLIT_GROUPS is on, the lower part that the kernel reads
    as a second unpadded tile ([ROWS, group_size - GLO] and [ROWS, GLO]) instead of one tile padded to the next
    power of two; else 0 (one padded tile)."""
    return split_parts(group_size) if SPLIT_GROUPS else 0


#: The narrowest part of a group that fwd_kernel and bwd_kernel read as three unpadded tiles (fwd_parts). sm_90 SASS
#: compiled with Triton 3.9 on the CPU machine (benchmarks/sass_count.py --parts, results/parts_sass_sm90.md;
#: Triton 3.6, the GPU image's: parts_sass_sm90_triton36.md, within about 10%),
#: instructions per real element at the padded tile's launch shape, padded -> three parts. Forward: groups of 96,
#: LayerNorm + bias gated first (bench_gpu's row at 80% of copy) 29.8 -> 18.7, RMSNorm gated after 24.9 -> 16.2
#: (groups of 128, RMSNorm gated after, run at 94% of copy with 21.4); 48 = 3 x 16 33.9 -> 25.4; 192 34.6 -> 27.0;
#: 384 29.0 -> 21.7; 3072 26.8 -> 23.6; 768 at its one-row, one-warp shape 17.5-17.7 -> 17.5-18.0 (no change).
#: Backward, groups of 96: 56.2 -> 50.8 (LayerNorm), 43.5 -> 37.8 (RMSNorm gated after), 46.4 -> 39.7.
FWD_PARTS_MIN = 16


def fwd_parts(group_size: int) -> int:
    """PARTS of fwd_kernel: 3 for a group of three equal power-of-two parts (96 = 3 x 32, 192, 384, ..., 3072;
    parts of at least FWD_PARTS_MIN) where SPLIT_GROUPS is on, read as three unpadded tiles at the padded tile's
    launch shape; else 1 (one tile padded to the next power of two: 96 -> 128, a quarter of its lanes idle)."""
    part = group_size // 3
    return 3 if SPLIT_GROUPS and part * 3 == group_size and _is_pow2(part) and part >= FWD_PARTS_MIN else 1


@functools.cache
def gpu_model(index: int) -> str:
    """The name of CUDA device ``index`` (FWD_TUNED_BY_MODEL's key); "" for a CPU tensor's -1 (Triton's
    interpreter)."""
    return torch.cuda.get_device_name(index) if index >= 0 else ""


def gpu_model_of(x: torch.Tensor) -> str:
    """:func:`gpu_model` of the device x lives on."""
    return gpu_model(x.get_device())


@functools.cache
def fwd_tuned(model: str = "", output_only: bool = False) -> dict[tuple[int, bool], tuple[int, int, int]]:
    """The forward's tuned launch shapes on a GPU model (its name, :func:`gpu_model`): FWD_TUNED with the model's
    entries of FWD_TUNED_BY_MODEL over it, and with ``output_only`` (a forward whose statistics are discarded)
    FWD_OUTPUT_TUNED_BY_MODEL's over those."""
    tuned = {**FWD_TUNED, **FWD_TUNED_BY_MODEL.get(model, {})}
    return {**tuned, **FWD_OUTPUT_TUNED_BY_MODEL.get(model, {})} if output_only else tuned


@functools.cache
def _fwd_config(group_size: int, elem_bytes: int, model: str = "",
                output_only: bool = False) -> tuple[int, int, int, int, int]:
    """Forward launch shape (BLOCK, NUM_CHUNKS, ROWS, num_warps, order: ORDER_*) on a GPU model (its name,
    :func:`gpu_model`; :func:`fwd_tuned`): from the group size and dtype only, never from M (batch invariance).
    ``output_only``: for a forward whose statistics are discarded (FWD_OUTPUT_TUNED_BY_MODEL)."""
    if group_size == FWD_ONE_TILE_GROUP:
        return group_size, 1, 1, 32, ORDER_ROWS_FASTEST
    block, chunks, rows, warps = _tile_config(group_size, FWD_TILE_ELEMENTS, FWD_ELEMS_PER_THREAD, MAX_BLOCK)
    tuned = fwd_tuned(model, output_only).get((block, _is_pow2(group_size))) if chunks == 1 else None
    if tuned is None:
        return block, chunks, rows, warps, ORDER_ROWS_FASTEST
    rows, warps, order = tuned
    return block, chunks, rows, warps, order


def output_tile_differs(group_size: int, elem_bytes: int, model: str = "") -> bool:
    """Whether a forward whose statistics are discarded launches another shape than one that keeps them."""
    return _fwd_config(group_size, elem_bytes, model, True) != _fwd_config(group_size, elem_bytes, model)


@functools.cache
def _bwd_config(group_size: int, elem_bytes: int) -> tuple[int, int, int, int, int, bool]:
    """Backward launch shape (BLOCK, NUM_CHUNKS, ROWS, num_warps, programs per SM, GROUPS_FASTEST): from the
    group size and dtype only (the program count follows M, which changes only how rows are shared out)."""
    block, chunks, rows, warps = _tile_config(group_size, BWD_TILE_ELEMENTS, BWD_ELEMS_PER_THREAD, MAX_BLOCK,
                                              BWD_MIN_ROWS)
    per_sm = BWD_PROGRAMS_PER_SM
    tuned = BWD_TUNED.get((block, _is_pow2(group_size))) if chunks == 1 else None
    if tuned is not None:
        rows, warps, per_sm = tuned
    return block, chunks, rows, warps, per_sm, False


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit stride along features: copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_flags(spec: NormSpec, has_z: bool, has_bias: bool) -> tuple[bool, ...]:
    """HAS_Z, HAS_BIAS, NORM_BEFORE_GATE, IS_RMS, SIGMOID_GATE, BF16_BY_BITS: the forward kernels' flags."""
    return has_z, has_bias, spec.norm_before_gate, spec.is_rms_norm, spec.activation == "sigmoid", _INTERPRET


def _fwd_kernel_constexprs(gs: int, block: int, rows: int, chunks: int, flags: tuple[bool, ...],
                           rescue_in_kernel: bool, pdl: bool, groups_fastest: bool, has_res: bool,
                           store_res: bool) -> tuple:
    """fwd_kernel's constexprs in signature order (GS, BLOCK, ROWS, NUM_CHUNKS, *flags, RESCUE_IN_KERNEL,
    USE_PDL, GROUPS_FASTEST, HAS_RES, STORE_RES, PARTS): one place, for :func:`forward` and :class:`ForwardPlan`,
    so a plan finds exactly the compiled kernel the plain launch made. PARTS: :func:`fwd_parts` for a group in
    one tile, at the padded tile's launch shape."""
    return (gs, block, rows, chunks, *flags, rescue_in_kernel, pdl, groups_fastest, has_res, store_res,
            fwd_parts(gs) if chunks == 1 else 1)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
    rescue_kernel_min_elements: int | None = None,
    rescue_scan_rows: int = RESCUE_SCAN_ROWS,
    *,
    config: tuple[int, int, int, int] | None = None,
    fast: bool = True,
    pdl: bool = False,
    rescue_pdl: bool | None = None,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    output_only: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Write the gated norm of x (M > 0, N; float32/bf16/fp16) into out (M, N, any floating dtype);
    return (mean | None, rstd), 1-D float32 of G*M values, group-major.

    ``residual`` (M, N, float32/bf16/fp16): normalise s = x + residual instead, summed in float32 in the
    kernel (the value of ops.residual_sum); ``residual_out`` (M, N, unit feature stride): receives s
    rounded once to its dtype (the prenorm output, or s in float32 for the backward).
    ``config``: (BLOCK, ROWS, num_warps, order: ORDER_*) instead of :func:`_fwd_config`'s choice (the
    tuning benchmark);
    ``rescue_kernel_min_elements``: see :func:`rescue_scan_min_elements` (None: by the group width);
    ``fast`` / ``pdl``: see :func:`_launch`; ``rescue_pdl``: the same for rescue_kernel where it runs after the
    forward (None: ``pdl``, or PDL wherever the GPU supports it, see PDL_MAX_ELEMENTS); ``output_only``: the
    caller discards mean and rstd (the launch shape of FWD_OUTPUT_TUNED_BY_MODEL; the same bits).
    """
    m, n = x.shape
    gs = spec.group_size
    groups = n // gs
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(groups * m, dtype=torch.float32, device=x.device)
    if m == 0:
        return mean, rstd
    x = _rows_ready(x)
    if z is not None:
        z = _rows_ready(z)
    if residual is not None:
        residual = _rows_ready(residual)
    if residual_out is not None and residual_out.stride(-1) != 1:
        raise ValueError("residual_out must have unit stride along features")
    weight = _rows_ready(weight)
    bias = _rows_ready(bias) if bias is not None else None
    y = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    if config is None:
        block, chunks, rows, warps, order = _fwd_config(gs, x.element_size(), gpu_model_of(x), output_only)
    else:
        block, rows, warps, order = config
        chunks = _cdiv(gs, block)
    tiles = _cdiv(m, rows)
    flat = (order == ORDER_FLAT and chunks == 1 and groups > 1 and x.stride(0) == n and y.stride(0) == n
            and (z is None or z.stride(0) == n) and residual is None and residual_out is None)
    groups_fastest = order == ORDER_GROUPS_FASTEST and groups > 1 and tiles <= MAX_GRID_Y
    args = (x, residual, z, weight, bias, y, residual_out, mean, rstd, m, x.stride(0),
            residual.stride(0) if residual is not None else 0, z.stride(0) if z is not None else 0, y.stride(0),
            residual_out.stride(0) if residual_out is not None else 0, spec.eps)
    flags = _fwd_flags(spec, z is not None, bias is not None)
    rescue_after = chunks == 1 and (flat or m * n >= rescue_scan_min_elements(rescue_kernel_min_elements, gs))
    if flat:  # GS, BLOCK, ROWS, *flags, USE_PDL
        _launch(fwd_flat_kernel, (_cdiv(m * groups, rows), 1, 1),
                (x, z, weight, bias, y, mean, rstd, m, groups, spec.eps),
                (gs, block, rows, *flags, pdl), warps, x.device, fast, pdl)
    else:
        _launch(fwd_kernel, (groups, tiles, 1) if groups_fastest else (tiles, groups, 1), args,
                _fwd_kernel_constexprs(gs, block, rows, chunks, flags, not rescue_after, pdl, groups_fastest,
                                       residual is not None, residual_out is not None), warps, x.device, fast, pdl)
    if rescue_after:  # GS, BLOCK, SCAN, *flags, USE_PDL, HAS_RES; the forward's warps (rescued rows' bits)
        if rescue_pdl is None:
            rescue_pdl = pdl or pdl_supported(x.device)
        _launch(rescue_kernel, (_cdiv(m, rescue_scan_rows), groups, 1), args,
                (gs, block, rescue_scan_rows, *flags, rescue_pdl, residual is not None), warps, x.device, fast,
                rescue_pdl)
    if y is not out:
        out.copy_(y)
    return mean, rstd


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: a few programs, so the persistent loop and the partial sums are exercised


@functools.cache
def _partials_config(n: int) -> tuple[int, int, int]:
    """(rows per step, columns per program, num_warps) of sum_partials_kernel for N features. Depends on N
    only, so a given M always sums its partial rows in the same order (deterministic dweight/dbias)."""
    return PARTIAL_ROWS, min(_next_pow2(n), PARTIAL_COLS), 4


def _partials_alloc(chunks: int):
    """How bwd_kernel's partial rows are allocated for a group in ``chunks`` chunks: zeroed where the kernel adds into
    them in memory (more than two chunks), else uninitialised (each program writes its row once)."""
    return torch.zeros if chunks > 2 else torch.empty


def _bwd_programs(m: int, rows: int, groups: int, sms: int, programs_per_sm: int) -> int:
    """Persistent programs per group: enough to fill the machine, never more than there are row tiles. Where
    the programs would get about one tile each (a launch-bound call), one program per multiprocessor: fewer
    rows of dweight partials to sum beat more programs (H200, 8192x128 forward + backward in a CUDA graph:
    13.5 -> 9.7 us; 2048x128 unchanged, 65536x128 keeps programs_per_sm). ``sms``: the device's multiprocessors
    (:func:`_sm_count`)."""
    tiles = _cdiv(m, rows)
    if tiles * groups <= sms * programs_per_sm:
        programs_per_sm = 1
    per_group = max(1, (sms * programs_per_sm) // groups)
    return max(1, min(per_group, tiles))


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    needs_dx: bool = True,
    needs_dz: bool = True,
    needs_dweight: bool = True,
    needs_dbias: bool = True,
    *,
    config: tuple[int, int, int, int, bool] | None = None,
    fast: bool = True,
    pdl: bool = False,
    partials_config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dz, dweight, dbias) from dy (M, N) and the saved x, z, weight, bias, mean, rstd.

    dx/dz in x's/z's dtypes (contiguous), dweight/dbias in the parameters' dtypes; None where not asked.
    M > 0; float32/bf16/fp16. ``config``: (BLOCK, ROWS, num_warps, programs per SM, GROUPS_FASTEST) instead of
    :func:`_bwd_config`'s choice, ``partials_config``: (rows per step, columns per program, num_warps) of the
    dweight/dbias sum instead of :func:`_partials_config`'s (the tuning benchmark); ``fast`` / ``pdl``: see
    :func:`_launch`.
    """
    m, n = x.shape
    gs = spec.group_size
    groups = n // gs
    needs_dz = needs_dz and z is not None
    needs_dbias = needs_dbias and bias is not None
    dev = x.device
    contiguous = torch.contiguous_format  # empty_like: about half the host time of torch.empty(shape, ...)
    dx = torch.empty_like(x, memory_format=contiguous) if needs_dx else None
    dz = torch.empty_like(z, memory_format=contiguous) if needs_dz else None
    if m == 0:
        dw = torch.zeros_like(weight) if needs_dweight else None
        db = torch.zeros_like(bias) if needs_dbias else None
        return dx, dz, dw, db
    dy = _rows_ready(dy)
    x = _rows_ready(x)
    if z is not None:
        z = _rows_ready(z)
    weight = _rows_ready(weight)
    bias = _rows_ready(bias) if bias is not None else None
    if config is None:
        block, chunks, rows, warps, per_sm, groups_fastest = _bwd_config(gs, x.element_size())
    else:
        block, rows, warps, per_sm, groups_fastest = config
        chunks = _cdiv(gs, block)
    progs = _bwd_programs(m, rows, groups, _sm_count(dev), per_sm)
    groups_fastest = groups_fastest and groups > 1 and progs <= MAX_GRID_Y
    need_part = needs_dweight or needs_dbias
    alloc = _partials_alloc(chunks)
    dw_part = alloc((progs, n), dtype=torch.float32, device=dev) if needs_dweight else None
    db_part = alloc((progs, n), dtype=torch.float32, device=dev) if needs_dbias else None
    _launch(
        bwd_kernel, (groups, progs, 1) if groups_fastest else (progs, groups, 1),
        (dy, x, z, weight, bias, mean, rstd, dx, dz, dw_part, db_part,
         m, dy.stride(0), x.stride(0), z.stride(0) if z is not None else 0, n, n, n),
        _bwd_kernel_constexprs(gs, block, rows, chunks, spec, z is not None, bias is not None,
                               GradsNeeded(needs_dx, needs_dz, needs_dweight, needs_dbias), pdl, groups_fastest),
        warps, dev, fast, pdl,
    )
    dw = db = None
    if need_part:
        dw = torch.empty_like(weight, memory_format=contiguous) if needs_dweight else None
        db = torch.empty_like(bias, memory_format=contiguous) if needs_dbias else None
        block_p, block_n, sum_warps = partials_config or _partials_config(n)
        _launch(
            sum_partials_kernel, (_cdiv(n, block_n), 1, 1),
            (dw_part, db_part, dw, db, progs, n),
            # BLOCK_P, BLOCK_N, NEED_DW, NEED_DB, BF16_BY_BITS, USE_PDL
            (block_p, block_n, needs_dweight, needs_dbias, _INTERPRET, pdl),
            sum_warps, dev, fast, pdl,
        )
    return dx, dz, dw, db


def _bwd_kernel_constexprs(gs: int, block: int, rows: int, chunks: int, spec: NormSpec, has_z: bool,
                           has_bias: bool, needs: GradsNeeded, pdl: bool, groups_fastest: bool) -> tuple:
    """bwd_kernel's constexprs in signature order (GS, BLOCK, ROWS, NUM_CHUNKS, HAS_Z, HAS_BIAS, NORM_BEFORE_GATE,
    IS_RMS, SIGMOID_GATE, NEED_DX, NEED_DZ, NEED_DW, NEED_DB, BF16_BY_BITS, USE_PDL, GROUPS_FASTEST, PARTS): one
    place, for :func:`backward` and :class:`BackwardPlan`. PARTS as the forward's (:func:`fwd_parts`), at the
    padded tile's launch shape."""
    return (gs, block, rows, chunks, has_z, has_bias, spec.norm_before_gate, spec.is_rms_norm,
            spec.activation == "sigmoid", *needs, _INTERPRET, pdl, groups_fastest,
            fwd_parts(gs) if chunks == 1 else 1)


class TritonBackend:
    """The ``triton`` backend (CUDA GPUs; CPU tensors under ``TRITON_INTERPRET=1``).

    ``rescue_kernel_min_elements`` / ``rescue_scan_rows``: where the range rescue runs as a separate
    scan kernel instead of in-kernel (None: :func:`rescue_scan_min_elements` by the group width, the fused
    quantized forward from RESCUE_KERNEL_MIN_ELEMENTS; tests lower the threshold to compare the two).
    ``fast_launch``: the cached launcher (False: Triton's own launch; both give the same bits).
    ``pdl``: programmatic dependent launch; None: for calls under :data:`PDL_MAX_ELEMENTS` where the GPU
    supports it (:func:`pdl_supported`), and for the range rescue's scan kernel after larger calls too.
    """

    name = "triton"
    supports_float64 = False

    def __init__(self, rescue_kernel_min_elements: int | None = None,
                 rescue_scan_rows: int = RESCUE_SCAN_ROWS, fast_launch: bool = True,
                 pdl: bool | None = None) -> None:
        self.rescue_kernel_min_elements = rescue_kernel_min_elements
        self.rescue_scan_rows = rescue_scan_rows
        self.fast_launch = fast_launch
        self.pdl = pdl

    def _pdl(self, x: torch.Tensor) -> bool:
        if self.pdl is None:
            return x.numel() < PDL_MAX_ELEMENTS and pdl_supported(x.device)
        return self.pdl

    def _rescue_pdl(self, x: torch.Tensor) -> bool:
        return rescue_scan_pdl(self.pdl, x.device)

    def forward(self, x, weight, bias, z, spec: NormSpec, out, output_only: bool = False):
        return _on_device_of(x, forward, x, weight, bias, z, spec, out, self.rescue_kernel_min_elements,
                             self.rescue_scan_rows, fast=self.fast_launch, pdl=self._pdl(x),
                             rescue_pdl=self._rescue_pdl(x), output_only=output_only)

    def forward_output(self, x, weight, bias, z, spec: NormSpec):
        # the forward at the launch shape of a call that keeps no statistics (FWD_OUTPUT_TUNED_BY_MODEL)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.forward(x, weight, bias, z, spec, out, output_only=True)
        return out

    # The eager plans (.plans) are built from this module's launch decisions, so they are imported here, once
    # per call signature, rather than at the top (plans imports this module).
    def plan_forward(self, x, weight, bias, z, spec: NormSpec):
        from .plans import plan_forward

        return plan_forward(x, weight, bias, z, spec, self.rescue_kernel_min_elements, self.rescue_scan_rows,
                            self.pdl, self.fast_launch)

    def plan_forward_output(self, x, weight, bias, z, spec: NormSpec):
        from .plans import plan_forward

        if not output_tile_differs(spec.group_size, x.element_size(), gpu_model_of(x)):
            return None  # plan_forward's plan serves these calls too
        return plan_forward(x, weight, bias, z, spec, self.rescue_kernel_min_elements, self.rescue_scan_rows,
                            self.pdl, self.fast_launch, output_only=True)

    def plan_backward(self, x, weight, bias, z, spec: NormSpec):
        from .plans import plan_backward

        return plan_backward(x, weight, bias, z, spec, self.pdl, self.fast_launch)

    def plan_autograd(self, forward_plan, backward_plan):
        from .plans import plan_autograd

        return plan_autograd(forward_plan, backward_plan)

    def plan_forward_quant(self, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec):
        from .plans import plan_forward_quant

        return plan_forward_quant(x, weight, bias, z, spec, qspec, self.rescue_kernel_min_elements,
                                  self.rescue_scan_rows, self.pdl, self.fast_launch)

    def forward_residual(self, x, residual, weight, bias, z, spec: NormSpec, out, residual_out):
        return _on_device_of(x, forward, x, weight, bias, z, spec, out, self.rescue_kernel_min_elements,
                             self.rescue_scan_rows, fast=self.fast_launch, pdl=self._pdl(x),
                             rescue_pdl=self._rescue_pdl(x), residual=residual, residual_out=residual_out)

    def backward(self, dy, x, weight, bias, z, mean, rstd, spec: NormSpec, needs: GradsNeeded) -> Grads:
        return _on_device_of(x, backward, dy, x, weight, bias, z, mean, rstd, spec, *needs, fast=self.fast_launch,
                             pdl=self._pdl(x))

    def forward_quant(self, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec, q, scale) -> bool:
        return _on_device_of(x, forward_quant, x, weight, bias, z, spec, qspec, q, scale,
                             self.rescue_kernel_min_elements, self.rescue_scan_rows, fast=self.fast_launch,
                             pdl=self._pdl(x), rescue_pdl=self._rescue_pdl(x))


def _on_device_of(x: torch.Tensor, fn, *args, **kwargs):
    """fn(*args, **kwargs) with x's GPU as the current device. Triton launches on the current device (its
    context, its stream), and callers need not have made x's GPU current: a model spread over GPUs in one
    process (Hugging Face's device_map="auto", pipeline stages) keeps cuda:0 current while a layer's tensors
    live on cuda:1. Only entered when the devices differ (about 0.3 us to check)."""
    dev = x.device
    if dev.type == "cuda" and dev.index is not None and dev.index != _current_cuda_device():
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _current_cuda_device() -> int:
    """torch.cuda.current_device() without its Python layers."""
    return torch._C._cuda_getDevice()


# ---------------------------------------------------------------------------
# Fused quantized forward (docs/design.md, "Quantized output")
# ---------------------------------------------------------------------------


def _launch_kw(kernel, grid: tuple[int, int, int], args: tuple, num_warps: int, dev: torch.device, *,
               fast: bool = True, pdl: bool = False, **constexprs) -> None:
    """:func:`_launch` with the constexprs by name (put in signature order here, checked to be complete);
    ``fast`` / ``pdl`` as there (with ``pdl`` the kernel's ``USE_PDL`` must be passed True as well)."""
    names = kernel.arg_names[len(args):]
    if set(names) != set(constexprs):
        raise TypeError(f"{kernel.fn.__name__} takes constexprs {names}, got {sorted(constexprs)}")
    _launch(kernel, grid, args, tuple(constexprs[name] for name in names), num_warps, dev, fast, pdl)


@functools.cache
def quant_layout(group_size: int, block: int) -> tuple[int, int, int, int, int] | None:
    """(NG, GB, KB, NQ, NQ_REAL) of fwd_quant_kernel for norm groups of ``group_size`` and quant blocks of
    ``block`` features, or None where the fused kernel does not apply (the generic path runs):

    * block == group size (any size): one block per group; GB = KB = the group rounded up to a power of two;
    * block a power of two dividing the group: NQ = GB / block blocks per group tile, NQ_REAL of them real;
    * block a power-of-two multiple of a power-of-two group size: NG = block / group size groups per tile;

    and in each case at most MAX_BLOCK features in a tile (one register tile: no chunked loops).
    Not fused: blocks that straddle group boundaries in other ways, sizes that are not powers of two
    (other than block == group size), and tiles wider than MAX_BLOCK (per-token scales of N > 8192).
    """
    def pow2(v: int) -> bool:
        return v & (v - 1) == 0

    gb = _next_pow2(group_size)
    if block == group_size:
        layout = (1, gb, gb, 1, 1)
    elif block < group_size and group_size % block == 0 and pow2(block):
        layout = (1, gb, block, gb // block, group_size // block)
    elif block > group_size and block % group_size == 0 and pow2(block) and pow2(group_size):
        layout = (block // group_size, group_size, block, 1, 1)
    else:
        return None
    return layout if layout[0] * layout[1] <= MAX_BLOCK else None


@functools.cache
def _fp8_by_bits(device: torch.device, fnuz: bool) -> bool:
    """Whether fwd_quant_kernel computes the fp8 codes on the bits (kernels._fp8_e4m3_bits) rather than with
    Triton's conversion: under the interpreter (its fp32 -> fp8 rounds wrongly), for e4m3fnuz (NVIDIA GPUs
    have no conversion to it), on ROCm (float8 support varies by chip) and on NVIDIA GPUs older than
    sm_89 (no fp8 hardware). Elsewhere e4m3fn uses the hardware conversion, which rounds to nearest even
    like the bit path: both give the same codes."""
    if _INTERPRET or fnuz or device.type != "cuda" or torch.version.hip is not None:
        return True
    return torch.cuda.get_device_capability(device) < (8, 9)


# Tuned fused-quant launch shapes: (tile width NG * GB, kind of group: "pow2", "padded" (one tile padded to GB) or
# "split" (two parts, split_low)) -> (ROWS, num_warps, program order); a split group without an entry takes its
# padded entry, a key not listed _tile_config's general rule. Measured on an H200 with
# `benchmarks/tune_gpu.py --quant` (bf16, fp8_e4m3 and int8; benchmarks/results/tune_gpu_quant_h200.json):
# 128-wide tiles keep (16, 4), within 7% of each shape's best and the best of them inside a CUDA graph at
# 8192x128 (3.18 us with PDL); 640-wide groups (1, 1) padded, as the plain forward; per-token blocks of 2048 and
# tiles of 4096 fewer warps than the plain forward's (13% and 4% faster there). Groups inside a block (NG > 1,
# powers of two) share the key of their tile width: the same contiguous [ROWS, NG * GB] stretch of memory.
# Split groups (SPLIT_GROUPS on; not measured on a GPU yet: chosen from sm_90 SASS compiled on the CPU
# machine with Triton 3.9, benchmarks/sass_count.py; 3.6's counts in results/quant_sass_sm90_triton36.md; the
# next sweep decides): two rows a warp, 24-40 features a thread, where the
# counts were lowest (fp8, 128-wide blocks: 640 at (4, 2) 32.4 instructions per element against 49.5 padded at
# (1, 1); 1280 at (2, 2) 33.5 against 60.1 padded at the rule's (2, 8); 384 at (8, 4) 40.4 against 47.0 at the
# rule's (8, 8); one group of 5120 at the padded entry's (1, 4) 32.6 against 35.0).
# Not (4, 1) for 128-wide tiles, though the 2026-12-04 sweeps (gpu_notes_h200.md) put it within 1-2% of (16, 4)
# on large calls and ahead in a CUDA graph at 8192x128: 65536x128 single-group tiles took 20.7 us per call in a
# graph with PDL (the previous kernel with (16, 4): 12.9-16.3 us, same benchmark; H100 session 24, probe_small_eager
# --quant: 20.8 against 14.5 us; at 8192x128 the shapes from (4, 1) to (32, 8) 2.87-2.99 us, (8, 2) 3.65). With it,
# tiles of several groups (64 + 64, 4 x 32) also came out wrong on the H200: the tl.reshape of such a tile to one
# block a row mixed rows up (found again on an H100 in session 24; fwd_quant_kernel no longer reshapes there).
# The program order, first swept in session 27 (H100, tune_gpu.py --quant --only "32768x4096 g128", bf16, fp8_e4m3
# and int8, L2 flushed; benchmarks/results/tune_gpu_quant_g128_order_h100_session27.log): a row's 128-wide tiles in
# neighbouring programs (groups fastest, as the plain forward's FWD_TUNED entry) ran 32768x4096 in 227.4 / 226.8 us,
# 100% of copy, against 252.6 / 254.3 us (90%) rows fastest; every launch shape of that order within 0.3% of the
# best; A/B against rows fastest on the next machine (fp8, float32 scales): 0.911x the time eagerly, 0.929x in a CUDA
# graph (ab_quant_order_h100_session27.log). Calls of one tile a row (8192x128, 524288x128) launch the same grid in
# either order. The other entries' order is not measured yet (rows fastest, as first tuned).
# The key depends on the group size and block only, never on M (batch invariance).
QUANT_TUNED: dict[tuple[int, str], tuple[int, int, int]] = {
    (128, "pow2"): (16, 4, ORDER_GROUPS_FASTEST),
    (128, "padded"): (16, 4, ORDER_ROWS_FASTEST),
    (512, "split"): (8, 4, ORDER_ROWS_FASTEST),
    (1024, "padded"): (1, 1, ORDER_ROWS_FASTEST),
    (1024, "split"): (4, 2, ORDER_ROWS_FASTEST),
    (2048, "pow2"): (2, 2, ORDER_ROWS_FASTEST),
    (2048, "split"): (2, 2, ORDER_ROWS_FASTEST),
    (4096, "pow2"): (1, 4, ORDER_ROWS_FASTEST),
    (8192, "padded"): (1, 4, ORDER_ROWS_FASTEST),
    (8192, "pow2"): (1, 16, ORDER_ROWS_FASTEST),
}


def quant_tile_key(group_size: int, block: int) -> tuple[int, str] | None:
    """QUANT_TUNED's key of fwd_quant_kernel's tile for this group size and quant block (None: not fused)."""
    layout = quant_layout(group_size, block)
    if layout is None:
        return None
    kind = ("pow2" if _is_pow2(group_size) else "split" if layout[0] == 1 and split_low(group_size)
            else "padded")
    return layout[0] * layout[1], kind


@functools.cache
def _quant_config(group_size: int, block: int) -> tuple[int, int, int] | None:
    """(ROWS, num_warps, program order: ORDER_ROWS_FASTEST / ORDER_GROUPS_FASTEST) of fwd_quant_kernel for a
    group size and quant block (None: not fused); from those only, never from M (batch invariance)."""
    key = quant_tile_key(group_size, block)
    return None if key is None else quant_launch_shape(key)


def quant_launch_shape(key: tuple[int, str]) -> tuple[int, int, int]:
    """(ROWS, num_warps, order) of fwd_quant_kernel for a QUANT_TUNED key (tile width, kind): the tuned entry, a
    split tile taking its padded tile's where it has none, else the general rule of _tile_config."""
    tuned = QUANT_TUNED.get(key)
    if tuned is None and key[1] == "split":
        tuned = QUANT_TUNED.get((key[0], "padded"))
    if tuned is not None:
        return tuned
    _, _, rows, warps = _tile_config(key[0], FWD_TILE_ELEMENTS, FWD_ELEMS_PER_THREAD, MAX_BLOCK)
    return rows, warps, ORDER_ROWS_FASTEST


def _quant_grid(m: int, rows: int, tiles: int, order: int) -> tuple[tuple[int, int, int], bool]:
    """fwd_quant_kernel's grid and GROUPS_FASTEST: tiles of a row in neighbouring programs where the order asks
    for it and the row tiles fit the grid's second axis."""
    row_tiles = _cdiv(m, rows)
    if order == ORDER_GROUPS_FASTEST and tiles > 1 and row_tiles <= MAX_GRID_Y:
        return (tiles, row_tiles, 1), True
    return (row_tiles, tiles, 1), False


def _quant_codes_arg(q: torch.Tensor, qspec: QuantSpec, by_bits: bool) -> torch.Tensor:
    """q as fwd_quant_kernel takes it: int8, float8 where the hardware converts, else uint8 for the fp8 bits."""
    return q.view(torch.uint8) if by_bits and qspec.quant != "int8" else q


def _quant_kernel_constexprs(spec: NormSpec, qspec: QuantSpec, layout: tuple[int, int, int, int, int], has_z: bool,
                             has_bias: bool, by_bits: bool, pdl: bool) -> dict:
    """The constexprs fwd_quant_kernel and quant_rescue_kernel share, by name (all but ROWS,
    RESCUE_IN_KERNEL and SCAN): what :func:`forward_quant` and the eager plans (.plans) launch with."""
    ng, gb, kb, nq, nq_real = layout
    return dict(
        GS=spec.group_size, GB=gb, NG=ng, KB=kb, NQ=nq, NQ_REAL=nq_real,
        GLO=split_low(spec.group_size) if ng == 1 else 0,
        HAS_Z=has_z, HAS_BIAS=has_bias, NORM_BEFORE_GATE=spec.norm_before_gate,
        IS_RMS=spec.is_rms_norm, SIGMOID_GATE=spec.activation == "sigmoid",
        QMAX=quant_max(qspec.quant), INT8=qspec.quant == "int8", FNUZ=qspec.quant == "fp8_e4m3fnuz",
        UE8M0=qspec.scale_format == "ue8m0", ROUND_TO={"none": 0, "bfloat16": 1, "float16": 2}[qspec.round_to],
        FP8_BY_BITS=by_bits, BF16_BY_BITS=_INTERPRET, USE_PDL=pdl,
    )


def quant_rescue_scan_min_elements(option: int | None, spec: NormSpec, qspec: QuantSpec) -> int:
    """The call size (elements) from which :func:`forward_quant` runs its range rescue as quant_rescue_kernel:
    ``option`` where given (tests lower it to compare the two), else RESCUE_KERNEL_MIN_ELEMENTS for scale blocks
    wider than QUANT_RESCUE_KERNEL_MAX_BLOCK (per-token scales of long rows) and for int8 on groups that are not a
    power of two (padded in the tile), never for the others (the check in fwd_quant_kernel: measured faster)."""
    if option is not None:
        return option
    padded = not _is_pow2(spec.group_size)
    if qspec.block > QUANT_RESCUE_KERNEL_MAX_BLOCK or (padded and qspec.quant == "int8"):
        return RESCUE_KERNEL_MIN_ELEMENTS
    return _NEVER


def forward_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                  spec: NormSpec, qspec: QuantSpec, q: torch.Tensor, scale: torch.Tensor,
                  rescue_kernel_min_elements: int | None = None,
                  rescue_scan_rows: int = RESCUE_SCAN_ROWS, *,
                  config: tuple[int, int] | None = None, fast: bool = True, pdl: bool = False,
                  rescue_pdl: bool | None = None) -> bool:
    """Write q (M, N, contiguous) and scale (M, G, any strides) of x (M > 0, N; float32/bf16/fp16) in one
    kernel (and the range rescue's scan after it on calls of at least ``rescue_kernel_min_elements`` elements,
    see :func:`quant_rescue_scan_min_elements`); False (nothing written) where :func:`quant_layout` does not
    cover the call.

    ``config``: (ROWS, num_warps[, order]) instead of :func:`_quant_config`'s choice (the tuning benchmark; ROWS
    a power of two); ``fast`` / ``pdl`` / ``rescue_pdl``: see :func:`forward`.
    """
    m, n = x.shape
    layout = quant_layout(spec.group_size, qspec.block)
    if layout is None:
        return False
    ng = layout[0]
    if config is None:
        config = _quant_config(spec.group_size, qspec.block)
    rows, warps, order = config if len(config) == 3 else (*config, ORDER_ROWS_FASTEST)
    x = _rows_ready(x)
    if z is not None:
        z = _rows_ready(z)
    weight = _rows_ready(weight)
    bias = _rows_ready(bias) if bias is not None else None
    by_bits = _fp8_by_bits(x.device, qspec.quant == "fp8_e4m3fnuz")
    tiles = n // (ng * spec.group_size)
    args = (x, z, weight, bias, _quant_codes_arg(q, qspec, by_bits), scale,
            m, x.stride(0), z.stride(0) if z is not None else 0, q.stride(0), scale.stride(0), scale.stride(1),
            spec.eps)
    constexprs = _quant_kernel_constexprs(spec, qspec, layout, z is not None, bias is not None, by_bits, pdl)
    # The range rescue: in-kernel below the threshold, else quant_rescue_kernel (the forward's warps: the
    # same bits either way). With the rescue in registers (an earlier kernel) the H200 moved 524288x128 with
    # 128-wide fp8 blocks at 71-73% of copy, with the scan kernel after it 81%
    # (benchmarks/results/quant_bench_h200.md); see quant_rescue_scan_min_elements for today's kernel.
    rescue_after = m * n >= quant_rescue_scan_min_elements(rescue_kernel_min_elements, spec, qspec)
    grid, groups_fastest = _quant_grid(m, rows, tiles, order)
    _launch_kw(fwd_quant_kernel, grid, args, warps, x.device, fast=fast, pdl=pdl,
               ROWS=rows, RESCUE_IN_KERNEL=not rescue_after, GROUPS_FASTEST=groups_fastest, **constexprs)
    if rescue_after:
        if rescue_pdl is None:
            rescue_pdl = pdl or pdl_supported(x.device)
        _launch_kw(quant_rescue_kernel, (_cdiv(m, rescue_scan_rows), tiles, 1), args, warps, x.device, fast=fast,
                   pdl=rescue_pdl, SCAN=rescue_scan_rows, **dict(constexprs, USE_PDL=rescue_pdl))
    return True
