"""Tile sweep for the Triton kernels (issue 16): which (BLOCK, ROWS, num_warps) each shape wants.

Times ``backends.triton.launch.forward`` / ``backward`` alone (do_bench median, L2 flushed) over a grid of
launch configurations per shape, the shapes of benchmarks/bench_gpu.py of at least 8M elements, and
prints the best few per shape beside the configuration the launcher picks today. Also compares the
launch modes (Triton's own launch, the cached launcher, programmatic dependent launch) bit for bit and
in time, eagerly and in a CUDA graph, at the launch-bound shapes.

Compiling ~100 kernel variants takes minutes of CPU time, so the variants are first compiled by parallel
worker processes (Triton's on-disk cache), and then timed one after another in this process.

    PYTHONPATH=src python benchmarks/tune_gpu.py --out DIR [--jobs 8] [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import triton
from triton.testing import do_bench

import gatednorm.backends.triton.launch as tk
from gatednorm.spec import NormSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import EPS, SHAPES, copy_bandwidth, make_inputs  # noqa: E402
from cuda_timing import cuda_graph_ms  # noqa: E402


def fwd_configs(gs: int, n: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK, ROWS, warps, order): one register tile of the group (several rows of it), or for groups
    that are not a power of two, chunks of the largest power of two dividing them (ROWS = 1); with several
    groups, in each program order (launch.ORDER_*; the flat view for single tiles only)."""
    out = []
    block = triton.next_power_of_2(gs)
    if block <= tk.MAX_BLOCK:
        for rows in (1, 2, 4, 8, 16, 32, 64):
            tile = rows * block
            if not 1024 <= tile <= 16384:
                continue
            for ept in (8, 16, 32, 64):
                warps = tile // (32 * ept)
                if 1 <= warps <= 16:
                    out.append((block, rows, warps))
    if gs & (gs - 1):
        chunk = gs & -gs  # largest power of two dividing gs
        if chunk >= 128 and gs // chunk <= 8:
            for warps in (1, 2, 4, 8):
                if 4 <= chunk // (32 * warps) <= 64:
                    out.append((chunk, 1, warps))
    orders = (tk.ORDER_ROWS_FASTEST, tk.ORDER_GROUPS_FASTEST, tk.ORDER_FLAT) if n > gs else (tk.ORDER_ROWS_FASTEST,)
    return [(*c, o) for c in out for o in orders if o != tk.ORDER_FLAT or c[0] >= gs]


def bwd_configs(gs: int, n: int) -> list[tuple[int, int, int, int, bool]]:
    """(BLOCK, ROWS, warps, programs per SM, GROUPS_FASTEST)."""
    out = []
    block = min(triton.next_power_of_2(gs), tk.MAX_BLOCK)
    orders = (False, True) if n > gs else (False,)
    for rows in (1, 2, 4, 8, 16, 32):
        tile = rows * block
        if not 1024 <= tile <= 8192 or (gs > block and rows > 1):
            continue
        for ept in (8, 16, 32, 64):
            warps = tile // (32 * ept)
            if 1 <= warps <= 16:
                for per_sm in (2, 4, 8, 16):
                    for gf in orders:
                        out.append((block, rows, warps, per_sm, gf))
    # Wide groups in chunks (two passes over the row, the second from L2; partial sums in memory).
    chunk = gs & -gs if gs & (gs - 1) else gs // 4
    if gs >= 4096 and 1024 <= chunk < gs:
        for warps in (2, 4, 8):
            for per_sm in (2, 4, 8):
                out.append((chunk, 1, warps, per_sm, False))
    return out


def spec_of(shape) -> NormSpec:
    _, _, _, gs, rms, nbg, _, _ = shape
    return NormSpec(EPS, gs, nbg, rms, "swish")


