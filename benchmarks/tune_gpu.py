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
from gatednorm.spec import NormSpec, QuantSpec, quant_dtype
from gatednorm.verify.quantized import check_quant, reference_y

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import EPS, SHAPES, copy_bandwidth, make_inputs  # noqa: E402
from bench_quant import SHAPES as QUANT_SHAPES  # noqa: E402  (the quant benchmark's shapes)
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
                if 1 <= warps <= 32:  # 32 warps: 1024 threads, Triton's maximum
                    out.append((block, rows, warps))
    elif block <= 2 * tk.MAX_BLOCK:
        # a group wider than one shipped tile (MAX_BLOCK) in one tile anyway, at Triton's 32-warp maximum: 16
        # elements a thread, as 8192 at 16 warps (sm_90 code of Triton 3.6, the GPU image's, compiled on the CPU
        # machine, 16384 gated first: 29 registers, no spills, 16.6 instructions per element against the two
        # chunks' 20.3), one pass over the row against the chunks' two
        out.append((block, 1, 32))
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
    # Wide groups in chunks (two passes over the row, the second from L2; partial sums in memory). Two rows a
    # tile halve the read-modify-write of the program's partial row (once per tile and chunk) at the same tile size.
    chunk = gs & -gs if gs & (gs - 1) else gs // 4
    if gs >= 4096 and 1024 <= chunk < gs:
        for rows in (1, 2):
            for warps in (2, 4, 8, 16):
                for per_sm in (2, 4, 8):
                    if 8 <= rows * chunk // (32 * warps) <= 64:
                        out.append((chunk, rows, warps, per_sm, False))
    if tk.MAX_BLOCK < triton.next_power_of_2(gs) <= 2 * tk.MAX_BLOCK:
        # the whole group in one tile at Triton's 32-warp maximum (one program per SM): one pass over the row, but
        # it spills (sm_90 code of Triton 3.6 compiled on the CPU machine, 16384 RMSNorm gated first: 75 local
        # loads and 75 stores; LayerNorm with bias 123 / 130; the two-chunk default none / 3)
        out.append((triton.next_power_of_2(gs), 1, 32, 1, False))
    return out


def spec_of(shape) -> NormSpec:
    _, _, _, gs, rms, nbg, _, _ = shape
    return NormSpec(EPS, gs, nbg, rms, "swish")


def warm(shape_index: int, fwd_only: bool = False) -> None:
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
    for block, rows, warps, gf in {(c[0], c[1], c[2], c[4]) for c in bwd_configs(gs, n)} if not fwd_only else ():
        tk.backward(dy, x, w, b, z, mean, rstd, spec, config=(block, rows, warps, 2, gf))
    torch.cuda.synchronize()


def time_ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep(shape, copy_gbps: float, fwd_only: bool = False) -> dict:
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
    default_f = {"config": tk._fwd_config(gs, 2, tk.gpu_model_of(x)), "us": t * 1e3,
                 "pct_copy": 100 * fwd_bytes / (t * 1e-3) / 1e9 / copy_gbps}
    mean, rstd = tk.forward(x, w, b, z, spec, y)
    bwd = []
    for cfg in bwd_configs(gs, n) if not fwd_only else ():
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
    """Launch-bound forward + backward: CUDA-graph us per call over programs per SM of the backward and the
    shape of the dweight partial sum ((rows per step, columns per program, warps); None: today's choice)."""
    x, z, w, b, dy = make_inputs(m, n, True, False, seed=5)
    spec = NormSpec(EPS, 128, True, True, "swish")
    y = torch.empty_like(x)
    block, _, rows, warps, default_per_sm, _ = tk._bwd_config(128, 2)
    out = []
    for per_sm in sorted({1, 2, default_per_sm, 8}):
        for partials in (None, (32, 32, 4), (64, 32, 4), (128, 32, 4), (256, 32, 8), (128, 64, 8), (64, 128, 4)):
            cfg = (block, rows, warps, per_sm, False)

            def fb(cfg=cfg, partials=partials):
                mean, rstd = tk.forward(x, w, None, z, spec, y, pdl=True)
                return tk.backward(dy, x, w, None, z, mean, rstd, spec, config=cfg, pdl=True, partials_config=partials)

            out.append({"shape": f"{m}x{n}", "config": cfg, "partials": partials, "fwd_bwd_graph_us": graph_us(fb)})
    return out


