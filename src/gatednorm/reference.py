"""A float64 evaluation of the operator, written as directly as the formula reads.

Independent of the backends (no blocking, no shared helpers): it is what tests and
``gatednorm verify`` measure every backend against. Slow and memory-hungry by design.
"""

from __future__ import annotations

import torch


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
    gs = n if group_size is None else group_size
    groups = n // gs
    xd = x.double().reshape(-1, groups, gs)
    m = xd.shape[0]
    gate = None
    if z is not None:
        zd = z.double().reshape(-1, groups, gs)
        gate = zd * torch.sigmoid(zd) if activation in ("swish", "silu") else torch.sigmoid(zd)
        if not norm_before_gate:
            xd = xd * gate
    if is_rms_norm:
        mean = None
        var = (xd * xd).mean(dim=-1, keepdim=True)
        xhat = xd / torch.sqrt(var + eps)
    else:
        mean = xd.mean(dim=-1, keepdim=True)
        var = ((xd - mean) ** 2).mean(dim=-1, keepdim=True)
        xhat = (xd - mean) / torch.sqrt(var + eps)
    y = xhat * weight.double().view(groups, gs)
    if bias is not None:
        y = y + bias.double().view(groups, gs)
    if gate is not None and norm_before_gate:
        y = y * gate
    rstd = (1.0 / torch.sqrt(var + eps)).reshape(m, groups).t().reshape(-1)
    mean_gm = mean.reshape(m, groups).t().reshape(-1) if mean is not None else None
    return y.reshape(x.shape), mean_gm, rstd
