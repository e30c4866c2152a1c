"""The native backend on every device but CPU: the whole-tensor formulas of :mod:`gatednorm.numerics`.

On GPUs and other accelerators (CUDA without Triton, ROCm, XPU, MPS, NPU/GCU plugins) every ATen op
is a kernel launch, and calls of typical size are launch bound; cache-sized blocking (the CPU path)
would multiply the launches. So this path runs each formula once over as many rows as fit in
:data:`ACCEL_BLOCK_ELEMENTS` (one block for most shapes; the cap keeps the float32 temporaries of
a huge input bounded).

Range rescue happens in the graph of ops, without a host round trip (which would stall the device
and break CUDA graph capture): every group is divided by a power of two of its max |value| before
its sums are taken (exact), at the cost of one more reduction per call.

Batch invariance is not promised here: ATen's GPU reductions pick their strategy by output count.
The Triton backend is the batch-invariant path on GPUs.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..spec import NormSpec, compute_dtype
from .base import Grads, GradsNeeded

#: Cap a block at this many elements (64 MiB per float32 temporary): one block covers most shapes,
#: while a huge input cannot blow up memory.
ACCEL_BLOCK_ELEMENTS = 1 << 24


class NativeAccelBackend:
    """The ``native`` backend's implementation for non-CPU devices (tests run it on CPU tensors).

    ``block_elements`` caps the rows per block (tests shrink it to cross block boundaries).
    """

    name = "native"
    supports_float64 = True

    def __init__(self, block_elements: int = ACCEL_BLOCK_ELEMENTS) -> None:
        self.block_elements = block_elements

    def _blocks(self, m: int, n: int):
        step = max(1, min(m, self.block_elements // n))
        for r0 in range(0, m, step):
            yield r0, min(r0 + step, m)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        m, n = x.shape
        blocks = list(self._blocks(m, n))
        if len(blocks) == 1:  # the common case: the statistics come out group-major, no copies
            _, mu, rs = numerics.forward_rows(x, weight, bias, z, spec, out=out)  # out: the one rounding
            return (None if mu is None else numerics.group_major(mu)), numerics.group_major(rs)
        c = compute_dtype(x.dtype)
        stats = (n // spec.group_size) * m
        mean = None if spec.is_rms_norm else torch.empty(stats, dtype=c, device=x.device)
        rstd = torch.empty(stats, dtype=c, device=x.device)
        mean_rows = None if mean is None else numerics.row_major(mean, m)
        rstd_rows = numerics.row_major(rstd, m)
        for r0, r1 in blocks:
            _, mu, rs = numerics.forward_rows(x[r0:r1], weight, bias, None if z is None else z[r0:r1], spec,
                                              out=out[r0:r1])
            rstd_rows[r0:r1].copy_(rs)
            if mean_rows is not None:
                mean_rows[r0:r1].copy_(mu)
        return mean, rstd

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                 needs: GradsNeeded) -> Grads:
        m, n = x.shape
        dx = torch.empty(m, n, dtype=x.dtype, device=x.device) if needs.dx else None
        dz = torch.empty(m, n, dtype=z.dtype, device=x.device) if needs.dz else None
        mean_rows = None if mean is None else numerics.row_major(mean, m)
        rstd_rows = numerics.row_major(rstd, m)
        dw = db = None
        for r0, r1 in self._blocks(m, n):
            gx, gz, gw, gb = numerics.backward_rows(
                dy[r0:r1], x[r0:r1], weight, bias, None if z is None else z[r0:r1],
                None if mean_rows is None else mean_rows[r0:r1], rstd_rows[r0:r1], spec, *needs)
            if gx is not None:
                dx[r0:r1].copy_(gx)
            if gz is not None:
                dz[r0:r1].copy_(gz)
            dw = gw if dw is None else dw.add_(gw)
            db = gb if db is None else db.add_(gb)
        return (dx, dz, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))
