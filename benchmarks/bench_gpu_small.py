"""Launch-bound gated RMSNorm on the GPU: the forward's launch shape per row count (issue 16, item 4).

At a few thousand rows of 128 features a call is latency, not bandwidth: inside a CUDA graph the forward of
8192x128 bf16 takes about 1.4x one torch.mul. This times, per row count and inside a CUDA graph of 100 calls
(programmatic dependent launch as the backend ships it), the forward in the launch shape the launcher picks
(``FWD_TUNED`` of ``backends/triton/launch.py``) and in candidate shapes (ROWS rows per program, num_warps),
beside torch.mul; then forward + backward (graph of 20), where a forward shape can change how the backward,
released early by PDL, overlaps it. A candidate whose output differs from the picked shape's on these
(ordinary) rows is flagged; equal bits here do not prove equal bits for every row (rows redone by the range
rescue differed for 4 rows / 2 warps: benchmarks/results/gpu_small_batch_h200.md).

    PYTHONPATH=src python benchmarks/bench_gpu_small.py [--out benchmarks/results]

Only torch, Triton and gatednorm are imported: it runs offline on a GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import cuda_graph_ms  # noqa: E402

import gatednorm.backends.triton.launch as tk  # noqa: E402
from gatednorm.spec import NormSpec  # noqa: E402

ROW_COUNTS = (256, 1024, 2048, 3072, 4096, 8192, 16384, 65536)
#: (ROWS, num_warps) candidates for groups of 128; None = what the launcher picks
CANDIDATES = (None, (4, 2), (16, 4), (32, 8))


def _label(shape) -> str:
    return "picked" if shape is None else f"{shape[0]} rows / {shape[1]} warps"


def measure(m: int, gen: torch.Generator) -> dict:
    spec = NormSpec(1e-6, 128, True, True, "swish")
    x, z, dy = (torch.randn(m, 128, device="cuda", generator=gen).bfloat16() for _ in range(3))
    w = torch.randn(128, device="cuda", generator=gen).bfloat16()
    y = torch.empty_like(x)
    pdl = m * 128 < tk.PDL_MAX_ELEMENTS and tk.pdl_supported(x.device)
    rec = {"rows": m, "pdl": pdl, "mul_us": cuda_graph_ms(lambda: torch.mul(x, z, out=y)) * 1e3, "shapes": []}
    picked = None
    for shape in CANDIDATES:
        config = None if shape is None else (128, shape[0], shape[1], tk.ORDER_ROWS_FASTEST)

        def forward(config=config):
            return tk.forward(x, w, None, z, spec, y, config=config, pdl=pdl)

        def forward_backward(config=config):
            _, rstd = forward(config)
            tk.backward(dy, x, w, None, z, None, rstd, spec, True, True, True, False, pdl=pdl)

        forward()
        torch.cuda.synchronize()
        if picked is None:
            picked = y.clone()
        fwd = min(cuda_graph_ms(forward) for _ in range(3)) * 1e3
        fb = min(cuda_graph_ms(forward_backward, 20) for _ in range(3)) * 1e3
        rec["shapes"].append({"shape": _label(shape), "fwd_us": fwd, "fwd_bwd_us": fb,
                              "same_bits_as_picked": bool(torch.equal(y, picked))})
    return rec


def table(records: list[dict]) -> str:
    head = ["rows", "torch.mul us"] + [f"{_label(s)} fwd / fwd+bwd us (x mul)" for s in CANDIDATES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [str(r["rows"]), f"{r['mul_us']:.2f}"]
        for s in r["shapes"]:
            flag = "" if s["same_bits_as_picked"] else " BITS DIFFER"
            cells.append(f"{s['fwd_us']:.2f} ({s['fwd_us'] / r['mul_us']:.2f}x) / {s['fwd_bwd_us']:.2f} "
                         f"({s['fwd_bwd_us'] / r['mul_us']:.2f}x){flag}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for m in ROW_COUNTS:
        records.append(measure(m, gen))
        print(f"  {m} rows done", flush=True)
    name = torch.cuda.get_device_name()
    text = (f"# Launch-bound forward shapes, groups of 128 ({name})\n\n"
            f"Command: `PYTHONPATH=src python benchmarks/bench_gpu_small.py` (torch {torch.__version__}, "
            f"triton {tk.triton_version()}). bf16 gated RMSNorm (gate after), N = 128. Cells: us per call in a CUDA "
            "graph (forward: 100 calls, forward+backward: 20; best of 3), and x torch.mul's graph figure; PDL as "
            f"shipped (calls under {tk.PDL_MAX_ELEMENTS} elements). picked = what the launcher picks (FWD_TUNED).\n\n"
            + table(records) + "\n")
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_small_batch_h200.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "gpu_small_batch_h200.json"), "w") as f:
        json.dump({"device": name, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
