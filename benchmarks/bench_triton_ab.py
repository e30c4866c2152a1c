"""A/B timing of the Triton forward kernel against other versions of ``triton_kernels.py``.

For kernel changes that must not cost bandwidth (e.g. the range rescue's per-tile check): every
version runs interleaved on the same inputs in one process; each is reported in GB/s, as a
percentage of the copy bandwidth measured in the same run, and as a time ratio to the first one.

    git show REV:src/gatednorm/triton_kernels.py > /tmp/baseline.py
    python benchmarks/bench_triton_ab.py --baseline /tmp/baseline.py [--baseline other.py ...] [--only 4096,5120]

Each file is loaded as a module of the installed ``gatednorm`` package (its relative imports
resolve there), so it must be interface-compatible: ``forward(x, weight, bias, z, spec, out)``.
The installed ``gatednorm.triton_kernels`` runs last, as "current".
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


def load_version(path: str, index: int):
    spec = importlib.util.spec_from_file_location(f"gatednorm._ab_version_{index}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "gatednorm"
    spec.loader.exec_module(module)
    return module


def time_shape(versions: dict, m, n, gs, rms, nbg, has_z, has_bias, rounds) -> tuple[dict[str, float], int]:
    """({version: median ms of one forward over interleaved rounds}, bytes moved)."""
    x, z, w, b, _ = make_inputs(m, n, has_z, has_bias)
    out = torch.empty_like(x)
    spec = NormSpec(EPS, gs, nbg, rms, "swish")
    # bytes moved: x, z, out (bf16) and the fp32 statistics
    moved = x.numel() * 2 * (3 if has_z else 2) + (m * (n // gs)) * 4 * (1 if rms else 2)
    times: dict[str, list[float]] = {label: [] for label in versions}
    for _ in range(rounds):
        for label, mod in versions.items():
            times[label].append(do_bench(lambda mod=mod: mod.forward(x, w, b, z, spec, out),
                                         warmup=25, rep=100, return_mode="median"))
    return {label: statistics.median(t) for label, t in times.items()}, moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", action="append", required=True,
                    help="path of another triton_kernels.py (repeatable; ratios are to the first)")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names (bench_gpu.SHAPES)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved do_bench rounds per version")
    args = ap.parse_args()
    versions = {os.path.basename(p).removesuffix(".py"): load_version(p, i) for i, p in enumerate(args.baseline)}
    versions["current"] = current
    first = next(iter(versions))
    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s; "
          f"per version: ms, % of copy, time / {first}")
    print(f"{'shape':38s} " + " ".join(f"{label[:24]:>26s}" for label in versions))
    for name, m, n, gs, rms, nbg, has_z, has_bias in SHAPES:
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        ms, moved = time_shape(versions, m, n, gs, rms, nbg, has_z, has_bias, args.rounds)
        cells = [f"{t:8.4f} {100 * moved / (t * 1e-3) / 1e9 / copy_gbps:5.1f}% {t / ms[first]:6.3f}x"
                 for t in ms.values()]
        print(f"{name:38s} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
