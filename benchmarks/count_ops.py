"""ATen ops per call (a proxy for kernel launches on accelerators) of the native backend's paths and the recipe.

On an accelerator every top-level ATen op that computes is one (or more) kernel launch, and eager
calls of the sizes below are launch bound. This script counts, on CPU tensors (no GPU needed),
the top-level ATen ops of one forward and one backward call, through a TorchDispatchMode:

* ``recipe``: the straightforward code of benchmarks/bench_cpu.py (fwd; bwd = its autograd graph);
* ``old native (non-CPU)``: the CPU-tuned blocked path as it ran on non-CPU devices before the
  accelerator path (:class:`~gatednorm.backends.native_cpu.NativeCPUBackend` with one block of
  ``ACCEL_BLOCK_ELEMENTS``; its silu padding changes lengths, not the op count);
* ``accel path``: the accelerator path (:class:`~gatednorm.backends.native_accel.NativeAccelBackend`).

Both run on CPU tensors by serving the ``native`` backend on "cpu" through ``ops.override_impl``.

"ops" excludes views and allocations (empty/empty_strided: no launch); "all" counts every op.

    PYTHONPATH=src python benchmarks/count_ops.py
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import CASES, EPS, recipe  # noqa: E402

from gatednorm import ops  # noqa: E402
from gatednorm.backends.base import GradsNeeded  # noqa: E402
from gatednorm.backends.native_accel import ACCEL_BLOCK_ELEMENTS, NativeAccelBackend  # noqa: E402
from gatednorm.backends.native_cpu import NativeCPUBackend  # noqa: E402
from gatednorm.spec import NormSpec  # noqa: E402

_NO_LAUNCH = {"empty.memory_format", "empty_strided", "empty_like"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.free: set[str] = set()  # views and allocations: no kernel launch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().replace("aten::", "")
        self.ops[name] += 1
        if func.is_view or name in _NO_LAUNCH:
            self.free.add(name)
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        return sum(v for k, v in self.ops.items() if k not in self.free)


def _count(fn):
    with OpCounter() as c:
        fn()
    return c.launches(), sum(c.ops.values()), c.ops


def _inputs(case, dtype, scale):
    m = max(1, case.m // scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, case.n, generator=g).to(dtype)
    z = torch.randn(m, case.n, generator=g).to(dtype) if case.gate != "none" else None
    w = (1 + 0.1 * torch.randn(case.n, generator=g)).to(dtype)
    b = (0.1 * torch.randn(case.n, generator=g)).to(dtype) if case.bias else None
    return x, z, w, b


def _native_counts(case, x, z, w, b, accel: bool):
    spec = NormSpec(EPS, case.group_size, case.gate != "before", case.rms, "swish")
    out = torch.empty_like(x)
    dy = torch.randn_like(x)
    needs = GradsNeeded(True, z is not None, True, b is not None)
    # the old path as it ran on CUDA: the CPU path in one block
    impl = NativeAccelBackend() if accel else NativeCPUBackend(block_elements=ACCEL_BLOCK_ELEMENTS)
    with ops.override_impl("native", "cpu", impl):
        native = ops.select_impl("native", x.device)
        mean, rstd = native.forward(x, w, b, z, spec, out)
        fwd = _count(lambda: native.forward(x, w, b, z, spec, out))
        bwd = _count(lambda: native.backward(dy, x, w, b, z, mean, rstd, spec, needs))
    return fwd, bwd


def _recipe_counts(case, x, z, w, b):
    fwd = _count(lambda: recipe(x, w, b, z, case.group_size, case.gate, case.rms))
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    y = recipe(leaves[0], leaves[2], leaves[3], leaves[1], case.group_size, case.gate, case.rms)
    dy = torch.randn_like(y)
    bwd = _count(lambda: y.backward(dy))
    return fwd, bwd


def main() -> None:
    verbose = "-v" in sys.argv
    scale = 64  # op counts do not depend on M while one block holds the rows; keep the run quick
    print("| case | dtype | pass | recipe | old native (non-CPU) | accel path | recipe / accel |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        for dtype in (torch.bfloat16, torch.float32):
            x, z, w, b = _inputs(case, dtype, scale)
            rf, rb = _recipe_counts(case, x, z, w, b)
            of, ob = _native_counts(case, x, z, w, b, accel=False)
            af, ab = _native_counts(case, x, z, w, b, accel=True)
            for name, r, o, a in (("fwd", rf, of, af), ("bwd", rb, ob, ab)):
                print(f"| {case.name} | {str(dtype).replace('torch.', '')} | {name} | {r[0]} ({r[1]}) | "
                      f"{o[0]} ({o[1]}) | {a[0]} ({a[1]}) | {r[0] / a[0]:.2f} |")
                if verbose:
                    print("    accel:", dict(a[2]))
                    print("    recipe:", dict(r[2]))
    print()
    print("Each cell: ops that compute (launch kernels on an accelerator), in brackets all dispatched ops "
          "(views and allocations included). bwd for the recipe = its autograd backward; for native, all "
          "gradients the recipe's autograd would produce (dx, dz, dweight, dbias where present).")


if __name__ == "__main__":
    main()
