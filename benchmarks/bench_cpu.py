"""CPU (or any eager device) benchmark of the native and compiled backends against the straightforward recipe.

For each shape x dtype x {forward, forward+backward} it times, interleaved within one run
(each repeat calls every implementation once, medians are reported):

* ``recipe``   - the migration guide's straightforward code: a chain of full-size float32
                 temporaries (x.float(), silu(z.float()), view groups, pow/mean/rsqrt, weight,
                 gate, .to(dtype)); fwd+bwd is autograd through it;
* ``native``   - gatednorm, backend="native" (eager, row blocks);
* ``compiled`` - gatednorm, backend="compiled" (the native formula under torch.compile);
* ``inductor`` - torch.compile of the recipe (what a user gets by compiling the recipe);
* ``floor``    - F.rms_norm / F.layer_norm on x alone (no gate, one group): a lower bound;
* ``triton``   - gatednorm, backend="triton" (only with --device cuda and Triton present).

Peak memory (CPU): growth of the process's RSS high-water mark during one call, after a
warm-up call, minus the call's outputs (y, statistics, gradients): the temporaries the call
needed beyond its inputs and outputs, reported as a multiple of x's size. The script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves large blocks with mmap and returns
them at free (otherwise freed temporaries stay resident and hide later peaks); the high-water
mark is reset through ``/proc/self/clear_refs``. On CUDA: ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_cpu.py                      # full run, writes benchmarks/results/cpu_bench.*
    python benchmarks/bench_cpu.py --quick              # fewer repeats, no files
    python benchmarks/bench_cpu.py --device cuda        # eager GPU timing (adds the triton column)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import gatednorm  # noqa: E402
from gatednorm.backends import compiled as compiled_backend  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EPS = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    m: int
    n: int
    group_size: int
    rms: bool
    gate: str  # "after" (norm_before_gate=True), "before", "none"
    bias: bool


CASES = [
    Case("RMS gate-after 65536x128", 65536, 128, 128, True, "after", False),
    Case("RMS gate-after 4096x4096 g128", 4096, 4096, 128, True, "after", False),
    Case("RMS gate-before 2048x5120 g640", 2048, 5120, 640, True, "before", False),
    Case("LN+bias 4096x2048 no gate", 4096, 2048, 2048, False, "none", True),
]


def recipe(x, w, b, z, group_size, gate, rms):
    """The straightforward code: full-size float32 temporaries, rounded once at the end."""
    dtype = x.dtype
    m, n = x.shape
    xf = x.float()
    g = F.silu(z.float()) if z is not None else None
    if gate == "before":
        xf = xf * g
    xg = xf.view(m, n // group_size, group_size)
    if not rms:
        xg = xg - xg.mean(dim=-1, keepdim=True)
    y = xg * torch.rsqrt(xg.pow(2).mean(dim=-1, keepdim=True) + EPS)
    y = y.view(m, n) * w.float()
    if b is not None:
        y = y + b.float()
    if gate == "after":
        y = y * g
    return y.to(dtype)


def gated(backend):
    def run(x, w, b, z, group_size, gate, rms):
        return gatednorm.layernorm_fn(x, w, b, z, eps=EPS, group_size=group_size, norm_before_gate=gate != "before",
                                      is_rms_norm=rms, backend=backend)
    return run


def fresh_copy(fn, tag):
    """fn on a new code object: dynamo's cache and recompile limit are per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def floor(x, w, b, z, group_size, gate, rms):
    n = x.shape[-1]
    if rms:
        return F.rms_norm(x, (n,), w, EPS)
    return F.layer_norm(x, (n,), w, b, EPS)


# ---------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------

