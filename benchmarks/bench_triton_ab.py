"""A/B timing of the Triton forward (``--backward``: backward) kernels against other versions of the triton backend.

For kernel changes that must not cost bandwidth (e.g. the range rescue's per-tile check): every
version runs interleaved on the same inputs in one process; each is reported in GB/s, as a
percentage of the copy bandwidth measured in the same run, and as a time ratio to the first one.

    python benchmarks/bench_triton_ab.py --baseline BASE [--baseline OTHER ...] [--only 4096,5120] [--rounds 5]
    python benchmarks/bench_triton_ab.py --baseline BASE --smoke      # load and compare only, no timing
    python benchmarks/bench_triton_ab.py --baseline BASE --quant fp8_e4m3[:ue8m0] [--smoke]  # forward_quant
    python benchmarks/bench_triton_ab.py --baseline BASE --graph ...  # each version inside CUDA graphs

A baseline (``BASE``) is either layout of the backend:

* an old single-file ``triton_kernels.py`` (before the backends/ restructure), loaded as a module of
  the installed ``gatednorm`` package: its ``from . import native`` and ``from .spec import NormSpec``
  resolve there (the ``gatednorm.native`` compatibility module still provides what it used);
* a folder of the new layout (``backends/triton/`` holding ``launch.py`` and ``kernels.py``), or its
  ``launch.py``: loaded as a package beside the installed ``gatednorm.backends.triton``, so its
  relative imports (``..base``, ``...spec``, ``...settings``, ``...numerics``) resolve in the
  installed package.

Either way the version must be interface-compatible with the installed package and provide
``forward(x, weight, bias, z, spec, out)`` (with ``--backward``: ``backward(dy, x, weight, bias, z, mean, rstd,
spec)``, every gradient asked for, timed on the statistics of the current forward; with ``--quant``:
``forward_quant(x, weight, bias, z, spec, qspec, q, scale)``, on bench_quant's shapes). The installed
``gatednorm.backends.triton.launch`` runs last, as "current". A label is the file's name without ``.py`` (for
a folder or a ``launch.py``, the folder's name); ``--baseline LABEL=PATH`` names it explicitly.

``--smoke`` runs every version once on a few small inputs and prints how far each is from "current"
(max |difference| of y and rstd, or with ``--backward`` of each gradient, and whether the bits agree); no
timing, no bandwidth. It needs no
GPU: on a machine without CUDA it runs on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, slow).

Before/after A/B of the backends/ restructure, on a GPU machine (from the repository root)::

    git show 1aadf03:src/gatednorm/triton_kernels.py > /tmp/old_tk.py    # last single-file version
    PYTHONPATH=src python benchmarks/bench_triton_ab.py --baseline before=/tmp/old_tk.py --smoke
    PYTHONPATH=src python benchmarks/bench_triton_ab.py --baseline before=/tmp/old_tk.py
    # or, with the GPU tests first: bash benchmarks/gpu_suite.sh ab /tmp/old_tk.py

The kernels' source moved files but should compile to the same code, so every ratio should be
within the run-to-run noise (about +-3% on the large shapes, more on the launch-bound small ones).
A later new-layout revision is compared the same way from its folder::

    mkdir -p /tmp/rev && git archive REV src/gatednorm/backends/triton | tar -x -C /tmp/rev
    PYTHONPATH=src python benchmarks/bench_triton_ab.py --baseline rev=/tmp/rev/src/gatednorm/backends/triton
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import types

import torch
from triton.testing import do_bench

import gatednorm.backends.triton.launch as current
from gatednorm.settings import env_flag
from gatednorm.spec import NormSpec, QuantSpec, quant_dtype

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import EPS, SHAPES, copy_bandwidth, make_inputs  # noqa: E402
from bench_quant import SHAPES as QUANT_SHAPES  # noqa: E402
from bench_quant import SMOKE_SHAPES as QUANT_SMOKE_SHAPES  # noqa: E402
from cuda_timing import graph_rounds  # noqa: E402

#: --smoke inputs: name, M, N, group size, rms, norm_before_gate, has_z, has_bias (small: the interpreter is slow)
SMOKE_SHAPES = [
    ("16x256 g128 rms gate-after", 16, 256, 128, True, True, True, False),
    ("8x640 one group rms gate-before", 8, 640, 640, True, False, True, False),
    ("8x512 LN+bias no gate", 8, 512, 512, False, True, False, True),
    ("3x12288 one group LN+bias gate-before", 3, 12288, 12288, False, False, True, True),  # two chunks
]


def _load_single_file(path: str, index: int) -> types.ModuleType:
    """An old ``triton_kernels.py``, as a module of the installed ``gatednorm`` package."""
    name = f"gatednorm._ab_version_{index}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "gatednorm"
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_package(folder: str, index: int) -> types.ModuleType:
    """``launch`` of a new-layout triton backend folder, as a package beside ``gatednorm.backends.triton``.

    The folder's ``__init__.py`` is not run; ``launch`` and ``kernels`` are imported from the folder.
    """
    name = f"gatednorm.backends._ab_version_{index}"
    package = types.ModuleType(name)
    package.__path__ = [folder]
    package.__package__ = name
    sys.modules[name] = package
    return importlib.import_module(f"{name}.launch")


def load_version(path: str, index: int) -> types.ModuleType:
    """A baseline: an old single-file ``triton_kernels.py``, or a new-layout folder (or its ``launch.py``)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) == "launch.py":
        folder = os.path.dirname(path)
    elif os.path.isfile(path):
        return _load_single_file(path, index)
    else:
        raise SystemExit(f"--baseline {path}: no such file or folder")
    for needed in ("launch.py", "kernels.py"):
        if not os.path.isfile(os.path.join(folder, needed)):
            raise SystemExit(f"--baseline {path}: a new-layout baseline needs {needed} in {folder}")
    return _load_package(folder, index)


