"""CPU benchmark of the quantized output (issue 14): ``gated_norm_quant`` on the native backend.

Per shape (bf16 in, gated RMSNorm or LayerNorm, fp8 e4m3 and int8), times interleaved within one run
(each repeat calls every row once; medians reported), quiet and then while a busy process spins pinned to
one core (``bench_cpu.Spinner``: shared machines are the ones users have):

* ``quant``          ``gatednorm.gated_norm_quant(..., backend="native")``: the norm into a float32 buffer,
                     then ``numerics.quantize_blocks`` (the generic path; native has no fused kernel);
* ``norm + torch quant``  the native norm writing bf16, then the quantization in plain torch ops (what a
                     port without gatednorm's quantized output writes: ``bench_quant.torch_quant``);
* ``norm alone``     the native norm writing bf16 (for scale: the quantized call's floor is about this).

    PYTHONPATH=src python benchmarks/bench_cpu_quant.py [--out benchmarks/results/cpu_quant_bench] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import Spinner, load_line, machine_name, spinner_cpu  # noqa: E402
from bench_quant import torch_quant  # noqa: E402

import gatednorm  # noqa: E402

EPS = 1e-6
# name, M, N, group size, rms, has_z, quant block (None: per token)
SHAPES = [
    ("16x128 rms gate k128 (decode)", 16, 128, 128, True, True, 128),
    ("16x4096 g128 rms gate k128", 16, 4096, 128, True, True, 128),
    ("256x4096 g128 rms gate k128", 256, 4096, 128, True, True, 128),
    ("4096x128 rms gate k128", 4096, 128, 128, True, True, 128),
    ("2048x2048 LN per-token", 2048, 2048, 2048, False, False, None),
]


def rows_for(shape, quant: str):
    name, m, n, gs, rms, has_z, block = shape
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, n, generator=g).bfloat16()
    z = torch.randn(m, n, generator=g).bfloat16() if has_z else None
    w = (torch.randn(n, generator=g) * 0.1 + 1).bfloat16()
    b = None if rms else (torch.randn(n, generator=g) * 0.1).bfloat16()
    k = block or n

    def norm():
        return gatednorm.layer_norm_fwd(x, w, b, EPS, z, group_size=gs, is_rms_norm=rms, backend="native")[0]

    return {
        "quant": lambda: gatednorm.gated_norm_quant(x, w, b, EPS, z, gs, True, rms, quant=quant,
                                                    quant_group_size=block, backend="native"),
        "norm + torch quant": lambda: torch_quant(norm(), quant, k, False),
        "norm alone": norm,
    }


def time_rows(rows: dict, reps: int, min_s: float) -> dict[str, float]:
    """Median us per call of each row; every repeat runs each row for at least ``min_s`` seconds."""
    samples: dict[str, list[float]] = {k: [] for k in rows}
    for fn in rows.values():
        fn()
        fn()
    for _ in range(reps):
        for key, fn in rows.items():
            n = 0
            t0 = time.perf_counter()
            while True:
                fn()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_s:
                    break
            samples[key].append(dt / n * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results file stem (.md and .json); none by default")
    ap.add_argument("--quick", action="store_true", help="3 repeats, quiet only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="a paragraph for the results file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps, min_s = (3, 0.05) if args.quick else (7, 0.15)
    busy_cpu = None if args.quick else spinner_cpu()
    print(load_line("start"))
    results = []
    with torch.no_grad():
        for shape in SHAPES:
            for quant in ("fp8_e4m3", "int8"):
                rows = rows_for(shape, quant)
                quiet = time_rows(rows, reps, min_s)
                busy = None
                if busy_cpu is not None:
                    with Spinner(busy_cpu):
                        busy = time_rows(rows, reps, min_s)
                results.append({"shape": shape[0], "quant": quant, "quiet_us": quiet, "busy_us": busy})
                cells = " | ".join(f"{k} {quiet[k]:.1f}" + (f" / {busy[k]:.1f}" if busy else "") for k in rows)
                print(f"{shape[0]} {quant}: {cells}", flush=True)
    print(load_line("end"))
    keys = list(results[0]["quiet_us"])
    lines = [f"# gated_norm_quant on CPU, native backend ({machine_name(torch.device('cpu'))}, {args.threads} threads)",
             "", args.note, "",
             "us per call, median of interleaved repeats; cells: quiet / with one core busy (a spinning process "
             "pinned to it); in brackets the time as a multiple of the norm alone's.", "",
             "| shape | quant | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in results:
        cells = []
        for k in keys:
            q = r["quiet_us"][k]
            c = f"{q:.1f}"
            if r["busy_us"]:
                c += f" / {r['busy_us'][k]:.1f}"
            c += f" ({q / r['quiet_us']['norm alone']:.2f}x)"
            cells.append(c)
        lines.append(f"| {r['shape']} | {r['quant']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(table + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