def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Time (wall, synchronised) and peak extra memory of one call on a device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rss = device.type == "cpu" and os.path.exists("/proc/self/clear_refs")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start_memory(self):
        gc.collect()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.cpu_rss:
            self.base = _proc_status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_memory(self) -> float | None:
        self.sync()
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated() - self.base)
        if self.cpu_rss:
            return float(_proc_status("VmHWM") - self.base)
        return None


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, grad: bool):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(case.m, case.n, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    z = torch.randn(case.m, case.n, generator=g).mul(2).to(device=device, dtype=dtype) if case.gate != "none" else None
    w = (1 + 0.5 * torch.randn(case.n, generator=g)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(case.n, generator=g)).to(device=device, dtype=dtype) if case.bias else None
    dy = torch.randn(case.m, case.n, generator=g).to(device=device, dtype=dtype) if grad else None
    leaves = [t for t in (x, w, b, z) if t is not None]
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    return x, w, b, z, dy, leaves


def call_once(fn, case, args, grad):
    """One call; returns the bytes of everything it produced (output and gradients)."""
    x, w, b, z, dy, leaves = args
    for t in leaves:
        t.grad = None
    if grad:
        y = fn(x, w, b, z, case.group_size, case.gate, case.rms)
        y.backward(dy)
        produced = [y] + [t.grad for t in leaves]
    else:
        with torch.no_grad():
            y = fn(x, w, b, z, case.group_size, case.gate, case.rms)
        produced = [y]
    return sum(t.numel() * t.element_size() for t in produced if t is not None)


def measure_memory(case, dtype, grad, impls, meter):
    """Peak extra memory of one call per implementation (after two warm-up calls), as a multiple of x's size."""
    args = make_inputs(case, dtype, meter.device, grad)
    x = args[0]
    res = {}
    for name, fn in impls.items():
        t0 = time.perf_counter()
        call_once(fn, case, args, grad)
        meter.sync()
        res[f"{name}_first_call_s"] = time.perf_counter() - t0
        call_once(fn, case, args, grad)
        for t in args[-1]:
            t.grad = None  # free the previous call's gradients before the baseline is taken
        meter.start_memory()
        produced = call_once(fn, case, args, grad)
        peak = meter.peak_memory()
        res[name] = None if peak is None else max(0.0, peak - produced) / (x.numel() * x.element_size())
    return res


def time_case(case, dtype, grad, impls, meter, reps):
    """Median wall time per implementation; every repeat runs every implementation once (interleaved)."""
    args = make_inputs(case, dtype, meter.device, grad)
    res = {}
    for name, fn in impls.items():
        meter.sync()
        t0 = time.perf_counter()
        call_once(fn, case, args, grad)  # warm-up (compiles compiled variants)
        meter.sync()
        res[name] = {"first_call_s": time.perf_counter() - t0, "times": []}
        call_once(fn, case, args, grad)
    for _ in range(reps):
        for name, fn in impls.items():
            meter.sync()
            t0 = time.perf_counter()
            call_once(fn, case, args, grad)
            meter.sync()
            res[name]["times"].append(time.perf_counter() - t0)
    for r in res.values():
        r["median_ms"] = statistics.median(r["times"]) * 1e3
        r["min_ms"] = min(r["times"]) * 1e3
        del r["times"]
    return res


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or "cpu"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def format_table(rows, names, device_label) -> str:
    lines = [f"Machine: {device_label}", ""]
    head = ["case", "dtype", "pass"] + [f"{n} ms" for n in names]
    head += ["recipe/native", "compiled/inductor"] + [f"mem {n}" for n in names if n != "floor"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in rows:
        r = row["results"]
        cells = [row["case"], row["dtype"], row["pass"]] + [f"{r[n]['median_ms']:.2f}" for n in names]
        cells.append(f"{r['recipe']['median_ms'] / r['native']['median_ms']:.1f}x" if "recipe" in r else "-")
        if "compiled" in r and "inductor" in r:
            cells.append(f"{r['compiled']['median_ms'] / r['inductor']['median_ms']:.2f}")
        else:
            cells.append("-")
        for n in names:
            if n == "floor":
                continue
            pk = r[n]["peak_extra_x"]
            cells.append("-" if pk is None else f"{pk:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows, names, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['dtype']} {r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(10, 1.1 * len(rows)), 6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [r["results"][name]["median_ms"] for r in rows]
        ax.bar([k + i * width for k in range(len(rows))], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call, ms (log)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_memory_subprocess(args, device) -> dict:
    """Peak memory, measured in a fresh process whose glibc returns every freed large block at once.

    Timing runs in this process with the default allocator settings; only the memory phase
    uses MALLOC_MMAP_THRESHOLD_ (which makes allocation-heavy code slower).
    """
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return {}
    import tempfile

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        argv = [sys.executable, os.path.abspath(__file__), "--memory-only", path, "--device", args.device,
                "--threads", str(args.threads), "--dtypes", args.dtypes, "--cases", args.cases, "--passes", args.passes]
        if args.no_compile:
            argv.append("--no-compile")
        print("# measuring peak memory in a subprocess ...", flush=True)
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--reps", type=int, default=15, help="interleaved repeats per forward measurement")
    p.add_argument("--reps-bwd", type=int, default=9, help="interleaved repeats per forward+backward measurement")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled and inductor columns")
    p.add_argument("--quick", action="store_true", help="3 repeats, no files written")
    p.add_argument("--out", default=None, help="results file stem (default: results/cpu_bench)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)  # internal: subprocess, writes JSON here
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps = args.reps_bwd = 3
    meter = Meter(device)
    impls = {"recipe": recipe, "native": gated("native")}
    if not args.no_compile:
        impls["compiled"] = gated("compiled")
        impls["inductor"] = None  # one torch.compile per case (built below)
    impls["floor"] = floor
    if device.type == "cuda" and gatednorm.ops.triton_available():
        impls["triton"] = gated("triton")
    names = list(impls)
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    label = machine_name(device)
    print(f"# {label}", flush=True)

    memory = {}
    if args.memory_only is None and not args.no_memory:
        memory = run_memory_subprocess(args, device)
    rows = []
    for case in cases:
        for dtype in dtypes:
            for pass_ in args.passes.split(","):
                run_impls = dict(impls)
                if "inductor" in run_impls:
                    run_impls["inductor"] = torch.compile(fresh_copy(recipe, len(rows)), dynamic=False)
                key = f"{case.name}|{dtype}|{pass_}"
                if args.memory_only is not None:
                    memory[key] = measure_memory(case, dtype, pass_ == "fwd+bwd", run_impls, meter)
                    print(key, memory[key], flush=True)
                    rows.append(key)
                    continue
                if device.type == "cuda" and not args.no_memory:  # caching-allocator stats, in process
                    memory[key] = measure_memory(case, dtype, pass_ == "fwd+bwd", run_impls, meter)
                reps = args.reps if pass_ == "fwd" else args.reps_bwd
                res = time_case(case, dtype, pass_ == "fwd+bwd", run_impls, meter, reps)
                for name in res:
                    res[name]["peak_extra_x"] = memory.get(key, {}).get(name)
                    res[name]["first_process_first_call_s"] = memory.get(key, {}).get(f"{name}_first_call_s")
                row = {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "pass": pass_, "results": res}
                rows.append(row)
                summary = "  ".join(f"{n}={res[n]['median_ms']:.2f}ms" for n in names)
                print(f"{case.name:32s} {row['dtype']:9s} {pass_:8s} {summary}", flush=True)
    if args.memory_only is not None:
        memory["compile_times"] = [[repr(k), t] for k, t in compiled_backend.COMPILE_TIMES]
        with open(args.memory_only, "w") as f:
            json.dump(memory, f)
        return

    table = format_table(rows, names, label)
    compile_lines = ["", "Compiled backend: first call per feature combination (= compile time), "
                     "first process (memory phase; Inductor cache as found) / timing process:", ""]
    first = dict(memory.get("compile_times", []))
    for k, t in compiled_backend.COMPILE_TIMES:
        f = first.get(repr(k))
        compile_lines.append(f"- {k[0]} {k[1:]}: {'-' if f is None else f'{f:.1f}'} s / {t:.1f} s")
    first_calls = ["", "First call (s) per row, timing process (includes torch.compile of compiled/inductor; "
                   "first process in brackets):", ""]
    for row in rows:
        fc = ", ".join(f"{n} {row['results'][n]['first_call_s']:.2f}"
                       + (f" [{row['results'][n]['first_process_first_call_s']:.2f}]"
                          if row['results'][n].get('first_process_first_call_s') is not None else "")
                       for n in names)
        first_calls.append(f"- {row['case']} {row['dtype']} {row['pass']}: {fc}")
    load = "load average (1/5/15 min) at the end of the run: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    report = "\n".join([table, "", load, *compile_lines, *first_calls])
    print()
    print(report)
    if args.quick:
        return
    os.makedirs(RESULTS, exist_ok=True)
    stem = args.out or os.path.join(RESULTS, "cpu_bench" if device.type == "cpu" else f"{device.type}_native_eager")
    cmd = "python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:])
    with open(stem + ".md", "w") as f:
        f.write(f"# gatednorm native/compiled benchmark\n\nCommand: `{cmd}`\n\n{report}\n")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": label, "command": cmd, "rows": rows}, f, indent=1)
    try:
        chart(rows, names, stem + ".png", label)
    except ImportError:  # matplotlib is a bench extra; the GPU image may lack it (plot later from the JSON)
        print(f"\nwrote {stem}.md, .json (no matplotlib: no chart)")
    else:
        print(f"\nwrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
