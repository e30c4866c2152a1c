"""GPU benchmark of issue 15's goals: residual / prenorm forward, strided gates, norm + gate + linear memory.

For each shape (bf16, at least 32M elements), forward only, no gradients, do_bench medians (L2 flushed), in
GB/s and % of the copy bandwidth measured in the same run:

* ``plain``: the gated norm of x (bytes: x, z read; y written);
* ``residual``: of x + residual (x, residual, z read; y written), through the fused kernel;
* ``prenorm``: the same plus the updated residual written in bf16; ``prenorm fp32``: written in float32
  (``residual_in_fp32=True``);
* ``residual, generic``: the unfused path (the float32 sum by a torch op, then the norm), for scale;
* fla's ``fused_norm_gate`` with the same residual where its variant exists (RMSNorm, gate after, one group
  per row), when fla-core is importable;
* ``strided gate``: z a column slice of a (M, 2N) projection (rows 2N apart), beside ``plain``.

The goal: residual variants within 5% of ``plain``'s % of copy, the strided gate within 5% of ``plain``.

Then peak memory (torch.cuda.max_memory_allocated above the inputs) of 4 stacked norm + gate + linear
layers, forward + backward: gatednorm's ``rmsnorm_linear_fn`` (recomputes the normalised, gated activation
in the backward) against the non-fused paths (gatednorm's or fla's norm, then F.linear: autograd keeps each
layer's activation) and fla's ``rms_norm_swish_gate_linear``.

    PYTHONPATH=src python benchmarks/bench_residual.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import gatednorm
from gatednorm import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import copy_bandwidth  # noqa: E402

EPS = 1e-6
BF16 = torch.bfloat16

# name, M, N, group size, rms, norm_before_gate
SHAPES = [
    ("524288x128 rms gate-after", 524288, 128, 128, True, True),
    ("32768x4096 g128 rms gate-after", 32768, 4096, 128, True, True),
    ("16384x8192 rms gate-after", 16384, 8192, 8192, True, True),
    ("32768x5120 g640 rms gate-before", 32768, 5120, 640, True, False),
    ("65536x2048 LN gate-after", 65536, 2048, 2048, False, True),
]


class _GenericOnly:
    """A backend without ``forward_residual``: ops takes the generic residual path (for comparison)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.supports_float64 = inner, inner.name, inner.supports_float64

    def forward(self, *args):
        return self.inner.forward(*args)

    def backward(self, *args):
        return self.inner.backward(*args)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_shape(shape, copy_gbps: float, fla) -> dict:
    name, m, n, gs, rms, nbg = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x, residual, z = (torch.randn(m, n, device="cuda", generator=g).to(BF16) for _ in range(3))
    w = (torch.randn(n, device="cuda", generator=g) * 0.1 + 1).to(BF16)
    projection = torch.randn(m, 2 * n, device="cuda", generator=g).to(BF16)
    z_strided = projection[:, n:]
    fn = gatednorm.rmsnorm_fn if rms else gatednorm.layernorm_fn
    e = m * n * 2  # bytes of one bf16 (M, N) tensor

    def call(zz=z, **kw):
        return lambda: fn(x, w, None, zz, eps=EPS, group_size=gs, norm_before_gate=nbg, backend="triton", **kw)

    cases = {
        "plain": (call(), 3 * e),
        "residual": (call(residual=residual), 4 * e),
        "prenorm": (call(residual=residual, prenorm=True), 5 * e),
        "prenorm fp32": (call(residual=residual, prenorm=True, residual_in_fp32=True), 4 * e + 2 * e),
        "strided gate": (call(z_strided), 3 * e),
    }
    rec = {"shape": name, "M": m, "N": n, "group_size": gs, "rms": rms, "norm_before_gate": nbg, "cases": {}}
    with torch.no_grad():
        for key, (f, nbytes) in cases.items():
            t = ms(f)
            rec["cases"][key] = {"ms": t, "bytes": nbytes, "gbps": nbytes / (t * 1e-3) / 1e9}
        # the unfused path on the same backend, and its bytes counted as the fused kernel's (for scale)
        with ops.override_impl("triton", "cuda", _GenericOnly(ops.select_impl("triton", torch.device("cuda")))):
            t = ms(call(residual=residual, prenorm=True))
        rec["cases"]["prenorm, generic"] = {"ms": t, "bytes": 5 * e, "gbps": 5 * e / (t * 1e-3) / 1e9}
        if fla is not None and rms and nbg and gs == n:
            t = ms(lambda: fla.rms_norm_gated(x, z, w, None, activation="swish", residual=residual, prenorm=True,
                                              eps=EPS))
            rec["cases"]["fla fused_norm_gate prenorm"] = {"ms": t, "bytes": 5 * e, "gbps": 5 * e / (t * 1e-3) / 1e9}
        # the fused path gives the generic path's bits (tests/test_residual_fused.py proves it on every path)
        y1, r1 = call(residual=residual, prenorm=True)()
        with ops.override_impl("triton", "cuda", _GenericOnly(ops.select_impl("triton", torch.device("cuda")))):
            y2, r2 = call(residual=residual, prenorm=True)()
        rec["fused_equals_generic"] = bool(torch.equal(y1, y2) and torch.equal(r1, r2))
        rec["strided_equals_contiguous"] = bool(torch.equal(call(z_strided)(), call(z_strided.contiguous())()))
    for c in rec["cases"].values():
        c["pct_copy"] = 100 * c["gbps"] / copy_gbps
    plain = rec["cases"]["plain"]["pct_copy"]
    for c in rec["cases"].values():
        c["vs_plain"] = c["pct_copy"] / plain
    return rec


