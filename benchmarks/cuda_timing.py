"""Timing helpers shared by the GPU benchmarks (bench_gpu.py, bench_quant.py, tune_gpu.py). Imports without
Triton (the CPU smoke runs); the CUDA timings import triton.testing when called."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def do_bench(fn, **kwargs) -> float:
    """triton.testing.do_bench (L2 flushed before every call)."""
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, **kwargs)


def captured_graph(fn, calls: int = 100) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` back-to-back calls of ``fn``, warmed up on a side stream first, as capture
    requires; raises what capture raises (a kernel that cannot be captured)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def cuda_graph_ms(fn, calls: int = 100) -> float:
    """Median ms per call of ``fn`` replayed inside one CUDA graph of ``calls`` back-to-back calls (the
    kernels' time without the host's launch gaps)."""
    return do_bench(captured_graph(fn, calls).replay, warmup=10, rep=50, return_mode="median") / calls


def interleaved_rounds(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each timer's figures over ``rounds`` rounds, every round running every timer once, in order: a shared
    machine drifts (clocks, other processes), and figures taken side by side drift alike, so a ratio is best
    read round by round (:func:`median_ratio`)."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (each round's pair measured side by side)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def graph_rounds(fns: dict[str, Callable[[], object]], calls: int = 100, rounds: int = 7,
                 failed: Callable[[str, Exception], None] | None = None) -> dict[str, list[float]]:
    """ms per call of each fn inside its own CUDA graph of ``calls`` calls, the graphs captured once and replayed
    in ``rounds`` interleaved rounds (:func:`interleaved_rounds`). A single graph figure of a few microseconds
    moved by up to a fifth between two captures of torch.mul at 8192x128 in one H100 run (1.79 and 2.16 us,
    session 23). A fn whose capture fails is left out (``failed(name, exc)`` is told)."""
    graphs = {}
    for name, fn in fns.items():
        try:
            graphs[name] = captured_graph(fn, calls)
        except Exception as exc:  # noqa: BLE001 - an upstream kernel that cannot be captured: reported, left out
            if failed is not None:
                failed(name, exc)
    return interleaved_rounds({name: (lambda g=g: do_bench(g.replay, warmup=5, rep=25, return_mode="median") / calls)
                               for name, g in graphs.items()}, rounds)
