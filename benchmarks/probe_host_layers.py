"""Where an eager call's host time goes, layer by layer (issue 16, item 3): CUDA only.

bench_host.py times whole calls; this times each layer of the planned eager path on its own, back to back
(``time.perf_counter`` over ``--calls`` calls, median of ``--repeats``, rows interleaved per repeat), so the
difference between two rows is what the layer between them costs:

* floors: ``torch.mul(x, z, out=y)``, ``torch.mul(x, z)`` (one allocation more), ``torch.empty_like(x)``,
  ``torch.empty`` of the statistics, the current raw stream, four ``data_ptr`` reads;
* the Triton C launcher of the cached forward kernel called with fixed addresses (the launch alone), with and
  without the PDL launch attribute;
* the least Python a planned forward can run (two allocations, the addresses, the stream, the C launcher with
  a prebuilt argument tail: the floor of a flatter plan);
* the forward plan (``ForwardPlan.__call__``: allocate, read addresses, launch), the eager plan's
  ``forward_rows``, ``ops.planned_forward`` (signature key and lookup), ``layer_norm_fwd`` and ``rmsnorm_fn``
  (no grad); the key's parts (``_signature_key``, ``_plannable_call``, ``needs_autograd``) alone, and the whole
  of it (``_call_signature``) with the tensors' part in Python and from the C++ ``call_key``;
* backward: the backward plan with saved tensors (allocate 4, launch 2), ``launch.backward`` (the unplanned
  path), the Function's forward with grad on, ``torch.autograd.grad`` of rmsnorm_fn, and the autograd pair
  ``(x * z)`` backward, the floor of the engine.

    PYTHONPATH=src python benchmarks/probe_host_layers.py --shape 8192x128 [--json OUT.json]
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
import gatednorm  # noqa: E402
from gatednorm import ops  # noqa: E402
from gatednorm.backends import base as backend_base  # noqa: E402
from gatednorm.backends.base import GradsNeeded  # noqa: E402
from gatednorm.backends.triton import cxx_plans, launch, plans  # noqa: E402

EPS = 1e-6


def rows_for(m: int, n: int) -> dict:
    if cxx_plans.ENABLED:
        cxx_plans.extension()  # built here, so that the plans below attach to it
    gen = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    x, z, dy = (torch.randn(m, n, device="cuda", generator=gen).to(bf) for _ in range(3))
    w = (torch.randn(n, device="cuda", generator=gen) * 0.1 + 1).to(bf)
    y = torch.empty_like(x)
    stats = m  # one group of n per row
    for _ in range(3):  # compile every variant the plans look up, then build the plans
        gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, is_rms_norm=True)
        xg, zg, wg = (t.detach().requires_grad_(True) for t in (x, z, w))
        torch.autograd.grad(gatednorm.rmsnorm_fn(xg, wg, None, zg, EPS), (xg, zg, wg), dy)
    key, _ = ops._call_signature(x, w, None, z, EPS, None, True, True, "swish", None)
    eager = ops._PLANS[key]
    fplan, bplan = eager.launch, eager.backward_launch
    if fplan is None or bplan is None:
        raise SystemExit("no triton plan for this signature (fast launch off? not CUDA?)")
    done = fplan(x, w, None, z)
    if done is None or bplan(dy, x, w, None, z, None, done[2], GradsNeeded(True, True, True, False)) is None:
        raise SystemExit("the plans did not serve the call after three warm-up calls")
    rstd = done[2]
    variant = next(iter(fplan.variants))
    pdl, groups_fastest, after = variant[2:]
    constexprs = fplan.constexprs[(pdl, groups_fastest, after)][0]
    # the launcher launch._launch cached for that forward (its key: kernel, device, warps, PDL, constexprs, spec)
    entry = next(v for k, v in launch._COMPILED.items()
                 if k[0] is launch.fwd_kernel and k[3] == pdl and k[4] == constexprs)
    _, run, function, packed, direct, cooperative, pdl_flag = entry
    index = fplan.index
    hooks = plans._launch_hooks(index)
    tiles = -(-m // fplan.rows)
    grid = (fplan.groups, tiles) if groups_fastest else (tiles, fplan.groups)
    ptrs = (x.data_ptr(), None, z.data_ptr(), w.data_ptr(), None, y.data_ptr(), None, None, rstd.data_ptr())
    tail = (m, *fplan.fixed_args, *constexprs)
    stream = torch._C._cuda_getCurrentRawStream(index)

    def raw_launch(flag):
        return lambda: direct(grid[0], grid[1], 1, stream, function, cooperative, flag, None, None, packed, None,
                              *hooks, *ptrs, *tail)

    enter, leave = hooks
    fixed_tail = (*fplan.fixed_args, *constexprs)
    contiguous, f32, dev, groups = torch.contiguous_format, torch.float32, x.device, fplan.groups

    def python_key(fn):  # fn with the eager plans' keys built in Python (no C++ call_key)
        def run():
            saved, backend_base.call_key = backend_base.call_key, None
            try:
                return fn()
            finally:
                backend_base.call_key = saved
        return run

    def minimal_forward():  # the least Python a planned forward can run: what a flatter plan could reach
        y_ = torch.empty_like(x, memory_format=contiguous)
        r_ = torch.empty(groups * m, dtype=f32, device=dev)
        direct(grid[0], grid[1], 1, torch._C._cuda_getCurrentRawStream(index), function, cooperative, pdl_flag,
               None, None, packed, None, enter, leave, x.data_ptr(), None, z.data_ptr(), w.data_ptr(), None,
               y_.data_ptr(), None, None, r_.data_ptr(), m, *fixed_tail)
        return y_, None, r_

    # the same plan kept in Python (its C++ entry detached), and the C++ entry alone where it is in use
    native = fplan.native_forward
    py_plan = plans.ForwardPlan(x, w, None, z, eager.spec, None, launch.RESCUE_SCAN_ROWS, None)  # the backend's
    py_plan.native_forward, py_plan.native_wanted = None, False
    if py_plan(x, w, None, z) is None:
        raise SystemExit("the Python plan did not serve the call")
    py_bplan = plans.BackwardPlan(x, w, None, z, eager.spec, None)
    py_bplan.native_backward, py_bplan.native_wanted = None, False
    if py_bplan(dy, x, w, None, z, None, rstd, GradsNeeded(True, True, True, False)) is None:
        raise SystemExit("the Python backward plan did not serve the call")
    print(f"cxx_plans: {cxx_plans.status()}")
    needs = GradsNeeded(True, True, True, False)
    xg, zg, wg = (t.detach().requires_grad_(True) for t in (x, z, w))
    xa, za = x.detach().requires_grad_(True), z.detach().clone().requires_grad_(True)
    spec = eager.spec
    out = {
        "torch.mul(x, z, out=y)": lambda: torch.mul(x, z, out=y),
        "torch.mul(x, z)": lambda: torch.mul(x, z),
        "torch.empty_like(x)": lambda: torch.empty_like(x, memory_format=torch.contiguous_format),
        "torch.empty(stats, f32)": lambda: torch.empty(stats, dtype=torch.float32, device=x.device),
        "raw stream": lambda: torch._C._cuda_getCurrentRawStream(index),
        "4x data_ptr": lambda: (x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr()),
        "_launch_hooks": lambda: plans._launch_hooks(index),
        "C launch, pdl flag as cached": raw_launch(pdl_flag),
        "C launch, pdl flag 0": raw_launch(0),
        "minimal forward (allocate 2, launch)": minimal_forward,
        "ForwardPlan()": lambda: fplan(x, w, None, z),
        "ForwardPlan() in Python": lambda: py_plan(x, w, None, z),
        "cxx_plans C++ call": (lambda: native(fplan.native_address, x, z, w, None)) if native else None,
        "_EagerPlan.forward_rows": lambda: eager.forward_rows(x, w, None, z),
        "_plannable_call": lambda: ops._plannable_call(x),
        "needs_autograd": lambda: ops.needs_autograd(x, w, None, z),
        "_signature_key": lambda: ops._signature_key(x, w, None, z, EPS, None, True, True, "swish", None),
        "_call_signature, Python key": python_key(
            lambda: ops._call_signature(x, w, None, z, EPS, None, True, True, "swish", None)),
        "_call_signature": lambda: ops._call_signature(x, w, None, z, EPS, None, True, True, "swish", None),
        "planned_forward": lambda: ops.planned_forward(x, w, None, z, EPS, None, True, True, "swish", None),
        "layer_norm_fwd": lambda: gatednorm.layer_norm_fwd(x, w, None, EPS, z=z, is_rms_norm=True),
        "layer_norm_fwd (bench_gpu's kwargs)": lambda: gatednorm.layer_norm_fwd(
            x, w, None, EPS, z=z, group_size=x.shape[1], norm_before_gate=True, is_rms_norm=True, backend="triton"),
        "rmsnorm_fn (no grad)": lambda: gatednorm.rmsnorm_fn(x, w, None, z, EPS),
        "launch.forward (unplanned)": lambda: launch.forward(x, w, None, z, spec, y),
        "BackwardPlan()": lambda: bplan(dy, x, w, None, z, None, rstd, needs),
        "BackwardPlan() in Python": lambda: py_bplan(dy, x, w, None, z, None, rstd, needs),
        "launch.backward (unplanned)": lambda: launch.backward(dy, x, w, None, z, None, rstd, spec, *needs),
        "rmsnorm_fn forward, grad on": lambda: gatednorm.rmsnorm_fn(xg, wg, None, zg, EPS),
        "rmsnorm_fn fwd+bwd (autograd.grad)": lambda: torch.autograd.grad(
            gatednorm.rmsnorm_fn(xg, wg, None, zg, EPS), (xg, zg, wg), dy),
        "autograd pair (x * z), grad": lambda: torch.autograd.grad(xa * za, (xa, za), dy),
        "x * z, grad on (forward only)": lambda: xa * za,
    }
    return {k: f for k, f in out.items() if f is not None}


def time_rows(rows: dict, calls: int, repeats: int) -> dict:
    samples = {k: [] for k in rows}
    for f in rows.values():
        for _ in range(20):
            f()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for k, f in rows.items():
            n = calls // 4 if "grad" in k else calls
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            torch.cuda.synchronize()
            samples[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x128")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    result = time_rows(rows_for(m, n), args.calls, args.repeats)
    floor = result["torch.mul(x, z, out=y)"]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; {args.shape} bf16 gated RMSNorm; "
          f"host us per call, back to back, median of {args.repeats}")
    for k, us in result.items():
        print(f"LAYER {k:42s} {us:7.2f} us  {us / floor:5.2f}x torch.mul(out=)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                       "us_per_call": result}, f, indent=1)


if __name__ == "__main__":
    main()
