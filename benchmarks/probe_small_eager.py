"""Small gated RMSNorm forwards timed eagerly with L2 flushed (issue 16's parity goal at 8192x128 and 2048x128):
which launch shape and whether programmatic dependent launch (PDL) make the cold-cache call slower than sglang's.

Session 24 (H100): our forward 8.19 us against sglang's 7.14 us at 8192x128 eagerly (do_bench, L2 flushed, 7
rounds side by side), while inside a CUDA graph (L2 warm, back to back) ours is 2.44 against 3.14 us. sglang runs
4 rows a program with one warp (2048 programs); ours 32 rows with 8 warps and PDL. This probe times, side by side
in interleaved rounds, at each row count: torch.mul into a preallocated output, our API call
(``layer_norm_fwd(backend="triton")``), the launcher alone (``launch.forward``) at several (ROWS, num_warps) with
PDL on and off, and sglang's ``_layer_norm_fwd`` where ``--sglang`` names its file; eagerly (do_bench median, L2
flushed) and inside CUDA graphs of 100 calls (L2 warm). Each figure is the median of its rounds; "x sglang" /
"x mul" the median of the rounds' ratios. Each launch shape also runs with the range rescue after the kernel
("scan after": a second, small kernel; the forward's own code 44% shorter). ``--quant``: the fused fp8 forward
(blocks of 128) instead, the API call and the launcher at each shape (PDL on, as shipped), beside torch.mul (issue
14's CUDA-graph goal at 8192x128).

Result (H100, session 24; benchmarks/results/probe_small_eager_h100_session24.json and ..._quant_...json): eagerly
every launch shape, PDL on or off, within 7.6-8.6 us at 8192x128 and sglang 8.3 us in that process (our API call
0.94x sglang's, against 1.15x in bench_gpu's process); in graphs the shipped shape is the fastest. The fused fp8
forward in graphs: 2.87-2.99 us at every shape but 8 rows / 2 warps (3.65), against torch.mul's 2.15.
Session 30 (H100, probe_small_eager_h100_session30.json, ``--shapes 32x8,16x8,32x16,8x4``): with PDL, 8 values a
thread ran the 8192x128 graph in 2.45 us (16 rows / 8 warps) and 2.47 us (8 / 4), 1.14-1.15x torch.mul, against
2.83-2.90 us for the shipped 32 / 8; without PDL every shape 2.85-2.91 (benchmarks/results/gpu_notes_h200.md).

    PYTHONPATH=src python benchmarks/probe_small_eager.py [--sglang sgl/layernorm_gated.py --sglang-loader tools]
        [--rows 2048,8192] [--rounds 7] [--quant] [--shapes 32x8,16x8,32x16] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quant  # noqa: E402  (its Timer and sglang loader)
from cuda_timing import median_ratio  # noqa: E402

import gatednorm  # noqa: E402
import gatednorm.backends.triton.launch as tk  # noqa: E402
from gatednorm.spec import NormSpec, QuantSpec  # noqa: E402

EPS = 1e-6
N = 128
SPEC = NormSpec(EPS, N, True, True, "swish")
#: (ROWS, num_warps) of the launcher; None: what it picks for groups of 128 (launch.FWD_TUNED).
SHAPES = (None, (4, 1), (8, 1), (8, 2), (16, 4), (32, 8))


def _quant_timers(x, z, w, fns: dict) -> dict:
    """fns plus the fused fp8 forward (blocks of 128, float32 scales): the API call and the launcher at each shape,
    PDL on (as the API launches calls under launch.PDL_MAX_ELEMENTS)."""
    m = x.shape[0]
    q = torch.empty(m, N, device="cuda", dtype=torch.float8_e4m3fn)
    scale = torch.empty(m, 1, device="cuda")
    qspec = QuantSpec("fp8_e4m3", N, "float32", "none", False)
    fns["api gated_norm_quant"] = lambda: gatednorm.gated_norm_quant(x, w, None, EPS, z, N, True, True,
                                                                     quant_group_size=N, backend="triton")
    for shape in SHAPES:
        label = "picked" if shape is None else f"{shape[0]}x{shape[1]}w"
        config = None if shape is None else (*shape, tk.ORDER_ROWS_FASTEST)
        fns[f"quant {label}"] = lambda config=config: tk.forward_quant(x, w, None, z, SPEC, qspec, q, scale,
                                                                      config=config, pdl=True)
    return fns


def _timers(m: int, sglang, quant: bool, shapes=SHAPES) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m)
    x, z = (torch.randn(m, N, device="cuda", generator=gen).bfloat16() for _ in range(2))
    w = (torch.randn(N, device="cuda", generator=gen) * 0.1 + 1).bfloat16()
    y, y_mul = torch.empty_like(x), torch.empty_like(x)
    fns = {"torch.mul out=": lambda: torch.mul(x, z, out=y_mul)}
    if quant:
        return _quant_timers(x, z, w, fns)
    fns["api layer_norm_fwd"] = lambda: gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, group_size=N,
                                                                 is_rms_norm=True, backend="triton")
    for shape in shapes:
        config = None if shape is None else (N, shape[0], shape[1], tk.ORDER_ROWS_FASTEST)
        for pdl in (True, False):
            label = "picked" if shape is None else f"{shape[0]}x{shape[1]}w"
            fns[f"launch {label} pdl={int(pdl)}"] = (
                lambda config=config, pdl=pdl: tk.forward(x, w, None, z, SPEC, y, config=config, pdl=pdl))
        # the range rescue after the forward (rescue_kernel's scan, a second launch) instead of in the kernel: the
        # forward's code without the rescue path (sm_90, Triton 3.6, 32 rows / 8 warps: 322 SASS instructions
        # against 576), which the first call after an L2 flush fetches from memory
        fns[f"launch {label} scan after"] = (
            lambda config=config: tk.forward(x, w, None, z, SPEC, y, 0, config=config, pdl=True))
    if sglang is not None:
        fns["sglang"] = lambda: sglang._layer_norm_fwd(x, w, None, EPS, z=z, group_size=N, norm_before_gate=True,
                                                       is_rms_norm=True)
    ref = gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, group_size=N, is_rms_norm=True, backend="triton")[0]
    for name, fn in fns.items():  # every launch shape writes the same bits
        if name.startswith("launch"):
            y.zero_()
            fn()
            if not torch.equal(y, ref):
                raise AssertionError(f"{m}x{N} {name}: output differs from the API call's")
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang", default="")
    ap.add_argument("--sglang-loader", default="")
    ap.add_argument("--rows", default="2048,8192")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quant", action="store_true",
                    help="the fused fp8 forward (blocks of 128) at each launch shape instead of the norm")
    ap.add_argument("--shapes", default="",
                    help="launch shapes ROWSxWARPS,... instead of SHAPES' (the picked one always runs), e.g. "
                         "16x8,32x16: 8 values a thread where SHAPES' all hold 16")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = (None, *(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")))
    sglang = bench_quant.load_sglang(args, torch.device("cuda"))
    timer = bench_quant.Timer(torch.device("cuda"), False)  # do_bench, L2 flushed; graphs of many calls
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    with torch.no_grad():
        for m in (int(v) for v in args.rows.split(",")):
            fns = _timers(m, sglang, args.quant, shapes)
            eager = timer.rounds(fns, args.rounds)
            graph = timer.graph_rounds(fns, 100, args.rounds)
            ref = "sglang" if "sglang" in eager else "torch.mul out="
            rows = {}
            print(f"\n{m}x{N} (eager: do_bench median, L2 flushed; graph: 100 calls; x {ref} / x mul: median of "
                  f"{args.rounds} rounds' ratios)")
            print(f"{'':28s} {'eager us':>9s} {'x ' + ref[:6]:>9s} {'graph us':>9s} {'x mul':>7s}")
            for k in fns:
                row = {"eager_us": statistics.median(eager[k]) * 1e3, "eager_rounds_ms": eager[k],
                       "eager_x_ref": median_ratio(eager[k], eager[ref])}
                if k in graph:
                    row.update(graph_us=statistics.median(graph[k]) * 1e3, graph_rounds_ms=graph[k],
                               graph_x_mul=median_ratio(graph[k], graph["torch.mul out="]))
                rows[k] = row
                g = f"{row['graph_us']:9.2f} {row['graph_x_mul']:7.2f}" if "graph_us" in row else f"{'-':>9s}"
                print(f"{k:28s} {row['eager_us']:9.2f} {row['eager_x_ref']:9.2f} {g}", flush=True)
            out["rows"][f"{m}x{N}"] = {"reference": ref, "figures": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