def _label(arg: str) -> tuple[str, str]:
    """(label, path) of a --baseline argument: LABEL=PATH, else a name taken from the path."""
    if "=" in arg and not os.path.exists(arg):
        label, path = arg.split("=", 1)
        return label, path
    path = os.path.abspath(arg)
    if os.path.isdir(path):
        return os.path.basename(path.rstrip(os.sep)), arg
    if os.path.basename(path) == "launch.py":
        return os.path.basename(os.path.dirname(path)), arg
    return os.path.basename(path).removesuffix(".py"), arg


def load_versions(baselines: list[str]) -> dict[str, types.ModuleType]:
    versions: dict[str, types.ModuleType] = {}
    for i, arg in enumerate(baselines):
        label, path = _label(arg)
        if label in versions or label == "current":
            label = f"{label}#{i}"
        versions[label] = load_version(path, i)
    versions["current"] = current
    return versions


def _call(mod, backward: bool, x, w, b, z, dy, spec, out, stats):
    """One forward of ``mod`` into out, or (backward) one backward from the current forward's statistics."""
    if backward:
        return mod.backward(dy, x, w, b, z, *stats, spec)
    return mod.forward(x, w, b, z, spec, out)


def time_shape(versions: dict, m, n, gs, rms, nbg, has_z, has_bias, rounds,
               backward: bool = False, graph: bool = False) -> tuple[dict[str, float], int]:
    """({version: median ms of one forward (or backward) over interleaved rounds}, bytes moved)."""
    x, z, w, b, dy = make_inputs(m, n, has_z, has_bias)
    out = torch.empty_like(x)
    spec = NormSpec(EPS, gs, nbg, rms, "swish")
    stats = current.forward(x, w, b, z, spec, out)
    # bytes moved: x, z, out (bf16) and the fp32 statistics; the backward reads x, z, dy and writes dx, dz
    tensors = 2 if has_z else 1
    moved = x.numel() * 2 * ((2 * tensors + 1) if backward else (tensors + 1)) + (m * (n // gs)) * 4 * (1 if rms else 2)
    calls = {label: (lambda mod=mod: _call(mod, backward, x, w, b, z, dy, spec, out, stats))
             for label, mod in versions.items()}
    return _median_times(calls, rounds, graph), moved


def _median_times(calls: dict, rounds: int, graph: bool) -> dict[str, float]:
    """{label: median ms per call over interleaved rounds}: do_bench with L2 flushed, or (``graph``) each call in
    its own CUDA graph of 100 calls (cuda_timing.graph_rounds: the kernels without the host's launch gaps, the
    figure issue 14's and 16's small-shape goals are read on)."""
    if graph:
        times = graph_rounds(calls, 100, rounds)
    else:
        times = {label: [] for label in calls}
        for _ in range(rounds):
            for label, call in calls.items():
                times[label].append(do_bench(call, warmup=25, rep=100, return_mode="median"))
    return {label: statistics.median(t) for label, t in times.items()}


def _quant_inputs(shape, quant: str, fmt: str, device: torch.device, seed: int = 0):
    """x, z, w, b, NormSpec, QuantSpec and fresh (q, scale (M, G)) for a bench_quant.SHAPES entry."""
    _, m, n, gs, rms, nbg, has_z, has_bias, block = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
    z = torch.randn(m, n, generator=g).to(device, torch.bfloat16) if has_z else None
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16)
    b = (0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16) if has_bias else None
    qspec = QuantSpec(quant, block or n, fmt, "none", False)
    return x, z, w, b, NormSpec(EPS, gs, nbg, rms, "swish"), qspec


def _quant_outputs(x: torch.Tensor, qspec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape
    return (torch.empty(m, n, dtype=quant_dtype(qspec.quant), device=x.device),
            torch.empty(m, n // qspec.block, dtype=torch.float32, device=x.device))


def time_quant_shape(versions: dict, shape, quant: str, fmt: str, rounds: int,
                     graph: bool = False) -> tuple[dict[str, float], int] | None:
    """({version: median ms of one fused quantized forward (forward_quant) over interleaved rounds}, bytes moved:
    x, z read, q and the scales written), or None where the fused kernel does not cover the layout."""
    x, z, w, b, spec, qspec = _quant_inputs(shape, quant, fmt, torch.device("cuda"))
    q, scale = _quant_outputs(x, qspec)
    if not current.forward_quant(x, w, b, z, spec, qspec, q, scale):
        return None
    m, n = x.shape
    moved = x.numel() * 2 * (2 if z is not None else 1) + m * n + scale.numel() * 4
    calls = {label: (lambda mod=mod: mod.forward_quant(x, w, b, z, spec, qspec, q, scale))
             for label, mod in versions.items()}
    return _median_times(calls, rounds, graph), moved


def smoke_quant(versions: dict, quant: str, fmt: str) -> int:
    """Every version's fused quantized forward once per bench_quant.SMOKE_SHAPES input: q and the scales against
    "current", bit for bit. Returns 1 on an error."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not env_flag("TRITON_INTERPRET"):
        print("no CUDA device: set TRITON_INTERPRET=1 to run the kernels on CPU tensors", file=sys.stderr)
        return 1
    print(f"smoke on {device}, {quant} {fmt}; per version: q and scales bits equal to current's")
    failed = 0
    for shape in QUANT_SMOKE_SHAPES:
        x, z, w, b, spec, qspec = _quant_inputs(shape, quant, fmt, device)
        results = {}
        for label, mod in versions.items():
            q, scale = _quant_outputs(x, qspec)
            try:
                covered = mod.forward_quant(x, w, b, z, spec, qspec, q, scale)
            except Exception as e:  # report and go on: one broken baseline should not hide the others
                print(f"  {shape[0]}: {label} failed: {type(e).__name__}: {e}")
                failed = 1
                continue
            results[label] = (q.view(torch.uint8) if q.dtype != torch.int8 else q, scale.view(torch.int32)) \
                if covered else None
        ref = results.get("current")
        cells = [f"{label} " + ("not covered" if got is None else "bits equal" if ref is not None
                                and all(torch.equal(a, r) for a, r in zip(got, ref, strict=True)) else "DIFFER")
                 for label, got in results.items() if label != "current"]
        if any("DIFFER" in c for c in cells):
            failed = 1
        print(f"  {shape[0]}: " + "; ".join(cells), flush=True)
    return failed


def smoke(versions: dict, backward: bool = False) -> int:
    """Every version once per SMOKE_SHAPES input; print its distance from "current" (the forward's y and rstd, or
    the backward's gradients). Returns 1 on an error."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not env_flag("TRITON_INTERPRET"):
        print("no CUDA device: set TRITON_INTERPRET=1 to run the kernels on CPU tensors", file=sys.stderr)
        return 1
    print(f"smoke on {device}; per version: " + ("max |grad - grad_current| over dx, dz, dweight, dbias, bits equal"
                                                 if backward else
                                                 "max |y - y_current|, max |rstd - rstd_current|, bits equal"))
    failed = 0
    for name, m, n, gs, rms, nbg, has_z, has_bias in SMOKE_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
        z = torch.randn(m, n, generator=g).to(device, torch.bfloat16) if has_z else None
        w = (1 + 0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16)
        b = (0.1 * torch.randn(n, generator=g)).to(device, torch.bfloat16) if has_bias else None
        spec = NormSpec(EPS, gs, nbg, rms, "swish")
        dy = torch.randn(m, n, generator=g).to(device, torch.bfloat16)
        stats = current.forward(x, w, b, z, spec, torch.empty_like(x))
        results = {}
        for label, mod in versions.items():
            out = torch.empty_like(x)
            try:
                got = _call(mod, backward, x, w, b, z, dy, spec, out, stats)
            except Exception as e:  # report and go on: one broken baseline should not hide the others
                print(f"  {name}: {label} failed: {type(e).__name__}: {e}")
                failed = 1
                continue
            results[label] = tuple(t.float() for t in (got if backward else (out, got[1])) if t is not None)
        ref = results.get("current")
        cells = []
        for label, got in results.items():
            if label == "current":
                continue
            if ref is None:
                cells.append(f"{label} ran")
                continue
            diffs = " ".join(f"{(a - r).abs().max().item():.1e}" for a, r in zip(got, ref, strict=True))
            same = all(torch.equal(a, r) for a, r in zip(got, ref, strict=True))
            cells.append(f"{label} {diffs} {'bits equal' if same else 'DIFFER'}")
        print(f"  {name}: " + "; ".join(cells), flush=True)
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", action="append", required=True,
                    help="[LABEL=]PATH of another version: an old triton_kernels.py, or a new-layout "
                         "backends/triton folder (or its launch.py); repeatable; ratios are to the first")
    ap.add_argument("--only", default="", help="comma-separated substrings of shape names (bench_gpu.SHAPES)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved do_bench rounds per version")
    ap.add_argument("--backward", action="store_true", help="time (or compare) the backward instead of the forward")
    ap.add_argument("--quant", default=None, metavar="QUANT[:FORMAT]",
                    help="time (or compare) the fused quantized forward (forward_quant) instead, on bench_quant's "
                         "shapes, e.g. fp8_e4m3, fp8_e4m3:ue8m0, int8")
    ap.add_argument("--graph", action="store_true",
                    help="time each version inside CUDA graphs of 100 calls instead of eagerly with L2 flushed")
    ap.add_argument("--smoke", action="store_true",
                    help="load every version and compare it with current on small inputs; no timing "
                         "(CPU: needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    versions = load_versions(args.baseline)
    quant, _, fmt = (args.quant or "").partition(":")
    fmt = fmt or "float32"
    if args.smoke:
        sys.exit(smoke_quant(versions, quant, fmt) if args.quant else smoke(versions, args.backward))
    first = next(iter(versions))
    copy_gbps = copy_bandwidth()
    what = f"fused quantized forward {quant} {fmt}" if args.quant else "backward" if args.backward else "forward"
    what += ", in CUDA graphs" if args.graph else ", eagerly (L2 flushed)"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy bandwidth {copy_gbps:.0f} GB/s; "
          f"{what}, per version: ms, % of copy, time / {first}")
    print(f"{'shape':38s} " + " ".join(f"{label[:24]:>26s}" for label in versions))
    for shape in QUANT_SHAPES if args.quant else SHAPES:
        name = shape[0]
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        if args.quant:
            timed = time_quant_shape(versions, shape, quant, fmt, args.rounds, args.graph)
            if timed is None:
                print(f"{name:38s} not covered by the fused kernel")
                continue
            ms, moved = timed
        else:
            ms, moved = time_shape(versions, *shape[1:], args.rounds, args.backward, args.graph)
        cells = [f"{t:8.4f} {100 * moved / (t * 1e-3) / 1e9 / copy_gbps:5.1f}% {t / ms[first]:6.3f}x"
                 for t in ms.values()]
        print(f"{name:38s} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
