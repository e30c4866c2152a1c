"""The kernels behind two open misses, for Nsight Compute (``ncu``) on a GPU machine: what one call's kernels do.

Issue 14: in a CUDA graph at 8192x128 the fused quantized forward takes 1.6x one ``torch.mul`` (goal 1.3x) where
the plain forward takes 1.1x, and removing its parts one at a time (``probe_quant_ablation.py``) left it above
the plain forward; the launch shapes all time alike. Issue 16: at 16384x8192 (groups of 8192) the range rescue's
scan kernel after the forward costs about 0.7% and checking in the forward kernel instead cost 3.4-3.6%, though
the check adds one register. Event timings cannot say why; the hardware counters can (duration, achieved
occupancy, warp-stall reasons, memory throughput).

Each case runs its call a few times after a warm-up, so that ``ncu --launch-skip`` can pass the compilations by::

    python benchmarks/probe_ncu.py --list                    # the cases
    ncu --clock-control none --set full -k regex:'fwd|quant|rescue' --launch-skip 6 --launch-count 2 \\
        -o OUT/quant-8192x128 python benchmarks/probe_ncu.py quant-8192x128
    bash benchmarks/gpu_suite.sh ncu                         # every case, reports as text in $OUT

(``--clock-control none``: the device notes ask to leave the clocks alone.) Without ncu the script still runs
each case and prints the time of one call in a CUDA graph, a check that the cases run at all; on a machine
without a GPU it runs them on 2 rows under ``TRITON_INTERPRET=1`` with ``--device cpu --smoke`` (tests).
"""

from __future__ import annotations

import argparse
import sys

import torch

import gatednorm
from gatednorm.backends.triton import launch
from gatednorm.spec import NormSpec

EPS = 1e-6


def _inputs(m: int, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    z = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16)
    return x, z, w


def _call(case: dict, device: torch.device, rows: int | None = None):
    """The call a case profiles, on its inputs (``rows``: fewer rows, for --smoke)."""
    m, n = rows or case["m"], case["n"]
    x, z, w = _inputs(m, n, device)
    if "quant" in case:
        return lambda: gatednorm.gated_norm_quant(x, w, None, EPS, z=z, group_size=case["gs"], is_rms_norm=True,
                                                  quant=case["quant"], quant_group_size=128,
                                                  scale_format=case["fmt"], backend="triton")
    if case.get("rescue_min") is None:  # the public call, as users make it (its plan, PDL where it applies)
        return lambda: gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, group_size=case["gs"], is_rms_norm=True,
                                                backend="triton")
    y = torch.empty_like(x)
    spec = NormSpec(EPS, case["gs"], True, True, "swish")
    return lambda: launch.forward(x, w, None, z, spec, y, case["rescue_min"])


#: name -> what it shows and its call (gated RMSNorm, bf16, gate after the norm)
CASES = {
    "fwd-8192x128": dict(what="plain forward, 8192x128 groups of 128 (the 1.1x reference)", m=8192, n=128, gs=128),
    "quant-8192x128": dict(what="fused quantized forward, fp8 float32 scales, 128-wide blocks (1.6x)", m=8192,
                           n=128, gs=128, quant="fp8_e4m3", fmt="float32"),
    "quant-8192x128-ue8m0": dict(what="the same with UE8M0 scales (one multiply per element, no division)",
                                 m=8192, n=128, gs=128, quant="fp8_e4m3", fmt="ue8m0"),
    "quant-8192x128-int8": dict(what="the same to int8 (1.3x)", m=8192, n=128, gs=128, quant="int8", fmt="float32"),
    "fwd-16384x8192-scan": dict(what="forward of groups of 8192, the rescue's scan kernel after it (as shipped)",
                                m=16384, n=8192, gs=8192, rescue_min=launch.RESCUE_KERNEL_MIN_ELEMENTS),
    "fwd-16384x8192-inkernel": dict(what="the same with the check in the forward kernel (3.4-3.6% slower)",
                                    m=16384, n=8192, gs=8192, rescue_min=1 << 62),
}
#: calls made before the profiled ones: ncu's --launch-skip passes the first compilations and the plan's start
WARMUP = 3
CALLS = 3


def run(name: str, device: torch.device, rows: int | None = None) -> float | None:
    """WARMUP + CALLS calls of the case; on CUDA, then us per call in a CUDA graph of 20 calls (None elsewhere)."""
    call = _call(CASES[name], device, rows)
    with torch.no_grad():
        for _ in range(WARMUP + CALLS):
            call()
        if device.type != "cuda":
            return None
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / 200


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cases", nargs="*", help="case names (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the cases and what each shows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="2 rows per case (the interpreter on CPU: tests)")
    args = ap.parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"{name:26s} {case['what']}")
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {list(CASES)}", file=sys.stderr)
        return 2
    for name in args.cases or list(CASES):
        us = run(name, torch.device(args.device), 2 if args.smoke else None)
        print(f"{name:26s} " + ("ran" if us is None else f"{us:.2f} us per call in a CUDA graph"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
