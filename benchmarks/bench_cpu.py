"""CPU (or any eager device) benchmark of the native and compiled backends against the straightforward recipe.

For each shape x dtype x {forward, forward+backward} it times, interleaved within one run
(each repeat calls every implementation once, medians are reported):

* ``recipe``   - the migration guide's straightforward code: a chain of full-size float32
                 temporaries (x.float(), silu(z.float()), view groups, pow/mean/rsqrt, weight,
                 gate, .to(dtype)); fwd+bwd is autograd through it;
* ``native``   - gatednorm, backend="native" (on CPU: its C forward kernel where a C compiler built it,
                 PyTorch ops in small row blocks otherwise and for the backward; over worker threads);
* ``native blocks`` - the same with the C kernel switched off (shown where the kernel is built);
* ``compiled`` - gatednorm, backend="compiled" (the native formula under torch.compile);
* ``inductor`` - torch.compile of the recipe (what a user gets by compiling the recipe);
* ``floor``    - PyTorch's own norm on x alone (F.rms_norm / F.layer_norm: no gate, one group per row),
                 for scale: what the plain norm of that size costs in eager PyTorch. F.layer_norm is one
                 fused kernel; F.rms_norm on CPU is itself a chain of ops, so native can beat it;
* ``triton``   - gatednorm, backend="triton" (only with --device cuda and Triton present).

Contention (CPU, on by default for full runs, ``--contention`` / ``--no-contention``): every row is
timed twice, quiet and then while a busy process spins pinned to one core (``os.sched_setaffinity``;
the script starts and stops it). Real machines are shared: a backend whose parallel regions wait for a
descheduled thread collapses there. The tables show ``quiet / busy`` side by side.

Background load: the load average is printed at the start and the end, and every timing phase records
the CPU time that *other* processes (not this one, not its spinner) used meanwhile, as a share of one
core (column ``others``). A quiet row with a large share was disturbed; re-run when the machine is idle.

Peak memory (CPU): growth of the process's RSS high-water mark during one call, after a
warm-up call, minus the call's outputs (y, statistics, gradients): the temporaries the call
needed beyond its inputs and outputs, reported as a multiple of x's size. The script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves large blocks with mmap and returns
them at free (otherwise freed temporaries stay resident and hide later peaks); the high-water
mark is reset through ``/proc/self/clear_refs``. On CUDA: ``torch.cuda.max_memory_allocated``.

Large temporaries and outputs (``--malloc``): glibc serves a block of 128 KiB or more with a fresh mmap
(first-touch page faults on every call) until one such block is freed, after which its threshold rises
to that size (up to 32 MiB) and later blocks come from the heap, reused without faults. Which of the two a
16-32 MiB block gets depends on the process's history: the recipe's LayerNorm bf16 4096x2048 forward took
20 ms with reused memory and 50-60 ms with fresh memory on the 2-core VM, and 34.6-71 ms in full runs.
``--malloc default`` (the default) leaves glibc as users have it; ``reuse`` re-executes the script with a
fixed high threshold (blocks reused: compute-bound timings), ``fresh`` with a fixed low one (every large
block faulted in on every call). The mode is recorded in the results file.

    python benchmarks/bench_cpu.py                      # full run (quiet + busy), writes benchmarks/results/cpu_bench.*
    python benchmarks/bench_cpu.py --quick              # fewer repeats, quiet only, no files
    python benchmarks/bench_cpu.py --device cuda        # eager GPU timing (adds the triton column)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import signal
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
from gatednorm.backends import native_cpu_kernel  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: --malloc modes: glibc's settings for the timing process (see the module docstring).
MALLOC_MODES = {
    "default": {},
    "reuse": {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)},
    "fresh": {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
}
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

#: What each column means, printed under every table (``make run`` shows it to new users): (column, text),
#: shown when the table has that column.
LEGEND = [
    ("recipe", "the straightforward float32 code (x.float(), silu(z.float()), pow/mean/rsqrt, weight, gate, .to)"),
    ("native", "gatednorm backend=\"native\" (on CPU, float32/bf16: its C kernel, forward and backward, one pass\n"
               "            per row, where a C compiler built it; other dtypes: PyTorch ops in small row blocks;\n"
               "            the C kernel on PyTorch's OpenMP threads, or gatednorm's own pool while those start\n"
               "            late; the row blocks on that pool)"),
    ("native blocks", "the same with the C kernel switched off: PyTorch ops in small row blocks (the fallback)"),
    ("compiled", "gatednorm backend=\"compiled\" (the same formula under torch.compile)"),
    ("inductor", "torch.compile of the recipe"),
    ("floor", "PyTorch's own norm of x alone (F.rms_norm / F.layer_norm, no gate, one group per row), for\n"
              "            scale; F.layer_norm is one fused kernel, F.rms_norm on CPU a chain of ops that native\n"
              "            can beat"),
    ("triton", "gatednorm backend=\"triton\""),
    ("recipe/native", "speed-up of native over the recipe (higher is better)"),
    ("native busy/quiet", "how much slower native runs with one core busy (recipe busy/quiet: the same for\n"
                          "            the recipe)"),
    ("compiled/inductor", "time of the compiled backend over the compiled recipe (1.0: as fast)"),
    ("others", "share of one core that other processes used while the row was timed: a large share means the\n"
               "            row was disturbed"),
    ("mem", "extra peak memory of one call beyond its inputs and outputs, as a multiple of x's size"),
]


def legend(columns: list[str], busy: bool) -> str:
    lines = ["Columns (median ms per call" + ('; "quiet / busy": both measured, busy = a process spinning pinned to '
                                         "one core, started and stopped by this script" if busy else "") + "):"]
    for name, text in LEGEND:
        if name in columns:
            lines.append(f"  {name:9s} {text}" if len(name) <= 9 else f"  {name}  {text}")
    return "\n".join(lines)


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


def block_kernels(fn):
    """fn with the native backend's C forward kernel switched off (the pure-PyTorch block kernels)."""
    def run(*args):
        with native_cpu_kernel.enabled(False):
            return fn(*args)
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


