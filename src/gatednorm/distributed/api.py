""":func:`tp_gated_norm`: argument checks, then the aligned path (no communication) or the spanning one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..functional import layer_norm_fwd
from ..spec import NormSpec, prepare
from .layout import shard_layout
from .spanning import TPSpanFunction, span_forward

__all__ = ["tp_gated_norm"]


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; ``ValueError`` when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized; call torch.distributed.init_process_group "
                         "first (or pass rank and world_size to the module constructor and initialize before "
                         "the forward)")
    return dist.get_rank(group), dist.get_world_size(group)


def tp_gated_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    activation: str = "swish",
    full_hidden_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gated, grouped LayerNorm/RMSNorm over a hidden dimension sharded across ``group``'s ranks.

    Args:
        x: (..., n) local shard: columns ``[r * n, (r + 1) * n)`` of the full (..., N) input, N = n * P,
            r = this rank in ``group``, P = its size. Any leading dims and strides.
        weight: (n,) local shard of the (N,) scale. bias: (n,) local shard or None.
        z: gate, local shard shaped like x (or (T, H, n) for a (T*H, n) x), or None.
        group: the tensor-parallel process group (None: the default group).
        eps, norm_before_gate, is_rms_norm, activation: as :func:`gatednorm.layer_norm_fwd`.
        group_size: features per group **of the full hidden dimension** (a divisor of N); None means N
            (one group spanning every rank).
        full_hidden_size: N, checked against n * P when given.
        backend: kernel for the communication-free (aligned) path, as in :func:`gatednorm.layer_norm_fwd`;
            the spanning path runs plain torch ops around its all_reduce whatever this says.

    Returns:
        ``(y, mean, rstd)``: y is x's shape and dtype, equal to columns ``[r*n, (r+1)*n)`` of the unsharded
        operator's output. mean (None for RMSNorm) and rstd are 1-D, compute dtype (float32; float64 for
        float64 x), ``L * M`` long for the L groups that intersect this shard (``shard_layout(...)
        .num_local_groups``), group-major: local group j, row m at ``j * M + m``; equal to the unsharded
        statistics of those groups.

    Communication: none when every group lies within one shard (N/P a multiple of group_size); otherwise one
    all_reduce in the forward, of a (3 x slots, spanning groups, M) tensor for LayerNorm, (2 x slots, ...) for
    RMSNorm (slots: the most ranks a group spans), and one of a (2 or 1, spanning groups, M) tensor in the
    backward when dx or the pre-norm gate's dz is needed. Differentiable in x, weight, bias, z; dweight/dbias
    are local (no reduction). Every rank of ``group`` must make the same call.
    """
    call = prepare(x, weight, bias, z, eps, None, norm_before_gate, is_rms_norm, activation)
    n = call.x2d.shape[1]
    rank, world = group_rank_and_size(group)
    full = n * world
    if full_hidden_size is not None and full_hidden_size != full:
        raise ValueError(f"full_hidden_size ({full_hidden_size}) must equal the local hidden size ({n}) times the "
                         f"tensor-parallel world size ({world}) = {full}")
    if group_size is None:
        group_size = full
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    if group_size <= 0 or full % group_size:
        raise ValueError(f"group_size must be a positive divisor of the full hidden size N = {full} "
                         f"(local {n} x {world} ranks), got {group_size}")
    lay = shard_layout(full, group_size, rank, world)
    if lay.aligned:
        # Every group inside this shard: the single-device operator on the shard is the answer.
        return layer_norm_fwd(x, weight, bias, eps, z=z, group_size=group_size, norm_before_gate=norm_before_gate,
                              is_rms_norm=is_rms_norm, activation=activation, backend=backend)
    spec = NormSpec(call.spec.eps, group_size, norm_before_gate, is_rms_norm, call.spec.activation)
    args = (call.x2d, weight, bias, call.z2d, lay, spec, group)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, z))
    if grad:
        y, mean, rstd = TPSpanFunction.apply(*args)
        mean = None if is_rms_norm else mean
    else:
        y, mean, rstd = span_forward(*args)
    return y.view(call.out_shape), mean, rstd