def peak_memory_one(m: int, d: int, layers: int, fla) -> dict:
    """Peak bytes above the inputs of ``layers`` stacked norm + gate + linear layers ((M, D) -> (M, D) each, one
    gate z per layer), forward + backward, bf16: what each path keeps for the backward adds up per layer."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, d, device="cuda", generator=g).to(BF16).requires_grad_()
    zs = [torch.randn(m, d, device="cuda", generator=g).to(BF16).requires_grad_() for _ in range(layers)]
    w = torch.ones(d, device="cuda", dtype=BF16, requires_grad=True)
    lw = (torch.randn(d, d, device="cuda", generator=g) * d**-0.5).to(BF16).requires_grad_()
    dy = torch.randn(m, d, device="cuda", generator=g).to(BF16)
    one_layer = {
        "gatednorm rmsnorm_linear_fn": lambda h, z: gatednorm.rmsnorm_linear_fn(h, w, None, z, lw, None, EPS,
                                                                                backend="triton"),
        "gatednorm norm, then F.linear": lambda h, z: F.linear(gatednorm.rmsnorm_fn(h, w, None, z, eps=EPS,
                                                                                    backend="triton"), lw),
    }
    if fla is not None:
        one_layer["fla rms_norm_swish_gate_linear"] = lambda h, z: fla.rms_norm_swish_gate_linear(
            h, z, w, None, lw, None, eps=EPS)
        one_layer["fla norm, then F.linear"] = lambda h, z: F.linear(
            fla.rms_norm_gated(h, z, w, None, activation="swish", eps=EPS), lw)
    rec = {"M": m, "D": d, "layers": layers, "activation_bytes": m * d * 2, "peak_above_inputs": {}}
    for key, layer in one_layer.items():
        for _ in range(2):  # the second run is measured (no first-call allocations)
            for t in (x, w, lw, *zs):
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            h = x
            for z in zs:
                h = layer(h, z)
            h.backward(dy)
            del h
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        rec["peak_above_inputs"][key] = peak
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    try:
        import fla.modules.fused_norm_gate as fla
    except Exception as exc:  # fla-core is optional
        print(f"fla not available: {exc}", file=sys.stderr)
        fla = None
    copy_gbps = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, copy {copy_gbps:.0f} GB/s, torch {torch.__version__}")
    records = [run_shape(s, copy_gbps, fla) for s in SHAPES if not args.only or args.only in s[0]]
    lines = [f"# Residual, prenorm and strided gates: forward on {dev}", "",
             "`PYTHONPATH=src python benchmarks/bench_residual.py`; bf16, no gradients, do_bench medians; "
             f"copy bandwidth {copy_gbps:.0f} GB/s measured in the same run.", "",
             "| shape | case | ms | GB/s | % of copy | vs plain |", "|---|---|---|---|---|---|"]
    for r in records:
        for key, c in r["cases"].items():
            lines.append(f"| {r['shape']} | {key} | {c['ms']:.4f} | {c['gbps']:.0f} | {c['pct_copy']:.1f} | "
                         f"{c['vs_plain']:.3f} |")
        lines.append(f"| {r['shape']} | fused == generic bits: {r['fused_equals_generic']}; strided == contiguous "
                     f"bits: {r['strided_equals_contiguous']} | | | | |")
    mem = [peak_memory_one(m, d, 4, fla) for m, d in ((16384, 4096), (65536, 2048))]
    lines += ["", "Peak memory of 4 stacked norm + gate + linear layers, forward + backward, above the inputs "
              "(bf16; gradients of the inputs and weights included), in units of one (M, D) activation:", "",
              "| M x D, layers | path | MiB | activations |", "|---|---|---|---|"]
    for r in mem:
        for key, peak in r["peak_above_inputs"].items():
            lines.append(f"| {r['M']}x{r['D']}, {r['layers']} | {key} | {peak / 2**20:.0f} | "
                         f"{peak / r['activation_bytes']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    tag = dev.split()[-1].lower()
    with open(os.path.join(args.out, f"residual_bench_{tag}.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(args.out, f"residual_bench_{tag}.json"), "w") as fh:
        json.dump({"device": dev, "copy_gbps": copy_gbps, "torch": torch.__version__, "shapes": records,
                   "peak_memory": mem}, fh, indent=1)


if __name__ == "__main__":
    main()
