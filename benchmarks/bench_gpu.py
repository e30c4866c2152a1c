"""GPU benchmark: gatednorm's Triton kernels against the native backend, torch.compile and upstream kernels.

For each shape of issue 7 (bf16), times forward and forward+backward with triton.testing.do_bench
(median; L2 flushed before every call), the per-shape floor ``torch.mul(x, z, out=y)`` and, for
shapes under 32M elements, a CUDA graph of 100 back-to-back calls. Copy bandwidth is measured in the
same run. Prints a table of GB/s, % of copy and ratio to the mul floor; writes JSON (and a PNG when
matplotlib is importable).

Bytes counted (the issue's definition): forward = x (and z) read + y written + statistics;
forward+backward adds x, z, dy read and dx, dz written; weight/bias and dweight/dbias ignored.

Upstream kernels are optional: fla-core (``fla.modules.norm``) when importable, and sglang's newest
kernel when ``--sglang PATH`` names the extracted ``layernorm_gated.py`` (loaded through
``--sglang-loader DIR`` holding upstream_sglang.py).

    PYTHONPATH=src python benchmarks/bench_gpu.py --out benchmarks/results [--no-compile] [--host]

The launch shapes themselves are tuned by benchmarks/tune_gpu.py.

With --quant: the quantized-output benchmark of benchmarks/bench_quant.py (fused gated_norm_quant vs
norm + separate quantization).

``--device cpu --smoke`` (under ``TRITON_INTERPRET=1``) runs either benchmark on tiny shapes of the same kinds on
the CPU machine, every code path the GPU run takes (the host breakdown, the peers, tables, JSON, plot) but CUDA
graphs, with perf_counter timings that mean nothing: a check that a scarce device call will not die in Python
(tests/test_gpu_benchmarks.py runs it).

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_gpu.py --device cpu --smoke --host --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

import gatednorm
import gatednorm.backends.triton.launch as tk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quant  # noqa: E402  (the --quant benchmark, next to this file)
from cuda_timing import interleaved_rounds, median_ratio  # noqa: E402

EPS = 1e-6
BIG = 32 * 1024 * 1024  # elements: at and above this, the bandwidth goals apply

# name, M, N, group size, rms, norm_before_gate, has_z, has_bias
SHAPES = [
    ("524288x128 rms gate-after", 524288, 128, 128, True, True, True, False),
    ("65536x128 rms gate-after", 65536, 128, 128, True, True, True, False),
    ("8192x128 rms gate-after", 8192, 128, 128, True, True, True, False),
    ("2048x128 rms gate-after", 2048, 128, 128, True, True, True, False),
    ("32768x4096 g128 rms gate-after", 32768, 4096, 128, True, True, True, False),
    ("32768x5120 g640 rms gate-before", 32768, 5120, 640, True, False, True, False),
    ("32768x5120 one group rms gate-before", 32768, 5120, 5120, True, False, True, False),
    ("65536x2048 LN+bias no gate", 65536, 2048, 2048, False, True, False, True),
    ("16384x8192 rms gate-after", 16384, 8192, 8192, True, True, True, False),
    ("32768x3072 LN g96 gate-before", 32768, 3072, 96, False, False, True, False),
    # a group wider than one register tile (MAX_BLOCK): the chunked kernels, two passes over each row's chunks
    ("8192x16384 one group rms gate-before", 8192, 16384, 16384, True, False, True, False),
    # the same group as LayerNorm with a bias and the gate first: the most registers a thread holds in one tile
    ("8192x16384 one group LN+bias gate-before", 8192, 16384, 16384, False, False, True, True),
]
#: --smoke: one tiny shape of each kernel kind above (tiles of several rows, padded groups, one wide group, the
#: LayerNorm with bias, three-part groups of 96, chunks of a group wider than a tile).
SMOKE_SHAPES = [
    ("16x128 rms gate-after", 16, 128, 128, True, True, True, False),
    ("4x1280 g640 rms gate-before", 4, 1280, 640, True, False, True, False),
    ("2x2048 LN+bias no gate", 2, 2048, 2048, False, True, False, True),
    ("4x192 LN g96 gate-before", 4, 192, 96, False, False, True, False),
    ("1x16384 one group rms gate-before", 1, 16384, 16384, True, False, True, False),
]


@dataclasses.dataclass
class Run:
    """Where and how this run times: the device, bench_quant's Timer (do_bench with L2 flushed on CUDA,
    perf_counter on CPU) and, for --smoke, few calls of everything."""

    device: torch.device
    timer: bench_quant.Timer
    smoke: bool = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def calls(self, n: int) -> int:
        return 2 if self.smoke else n


#: CUDA, as tune_gpu.py, bench_triton_ab.py and bench_residual.py (which import from here) use it.
CUDA_RUN = Run(torch.device("cuda"), bench_quant.Timer(torch.device("cuda"), False))


def bench(fn, run: Run, graph_calls=0):
    """Median ms per call; with graph_calls, also ms per call inside a CUDA graph of that many (None off CUDA or
    where capture fails: an upstream kernel that cannot be captured)."""
    return run.timer(fn), (run.timer.graph(fn, graph_calls) if graph_calls else None)


#: The forwards timed side by side in interleaved rounds (their eager figures: issue 16's parity goal), and how many.
PARITY = ("gatednorm triton", "sglang 0.5.23", "fla layernorm_gated", "fla fused_norm_gate")
PARITY_ROUNDS = 7
#: The implementations timed in CUDA graphs: on small shapes side by side with torch.mul (graph_rounds), on
#: large ones forward+backward only, once each (10 calls).
#: Our serving forward on small shapes: the public call with the statistics discarded (``layernorm_fn`` without
#: autograd, what sglang's and vLLM's gated-norm modules call), which launches the backend's output-only tile;
#: "gatednorm triton" is ``layer_norm_fwd`` (y, mean, rstd: the training forward, the training tile).
OURS_SERVING = "gatednorm triton, statistics discarded"
GRAPH_PEERS = {"fwd": ("gatednorm triton", OURS_SERVING, "sglang 0.5.23", "fla fused_norm_gate"),
               "fwd_bwd": ("gatednorm triton", "fla layernorm_gated", "fla fused_norm_gate")}


def _no_grad(fn):
    """fn run under torch.no_grad() (the forwards are timed as inference calls)."""
    def run():
        with torch.no_grad():
            return fn()
    return run


def back_to_back_us(fn, run: Run, calls=2000):
    """Wall-clock us per call for many calls in a row (the larger of host and device time per call)."""
    for _ in range(run.calls(10)):
        fn()
    run.sync()
    calls = run.calls(calls)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    run.sync()
    return (time.perf_counter() - t0) / calls * 1e6


#: Interleaved rounds of the host-time measurement (host_rounds) and the calls each times per round.
HOST_ROUNDS = 7
HOST_CALLS = {"fwd": 1000, "fwd_bwd": 200}


def host_rounds(fns: dict, calls: dict, run: Run, rounds: int = HOST_ROUNDS) -> dict[str, list[float]]:
    """Back-to-back wall us per call of every fn (``fns``: name -> fn; ``calls``: name -> calls per timing), in
    ``rounds`` interleaved rounds: each round times each fn once, in order. A shared host's speed drifts during a
    run (other processes, clocks: torch.mul's host time at 8192x128 went 11.5 -> 8.7 -> 9.3 us in three runs
    of one H100 host in session 22), and the goals are ratios: timing ours and its reference side by side, round
    after round, lets the drift move both alike; the ratio of each round's pair is what the goals read (median
    over the rounds)."""
    return interleaved_rounds({name: (lambda fn=fn, c=calls[name]: back_to_back_us(fn, run, c))
                               for name, fn in fns.items()}, run.calls(rounds))


def torch_formula(x, w, b, z, gs, rms, nbg):
    """The operator in plain torch ops (fp32 math, one rounding): what torch.compile is given."""
    m, n = x.shape
    xf = x.float()
    gate = None
    if z is not None:
        gate = F.silu(z.float())
        if not nbg:
            xf = xf * gate
    xg = xf.view(m, n // gs, gs)
    if not rms:
        xg = xg - xg.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xg.square().mean(-1, keepdim=True) + EPS)
    y = (xg * rstd).view(m, n) * w.float()
    if b is not None:
        y = y + b.float()
    if gate is not None and nbg:
        y = y * gate
    return y.to(x.dtype)


def load_upstream(args, device: torch.device):
    impls = {}
    try:
        from fla.modules.norm import fused_norm_gate as fla_fused
        from fla.modules.norm import layernorm_gated as fla_lg
        impls["fla_lg"] = fla_lg
        impls["fla_fused"] = fla_fused
    except Exception as e:
        print(f"fla not available: {e}", file=sys.stderr)
    sglang = bench_quant.load_sglang(args, device)
    if sglang is not None:
        impls["sglang"] = sglang
    return impls


def copy_bandwidth(run: Run = CUDA_RUN) -> float:
    """GB/s (bytes read + written) of a bf16 copy of 512 MiB (64K elements for --smoke)."""
    return bench_quant.copy_gbps(run.device, run.timer, run.smoke)


def make_inputs(m, n, has_z, has_bias, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    bf = torch.bfloat16
    x = torch.randn(m, n, device=device, generator=g).to(bf)
    z = torch.randn(m, n, device=device, generator=g).to(bf) if has_z else None
    w = (torch.randn(n, device=device, generator=g) * 0.1 + 1).to(bf)
    b = (torch.randn(n, device=device, generator=g) * 0.1).to(bf) if has_bias else None
    dy = torch.randn(m, n, device=device, generator=g).to(bf)
    return x, z, w, b, dy


def run_shape(shape, impls, copy_gbps, args, run: Run):
    name, m, n, gs, rms, nbg, has_z, has_bias = shape
    x, z, w, b, dy = make_inputs(m, n, has_z, has_bias, device=run.device)
    groups = n // gs
    tensors = 2 if has_z else 1
    bytes_fwd = (tensors + 1) * m * n * 2 + (1 if rms else 2) * groups * m * 4
    bytes_fb = bytes_fwd + (tensors + 1) * m * n * 2 + tensors * m * n * 2
    small = m * n < BIG
    rec = {"shape": name, "M": m, "N": n, "group_size": gs, "rms": rms, "norm_before_gate": nbg,
           "gate": has_z, "bias": has_bias, "bytes_fwd": bytes_fwd, "bytes_fwd_bwd": bytes_fb, "fwd": {}, "fwd_bwd": {}}

    y = torch.empty_like(x)
    z_or_x = z if z is not None else x

    def mul():
        return torch.mul(x, z_or_x, out=y)

    rec["mul_ms"], rec["mul_graph_ms"] = run.timer(mul), None

    if small:
        from gatednorm.spec import NormSpec
        spec = NormSpec(EPS, gs, nbg, rms, "swish")
        rec["ours_kernel_b2b_us"] = back_to_back_us(lambda: tk.forward(x, w, b, z, spec, y), run)

    # correctness gate: ours against native on this very shape
    with torch.no_grad():
        y_t = gatednorm.layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                       backend="triton")[0]
        y_t2 = gatednorm.layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                        backend="triton")[0]
        y_n = gatednorm.layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms,
                                       backend="native")[0]
        err = ((y_t2.float() - y_n.float()).abs().max() / y_n.float().abs().max()).item()
        rec["check_rel_err_vs_native"] = err
        rec["check_repeat_bitwise"] = bool(torch.equal(y_t, y_t2))
        if err > 1e-2 or not rec["check_repeat_bitwise"]:
            print(f"  WARNING {name}: ours vs native rel err {err:.2e}, repeat equal {rec['check_repeat_bitwise']}")

    def ours():
        return gatednorm.layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs, norm_before_gate=nbg,
                                        is_rms_norm=rms, backend="triton")

    def native_eager():
        return gatednorm.layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs, norm_before_gate=nbg,
                                        is_rms_norm=rms, backend="native")

    fwd = {"gatednorm triton": ours, "gatednorm native": native_eager}
    if small:
        fwd[OURS_SERVING] = lambda: gatednorm.layernorm_fn(x, w, b, z, EPS, gs, nbg, rms, backend="triton")
    if not args.no_compile:
        # One torch.compile of the same function per shape would hit dynamo's recompile limit after 8
        # shapes and silently run eagerly: start each shape from a clean cache.
        torch._dynamo.reset()
        compiled = torch.compile(torch_formula, dynamic=False)
        fwd["torch.compile formula"] = lambda: compiled(x, w, b, z, gs, rms, nbg)
    if "fla_lg" in impls:
        lg = impls["fla_lg"]
        fwd["fla layernorm_gated"] = lambda: lg.layernorm_fn(x, w, b, z, EPS, gs, nbg, rms)
    fused_ok = "fla_fused" in impls and rms and nbg and has_z and gs == n and not has_bias
    if fused_ok:
        ff = impls["fla_fused"]
        fwd["fla fused_norm_gate"] = lambda: ff.rms_norm_gated(x, z, w, None, activation="swish", eps=EPS)
    if "sglang" in impls:
        sg = impls["sglang"]
        fwd["sglang 0.5.23"] = lambda: sg._layer_norm_fwd(x, w, b, EPS, z=z, group_size=gs,
                                                          norm_before_gate=nbg, is_rms_norm=rms)
    with torch.no_grad():
        parity = []  # ours and the peers: timed below, side by side
        for key, fn in fwd.items():
            try:
                if key in PARITY:
                    fn()  # runs at all (a peer that does not take this layout is reported, left out)
                    parity.append(key)
                else:
                    rec["fwd"][key] = {"ms": run.timer(fn), "graph_ms": None}
            except Exception as e:
                print(f"  {name} fwd {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
        # In interleaved rounds, each figure the median of its rounds: the parity goal reads the median of the
        # rounds' ratios (a drift of the machine between two single timings would move a near tie either way).
        rounds = run.timer.rounds({key: fwd[key] for key in parity}, run.calls(PARITY_ROUNDS))
        for key in parity:  # graphs: small shapes only, below
            rec["fwd"][key] = {"ms": statistics.median(rounds[key]), "rounds_ms": rounds[key], "graph_ms": None}

    # forward + backward
    xg = x.detach().requires_grad_(True)
    zg = z.detach().requires_grad_(True) if z is not None else None
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True) if b is not None else None
    leaves = [t_ for t_ in (xg, zg, wg, bg) if t_ is not None]

    def fb(f):
        return lambda: torch.autograd.grad(f(), leaves, dy)

    fb_impls = {
        "gatednorm triton": fb(lambda: gatednorm.layernorm_fn(xg, wg, bg, zg, EPS, gs, nbg, rms, backend="triton")),
        "gatednorm native": fb(lambda: gatednorm.layernorm_fn(xg, wg, bg, zg, EPS, gs, nbg, rms, backend="native")),
    }
    if not args.no_compile:
        compiled_fb = torch.compile(torch_formula, dynamic=False)
        fb_impls["torch.compile formula"] = fb(lambda: compiled_fb(xg, wg, bg, zg, gs, rms, nbg))
    if "fla_lg" in impls:
        lg = impls["fla_lg"]
        fb_impls["fla layernorm_gated"] = fb(lambda: lg.layernorm_fn(xg, wg, bg, zg, EPS, gs, nbg, rms))
    if fused_ok:
        ff = impls["fla_fused"]
        fb_impls["fla fused_norm_gate"] = fb(lambda: ff.rms_norm_gated(xg, zg, wg, None, activation="swish", eps=EPS))
    for key, fn in fb_impls.items():
        try:
            gc = 10 if not small and key in GRAPH_PEERS["fwd_bwd"] else 0
            t, tg = bench(fn, run, gc)
            rec["fwd_bwd"][key] = {"ms": t, "graph_ms": tg}
        except Exception as e:
            print(f"  {name} fwd+bwd {key} failed: {type(e).__name__}: {e}", file=sys.stderr)

    if small:  # in CUDA graphs of 100 calls: ours, the peers and torch.mul side by side (graph_rounds)
        graph_fns = {"torch.mul": mul}
        for part, fns in (("fwd", {k: _no_grad(f) for k, f in fwd.items()}), ("fwd_bwd", fb_impls)):
            graph_fns.update({(part, key): fns[key] for key in GRAPH_PEERS[part] if key in rec[part]})
        rounds = run.timer.graph_rounds(graph_fns)
        mul_rounds = rounds.pop("torch.mul", None)
        if mul_rounds:
            rec["mul_graph_ms"], rec["mul_graph_rounds_ms"] = statistics.median(mul_rounds), mul_rounds
        for (part, key), times in rounds.items():
            r = rec[part][key]
            r["graph_ms"], r["graph_rounds_ms"] = statistics.median(times), times
            if mul_rounds:
                r["graph_x_mul"] = median_ratio(times, mul_rounds)

    if small and "gatednorm triton" in rec["fwd"] and "gatednorm triton" in rec["fwd_bwd"]:
        # host time per call, ours and its references side by side (host_rounds): one torch.mul(x, z) (the
        # reference issue 16 names: like our forward it allocates its output), the same into a given out= (no
        # allocation: reported beside it), and the host floor of any autograd pair (one product forward, its
        # two-product backward)
        xa, za = x.detach().requires_grad_(True), z_or_x.detach().clone().requires_grad_(True)
        # (no input of ours or torch.mul requires grad: the forwards take their inference paths)
        host = host_rounds({"torch.mul": lambda: torch.mul(x, z_or_x), "torch.mul out=": lambda: torch.mul(
                                x, z_or_x, out=y), "ours fwd": ours,
                            "autograd pair": lambda: torch.autograd.grad(xa * za, (xa, za), dy),
                            "ours fwd+bwd": fb_impls["gatednorm triton"]},
                           {"torch.mul": HOST_CALLS["fwd"], "torch.mul out=": HOST_CALLS["fwd"],
                            "ours fwd": HOST_CALLS["fwd"], "autograd pair": HOST_CALLS["fwd_bwd"],
                            "ours fwd+bwd": HOST_CALLS["fwd_bwd"]}, run)
        rec["host_rounds_us"] = host
        rec["mul_b2b_us"] = statistics.median(host["torch.mul"])
        rec["mul_out_b2b_us"] = statistics.median(host["torch.mul out="])
        rec["host_fwd_x_mul_out"] = median_ratio(host["ours fwd"], host["torch.mul out="])
        rec["autograd_pair_b2b_us"] = statistics.median(host["autograd pair"])
        rec["fwd"]["gatednorm triton"]["b2b_us"] = statistics.median(host["ours fwd"])
        rec["fwd_bwd"]["gatednorm triton"]["b2b_us"] = statistics.median(host["ours fwd+bwd"])
        rec["host_fwd_x_mul"] = median_ratio(host["ours fwd"], host["torch.mul"])
        rec["host_fwd_bwd_x_pair"] = median_ratio(host["ours fwd+bwd"], host["autograd pair"])
    for part, nbytes in (("fwd", bytes_fwd), ("fwd_bwd", bytes_fb)):
        for r in rec[part].values():
            r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
            r["pct_copy"] = 100 * r["gbps"] / copy_gbps
            r["x_mul"] = r["ms"] / rec["mul_ms"]
            if r.get("graph_ms"):
                r["graph_pct_copy"] = 100 * nbytes / (r["graph_ms"] * 1e-3) / 1e9 / copy_gbps
    return rec


def host_breakdown(run: Run, m=8192, n=128):
    """Wall us per call of each layer of the stack back-to-back, and a profiler table of fwd+bwd."""
    from gatednorm.spec import NormSpec
    if run.smoke:
        m = 16
    x, z, w, b, dy = make_inputs(m, n, True, False, device=run.device)
    spec = NormSpec(EPS, n, True, True, "swish")
    y = torch.empty_like(x)
    mean, rstd = tk.forward(x, w, None, z, spec, y)
    xg, zg, wg = (t.detach().requires_grad_(True) for t in (x, z, w))
    xa, za = (t.detach().requires_grad_(True) for t in (x, z))
    rows = {
        "torch.mul": lambda: torch.mul(x, z, out=y),
        "autograd pair (x * z).backward(dy)": lambda: (xa * za).backward(dy),
        "tk.forward + tk.backward": lambda: tk.backward(dy, x, w, None, z, *tk.forward(x, w, None, z, spec, y), spec),
        "tk.forward": lambda: tk.forward(x, w, None, z, spec, y),
        "tk.backward": lambda: tk.backward(dy, x, w, None, z, mean, rstd, spec),
        "layer_norm_fwd": lambda: gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, is_rms_norm=True, backend="triton"),
        "rmsnorm_fn fwd (grad on)": lambda: gatednorm.rmsnorm_fn(xg, wg, None, zg, EPS, backend="triton"),
        "rmsnorm_fn fwd+bwd": lambda: torch.autograd.grad(gatednorm.rmsnorm_fn(xg, wg, None, zg, EPS, backend="triton"),
                                                          (xg, zg, wg), dy),
    }
    for k, f in rows.items():
        before = tk.fast_launches
        us = back_to_back_us(f, run, 300)
        print(f"HOST {k}: {us:.1f} us/call (cached launches: {tk.fast_launches - before})", flush=True)
    # Where forward+backward's host time goes: the Function's backward (Python, run by the autograd engine on the
    # device's thread) timed from inside, the rest of a call is the forward's Python and the engine
    from gatednorm.ops import GatedNormOutputFunction
    inner = GatedNormOutputFunction.backward
    spent = [0.0, 0]

    def timed_backward(ctx, dy):
        t0 = time.perf_counter()
        try:
            return inner(ctx, dy)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    from gatednorm.backends.triton import plans

    planned = plans.planned_backward_launches
    GatedNormOutputFunction.backward = staticmethod(timed_backward)
    try:
        us = back_to_back_us(rows["rmsnorm_fn fwd+bwd"], run, 300)
    finally:
        GatedNormOutputFunction.backward = staticmethod(inner)
    if spent[1]:
        print(f"HOST rmsnorm_fn fwd+bwd: {us:.1f} us/call, of which {spent[0] / spent[1] * 1e6:.1f} us inside the "
              f"Function's backward ({spent[1]} backward calls, {plans.planned_backward_launches - planned} through "
              "the backward plan)", flush=True)
    import cProfile
    import pstats
    for k in ("layer_norm_fwd", "tk.backward"):
        f = rows[k]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(run.calls(300)):
            f()
        prof.disable()
        run.sync()
        print(f"PROFILE {k} (300 calls)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    from torch.profiler import ProfilerActivity, profile
    f = rows["rmsnorm_fn fwd+bwd"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(run.calls(20)):
            f()
        run.sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def fmt_table(records, copy_gbps, device):
    lines = [f"Device: {device}; copy bandwidth {copy_gbps:.0f} GB/s (bytes read + written). bf16. "
             f"Per call: do_bench median, L2 flushed (the forwards of ours and the peers: medians of {PARITY_ROUNDS} "
             "rounds side by side). Cells: GB/s (% of copy, time / torch.mul floor); "
             "graph: us per call in a CUDA graph of 100 calls (10 for fwd+bwd of large shapes), its % of copy and "
             f"x the mul graph figure (small shapes: medians of {bench_quant.GRAPH_ROUNDS} rounds side by side with "
             "torch.mul's graph, x mul the median of the rounds' ratios); back-to-back: wall us per call of "
             f"{HOST_CALLS['fwd']} (fwd+bwd: "
             f"{HOST_CALLS['fwd_bwd']}) calls in a row, the host time per call where it exceeds the kernels' "
             f"(median of {HOST_ROUNDS} rounds interleaved with torch.mul and the autograd pair).", ""]
    impls = []
    for r in records:
        for k in list(r["fwd"]) + list(r["fwd_bwd"]):
            if k not in impls:
                impls.append(k)
    for part, title in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        keys = [k for k in impls if any(k in r[part] for r in records)]
        lines.append(f"### {title}")
        lines.append("")
        lines.append("| shape | torch.mul floor | " + " | ".join(keys) + " |")
        lines.append("|---|---|" + "---|" * len(keys))
        for r in records:
            floor = f"{r['mul_ms']*1e3:.1f} us"
            if r.get("mul_graph_ms"):
                floor += f", graph {r['mul_graph_ms']*1e3:.2f} us"
            cells = []
            for k in keys:
                v = r[part].get(k)
                if v is None:
                    cells.append("-")
                    continue
                c = f"{v['gbps']:.0f} ({v['pct_copy']:.0f}%, {v['x_mul']:.2f}x; {v['ms']*1e3:.1f} us)"
                if v.get("graph_ms"):
                    c += f"; graph {v['graph_ms']*1e3:.2f} us ({v['graph_pct_copy']:.0f}%"
                    c += f", {v['graph_x_mul']:.2f}x mul)" if v.get("graph_x_mul") else ")"
                if v.get("b2b_us"):
                    c += f"; back-to-back {v['b2b_us']:.1f} us"
                cells.append(c)
            lines.append(f"| {r['shape']} | {floor} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("torch.mul(x, z) back-to-back (wall us per call, host-bound at small shapes): " + ", ".join(
        f"{r['shape'].split()[0]} {r['mul_b2b_us']:.1f}" + (f" (into out=: {r['mul_out_b2b_us']:.1f})"
                                                            if r.get("mul_out_b2b_us") else "")
        for r in records if r.get("mul_b2b_us")))
    lines.append("autograd pair (x * z, grads of x and z) back-to-back (wall us per call): " + ", ".join(
        f"{r['shape'].split()[0]} {r['autograd_pair_b2b_us']:.1f}" for r in records if r.get("autograd_pair_b2b_us")))
    lines.append("gatednorm backends.triton.launch.forward alone back-to-back (us per call): " + ", ".join(
        f"{r['shape'].split()[0]} {r['ours_kernel_b2b_us']:.1f}" for r in records if r.get("ours_kernel_b2b_us")))
    lines.append("host time, ours / its reference measured side by side (median over the rounds of each round's "
                 "ratio): " + ", ".join(
                     f"{r['shape'].split()[0]} forward {r['host_fwd_x_mul']:.2f}x torch.mul"
                     + (f" ({r['host_fwd_x_mul_out']:.2f}x into out=)" if r.get("host_fwd_x_mul_out") else "")
                     + ", forward+backward "
                     f"{r['host_fwd_bwd_x_pair']:.2f}x the autograd pair" for r in records if r.get("host_fwd_x_mul")))
    return "\n".join(lines)


def plot(records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    for ax, part in zip(axes, ("fwd", "fwd_bwd"), strict=True):
        impls = []
        for r in records:
            impls += [k for k in r[part] if k not in impls]
        width = 0.8 / max(1, len(impls))
        for i, k in enumerate(impls):
            vals = [r[part][k]["pct_copy"] if k in r[part] else 0 for r in records]
            ax.bar([j + i * width for j in range(len(records))], vals, width, label=k)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))])
        ax.set_xticklabels([r["shape"] for r in records], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title("forward" if part == "fwd" else "forward+backward")
        ax.axhline(90 if part == "fwd" else 75, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--host", action="store_true", help="print a host-overhead breakdown first")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names")
    ap.add_argument("--sglang", default="")
    ap.add_argument("--sglang-loader", default="")
    ap.add_argument("--quant", action="store_true",
                    help="run the quantized-output benchmark instead (benchmarks/bench_quant.py, issue 14)")
    bench_quant.add_arguments(ap)  # --device, --smoke, --quant-formats (used with --quant)
    args = ap.parse_args()
    if args.quant:
        bench_quant.run(args)
        return
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device or "cuda")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on CPU the triton backend needs TRITON_INTERPRET=1 (set before Python starts)")
    run = Run(dev, bench_quant.Timer(dev, args.smoke), args.smoke)
    if args.smoke:
        args.no_compile = True  # torch.compile of every shape: minutes of CPU for timings that mean nothing
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    shapes = [s for s in (SMOKE_SHAPES if args.smoke else SHAPES)
              if not args.only or any(o in s[0] for o in args.only.split(","))]
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    print(f"fast launch: {tk._fast_launch_enabled()}", flush=True)
    if args.host:
        host_breakdown(run)
    impls = load_upstream(args, dev)
    copy_gbps = copy_bandwidth(run)
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    # Warm-up pass, discarded: in one H200 run the first shape's forward rows ran at half speed for every
    # implementation timed early (clocks, first compiles), while the same row rerun at once was normal.
    if shapes:
        run_shape(shapes[0], impls, copy_gbps, args, run)
        torch.cuda.empty_cache()
    model = tk.gpu_model(dev.index if dev.index is not None else 0) if dev.type == "cuda" else ""
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "copy_gbps": copy_gbps,
            "config": {k: getattr(tk, k) for k in ("MAX_BLOCK", "FWD_TILE_ELEMENTS", "BWD_TILE_ELEMENTS",
                                                    "FWD_ELEMS_PER_THREAD", "BWD_ELEMS_PER_THREAD",
                                                    "BWD_PROGRAMS_PER_SM")},
            "fwd_tuned": {str(k): v for k, v in tk.fwd_tuned(model).items()},
            "fwd_output_tuned": {str(k): v for k, v in tk.fwd_tuned(model, True).items()},  # calls without stats
            "bwd_tuned": {str(k): v for k, v in tk.BWD_TUNED.items()},
            "pdl": tk.pdl_supported(dev)}
    records, table = [], ""
    for s in shapes:
        t0 = time.time()
        records.append(run_shape(s, impls, copy_gbps, args, run))
        print(f"  {s[0]} done in {time.time() - t0:.0f}s", flush=True)
        torch.cuda.empty_cache()
        # the tables so far, after every shape: a run cut short (a device call's time limit) keeps its rows
        table = fmt_table(records, copy_gbps, device)
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(f"# gatednorm GPU benchmark ({device})\n\n{table}\n")
    print(table)
    plot(records, os.path.join(args.out, "gpu_bench.png"))


if __name__ == "__main__":
    main()
