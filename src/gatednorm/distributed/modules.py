"""The tensor-parallel modules and the helpers that cut and reassemble sharded parameters."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..modules import AffineGatedNormBase, check_module_arguments
from ..spec import canonical_activation
from .api import group_rank_and_size, tp_gated_norm
from .layout import shard_layout

__all__ = ["TPGatedLayerNorm", "TPGatedRMSNorm", "gather_weight", "shard_weight"]


def shard_weight(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the last dimension: ``full[..., rank * N/P : (rank + 1) * N/P]``, contiguous copy.

    For an (N,) weight or bias (or a (..., N) activation in tests). Raises ``ValueError`` when world_size
    does not divide N or rank is out of range. The copy does not keep the full tensor's storage alive.
    """
    if not isinstance(full, torch.Tensor):
        raise TypeError(f"full must be a torch.Tensor, got {type(full).__name__}")
    if full.dim() < 1:
        raise ValueError("full must have at least one dimension")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    n = full.shape[-1]
    if n % world_size:
        raise ValueError(f"full's last dimension ({n}) must be divisible by world_size ({world_size})")
    shard = n // world_size
    return full[..., rank * shard:(rank + 1) * shard].contiguous().clone()


def gather_weight(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's shard of the last dimension (rank order): the inverse of :func:`shard_weight`.

    Collective: every rank of ``group`` must call it. Returns a new (..., n * P) tensor on every rank.
    """
    if not isinstance(local, torch.Tensor):
        raise TypeError(f"local must be a torch.Tensor, got {type(local).__name__}")
    if local.dim() < 1:
        raise ValueError("local must have at least one dimension")
    _, world = group_rank_and_size(group)
    src = local.detach().contiguous()
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src, group=group)
    return torch.cat(parts, dim=-1)


class _TPGatedNorm(AffineGatedNormBase):

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        activation: str = "swish",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        # The single-device modules' checks, on the full (unsharded) hidden size: what every forward would
        # reject (eps, group_size dividing N, the flags, activation, backend name) fails here, before the
        # process group is consulted.
        check_module_arguments(hidden_size, eps, group_size, norm_before_gate, self.is_rms_norm, activation, backend)
        for arg_name, value in (("rank", rank), ("world_size", world_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{arg_name} must be an int or None, got {type(value).__name__}")
        if rank is None or world_size is None:
            got_rank, got_world = group_rank_and_size(group)
            rank = got_rank if rank is None else rank
            world_size = got_world if world_size is None else world_size
        gs = hidden_size if group_size is None else group_size
        self.layout = shard_layout(hidden_size, gs, rank, world_size)  # validates the sharding and rank
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.activation = canonical_activation(activation)
        self.backend = backend
        self.group = group
        self.tp_rank = rank
        self.tp_size = world_size
        self._init_affine(self.layout.shard_size, device, dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept unsharded checkpoints: a full (N,) weight/bias is cut to this rank's shard on load.
        if self.tp_size > 1:
            for name in ("weight", "bias"):
                key = prefix + name
                value = state_dict.get(key)
                if (getattr(self, name) is not None and isinstance(value, torch.Tensor)
                        and tuple(value.shape) == (self.hidden_size,)):
                    state_dict[key] = shard_weight(value, self.tp_rank, self.tp_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., hidden_size / P) local shard; z: None or x's shape. Returns the local shard of y (x's dtype)."""
        return tp_gated_norm(
            x, self.weight, self.bias, z, group=self.group, eps=self.eps, group_size=self.group_size,
            norm_before_gate=self.norm_before_gate, is_rms_norm=self.is_rms_norm, activation=self.activation,
            full_hidden_size=self.hidden_size, backend=self.backend,
        )[0]

    def extra_repr(self) -> str:
        return (f"{self.hidden_size} (local {self.layout.shard_size}, rank {self.tp_rank}/{self.tp_size}), "
                f"eps={self.eps}, group_size={self.group_size}, norm_before_gate={self.norm_before_gate}"
                + self._options_repr())


class TPGatedLayerNorm(_TPGatedNorm):
    """Tensor-parallel gated, grouped LayerNorm holding this rank's shard of ``weight`` and ``bias``.

    Args:
        hidden_size: the full (unsharded) N; the parameters are (N / P,).
        eps, group_size (of the full N; None = one group), norm_before_gate, device, dtype: as
            :class:`gatednorm.LayerNorm`.
        group: tensor-parallel process group (None: default group). rank / world_size: override the
            group's (lets a module be built before ``init_process_group``; the forward still needs it).
        activation, backend: keyword only, as :class:`gatednorm.LayerNorm`.

    ``load_state_dict`` accepts either shard-sized or full-sized (N,) tensors (the latter are sharded).
    """


class TPGatedRMSNorm(_TPGatedNorm):
    """Tensor-parallel gated, grouped RMSNorm (``bias`` is None); see :class:`TPGatedLayerNorm`.

    The Mamba2 mixer's ``norm(x * silu(z))`` is ``norm_before_gate=False`` with ``group_size = N / n_groups``.
    """

    is_rms_norm = True
