"""Quantized-output benchmark (issue 14): gatednorm.gated_norm_quant fused vs norm + separate quantization.

Run through ``benchmarks/bench_gpu.py --quant`` (or directly). Per shape (bf16 in), times

* ``fused``: ``gated_norm_quant(..., backend="triton")``, one kernel (x and z read, q and scales written);
* ``norm + compiled quant``: the triton norm writing bf16, then the quantization as one
  ``torch.compile``-d function (Inductor fuses it into a kernel or two: the best separate quant torch offers);
* ``norm + eager quant``: the same quantization in eager torch ops;
* ``norm + sglang quant`` / ``norm + vllm quant``: those projects' own quant kernels where importable
  (sglang's per-token-group fp8 quant, from an installed sglang or its staged ``fp8_kernel.py``:
  ``--sglang-quant``, upstream_quant.py; vLLM's per-token dynamic fp8 quant), float32 scales only;
* ``sglang fused epilogue``: sglang's own fused norm + fp8 kernel, ``_layer_norm_fwd(quant_heads=H)`` (the one
  Qwen3.5's gated delta net calls), where ``--sglang PATH`` names its ``layernorm_gated.py`` (loaded through
  ``--sglang-loader DIR``, as bench_gpu.py loads it): per-token fp8 with float32 scales over the H = N / group
  heads of a row, the same function as ours on those shapes (the row seen as H rows of one group each);

and the copy bandwidth in the same run. The eager figures are taken in interleaved rounds (every implementation
and torch.mul once a round), each a median of its rounds, and a time "x fused" the median of the rounds' ratios.
Bytes counted: x and z read (bf16) + q (1 byte) and scales (4 bytes per block) written; weight ignored. Goals: fused
>= 1.8x faster than norm + separate quant and >= 85% of copy bandwidth on shapes >= 32M elements; in a CUDA graph at
8192x128, within 1.3x of one torch.mul per call.

Each shape is first checked: the fused (q, scales) against the triton norm (float32 out) followed by
gatednorm.numerics.quantize_blocks, bit for bit (same arithmetic, so they should agree exactly).

GPU:      PYTHONPATH=src python benchmarks/bench_gpu.py --quant --out benchmarks/results
CPU smoke (Triton interpreter, tiny shapes, no goals):
          TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_gpu.py --quant --device cpu --smoke
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

import torch

import gatednorm
from gatednorm import numerics
from gatednorm.spec import QUANT_FORMATS, QuantSpec, quant_max

EPS = 1e-6
BIG = 32 * 1024 * 1024  # elements: at and above this, the bandwidth goals apply
#: The column of the norm without quantization (bf16 output), timed beside the quantizing calls.
NORM_ALONE = "norm alone (bf16 out)"
#: Interleaved rounds of the small shapes' CUDA-graph figures (fused forwards and torch.mul side by side).
GRAPH_ROUNDS = 7
#: Interleaved rounds of the eager figures (every implementation and torch.mul side by side): "x fused" is the
#: median of the rounds' ratios, as acceptance.py reads issue 14's 1.8x goal.
EAGER_ROUNDS = 5

# name, M, N, group size, rms, norm_before_gate, has_z, has_bias, quant block (None: per token)
SHAPES = [
    ("8192x128 rms gate-after k128", 8192, 128, 128, True, True, True, False, 128),
    ("65536x128 rms gate-after k128", 65536, 128, 128, True, True, True, False, 128),
    ("524288x128 rms gate-after k128", 524288, 128, 128, True, True, True, False, 128),
    ("32768x4096 g128 rms gate-after k128", 32768, 4096, 128, True, True, True, False, 128),
    ("32768x4096 one group rms gate-after k128", 32768, 4096, 4096, True, True, True, False, 128),
    ("32768x5120 g640 rms gate-before k128", 32768, 5120, 640, True, False, True, False, 128),
    ("16384x4096 g64 rms gate-after per-token", 16384, 4096, 64, True, True, True, False, None),
    # Qwen3.5's gated delta net before an FP8 out_proj: 32 heads of 128 per token (sglang's quant_heads=32)
    ("16384x4096 g128 rms gate-after per-token", 16384, 4096, 128, True, True, True, False, None),
    ("65536x2048 LN+bias no gate per-token", 65536, 2048, 2048, False, True, False, True, None),
]
SMOKE_SHAPES = [
    ("64x128 rms gate-after k128", 64, 128, 128, True, True, True, False, 128),
    ("16x512 g128 rms gate-before k64", 16, 512, 128, True, False, True, False, 64),
    ("16x256 g64 LN+bias per-token", 16, 256, 64, False, True, True, True, None),
    ("16x512 g128 rms gate-after per-token", 16, 512, 128, True, True, True, False, None),
]


def torch_quant(y: torch.Tensor, quant: str, block: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A separate quantization in plain torch ops (what one writes without a fused kernel)."""
    m, n = y.shape
    y3 = y.float().view(m, n // block, block)
    scale = (y3.abs().amax(-1) / quant_max(quant)).clamp(min=2.0**-126)
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    v = (y3 / scale.unsqueeze(-1)).clamp(-quant_max(quant), quant_max(quant))
    if quant == "int8":
        v = v.round()
    return v.view(m, n).to(getattr(torch, QUANT_FORMATS[quant][0])), scale


def upstream_quants(quant: str, sglang_quant_file: str = ""):
    """{name: fn(y, block) -> (q, scale)} for the upstream quant kernels found here (fp8 e4m3 only): sglang's
    per-token-group kernel from an installed sglang, else from its staged ``fp8_kernel.py`` (upstream_quant.py);
    vLLM's per-token one where vLLM imports."""
    found = {}
    if quant != "fp8_e4m3":
        return found
    try:
        try:
            from sglang.srt.layers.quantization.fp8_kernel import per_token_group_quant_fp8
        except ImportError:
            if not sglang_quant_file:
                raise
            from upstream_quant import load_sglang_group_quant  # next to this file

            found["sglang quant"] = load_sglang_group_quant(sglang_quant_file)
        else:
            found["sglang quant"] = lambda y, block: per_token_group_quant_fp8(y, block)
    except Exception as exc:  # noqa: BLE001 - optional
        print(f"sglang quant kernel not available: {type(exc).__name__}: {exc}", file=sys.stderr)
    try:
        from vllm import _custom_ops as vllm_ops

        def vllm_per_token(y, block):
            if block != y.shape[1]:
                raise ValueError("vLLM's scaled_fp8_quant is per token only")
            return vllm_ops.scaled_fp8_quant(y, use_per_token_if_dynamic=True)

        found["vllm quant"] = vllm_per_token
    except Exception as exc:  # noqa: BLE001 - optional
        print(f"vllm quant kernel not available: {type(exc).__name__}: {exc}", file=sys.stderr)
    return found


class Timer:
    """Median ms per call: do_bench (L2 flushed) on CUDA, perf_counter on CPU; CUDA graphs of many calls."""

    def __init__(self, device: torch.device, smoke: bool):
        self.cuda = device.type == "cuda"
        self.smoke = smoke

    def __call__(self, fn) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        fn()
        times = []
        for _ in range(3 if self.smoke else 20):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    def rounds(self, fns: dict, rounds: int = EAGER_ROUNDS) -> dict[str, list[float]]:
        """Each fn's median ms per call (as ``self(fn)``) in ``rounds`` interleaved rounds
        (cuda_timing.interleaved_rounds)."""
        from cuda_timing import interleaved_rounds  # next to this file

        return interleaved_rounds({name: (lambda fn=fn: self(fn)) for name, fn in fns.items()}, rounds)

    def graph_rounds(self, fns: dict, calls: int = 100, rounds: int = GRAPH_ROUNDS) -> dict[str, list[float]]:
        """ms per call of each fn in its own CUDA graph of ``calls`` calls, in ``rounds`` interleaved rounds
        (cuda_timing.graph_rounds); {} off CUDA. A fn whose capture fails is reported and left out."""
        if not self.cuda:
            return {}
        from cuda_timing import graph_rounds

        def failed(name: str, exc: Exception) -> None:
            print(f"    graph capture of {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)

        return graph_rounds(fns, calls, rounds, failed)

    def graph(self, fn, calls: int = 100) -> float | None:
        """ms per call inside a CUDA graph of ``calls`` calls (None off CUDA or when capture fails)."""
        if not self.cuda:
            return None
        from cuda_timing import cuda_graph_ms  # next to this file; imports triton (absent on some CPU runs)

        try:
            return cuda_graph_ms(fn, calls)
        except Exception as exc:  # noqa: BLE001 - report, keep going
            print(f"    graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None


def copy_gbps(device: torch.device, timer: Timer, smoke: bool) -> float:
    n = (1 << 16) if smoke else (256 << 20)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * n * 2 / (timer(lambda: dst.copy_(src)) * 1e-3) / 1e9


def load_sglang(args: argparse.Namespace, device: torch.device):
    """sglang's layernorm_gated module from ``--sglang PATH`` through ``--sglang-loader DIR`` (upstream_sglang.py),
    or None where not given or not loadable (bench_gpu.py's peers and the FP8 epilogue here)."""
    path, loader = getattr(args, "sglang", ""), getattr(args, "sglang_loader", "")
    if not path or not os.path.exists(path):
        return None
    try:
        sys.path.insert(0, loader)
        from upstream_sglang import load_sglang_layernorm_gated

        return load_sglang_layernorm_gated(path, sm_count=None if device.type == "cuda" else 132)
    except Exception as exc:  # noqa: BLE001 - optional
        print(f"sglang kernel not loadable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def load_sglang_epilogue(args: argparse.Namespace, device: torch.device):
    """:func:`load_sglang`'s module where its ``_layer_norm_fwd`` has ``quant_heads`` (the FP8 epilogue), else None."""
    module = load_sglang(args, device)
    if module is not None and "quant_heads" not in inspect.signature(module._layer_norm_fwd).parameters:
        print("this sglang kernel has no quant_heads (FP8 epilogue)", file=sys.stderr)
        return None
    return module


def run_shape(shape, device, timer: Timer, copy: float, quant: str, scale_format: str, compile_quant: bool,
              sglang=None, upstream=None):
    name, m, n, gs, rms, nbg, has_z, has_bias, block = shape
    k = block or n
    ue8m0 = scale_format == "ue8m0"
    g = torch.Generator(device="cpu").manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(m, n, generator=g).to(device, bf)
    z = torch.randn(m, n, generator=g).to(device, bf) if has_z else None
    w = (torch.randn(n, generator=g) * 0.1 + 1).to(device, bf)
    b = (torch.randn(n, generator=g) * 0.1).to(device, bf) if has_bias else None
    nbytes = (2 if has_z else 1) * m * n * 2 + m * n + (n // k) * m * 4
    # The norm alone moves its own bytes (x, z read; y in bf16 and the statistics written): its GB/s and % of
    # copy count those, so the column says how close the norm runs to the bandwidth, not to the fused call.
    norm_bytes = (2 if has_z else 1) * m * n * 2 + m * n * 2 + (n // gs) * m * 4 * (1 if rms else 2)
    rec = {"shape": name, "M": m, "N": n, "group_size": gs, "block": k, "quant": quant, "scale_format": scale_format,
           "bytes": nbytes, "norm_bytes": norm_bytes, "impls": {}}

    def fused():
        return gatednorm.gated_norm_quant(x, w, b, EPS, z, gs, nbg, rms, quant=quant, quant_group_size=block,
                                          scale_format=scale_format, backend="triton")

    y_bf = torch.empty(m, n, dtype=bf, device=device)

    def norm():
        gatednorm.layer_norm_fwd(x, w, b, EPS, z, out=y_bf, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                 backend="triton")
        return y_bf

    with torch.no_grad():
        # fused against the triton norm (float32 out) + the generic quantizer: the same bits under the interpreter;
        # on a GPU two kernels, so y, a block's scale and a code may differ by a float32 rounding (docs/design.md,
        # the quantized output's table): the column reports it, tests/test_quant.py bounds it
        q, s = fused()
        y32 = gatednorm.layer_norm_fwd(x, w, b, EPS, z, out=torch.empty(m, n, device=device), group_size=gs,
                                       norm_before_gate=nbg, is_rms_norm=rms, backend="triton")[0]
        q2, s2 = numerics.quantize_blocks(y32, QuantSpec(quant, k, scale_format, "none", False))
        qb = q.view(torch.uint8) if q.dtype != torch.int8 else q
        q2b = q2.view(torch.uint8) if q2.dtype != torch.int8 else q2
        rec["check_bitwise_vs_generic"] = bool(torch.equal(qb, q2b) and torch.equal(s, s2))
        if not rec["check_bitwise_vs_generic"]:
            diff = int((qb != q2b).sum())
            print(f"  WARNING {name}: fused differs from norm + quantize_blocks in {diff} q of {q.numel()}, "
                  f"scales equal {torch.equal(s, s2)}")

        impls = {"fused (gated_norm_quant)": fused,
                 "norm + eager quant": lambda: torch_quant(norm(), quant, k, ue8m0)}
        if compile_quant:
            torch._dynamo.reset()
            cq = torch.compile(torch_quant, dynamic=False)
            impls["norm + compiled quant"] = lambda: cq(norm(), quant, k, ue8m0)
        for up_name, up in (upstream or {}).items():
            if scale_format != "float32":
                continue  # the upstream kernels timed here write float32 scales
            impls[f"norm + {up_name}"] = (lambda up=up: up(norm(), k))
            # the same function (from y rounded to bf16): dequantized, within a step of its block's scale of ours
            try:
                qu, su = up(norm(), k)
                deq_u = (qu.float().view(m, n // k, k) * su.float().view(m, n // k, 1)).view(m, n)
                deq = (q.float().view(m, n // k, k) * s.view(m, n // k, 1)).view(m, n)
                # one e4m3 step: 2^-3 of the value's binade, 2^-9 scale among the subnormal codes
                step = 2**-3 * torch.maximum(deq.abs(), deq_u.abs()) + 2**-9 * torch.maximum(su.float(), s).view(
                    m, n // k, 1).expand(m, n // k, k).reshape(m, n)
                rec[f"{up_name} within a step"] = within = float(((deq_u - deq).abs() <= step).float().mean())
                if within < 0.999:  # under Triton's interpreter: its fp32 -> fp8 cast rounds wrongly (~2% off)
                    print(f"  {name} {up_name}: {within:.2%} of its dequantized values within a step of ours")
            except Exception as exc:  # noqa: BLE001 - reported, the timing below reports the failure too
                print(f"  {name} {up_name} check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if sglang is not None and quant == "fp8_e4m3" and scale_format == "float32" and block is None:
            # the row as H = N / gs rows of one group each, quantized together: sglang's FP8 epilogue
            heads = n // gs
            x_h, z_h = x.view(m * heads, gs), None if z is None else z.view(m * heads, gs)
            w_h, b_h = w[:gs], None if b is None else b[:gs]
            impls["sglang fused epilogue"] = lambda: sglang._layer_norm_fwd(
                x_h, w_h, b_h, EPS, z=z_h, norm_before_gate=nbg, is_rms_norm=rms, quant_heads=heads)[0]
        impls[NORM_ALONE] = norm
        z_or_x = z if z is not None else x
        y_mul = torch.empty_like(x)

        def mul():
            return torch.mul(x, z_or_x, out=y_mul)

        working = {}
        for key, fn in impls.items():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - an upstream kernel that does not take this layout
                print(f"  {name} {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            working[key] = fn
        # every implementation and torch.mul side by side, round by round: the 1.8x goal's ratio is read per round
        eager = timer.rounds({"torch.mul": mul, **working})
        mul_rounds = eager.pop("torch.mul")
        rec["mul_ms"], rec["mul_rounds_ms"] = statistics.median(mul_rounds), mul_rounds
        small = m * n < BIG
        for key, fn in working.items():
            ms = statistics.median(eager[key])
            key_bytes = norm_bytes if key == NORM_ALONE else nbytes
            r = {"ms": ms, "rounds_ms": eager[key], "gbps": key_bytes / (ms * 1e-3) / 1e9}
            r["pct_copy"] = 100 * r["gbps"] / copy
            # In a CUDA graph the kernels alone are timed: do_bench's eager figure includes the host's time to
            # launch wherever that exceeds its L2 flush (the quantized call's host path is longer than the norm's).
            if not small and (key == NORM_ALONE or key.startswith("fused")):
                r["graph_ms"] = timer.graph(fn, 10)
            rec["impls"][key] = r
        fused = [key for key in rec["impls"] if key.startswith("fused")]
        # small shapes: the fused forwards and torch.mul in graphs of 100 calls, side by side (graph_rounds)
        rounds = timer.graph_rounds({"torch.mul": mul, **{key: impls[key] for key in fused}}) if small else {}
        if rounds:
            from cuda_timing import median_ratio  # next to this file

            mul_graph = rounds.get("torch.mul")
            if mul_graph:
                rec["mul_graph_ms"], rec["mul_graph_rounds_ms"] = statistics.median(mul_graph), mul_graph
            for key in (k for k in fused if k in rounds):
                r = rec["impls"][key]
                r["graph_ms"], r["graph_rounds_ms"] = statistics.median(rounds[key]), rounds[key]
                if mul_graph:
                    r["graph_x_mul"] = median_ratio(rounds[key], mul_graph)
        for key, r in rec["impls"].items():
            if r.get("graph_ms"):
                r["graph_pct_copy"] = 100 * (norm_bytes if key == NORM_ALONE else nbytes) / (
                    r["graph_ms"] * 1e-3) / 1e9 / copy
    fused_rounds = eager.get("fused (gated_norm_quant)")
    if fused_rounds:
        from cuda_timing import median_ratio  # next to this file

        for r in rec["impls"].values():
            r["x_fused"] = median_ratio(r["rounds_ms"], fused_rounds)
    return rec


def fmt_table(records, copy: float, device_name: str) -> str:
    lines = [f"Device: {device_name}; copy bandwidth {copy:.0f} GB/s (bytes read + written), measured in this run. "
             "bf16 in. Bytes: x, z read + q, scales written (the norm alone: x, z read + y in bf16 and the "
             "statistics written). Cells: GB/s (% of copy; time as a multiple of the fused call's) from do_bench "
             f"medians (L2 flushed) in {EAGER_ROUNDS} rounds, every implementation and torch.mul side by side: the "
             "median of each one's rounds, the multiple the median of the rounds' ratios; fused (and the "
             "norm alone on large shapes): also us per call in a CUDA graph of 100 calls (10 on shapes of at least 32M "
             "elements; the kernels alone, no host time) with its % of copy; on small shapes the median of "
             f"{GRAPH_ROUNDS} rounds timed side by side with torch.mul's graph, and x torch.mul's (the median of the "
             "rounds' ratios).", ""]
    keys = []
    for r in records:
        keys += [k for k in r["impls"] if k not in keys]
    lines.append("| shape | quant | bitwise = generic | " + " | ".join(keys) + " |")
    lines.append("|---|---|---|" + "---|" * len(keys))
    for r in records:
        cells = []
        for k in keys:
            v = r["impls"].get(k)
            if v is None:
                cells.append("-")
                continue
            c = f"{v['gbps']:.0f} ({v['pct_copy']:.0f}%, {v.get('x_fused', 0):.2f}x; {v['ms'] * 1e3:.1f} us)"
            if v.get("graph_ms"):
                mul = f", {v['graph_x_mul']:.2f}x mul" if v.get("graph_x_mul") else ""
                c += f"; graph {v['graph_ms'] * 1e3:.2f} us ({v['graph_pct_copy']:.0f}%{mul})"
            cells.append(c)
        lines.append(f"| {r['shape']} | {r['quant']} {r['scale_format']} | {r['check_bitwise_vs_generic']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return False
    keys = []
    for r in records:
        keys += [k for k in r["impls"] if k not in keys]
    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        vals = [r["impls"][k]["pct_copy"] if k in r["impls"] else 0 for r in records]
        ax.bar([j + i * width for j in range(len(records))], vals, width, label=k)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))])
    ax.set_xticklabels([f"{r['shape']} {r['quant']} {r['scale_format']}" for r in records], rotation=30, ha="right",
                       fontsize=7)
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title("gated norm -> quantized output")
    ax.axhline(85, color="k", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the quant benchmark (bench_gpu.py --quant adds these to its own)."""
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (Triton interpreter)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few repetitions (a CPU check that it runs)")
    ap.add_argument("--sglang-quant", default="",
                    help="sglang's fp8_kernel.py (its per-token-group quant kernel after our norm; default: the one "
                         "beside --sglang's file, where staged)")
    ap.add_argument("--quant-formats", default="fp8_e4m3",
                    help="comma-separated quant:scale_format pairs or quant names, e.g. fp8_e4m3,int8,fp8_e4m3:ue8m0")


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on CPU the triton backend needs TRITON_INTERPRET=1 (set before Python starts)")
    timer = Timer(device, args.smoke)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    only = getattr(args, "only", "")
    shapes = [s for s in shapes if not only or any(o in s[0] for o in only.split(","))]
    formats = []
    for item in args.quant_formats.split(","):
        quant, _, fmt = item.partition(":")
        formats.append((quant, fmt or "float32"))
    copy = copy_gbps(device, timer, args.smoke)
    print(f"{device_name}: copy bandwidth {copy:.0f} GB/s", flush=True)
    sglang = load_sglang_epilogue(args, device)
    quant_file = args.sglang_quant or os.path.join(os.path.dirname(getattr(args, "sglang", "") or "."), "fp8_kernel.py")
    upstream = {quant: upstream_quants(quant, quant_file if os.path.isfile(quant_file) else "")
                for quant in dict.fromkeys(q for q, _ in formats)}
    compile_quant = not getattr(args, "no_compile", False) and not args.smoke
    records = []
    for shape in shapes:
        for quant, fmt in formats:
            t0 = time.time()
            records.append(run_shape(shape, device, timer, copy, quant, fmt, compile_quant, sglang, upstream[quant]))
            print(f"  {shape[0]} {quant} {fmt} done in {time.time() - t0:.0f}s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = fmt_table(records, copy, device_name)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "quant_bench_smoke" if args.smoke else "quant_bench")
    meta = {"device": device_name, "torch": torch.__version__, "copy_gbps": copy}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# gatednorm quantized output benchmark ({device_name})\n\n{table}\n")
    plot(records, stem + ".png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--sglang", default="", help="sglang's layernorm_gated.py: its fused FP8 epilogue timed too")
    ap.add_argument("--sglang-loader", default="", help="the folder of upstream_sglang.py")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile-d separate quantization")
    add_arguments(ap)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