def warm(shape_index: int) -> None:
    """Compile every variant of one shape (worker process): a launch each, results unused."""
    shape = SHAPES[shape_index]
    name, m, n, gs, rms, nbg, has_z, has_bias = shape
    m = min(m, 256)  # compiling needs a launch, not the full tensor
    x, z, w, b, dy = make_inputs(m, n, has_z, has_bias)
    spec = spec_of(shape)
    y = torch.empty_like(x)
    for cfg in fwd_configs(gs, n):
        tk.forward(x, w, b, z, spec, y, config=cfg)
    mean, rstd = tk.forward(x, w, b, z, spec, y)
    for block, rows, warps, gf in {(c[0], c[1], c[2], c[4]) for c in bwd_configs(gs, n)}:
        tk.backward(dy, x, w, b, z, mean, rstd, spec, config=(block, rows, warps, 2, gf))
    torch.cuda.synchronize()


def time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep(shape, copy_gbps: float) -> dict:
    name, m, n, gs, rms, nbg, has_z, has_bias = shape
    x, z, w, b, dy = make_inputs(m, n, has_z, has_bias)
    spec = spec_of(shape)
    y = torch.empty_like(x)
    tensors = 2 if has_z else 1
    fwd_bytes = (tensors + 1) * m * n * 2
    bwd_bytes = (2 * tensors + 1) * m * n * 2  # x, z, dy read; dx, dz written
    ref = y.clone()
    tk.forward(x, w, b, z, spec, ref)
    fwd = []
    for cfg in fwd_configs(gs, n):
        y.fill_(float("nan"))
        tk.forward(x, w, b, z, spec, y, config=cfg)
        err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        t = time_ms(lambda: tk.forward(x, w, b, z, spec, y, config=cfg))  # noqa: B023
        fwd.append({"config": cfg, "us": t * 1e3, "pct_copy": 100 * fwd_bytes / (t * 1e-3) / 1e9 / copy_gbps,
                    "max_rel_diff_vs_default": err})
    t = time_ms(lambda: tk.forward(x, w, b, z, spec, y))
    default_f = {"config": tk._fwd_config(gs, 2), "us": t * 1e3,
                 "pct_copy": 100 * fwd_bytes / (t * 1e-3) / 1e9 / copy_gbps}
    mean, rstd = tk.forward(x, w, b, z, spec, y)
    bwd = []
    for cfg in bwd_configs(gs, n):
        t = time_ms(lambda: tk.backward(dy, x, w, b, z, mean, rstd, spec, config=cfg))  # noqa: B023
        bwd.append({"config": cfg, "us": t * 1e3, "pct_copy": 100 * bwd_bytes / (t * 1e-3) / 1e9 / copy_gbps})
    t = time_ms(lambda: tk.backward(dy, x, w, b, z, mean, rstd, spec))
    default_b = {"config": tk._bwd_config(gs, 2), "us": t * 1e3,
                 "pct_copy": 100 * bwd_bytes / (t * 1e-3) / 1e9 / copy_gbps}
    fwd.sort(key=lambda r: r["us"])
    bwd.sort(key=lambda r: r["us"])
    return {"shape": name, "fwd_default": default_f, "fwd": fwd, "bwd_default": default_b, "bwd": bwd}


def graph_us(fn, calls: int = 100) -> float:
    return cuda_graph_ms(fn, calls) * 1e3


