"""What the fused quantized forward's time is made of (issue 14): the kernel with one part taken out at a time.

Each variant is a copy of the installed ``gatednorm`` package whose ``backends/triton/kernels.py`` has one
textual patch applied (``PATCHES``); the copies give wrong results on purpose and live in a temporary folder
only. Every variant is timed in a process of its own (Triton compiles each copy separately) on the same
seeded inputs and launch shapes: % of the copy bandwidth on large calls (bytes: x, z read; q, scales
written), us per call in a CUDA graph of 100 calls on 8192x128 (with and without PDL) and that as a multiple
of one ``torch.mul``. The plain forward (bf16 out) runs once at the same shapes, for reference.

This is how the 2026-12-04 session found that the in-register range rescue cost 128-wide blocks 13 points
(``benchmarks/results/gpu_notes_h200.md``, session 10). A patch that no longer applies to the installed
kernels is reported and its variant skipped: update its text with the kernel.

    PYTHONPATH=src python benchmarks/probe_quant_ablation.py [--json OUT.json] [--only quotient,all]
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/probe_quant_ablation.py --smoke   # CPU: patches run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

#: name -> [(text in kernels.py, replacement)]: every pair must match exactly once.
PATCHES: dict[str, list[tuple[str, str]]] = {
    "baseline": [],
    # y / scale by an approximate reciprocal instead of the exact quotient (kernels._scaled_quotient)
    "quotient": [("        v = _scaled_quotient(yq, tl.expand_dims(scale, LAST))",
                  "        v = yq * tl.expand_dims(1.0 / scale, LAST)")],
    # the scale as amax times 1 / qmax instead of div_rn(amax, qmax)
    "scale division": [("    scale = tl.maximum(tl.math.div_rn(amax, QMAX), _QUANT_SCALE_MIN, "
                        "propagate_nan=tl.PropagateNan.ALL)",
                        "    scale = tl.maximum(amax * (1.0 / QMAX), _QUANT_SCALE_MIN, "
                        "propagate_nan=tl.PropagateNan.ALL)")],
    # no scale store for one block per row (the codes are still computed from the scale)
    "scale store": [("            tl.store(S + rows64 * stride_sm + t * stride_sg, scale, mask=row_ok)\n",
                     "            pass\n")],
}
PATCHES["all"] = PATCHES["quotient"] + PATCHES["scale division"] + PATCHES["scale store"]

# name, M, N, group size, rms, norm_before_gate, has_z, has_bias, quant block, launch shapes, in a CUDA graph
CASES = [
    ("8192x128 k128", 8192, 128, 128, True, True, True, False, 128, [(16, 4), (4, 1)], True),
    ("524288x128 k128", 524288, 128, 128, True, True, True, False, 128, [(16, 4), (8, 2)], False),
    ("65536x2048 LN+bias per token", 65536, 2048, 2048, False, True, False, True, 2048, [(2, 2), (1, 2)], False),
    # (4, 2): the launch shape of the split tiles (GATEDNORM_TRITON_SPLIT_GROUPS=1); (1, 1): the padded default's
    ("32768x5120 g640 gate-before k128", 32768, 5120, 640, True, False, True, False, 128, [(4, 2), (1, 1)], False),
]
SMOKE_CASES = [
    ("64x128 k128", 64, 128, 128, True, True, True, False, 128, [(16, 4)], False),
    ("8x640 g640 k128", 8, 640, 640, True, False, True, False, 128, [(1, 1)], False),
]


def make_variant(src_pkg: str, root: str, name: str) -> str | None:
    """A copy of the gatednorm package at ``root/name/gatednorm`` with ``name``'s patches; its PYTHONPATH entry,
    or None where a patch no longer applies."""
    dest = os.path.join(root, name.replace(" ", "_"))
    shutil.copytree(src_pkg, os.path.join(dest, "gatednorm"), ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(dest, "gatednorm", "backends", "triton", "kernels.py")
    with open(path) as f:
        text = f.read()
    for old, new in PATCHES[name]:
        if text.count(old) != 1:
            print(f"SKIP {name}: patch text found {text.count(old)} times, not once: {old.strip()[:70]!r}")
            return None
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)
    return dest


def time_case(label: str, case: tuple, smoke: bool, copy_gbps: float, plain: bool) -> list[dict]:
    """The records of one case: the variant's fused call at each launch shape (or the plain forward)."""
    import torch
    from triton.testing import do_bench

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cuda_timing import cuda_graph_ms

    import gatednorm.backends.triton.launch as tk
    from gatednorm.spec import NormSpec, QuantSpec, quant_dtype

    name, m, n, gs, rms, nbg, has_z, has_bias, block, shapes, graph = case
    device = "cpu" if smoke else "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, n, device=device, generator=g).bfloat16()
    z = torch.randn(m, n, device=device, generator=g).bfloat16() if has_z else None
    w = (1 + 0.1 * torch.randn(n, device=device, generator=g)).bfloat16()
    b = (0.1 * torch.randn(n, device=device, generator=g)).bfloat16() if has_bias else None
    spec = NormSpec(1e-6, gs, nbg, rms, "swish")
    qspec = QuantSpec("fp8_e4m3", block, "float32", "none", False)
    q = torch.empty(m, n, dtype=quant_dtype("fp8_e4m3"), device=device)
    s = torch.empty(m, n // block, dtype=torch.float32, device=device)
    y = torch.empty_like(x)

    def fused(cfg, pdl=False):
        return lambda: tk.forward_quant(x, w, b, z, spec, qspec, q, s, config=cfg, pdl=pdl)

    if plain:
        calls = [("plain forward (bf16 out)", None, lambda: tk.forward(x, w, b, z, spec, y))]
        moved = ((2 if has_z else 1) + 1) * m * n * 2
    else:
        calls = [(label, cfg, fused(cfg)) for cfg in shapes]
        moved = (2 if has_z else 1) * m * n * 2 + m * n + (n // block) * m * 4
    out = []
    for who, cfg, fn in calls:
        fn()
        rec = {"variant": who, "case": name, "config": cfg}
        if smoke:
            rec["ran"] = True
        elif graph:
            rec["mul_graph_us"] = cuda_graph_ms(lambda: torch.mul(x, x if z is None else z, out=y)) * 1e3
            rec["graph_us"] = cuda_graph_ms(fn) * 1e3
            if cfg is not None and tk.pdl_supported(x.device):
                rec["graph_us_pdl"] = cuda_graph_ms(fused(cfg, pdl=True)) * 1e3
        else:
            t = do_bench(fn, warmup=25, rep=100, return_mode="median")
            rec.update(us=t * 1e3, pct_copy=100 * moved / (t * 1e-3) / 1e9 / copy_gbps)
        out.append(rec)
    return out


def time_variant(label: str, smoke: bool, copy_gbps: float, plain: bool) -> list[dict]:
    """Time one variant (run in its own process, the variant first on sys.path)."""
    records = []
    for case in SMOKE_CASES if smoke else CASES:
        records += time_case(label, case, smoke, copy_gbps, plain)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, no timing")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print("RECORDS " + json.dumps(time_variant(args.worker, args.smoke, args.copy_gbps, args.plain)), flush=True)
        return

    import gatednorm

    src_pkg = os.path.dirname(os.path.abspath(gatednorm.__file__))
    copy_gbps = 0.0
    if not args.smoke:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_gpu import copy_bandwidth

        copy_gbps = copy_bandwidth()
        print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    names = [v for v in PATCHES if not args.only or v in args.only.split(",")]
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as root:
        jobs = [(name, make_variant(src_pkg, root, name), False) for name in names]
        jobs.append(("plain", os.path.dirname(src_pkg), True))  # the installed package, unpatched
        for name, path, plain in jobs:
            if path is None:
                continue
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--copy-gbps", str(copy_gbps)]
            cmd += ["--smoke"] if args.smoke else []
            cmd += ["--plain"] if plain else []
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RECORDS ")]
            if run.returncode != 0 or not lines:
                print(f"FAILED {name} (exit {run.returncode}): {run.stderr.strip()[-600:]}", flush=True)
                continue
            for rec in json.loads(lines[-1][len("RECORDS "):]):
                records.append(rec)
                cells = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()]
                print(" ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_gbps": copy_gbps, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