# ---------------------------------------------------------------------------
# Fused quantized forward (--quant): launch.forward_quant's (ROWS, num_warps) per tile, and its launch modes
# ---------------------------------------------------------------------------
# The shapes of benchmarks/bench_quant.py of at least 8M elements plus its launch-bound 8192x128; each in the
# formats of --quant-formats (default fp8_e4m3 and int8, float32 scales) with the shape's own quant block (128,
# or per token). Bytes: x (and z) read in bf16 + q (1 byte) and scales (4 bytes a block) written, as there.

#: Shapes under this many elements are launch-bound: also timed in a CUDA graph (and against torch.mul there).
QUANT_GRAPH_ELEMENTS = 32 * 1024 * 1024
#: The shape of the CUDA-graph goal (<= 1.3x one torch.mul) and of the launch-mode comparison.
QUANT_MODES_SHAPE = "8192x128"


def small_backward_sweep(report: dict) -> None:
    """small_backward at the launch-bound shapes, best four printed per shape beside today's choice."""
    for m, n in ((2048, 128), (8192, 128), (65536, 128), (2048, 4096)):
        rows = small_backward(m, n)
        report.setdefault("small_backward", []).extend(rows)
        rows.sort(key=lambda r: r["fwd_bwd_graph_us"])
        default = [r for r in rows if r["partials"] is None and r["config"][3] == tk._bwd_config(128, 2)[4]]
        print(f"SMALLBWD {m}x{n}: default {default[0]['fwd_bwd_graph_us']:.2f}us | best "
              + "; ".join(f"{r['config'][3]}/SM {r['partials']} {r['fwd_bwd_graph_us']:.2f}us" for r in rows[:4]),
              flush=True)


def quant_shape_indices(only: str = "") -> list[int]:
    """Indices into bench_quant.SHAPES: >= 8M elements, and the 8192x128 shape; filtered by --only substrings."""
    return [i for i, s in enumerate(QUANT_SHAPES)
            if (s[1] * s[2] >= 8 * 1024 * 1024 or s[0].startswith(QUANT_MODES_SHAPE + " "))
            and (not only or any(o in s[0] for o in only.split(",")))]


def parse_quant_formats(text: str) -> list[tuple[str, str]]:
    """"fp8_e4m3,int8:ue8m0" -> [("fp8_e4m3", "float32"), ("int8", "ue8m0")] (bench_quant's --quant-formats)."""
    out = []
    for item in text.split(","):
        quant, _, fmt = item.strip().partition(":")
        out.append((quant, fmt or "float32"))
    return out


def quant_specs(shape, quant: str, fmt: str) -> tuple[NormSpec, QuantSpec]:
    _, _, n, gs, rms, nbg, _, _, block = shape
    return NormSpec(EPS, gs, nbg, rms, "swish"), QuantSpec(quant, block or n, fmt, "none", False)


def quant_rule_config(gs: int, block: int) -> tuple[int, int, int]:
    """The general rule's (ROWS, num_warps, order) for this layout (launch._tile_config of the tile width, rows
    fastest): what forward_quant used before QUANT_TUNED."""
    ng, gb = tk.quant_layout(gs, block)[:2]
    _, _, rows, warps = tk._tile_config(ng * gb, tk.FWD_TILE_ELEMENTS, tk.FWD_ELEMS_PER_THREAD, tk.MAX_BLOCK)
    return rows, warps, tk.ORDER_ROWS_FASTEST