def wall_us(fn, calls: int = 1000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def launch_modes(m: int, n: int) -> list[dict]:
    """Triton's launch vs the cached launcher vs PDL: bits, eager wall time and CUDA-graph time."""
    x, z, w, b, dy = make_inputs(m, n, True, False, seed=3)
    spec = NormSpec(EPS, 128, True, True, "swish")
    out = []
    results = {}
    modes = {"triton launch": dict(fast=False, pdl=False), "cached launch": dict(fast=True, pdl=False)}
    if tk.pdl_supported(x.device):
        modes["cached + PDL"] = dict(fast=True, pdl=True)
        modes["triton launch + PDL"] = dict(fast=False, pdl=True)
    y = torch.empty_like(x)
    for label, kw in modes.items():
        yy = torch.full_like(x, float("nan"))
        mean, rstd = tk.forward(x, w, None, z, spec, yy, **kw)
        grads = tk.backward(dy, x, w, None, z, mean, rstd, spec, **kw)
        results[label] = (yy, rstd, *[g for g in grads if g is not None])

        def f(kw=kw):
            return tk.forward(x, w, None, z, spec, y, **kw)

        def fb(kw=kw):
            mean_, rstd_ = tk.forward(x, w, None, z, spec, y, **kw)
            return tk.backward(dy, x, w, None, z, mean_, rstd_, spec, **kw)

        out.append({"shape": f"{m}x{n}", "mode": label, "fwd_wall_us": wall_us(f), "fwd_graph_us": graph_us(f),
                    "fwd_bwd_wall_us": wall_us(fb), "fwd_bwd_graph_us": graph_us(fb)})
    base = results["triton launch"]
    for r in out:
        r["bitwise_equal_to_triton_launch"] = all(torch.equal(a, c) for a, c in zip(results[r["mode"]], base,
                                                                                    strict=True))
    return out


def small_backward(m: int, n: int) -> list[dict]:
    """Launch-bound backward: CUDA-graph us per call over programs per SM (default tile)."""
    x, z, w, b, dy = make_inputs(m, n, True, False, seed=5)
    spec = NormSpec(EPS, 128, True, True, "swish")
    y = torch.empty_like(x)
    mean, rstd = tk.forward(x, w, None, z, spec, y)
    block, _, rows, warps, _, _ = tk._bwd_config(128, 2)
    out = []
    for per_sm in (1, 2, 4):
        cfg = (block, rows, warps, per_sm, False)
        us = graph_us(lambda: tk.backward(dy, x, w, None, z, mean, rstd, spec, config=cfg, pdl=True))  # noqa: B023
        out.append({"shape": f"{m}x{n}", "config": cfg, "bwd_graph_us": us})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--only", default="")
    ap.add_argument("--warm", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm is not None:
        warm(args.warm)
        return
    picked = [i for i, s in enumerate(SHAPES)
              if s[1] * s[2] >= 8 * 1024 * 1024 and (not args.only or any(o in s[0] for o in args.only.split(",")))]
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    for i in picked:
        while len([p for p in procs if p.poll() is None]) >= args.jobs:
            time.sleep(0.2)
        procs.append(subprocess.Popen([sys.executable, __file__, "--warm", str(i)]))
    codes = [p.wait() for p in procs]
    print(f"compiled variants in {time.time() - t0:.0f}s (exit codes {codes})", flush=True)
    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, copy {copy_gbps:.0f} GB/s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "copy_gbps": copy_gbps,
              "shapes": [], "launch_modes": []}
    for i in picked:
        r = sweep(SHAPES[i], copy_gbps)
        report["shapes"].append(r)
        d, fb = r["fwd_default"], r["fwd"][0]
        print(f"FWD {r['shape']}: default {d['config']} {d['us']:.1f}us {d['pct_copy']:.0f}% | best "
              + "; ".join(f"{c['config']} {c['us']:.1f}us {c['pct_copy']:.0f}%" for c in r["fwd"][:4]), flush=True)
        d = r["bwd_default"]
        print(f"BWD {r['shape']}: default {d['config']} {d['us']:.1f}us {d['pct_copy']:.0f}% | best "
              + "; ".join(f"{c['config']} {c['us']:.1f}us {c['pct_copy']:.0f}%" for c in r["bwd"][:4]), flush=True)
        del fb
        torch.cuda.empty_cache()
    for m in (2048, 8192, 65536):
        for r in small_backward(m, 128):
            report.setdefault("small_backward", []).append(r)
            print(f"SMALLBWD {r['shape']} {r['config']} graph {r['bwd_graph_us']:.2f}us", flush=True)
    for m in (2048, 8192, 65536):
        for r in launch_modes(m, 128):
            report["launch_modes"].append(r)
            print("MODE " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