class Background:
    """CPU time of *other* processes during a phase, as a share of one core (Linux /proc; None elsewhere).

    Busy jiffies of the whole machine (/proc/stat) minus those of this process and of ``own_pids``
    (the spinner): what someone else's work took from the cores while we measured.
    """

    def __init__(self, own_pids=()):
        self.own_pids = tuple(own_pids)
        self.ok = os.path.exists("/proc/stat")
        self.tick = os.sysconf("SC_CLK_TCK") if self.ok else 100

    @staticmethod
    def _machine_busy() -> int:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait

    def _own(self) -> int:
        total = 0
        for pid in ("self", *map(str, self.own_pids)):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
            except (OSError, IndexError, ValueError):
                pass
        return total

    def __enter__(self):
        if self.ok:
            self.t0, self.busy0, self.own0 = time.perf_counter(), self._machine_busy(), self._own()
        return self

    def __exit__(self, *exc):
        self.share = None
        if self.ok:
            wall = time.perf_counter() - self.t0
            other = (self._machine_busy() - self.busy0) - (self._own() - self.own0)
            self.share = max(0.0, other / self.tick / wall) if wall > 0 else None
        return False


class Spinner:
    """A busy process pinned to one core for the duration of a ``with`` block (the contended runs).

    It also stops by itself once this process is gone (it checks its parent about every 10 ms), so an
    interrupted benchmark never leaves a core spinning.
    """

    CODE = ("import os, sys\n"
            "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
            "parent = os.getppid()\n"
            "while os.getppid() == parent:\n"
            "    for _ in range(100000):\n"
            "        pass\n")

    def __init__(self, cpu: int):
        self.cpu = cpu
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(self.cpu)])
        time.sleep(0.3)  # let it start and settle on its core
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False

    @property
    def pid(self) -> int:
        return self.proc.pid