def quant_configs(gs: int, block: int, n: int) -> list[tuple[int, int, int]]:
    """(ROWS, num_warps, order) candidates for fwd_quant_kernel on rows of n features: tiles of 512 to 16384
    elements (ROWS a power of two), 4 to 64 fp32 values of a tile per thread, 1 to 32 warps, rows fastest and,
    where a row holds several tiles, groups fastest; plus today's choice and the general rule."""
    layout = tk.quant_layout(gs, block)
    if layout is None:
        return []
    tile = layout[0] * layout[1]
    orders = (tk.ORDER_ROWS_FASTEST, tk.ORDER_GROUPS_FASTEST) if n // (layout[0] * gs) > 1 else (tk.ORDER_ROWS_FASTEST,)
    out = {tk._quant_config(gs, block), quant_rule_config(gs, block)}
    rows = 1
    while rows * tile <= 16384:
        if rows * tile >= 512:
            for ept in (4, 8, 16, 32, 64):
                warps = rows * tile // (32 * ept)
                if 1 <= warps <= 32 and warps & (warps - 1) == 0:
                    out.update((rows, warps, order) for order in orders)
        rows *= 2
    return sorted(out)


def quant_bytes(shape) -> int:
    _, m, n, _, _, _, has_z, _, block = shape
    return (2 if has_z else 1) * m * n * 2 + m * n + (n // (block or n)) * m * 4


def _quant_outputs(m: int, n: int, qspec: QuantSpec, device) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(m, n, dtype=quant_dtype(qspec.quant), device=device)
    return q, torch.empty(m, n // qspec.block, dtype=torch.float32, device=device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.uint8) if t.dtype != torch.int8 else t


def warm_quant(item: str) -> None:
    """Compile every variant of one "shape index:quant:scale format" (worker process): a launch each."""
    index, quant, fmt = item.split(":")
    shape = QUANT_SHAPES[int(index)]
    name, m, n, gs, rms, nbg, has_z, has_bias, block = shape
    m = min(m, 256)  # compiling needs a launch, not the full tensor (M stays a multiple of 16: same specialisation)
    x, z, w, b, _ = make_inputs(m, n, has_z, has_bias)
    spec, qspec = quant_specs(shape, quant, fmt)
    q, s = _quant_outputs(m, n, qspec, x.device)
    pdl_modes = (False, True) if tk.pdl_supported(x.device) and name.startswith(QUANT_MODES_SHAPE + " ") else (False,)
    for cfg in quant_configs(gs, qspec.block, n):
        for pdl in pdl_modes:
            tk.forward_quant(x, w, b, z, spec, qspec, q, s, config=cfg, pdl=pdl)
    torch.cuda.synchronize()


def warm_quant_parallel(items: list[str], jobs: int) -> None:
    """Compile in ``jobs`` worker processes (Triton's on-disk cache), as main() does for the norm sweep."""
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    for item in items:
        while len([p for p in procs if p.poll() is None]) >= jobs:
            time.sleep(0.2)
        procs.append(subprocess.Popen([sys.executable, __file__, "--warm-quant", item]))
    codes = [p.wait() for p in procs]
    print(f"compiled quant variants in {time.time() - t0:.0f}s (exit codes {codes})", flush=True)


#: Rows of each sweep call judged against the float64 rule (verify.quantized.check_quant) per candidate: a launch
#: shape that mixes rows up shows in any tile (one did: 2026-12-04, gpu_notes_h200.md), and the float64
#: reference of every row of a large call would cost more device time than the sweep.
QUANT_CHECK_ROWS = 2048


def quant_sweep(shape, quant: str, fmt: str, copy_gbps: float) -> dict:
    """Every candidate (ROWS, num_warps, order) of one shape and format: whether its first QUANT_CHECK_ROWS rows
    pass the float64 check, do_bench median us, GB/s, % of copy, and for launch-bound shapes us per call in a CUDA
    graph (x one torch.mul's); sorted fastest first."""
    name, m, n, gs, rms, nbg, has_z, has_bias, block = shape
    x, z, w, b, _ = make_inputs(m, n, has_z, has_bias)
    spec, qspec = quant_specs(shape, quant, fmt)
    q, s = _quant_outputs(m, n, qspec, x.device)
    nbytes = quant_bytes(shape)
    graph = m * n < QUANT_GRAPH_ELEMENTS
    rec = {"shape": name, "quant": quant, "scale_format": fmt, "block": qspec.block, "bytes": nbytes,
           "layout": tk.quant_layout(gs, qspec.block), "key": None, "today": tk._quant_config(gs, qspec.block),
           "rule": quant_rule_config(gs, qspec.block), "configs": []}
    rec["key"] = tk.quant_tile_key(gs, qspec.block)
    if graph:
        y_mul = torch.empty_like(x)
        other = z if z is not None else x
        rec["mul_graph_us"] = graph_us(lambda: torch.mul(x, other, out=y_mul))
    assert tk.forward_quant(x, w, b, z, spec, qspec, q, s)
    ref_q, ref_s = _bits(q).clone(), _bits(s).clone()
    rows = min(m, QUANT_CHECK_ROWS)
    y64, err = reference_y(x[:rows], w, b, None if z is None else z[:rows], EPS, gs, nbg, rms, "swish")

    def measure(cfg):
        def call():
            return tk.forward_quant(x, w, b, z, spec, qspec, q, s, config=cfg)

        q.view(torch.uint8).fill_(0xAA)  # stale outputs must not pass for fresh ones
        s.fill_(float("nan"))
        call()
        r = {"config": cfg, "q_differ": int((_bits(q) != ref_q).sum()), "scales_differ": int((_bits(s) != ref_s).sum())}
        check = check_quant(q[:rows], s[:rows], y64, err, quant, qspec.block, fmt)
        r["correct"] = check.passed
        if not check.passed:
            print(f"WRONG {name} {quant} {fmt} config {cfg}: {check}", flush=True)
        t = time_ms(call)
        r.update(us=t * 1e3, gbps=nbytes / (t * 1e-3) / 1e9)
        r["pct_copy"] = 100 * r["gbps"] / copy_gbps
        if graph:
            r["graph_us"] = graph_us(call)
            r["graph_x_mul"] = r["graph_us"] / rec["mul_graph_us"]
        return r

    for cfg in quant_configs(gs, qspec.block, n):
        rec["configs"].append(measure(cfg))
    rec["configs"].sort(key=lambda r: r["us"])
    rec["today_result"] = next(r for r in rec["configs"] if r["config"] == rec["today"])
    rec["rule_result"] = next(r for r in rec["configs"] if r["config"] == rec["rule"])
    return rec


def quant_launch_modes(shape, quant: str, fmt: str, config: tuple[int, int, int] | None = None) -> list[dict]:
    """Triton's launch vs the cached launcher, each with and without PDL: bits (against Triton's launch),
    eager wall us, us per call in a CUDA graph of 100 calls, and that as a multiple of one torch.mul's."""
    name, m, n, gs, rms, nbg, has_z, has_bias, block = shape
    x, z, w, b, _ = make_inputs(m, n, has_z, has_bias, seed=3)
    spec, qspec = quant_specs(shape, quant, fmt)
    y_mul = torch.empty_like(x)
    other = z if z is not None else x
    mul_us = graph_us(lambda: torch.mul(x, other, out=y_mul))
    modes = {"triton launch": dict(fast=False, pdl=False), "cached launch": dict(fast=True, pdl=False)}
    if tk.pdl_supported(x.device):
        modes["triton launch + PDL"] = dict(fast=False, pdl=True)
        modes["cached + PDL"] = dict(fast=True, pdl=True)
    out, results = [], {}
    for label, kw in modes.items():
        q, s = _quant_outputs(m, n, qspec, x.device)

        def call(kw=kw, q=q, s=s):
            return tk.forward_quant(x, w, b, z, spec, qspec, q, s, config=config, **kw)

        call()
        results[label] = (_bits(q).clone(), _bits(s).clone())
        us = graph_us(call)
        out.append({"shape": name, "quant": quant, "scale_format": fmt,
                    "config": config or tk._quant_config(gs, qspec.block), "mode": label,
                    "wall_us": wall_us(call), "graph_us": us, "mul_graph_us": mul_us, "graph_x_mul": us / mul_us})
    base = results["triton launch"]
    for r in out:
        r["bitwise_equal_to_triton_launch"] = all(torch.equal(a, c) for a, c in zip(results[r["mode"]], base,
                                                                                    strict=True))
    return out


def suggest_quant_tuned(records: list[dict]) -> dict:
    """Per QUANT_TUNED key: the config with the best geometric mean of (us / that record's best us) over the
    records sharing the key (every format and shape of that tile width), with its worst record's ratio. Only
    configs that passed the float64 check in every one of those records are candidates."""
    by_key: dict = {}
    for r in records:
        by_key.setdefault(tuple(r["key"]), []).append(r)
    out = {}
    for key, recs in sorted(by_key.items()):
        common = set.intersection(*({tuple(c["config"]) for c in r["configs"] if c.get("correct", True)}
                                    for r in recs))
        if not common:
            continue
        scores = {}
        for cfg in common:
            ratios = [next(c["us"] for c in r["configs"] if tuple(c["config"]) == cfg) / r["configs"][0]["us"]
                      for r in recs]
            gmean = 1.0
            for v in ratios:
                gmean *= v ** (1 / len(ratios))
            scores[cfg] = (gmean, max(ratios))
        best = min(scores, key=lambda c: scores[c])
        out[key] = {"config": best, "gmean_vs_best": scores[best][0], "worst_vs_best": scores[best][1],
                    "today": recs[0]["today"], "today_gmean_vs_best": scores[tuple(recs[0]["today"])][0],
                    "shapes": sorted({r["shape"] for r in recs})}
    return out


def quant_dry_run(indices: list[int], formats: list[tuple[str, str]]) -> None:
    """Print what --quant would run (shapes, layouts, today's choice, candidates) without CUDA."""
    items = [f"{i}:{q}:{f}" for i in indices for q, f in formats]
    print(f"warm-up items ({len(items)}): {' '.join(items)}")
    total = 0
    for i in indices:
        shape = QUANT_SHAPES[i]
        name, m, n, gs = shape[:4]
        for quant, fmt in formats:
            spec, qspec = quant_specs(shape, quant, fmt)
            cfgs = quant_configs(gs, qspec.block, n)
            total += len(cfgs)
            layout = tk.quant_layout(gs, qspec.block)
            print(f"QCFG {name} | {quant} {fmt} block {qspec.block} | layout (NG, GB, KB, NQ, NQ_REAL) {layout} | "
                  f"{quant_bytes(shape) / 1e6:.0f} MB | today {tk._quant_config(gs, qspec.block)} rule "
                  f"{quant_rule_config(gs, qspec.block)} | {len(cfgs)} candidates: {cfgs}")
    print(f"{total} timed configurations; launch modes at {QUANT_MODES_SHAPE}")


def run_quant(args) -> None:
    """--quant: compile in parallel, measure copy bandwidth, sweep, compare launch modes, write JSON."""
    indices = quant_shape_indices(args.only)
    formats = parse_quant_formats(args.quant_formats)
    if args.dry_run:
        quant_dry_run(indices, formats)
        return
    warm_quant_parallel([f"{i}:{q}:{f}" for i in indices for q, f in formats], args.jobs)
    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy {copy_gbps:.0f} GB/s", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbps": copy_gbps, "quant_tuned_today": {str(k): v for k, v in tk.QUANT_TUNED.items()},
              "records": [], "launch_modes": []}
    for i in indices:
        shape = QUANT_SHAPES[i]
        for quant, fmt in formats:
            r = quant_sweep(shape, quant, fmt, copy_gbps)
            report["records"].append(r)

            def cell(c):
                g = f", graph {c['graph_us']:.2f}us {c['graph_x_mul']:.2f}x mul" if "graph_us" in c else ""
                return f"{c['config']} {c['us']:.1f}us {c['pct_copy']:.0f}%{g}"

            print(f"QFWD {r['shape']} {quant} {fmt} key {r['key']}: today {cell(r['today_result'])} | rule "
                  f"{cell(r['rule_result'])} | best " + "; ".join(cell(c) for c in r["configs"][:4]), flush=True)
            if "graph_us" in r["configs"][0]:
                g = min(r["configs"], key=lambda c: c["graph_us"])
                print(f"QFWD-GRAPH {r['shape']} {quant} {fmt}: best in a graph {cell(g)}", flush=True)
            torch.cuda.empty_cache()
    for i in indices:
        shape = QUANT_SHAPES[i]
        if not shape[0].startswith(QUANT_MODES_SHAPE + " "):
            continue
        for quant, fmt in formats:
            rec = next(r for r in report["records"] if r["shape"] == shape[0] and r["quant"] == quant
                       and r["scale_format"] == fmt)
            best_graph = min(rec["configs"], key=lambda c: c["graph_us"])["config"]
            for cfg in dict.fromkeys([None, tuple(best_graph)]):
                for r in quant_launch_modes(shape, quant, fmt, cfg):
                    report["launch_modes"].append(r)
                    print("QMODE " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in r.items()), flush=True)
    report["suggested_quant_tuned"] = {str(k): v for k, v in suggest_quant_tuned(report["records"]).items()}
    for key, v in report["suggested_quant_tuned"].items():
        print(f"SUGGEST QUANT_TUNED[{key}] = {v['config']} (geomean {v['gmean_vs_best']:.3f}x of each shape's best, "
              f"worst {v['worst_vs_best']:.3f}x; today {v['today']} {v['today_gmean_vs_best']:.3f}x) "
              f"over {v['shapes']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_gpu_quant.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--only", default="")
    ap.add_argument("--fwd-only", action="store_true", help="the forward sweep alone (no backward, launch modes)")
    ap.add_argument("--small-backward", action="store_true",
                    help="only the launch-bound forward + backward sweep (programs per SM, dweight partial sum)")
    ap.add_argument("--warm", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quant", action="store_true", help="only the fused quantized forward's sweep (forward_quant)")
    ap.add_argument("--quant-formats", default="fp8_e4m3,int8",
                    help="with --quant: quant[:scale_format] list, as bench_quant.py's (default fp8_e4m3,int8)")
    ap.add_argument("--dry-run", action="store_true", help="with --quant: print shapes and configs, no CUDA")
    ap.add_argument("--warm-quant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm_quant is not None:
        warm_quant(args.warm_quant)
        return
    if args.quant or args.dry_run:
        run_quant(args)
        return
    if args.warm is not None:
        warm(args.warm, os.environ.get("TUNE_FWD_ONLY") == "1")
        return
    if args.fwd_only:
        os.environ["TUNE_FWD_ONLY"] = "1"  # for the warm-up workers
    if args.small_backward:
        report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "small_backward": []}
        small_backward_sweep(report)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune_gpu_small_backward.json"), "w") as f:
            json.dump(report, f, indent=1)
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
        r = sweep(SHAPES[i], copy_gbps, args.fwd_only)
        report["shapes"].append(r)
        d, fb = r["fwd_default"], r["fwd"][0]
        print(f"FWD {r['shape']}: default {d['config']} {d['us']:.1f}us {d['pct_copy']:.0f}% | best "
              + "; ".join(f"{c['config']} {c['us']:.1f}us {c['pct_copy']:.0f}%" for c in r["fwd"][:4]), flush=True)
        d = r["bwd_default"]
        if not args.fwd_only:
            print(f"BWD {r['shape']}: default {d['config']} {d['us']:.1f}us {d['pct_copy']:.0f}% | best "
                  + "; ".join(f"{c['config']} {c['us']:.1f}us {c['pct_copy']:.0f}%" for c in r["bwd"][:4]),
                  flush=True)
        del fb
        torch.cuda.empty_cache()
    if not args.fwd_only:
        small_backward_sweep(report)
    for m in (2048, 8192, 65536) if not args.fwd_only else ():
        for r in launch_modes(m, 128):
            report["launch_modes"].append(r)
            print("MODE " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
