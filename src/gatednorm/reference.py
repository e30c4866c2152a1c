"""A float64 evaluation of the operator: the formula of :mod:`gatednorm.numerics`, in float64, on whole tensors.

What tests and ``gatednorm verify`` measure every backend against. It shares the formula's code with
the whole-tensor paths on purpose (one definition of the operator) and is itself held to independent
references: ``F.layer_norm``, ``F.group_norm`` and ``F.rms_norm`` in float64 (tests/test_core.py).
Slow and memory-hungry by design: no blocking, no rescue (float64 sums do not overflow for float32
or narrower inputs), autograd through float64 ops.
"""

from __future__ import annotations

import torch

from .numerics import forward_rows, group_major
from .spec import NormSpec, canonical_activation


def gated_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    activation: str = "swish",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (y, mean, rstd) in float64; y has x's shape, stats are group-major (G*M,).

    z may also be (T, H, N) for a (T*H, N) x. Differentiable (autograd through float64 ops).
    """
    n = x.shape[-1]
    spec = NormSpec(float(eps), n if group_size is None else group_size, norm_before_gate, is_rms_norm,
                    canonical_activation(activation))
    y, mean, rstd = forward_rows(x.double().reshape(-1, n), weight.double(),
                                 None if bias is None else bias.double(),
                                 None if z is None else z.double().reshape(-1, n), spec, rescue=False)
    return y.reshape(x.shape), (None if mean is None else group_major(mean)), group_major(rstd)
