"""Host time per call of gatednorm's eager API, against the cheapest PyTorch calls on the same tensors.

Issue 16, item 3: a gated norm call should cost little more host time than one elementwise op. Each
row is the host microseconds one call takes, timed with ``time.perf_counter`` over ``--calls``
back-to-back calls (median of ``--repeats``; the cases are interleaved within each repeat, so drift of
the machine hits them alike). On CUDA, ``torch.cuda.synchronize()`` runs only outside the timed loop:
the kernels are queued, not waited for, so the numbers are the launch path (Python, dispatch, allocation,
kernel launch), which is what limits small calls.

Rows (x, z of ``--shape`` in ``--dtype``, weight (N,), gated RMSNorm with ``--group-size``):

* ``torch.mul``            the floor of the forward rows: ``torch.mul(x, z)``;
* ``rmsnorm_fn``           ``gatednorm.rmsnorm_fn(x, w, None, z=z, group_size=...)``;
* ``RMSNorm module``       ``gatednorm.RMSNorm(N, group_size=...)(x, z)``;
* ``layer_norm_fwd``       the upstream drop-in, with statistics (is_rms_norm=True);
* ``gated_norm_quant fp8`` the quantized output (issue 14): fp8 e4m3 codes, a float32 scale per group;
* ``autograd pair``        the floor of the fwd+bwd rows: ``(x * z).backward(dy)`` with x, z requiring grad;
* ``rmsnorm_fn fwd+bwd``   / ``RMSNorm module fwd+bwd``: x, z (and the weight) require grad, ``.backward(dy)``;
* ``recipe`` / ``recipe fwd+bwd``: the straightforward float32 code of the same function (``x.float()``, per
  group ``pow(2).mean``, ``rsqrt``, weight, ``silu(z.float())``, ``.to``), what a port without gatednorm
  runs: on CPU at small shapes (decode) the row to beat.

Forward rows run under ``torch.no_grad()`` (inference); fwd+bwd rows set the leaves' ``.grad`` to None
after each backward, in the floor as in ours (``zero_grad(set_to_none=True)``): the gradient is then
handed over, not added to the previous one, so no accumulation kernel runs in either.

Backends: by default the calls pass no ``backend=``, as most callers do, so resolving the backend (the
environment, auto) is part of what is timed: ``triton`` on CUDA (the real kernels; the script stops if
auto would pick anything else there), ``native`` elsewhere; ``--backend NAME`` passes one explicitly. On
CPU every gatednorm row is also timed with the backend replaced by :class:`NoOpBackend` (``[no-op]``
rows, through ``gatednorm.ops.override_impl``): it computes nothing, so those rows are the cost of gatednorm's Python
layers (checks, dispatch, autograd) plus the output allocations any backend makes. On CPU a real
kernel's host time is its compute time, so use a tiny shape (``--shape 64x128``) for the real rows.

    python benchmarks/bench_host.py --device cpu --shape 64x128
    python benchmarks/bench_host.py --device cuda --shape 8192x128 --json host.json

Only torch, Triton (through gatednorm) and gatednorm are imported: this runs offline on a GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import gatednorm  # noqa: E402
from gatednorm.backends.base import Grads, GradsNeeded  # noqa: E402
from gatednorm.ops import override_impl  # noqa: E402
from gatednorm.spec import NormSpec, compute_dtype  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class NoOpBackend:
    """A Backend that computes nothing: the forward returns statistics allocated once, the fused quantized
    forward writes nothing, the backward allocates its gradients (uninitialised, ``torch.empty``) and returns
    them.

    The backward allocates rather than returning preallocated gradients: autograd copies a gradient it
    does not own into ``.grad`` (a real kernel), and hands over one it owns. Allocating is what every
    real backend does for its outputs, so this keeps the rows free of compute without flattering them.
    """

    supports_float64 = True

    def __init__(self, name: str, x: torch.Tensor, group_size: int) -> None:
        self.name = name
        stats = x.shape[0] * (x.shape[1] // group_size)
        c = compute_dtype(x.dtype)
        self._mean = torch.zeros(stats, dtype=c, device=x.device)
        self._rstd = torch.ones(stats, dtype=c, device=x.device)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return (None if spec.is_rms_norm else self._mean), self._rstd

    def forward_quant(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      z: torch.Tensor | None, spec: NormSpec, qspec: object, q: torch.Tensor,
                      scale: torch.Tensor) -> bool:
        # claims the call as fused: without this method ops runs the generic path (the backend's forward
        # into a float32 buffer, then torch ops that quantize it), and the row would time that compute
        return True

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                 needs: GradsNeeded) -> Grads:
        return (
            torch.empty_like(x) if needs.dx else None,
            torch.empty_like(z) if needs.dz else None,
            torch.empty_like(weight) if needs.dweight else None,
            torch.empty_like(bias) if needs.dbias else None,
        )


def parse_shape(text: str) -> tuple[int, int]:
    m, n = (int(v) for v in text.lower().split("x"))
    return m, n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict[str, Callable[[], None]], device: torch.device, calls: int, repeats: int,
               warmup: int) -> dict[str, float]:
    """Median host microseconds per call of each case; repeats interleave the cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            _sync(device)  # outside the timed loop: the queue drains before the next case
            samples[name].append((t1 - t0) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def build_cases(device: torch.device, shape: tuple[int, int], dtype: torch.dtype, group_size: int,
                backend: str | None) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """(forward cases, fwd+bwd cases); the first of each is its floor."""
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    z = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    w = torch.ones(n, device=device, dtype=dtype)
    module = gatednorm.RMSNorm(n, eps=1e-6, group_size=group_size, device=device, dtype=dtype, backend=backend)

    def recipe(xv: torch.Tensor, zv: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
        xf = xv.float().view(m, n // group_size, group_size)
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).view(m, n)
        return (y * wv.float() * torch.nn.functional.silu(zv.float())).to(xv.dtype)

    def fwd_recipe() -> None:
        with torch.no_grad():
            recipe(x, z, w)

    def fwd_mul() -> None:
        with torch.no_grad():
            torch.mul(x, z)

    def fwd_fn() -> None:
        with torch.no_grad():
            gatednorm.rmsnorm_fn(x, w, None, z=z, eps=1e-6, group_size=group_size, backend=backend)

    def fwd_module() -> None:
        with torch.no_grad():
            module(x, z)

    def fwd_stats() -> None:
        with torch.no_grad():
            gatednorm.layer_norm_fwd(x, w, None, 1e-6, z=z, group_size=group_size, is_rms_norm=True,
                                     backend=backend)

    def fwd_quant() -> None:  # the quantized output: fp8 codes and float32 scales per group (DeepGEMM's blocks)
        with torch.no_grad():
            gatednorm.gated_norm_quant(x, w, None, 1e-6, z, group_size, is_rms_norm=True,
                                       quant_group_size=group_size, backend=backend)

    xg = x.detach().requires_grad_()
    zg = z.detach().requires_grad_()
    wg = w.detach().requires_grad_()
    leaves = (xg, zg, wg, module.weight)

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def pair() -> None:
        (xg * zg).backward(dy)
        reset()

    def both_fn() -> None:
        gatednorm.rmsnorm_fn(xg, wg, None, z=zg, eps=1e-6, group_size=group_size, backend=backend).backward(dy)
        reset()

    def both_module() -> None:
        module(xg, zg).backward(dy)
        reset()

    def both_recipe() -> None:
        recipe(xg, zg, wg).backward(dy)
        reset()

    forward = {"torch.mul": fwd_mul, "rmsnorm_fn": fwd_fn, "RMSNorm module": fwd_module,
               "layer_norm_fwd": fwd_stats, "gated_norm_quant fp8": fwd_quant, "recipe": fwd_recipe}
    both = {"autograd pair": pair, "rmsnorm_fn fwd+bwd": both_fn, "RMSNorm module fwd+bwd": both_module,
            "recipe fwd+bwd": both_recipe}
    return forward, both


def triton_launch_counts() -> dict[str, int]:
    """The triton backend's launch counters: launches through a forward plan, a backward plan
    (gatednorm.backends.triton.plans), and the cached launcher of the plain path (.launch); {} without them."""
    try:
        from gatednorm.backends.triton import launch, plans
    except ImportError:
        return {}
    counters = {"planned_launches": plans, "planned_backward_launches": plans, "planned_quant_launches": plans,
                "fast_launches": launch}
    counts = {name: getattr(module, name) for name, module in counters.items() if hasattr(module, name)}
    for name, total in (("planned_launches", "forward_plan_launches"),  # with the plans' C++ entry's launches
                        ("planned_backward_launches", "backward_plan_launches"),
                        ("planned_quant_launches", "quant_plan_launches")):
        if hasattr(plans, total):
            counts[name] = getattr(plans, total)()
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="8192x128", help="MxN, rows x features (default 8192x128)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=2000, help="back-to-back calls per timing (default 2000)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per case, the median is reported")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--backend", choices=("native", "triton", "compiled"),
                        help="pass backend= explicitly (default: none, resolved as for most callers)")
    parser.add_argument("--no-noop", action="store_true", help="skip the [no-op] rows (CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape = parse_shape(args.shape)
    dtype = DTYPES[args.dtype]
    backend = args.backend
    resolved = gatednorm.resolve_backend(backend, device)
    if device.type == "cuda" and backend is None and resolved != "triton":
        parser.error(f"on CUDA the calls should run the triton backend, but they resolve to {resolved!r}")
    forward, both = build_cases(device, shape, dtype, args.group_size, backend)
    cases = {**forward, **both}
    timed = time_cases(cases, device, args.calls, args.repeats, args.warmup)
    if device.type == "cpu" and not args.no_noop:
        x = torch.empty(shape, dtype=dtype)
        with override_impl(resolved, "cpu", NoOpBackend(resolved, x, args.group_size)):
            noop = {f"{name} [no-op]": fn for name, fn in cases.items()
                    if name not in ("torch.mul", "autograd pair", "recipe", "recipe fwd+bwd")}
            timed.update(time_cases(noop, device, args.calls, args.repeats, args.warmup))

    rows = []
    for name, us in timed.items():
        fwd_bwd = name.startswith(tuple(both))
        floor = timed["autograd pair" if fwd_bwd else "torch.mul"]
        rows.append({"case": name, "pass": "fwd+bwd" if fwd_bwd else "fwd", "us_per_call": us,
                     "ratio": us / floor, "ratio_to": "autograd pair" if fwd_bwd else "torch.mul"})
    rows.sort(key=lambda r: r["pass"] == "fwd+bwd")

    print(f"host time per call: device={device} backend={backend} ({resolved}) shape={args.shape} "
          f"dtype={args.dtype} group_size={args.group_size} calls={args.calls} repeats={args.repeats} "
          f"torch={torch.__version__}")
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'us/call':>9}  {'ratio':>6}  to")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['us_per_call']:9.2f}  {r['ratio']:6.2f}  {r['ratio_to']}")

    launches = triton_launch_counts() if resolved == "triton" else {}
    if launches:  # which launch path the timed calls took (eager plans, the cached launcher)
        print("triton launches during the run: " + ", ".join(f"{k} {v}" for k, v in launches.items()))
    result = {"device": str(device), "backend": backend, "resolved_backend": resolved, "shape": args.shape,
              "dtype": args.dtype, "group_size": args.group_size, "calls": args.calls, "repeats": args.repeats,
              "torch": torch.__version__, "python": platform.python_version(), "rows": rows,
              "triton_launches": launches}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