def spinner_cpu() -> int | None:
    """The core the spinner takes: the last one this process may run on (None: no affinity API)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > 1 else None


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
    """Median wall time per implementation; every repeat runs every implementation once (interleaved), in
    an order shuffled per repeat (seeded: the same orders every run). An implementation pays for what the
    one before it left behind (threads asleep, OpenMP's spinning, caches, the heap), so none may always
    follow the same one (compiled after native: LayerNorm bf16 4096x2048 forward 2.33 ms, after inductor
    1.83; a rotated order would keep every implementation's predecessor)."""
    args = make_inputs(case, dtype, meter.device, grad)
    res = {}
    for name, fn in impls.items():
        meter.sync()
        t0 = time.perf_counter()
        call_once(fn, case, args, grad)  # warm-up (compiles compiled variants)
        meter.sync()
        res[name] = {"first_call_s": time.perf_counter() - t0, "times": []}
        call_once(fn, case, args, grad)
    for rep in range(reps):
        order = list(impls.items())
        random.Random(rep).shuffle(order)
        for name, fn in order:
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


def load_line(when: str) -> str:
    try:
        return f"load average (1/5/15 min) {when}: " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return f"load average {when}: unavailable"


def _ms(r: dict | None, name: str) -> float | None:
    return None if r is None or name not in r else r[name]["median_ms"]


def _pair(q: float | None, c: float | None, fmt: str = "{:.2f}") -> str:
    if q is None:
        return "-"
    return fmt.format(q) if c is None else f"{fmt.format(q)} / {fmt.format(c)}"


def format_table(rows, names, device_label, memory: bool) -> str:
    busy = any(row.get("busy") for row in rows)
    lines = [f"Machine: {device_label}", ""]
    head = ["case", "dtype", "pass"] + [f"{n} ms" for n in names] + ["recipe/native"]
    if busy:
        head += ["native busy/quiet", "recipe busy/quiet"]
    if "compiled" in names and "inductor" in names:
        head.append("compiled/inductor")
    head.append("others (share of a core)")
    if memory:
        head += [f"mem {n}" for n in names if n != "floor"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in rows:
        q, c = row["results"], row.get("busy")
        cells = [row["case"], row["dtype"], row["pass"]] + [_pair(_ms(q, n), _ms(c, n)) for n in names]
        speed = lambda r: None if r is None else _ms(r, "recipe") / _ms(r, "native")  # noqa: E731
        cells.append(_pair(speed(q), speed(c), "{:.1f}x"))
        if busy:
            cells.append(f"{_ms(c, 'native') / _ms(q, 'native'):.2f}" if c else "-")
            cells.append(f"{_ms(c, 'recipe') / _ms(q, 'recipe'):.2f}" if c else "-")
        if "compiled" in names and "inductor" in names:
            cells.append(_pair(_ms(q, "compiled") / _ms(q, "inductor"),
                               _ms(c, "compiled") / _ms(c, "inductor") if c else None))
        others = row.get("others", {})
        cells.append(_pair(others.get("quiet"), others.get("busy"), "{:.2f}"))
        if memory:
            for n in names:
                if n != "floor":
                    pk = q[n].get("peak_extra_x")
                    cells.append("-" if pk is None else f"{pk:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows, names, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['dtype']} {r['pass']}" for r in rows]
    busy = any(r.get("busy") for r in rows)
    series = [(n, "results", "") for n in names] + ([(n, "busy", " (busy)") for n in ("recipe", "native")]
                                                   if busy else [])
    fig, ax = plt.subplots(figsize=(max(10, 1.3 * len(rows)), 6))
    width = 0.8 / len(series)
    for i, (name, key, suffix) in enumerate(series):
        vals = [(r.get(key) or {}).get(name, {}).get("median_ms", float("nan")) for r in rows]
        ax.bar([k + i * width for k in range(len(rows))], vals, width, label=name + suffix,
               hatch="//" if suffix else None)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call, ms (log)")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
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
    p.add_argument("--quick", action="store_true", help="3 repeats, quiet only, no files written")
    p.add_argument("--contention", action=argparse.BooleanOptionalAction, default=None,
                   help="also time every row with one core busy (default: on for full CPU runs, off with --quick)")
    p.add_argument("--out", default=None, help="results file stem (default: results/cpu_bench)")
    p.add_argument("--note", default="", help="a paragraph for the results file (run conditions, caveats)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--malloc", choices=sorted(MALLOC_MODES), default="default",
                   help="glibc's large-block policy for the timings: as is, reused heap blocks, or fresh mmaps")
    p.add_argument("--memory-only", default=None, help=argparse.SUPPRESS)  # internal: subprocess, writes JSON here
    args = p.parse_args(argv)
    if args.memory_only is None and os.environ.get("GATEDNORM_BENCH_MALLOC", "default") != args.malloc:
        # glibc reads these once, at start-up: run the script again with them set
        knobs = {k for mode in MALLOC_MODES.values() for k in mode}  # cleared first: "default" means unset
        env = {k: v for k, v in os.environ.items() if k not in knobs}
        env.update(GATEDNORM_BENCH_MALLOC=args.malloc, **MALLOC_MODES[args.malloc])
        script_args = list(argv) if argv is not None else sys.argv[1:]
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *script_args], env)
    # SIGTERM unwinds like Ctrl-C, so the spinner's with-block stops it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps = args.reps_bwd = 3
    contention = args.contention if args.contention is not None else not args.quick
    busy_cpu = spinner_cpu() if device.type == "cpu" and contention and args.memory_only is None else None
    if contention and busy_cpu is None and args.memory_only is None:
        print("# contention runs need a CPU device and at least 2 cores this process may use: skipped")
    meter = Meter(device)
    impls = {"recipe": recipe, "native": gated("native")}
    if device.type == "cpu" and native_cpu_kernel.library() is not None:
        impls["native blocks"] = block_kernels(gated("native"))
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
    if args.memory_only is None:
        print(f"# {label}")
        print(f"# {load_line('at the start')}", flush=True)

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
                grad = pass_ == "fwd+bwd"
                if args.memory_only is not None:
                    memory[key] = measure_memory(case, dtype, grad, run_impls, meter)
                    print(key, memory[key], flush=True)
                    rows.append(key)
                    continue
                if device.type == "cuda" and not args.no_memory:  # caching-allocator stats, in process
                    memory[key] = measure_memory(case, dtype, grad, run_impls, meter)
                reps = args.reps if pass_ == "fwd" else args.reps_bwd
                with Background() as quiet_bg:
                    res = time_case(case, dtype, grad, run_impls, meter, reps)
                busy = others_busy = None
                if busy_cpu is not None:
                    with Spinner(busy_cpu) as spinner, Background([spinner.pid]) as busy_bg:
                        busy = time_case(case, dtype, grad, run_impls, meter, reps)
                    others_busy = busy_bg.share
                for name in res:
                    res[name]["peak_extra_x"] = memory.get(key, {}).get(name)
                    res[name]["first_process_first_call_s"] = memory.get(key, {}).get(f"{name}_first_call_s")
                row = {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "pass": pass_, "results": res,
                       "busy": busy, "others": {"quiet": quiet_bg.share, "busy": others_busy}}
                rows.append(row)
                summary = "  ".join(f"{n}={_pair(_ms(res, n), _ms(busy, n))}ms" for n in names)
                print(f"{case.name:32s} {row['dtype']:9s} {pass_:8s} {summary}", flush=True)
    if args.memory_only is not None:
        memory["compile_times"] = [[repr(k), t] for k, t in compiled_backend.COMPILE_TIMES]
        with open(args.memory_only, "w") as f:
            json.dump(memory, f)
        return

    table = format_table(rows, names, label, memory=bool(memory))
    busy = any(row["busy"] for row in rows)
    columns = names + ["recipe/native", "others"] + (["native busy/quiet"] if busy else [])
    columns += ["compiled/inductor"] if "compiled" in names and "inductor" in names else []
    columns += ["mem"] if memory else []
    sections = [table, "", legend(columns, busy), "", load_line("at the end")]
    if compiled_backend.COMPILE_TIMES:
        sections += ["", "Compiled backend: first call per feature combination (= compile time), "
                     "first process (memory phase; Inductor cache as found) / timing process:", ""]
        first = dict(memory.get("compile_times", []))
        for k, t in compiled_backend.COMPILE_TIMES:
            f = first.get(repr(k))
            sections.append(f"- {k[0]} {k[1:]}: {'-' if f is None else f'{f:.1f}'} s / {t:.1f} s")
    if not args.quick:
        sections += ["", "First call (s) per row, timing process (includes torch.compile of compiled/inductor; "
                     "first process in brackets):", ""]
        for row in rows:
            fc = ", ".join(f"{n} {row['results'][n]['first_call_s']:.2f}"
                           + (f" [{row['results'][n]['first_process_first_call_s']:.2f}]"
                              if row['results'][n].get('first_process_first_call_s') is not None else "")
                           for n in names)
            sections.append(f"- {row['case']} {row['dtype']} {row['pass']}: {fc}")
    report = "\n".join(sections)
    print()
    print(report)
    if args.quick:
        return
    os.makedirs(RESULTS, exist_ok=True)
    stem = args.out or os.path.join(RESULTS, "cpu_bench" if device.type == "cpu" else f"{device.type}_native_eager")
    shown = [a for i, a in enumerate(sys.argv[1:]) if not (a.startswith("--note") or sys.argv[i] == "--note")]
    cmd = "python benchmarks/bench_cpu.py " + " ".join(shown)  # the note is printed as such
    with open(stem + ".md", "w") as f:
        note = f"{args.note}\n\n" if args.note else ""
        f.write(f"# gatednorm native/compiled benchmark\n\nCommand: `{cmd}`\n\n{note}{report}\n")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": label, "command": cmd, "note": args.note, "busy_cpu": busy_cpu, "rows": rows}, f,
                  indent=1)
    try:
        chart(rows, names, stem + ".png", label)
    except ImportError:  # matplotlib is a bench extra; the GPU image may lack it (plot later from the JSON)
        print(f"\nwrote {stem}.md, .json (no matplotlib: no chart)")
    else:
        print(f"\nwrote {stem}.md, .json, .png")


if __name__ == "__main__":
    main()
