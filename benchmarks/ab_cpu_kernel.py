"""A/B of two sources of the native CPU kernel (``native_cpu_kernel.c``): the same bits, and which is faster.

Work on the kernel's per-element efficiency changes code that must keep its results (a row's bits are part
of the contract: batch invariance, determinism, and the claims in docs/design.md). This script builds each
source given (with the flags the package uses), then:

* bits: runs both on the same inputs over every variant (group sizes 33 to 5120, x / z / weight in float32
  or bf16, gate before / after / none, sigmoid, bias, RMSNorm / LayerNorm, a row stride that is not N, a
  row of huge values and a constant row for the range rescue) and compares forward output, mean, rstd and
  backward dx, dz, dweight, dbias partial sums bit for bit: "bits: K differing tensors of T";
* time: median single-thread milliseconds of the forward and of the backward (preallocated outputs, the
  kernel called directly, as one task over all rows) on the benchmark's shapes, the sources interleaved.

    python benchmarks/ab_cpu_kernel.py OLD.c NEW.c [--reps 7]
    git show HEAD~1:src/gatednorm/backends/native_cpu_kernel.c > /tmp/old.c   # a previous version

Needs a C compiler (as the kernel does). Builds go to a temporary cache directory. Speed claims from it are
single-thread and preallocated: quote them as such (benchmarks/bench_cpu.py is the end-to-end benchmark).
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

from gatednorm.backends import native_cpu_kernel as kernel

#: (M, N, group size, gate, gate before, RMSNorm, bias): the rows of benchmarks/bench_cpu.py
TIMED_SHAPES = [(65536, 128, 128, True, False, True, False), (4096, 4096, 128, True, False, True, False),
                (2048, 5120, 640, True, True, True, False), (4096, 2048, 2048, False, False, False, True)]


def build(source: Path) -> object:
    """The loaded library of ``source`` (built like the package's own, into $GATEDNORM_CACHE_DIR)."""
    kernel._SOURCE = source
    kernel._state.clear()
    lib = kernel.library()
    if lib is None:
        raise SystemExit(f"{source}: {kernel._state.get('why')}")
    return lib


def use(lib: object) -> None:
    kernel._state["lib"] = lib


def inputs(m, n, dtype, gate_dtype, gate, param_dtype, bias, row_pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, n + row_pad, generator=g) * 2 + 0.5).to(dtype)[:, :n]
    z = (torch.randn(m, n, generator=g) * 2).to(gate_dtype) if gate else None
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(param_dtype)
    b = (torch.randn(n, generator=g) * 0.5).to(param_dtype) if bias else None
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, z, w, b, dy


def forward(x, z, w, b, gs, rms, before, sigmoid, bufs=None):
    m, n = x.shape
    out, mean, rstd = bufs or (torch.empty(m, n, dtype=x.dtype), None if rms else torch.empty(n // gs * m),
                               torch.empty(n // gs * m))
    kernel.forward_rows(x, z, w, b, out, mean, rstd, 0, m, gs, 1e-6, rms, before, sigmoid)
    return out, mean, rstd


def backward(x, z, w, b, dy, stats, gs, rms, before, sigmoid, bufs=None):
    m, n = x.shape
    _, mean, rstd = stats
    dx, dz, part_w, part_b = bufs or (torch.empty(m, n, dtype=x.dtype), None if z is None else torch.empty_like(z),
                                      torch.empty(n), None if b is None else torch.empty(n))
    kernel.backward_rows(dy, x, z, w, b, mean, rstd, dx, dz, part_w, part_b, 0, m, gs, rms, before, sigmoid)
    return dx, dz, part_w, part_b


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def compare_bits(libs: list[object]) -> tuple[int, int]:
    differing = total = 0
    f32, bf16 = torch.float32, torch.bfloat16
    groups = [(128, 128), (4096, 128), (640, 640), (2048, 2048), (288, 96), (100, 100), (66, 33), (5120, 5120)]
    for (n, gs), dt, zdt, gate, before, rms, bias, sigmoid, wdt in itertools.product(
            groups, [bf16, f32], [bf16, f32], [True, False], [False, True], [True, False], [False, True],
            [False, True], [f32, bf16]):
        if not gate and (before or sigmoid or zdt != dt):
            continue
        x, z, w, b, dy = inputs(37, n, dt, zdt, gate, wdt, bias, row_pad=3)
        x[3] = 1e30  # out of range: the caller's rescue redoes it; the kernel's own values are compared
        x[5] = 0.25  # a constant row
        results = []
        for lib in libs:
            use(lib)
            stats = forward(x, z, w, b, gs, rms, before, sigmoid)
            results.append(stats + backward(x, z, w, b, dy, stats, gs, rms, before, sigmoid))
        for other in results[1:]:
            for a, c in zip(results[0], other, strict=True):
                total += 1
                differing += not same_bits(a, c)
    return differing, total


def time_shapes(libs: list[object], names: list[str], reps: int) -> None:
    torch.set_num_threads(1)
    for m, n, gs, gate, before, rms, bias in TIMED_SHAPES:
        for dt in (torch.bfloat16, torch.float32):
            x, z, w, b, dy = inputs(m, n, dt, dt, gate, dt, bias)
            use(libs[0])
            stats = forward(x, z, w, b, gs, rms, before, False)
            fwd_bufs = tuple(None if t is None else t.clone() for t in stats)
            bwd_bufs = (torch.empty_like(x), None if z is None else torch.empty_like(z), torch.empty(n),
                        None if b is None else torch.empty(n))
            label = f"{m}x{n} g{gs} {'gate ' + ('before' if before else 'after') if gate else 'no gate'} {str(dt)[6:]}"
            line = f"{label:34}"
            for what in ("fwd", "bwd"):
                times = {name: [] for name in names}
                for _ in range(reps):
                    for lib, name in zip(libs, names, strict=True):
                        use(lib)
                        t0 = time.perf_counter()
                        if what == "fwd":
                            forward(x, z, w, b, gs, rms, before, False, fwd_bufs)
                        else:
                            backward(x, z, w, b, dy, stats, gs, rms, before, False, bwd_bufs)
                        times[name].append(time.perf_counter() - t0)
                medians = (f"{name} {sorted(t)[len(t) // 2] * 1e3:7.2f}" for name, t in times.items())
                line += f" | {what} " + " ".join(medians)
            print(line + " ms", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sources", nargs="+", type=Path, help="two or more kernel sources (.c)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-time", action="store_true", help="compare bits only")
    args = p.parse_args()
    if len(args.sources) < 2:
        p.error("give at least two sources")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GATEDNORM_CACHE_DIR"] = cache
        libs = [build(s.resolve()) for s in args.sources]
        names = [s.stem for s in args.sources]
        differing, total = compare_bits(libs)
        print(f"bits: {differing} differing tensors of {total}")
        if not args.no_time:
            time_shapes(libs, names, args.reps)


if __name__ == "__main__":
    main()
