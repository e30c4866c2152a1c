"""A/B timing of the Triton forward kernel against another version of ``triton_kernels.py``.

For kernel changes that must not cost bandwidth (e.g. the range rescue's per-tile check): the two
versions run interleaved on the same inputs in one process, and each is reported in GB/s and as a
percentage of the copy bandwidth measured in the same run.

    git show REV:src/gatednorm/triton_kernels.py > /tmp/baseline_triton_kernels.py
    python benchmarks/bench_triton_ab.py --baseline /tmp/baseline_triton_kernels.py [--only 4096,5120]

The baseline file is loaded as a module of the installed ``gatednorm`` package (its relative imports
resolve there), so it must be interface-compatible: ``forward(x, weight, bias, z, spec, out)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

import torch
from triton.testing import do_bench

import gatednorm.triton_kernels as current
from gatednorm.spec import NormSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import EPS, SHAPES, copy_bandwidth, make_inputs  # noqa: E402


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("gatednorm._ab_baseline_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "gatednorm"
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="path of the other triton_kernels.py")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names (bench_gpu.SHAPES)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved do_bench rounds per version")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline)
    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth()
    print(f"{device}, torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'shape':40s} {'baseline ms':>11s} {'current ms':>10s} {'cur/base':>8s} "
          f"{'base GB/s':>9s} {'cur GB/s':>8s} {'base %copy':>10s} {'cur %copy':>9s}")
    for name, m, n, gs, rms, nbg, has_z, has_bias in SHAPES:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        tb, tc, moved = time_shape(baseline, m, n, gs, rms, nbg, has_z, has_bias, args.rounds)
        gb, gc = (moved / (t * 1e-3) / 1e9 for t in (tb, tc))
        print(f"{name:40s} {tb:11.4f} {tc:10.4f} {tc / tb:8.3f} {gb:9.0f} {gc:8.0f} "
              f"{100 * gb / copy_gbps:9.1f}% {100 * gc / copy_gbps:8.1f}%", flush=True)
        torch.cuda.empty_cache()


def time_shape(baseline, m, n, gs, rms, nbg, has_z, has_bias, rounds) -> tuple[float, float, int]:
    """(baseline ms, current ms, bytes moved) of one forward, medians over interleaved rounds."""
    x, z, w, b, _ = make_inputs(m, n, has_z, has_bias)
    out = torch.empty_like(x)
    spec = NormSpec(EPS, gs, nbg, rms, "swish")
    # bytes moved: x, z, out (bf16) and the fp32 statistics
    moved = x.numel() * 2 * (3 if has_z else 2) + (m * (n // gs)) * 4 * (1 if rms else 2)
    times: dict[str, list[float]] = {"baseline": [], "current": []}
    for _ in range(rounds):
        for label, mod in (("baseline", baseline), ("current", current)):
            times[label].append(do_bench(lambda mod=mod: mod.forward(x, w, b, z, spec, out),
                                         warmup=25, rep=100, return_mode="median"))
    return statistics.median(times["baseline"]), statistics.median(times["current"]), moved

if __name__ == "__main__":
    main()
