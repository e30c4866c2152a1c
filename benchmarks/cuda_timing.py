"""Timing helpers shared by the GPU benchmarks (bench_gpu.py, bench_quant.py, tune_gpu.py)."""

from __future__ import annotations

import torch
from triton.testing import do_bench


def cuda_graph_ms(fn, calls: int = 100) -> float:
    """Median ms per call of ``fn`` replayed inside one CUDA graph of ``calls`` back-to-back calls (the
    kernels' time without the host's launch gaps). Warmed up on a side stream first, as capture requires;
    raises what capture raises (a kernel that cannot be captured)."""
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
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") / calls
