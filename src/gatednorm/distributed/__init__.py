"""Tensor-parallel gated norm: the hidden dimension sharded over a ``torch.distributed`` process group.

Mamba2-style layers under tensor parallelism hold a contiguous slice of the hidden dimension on
each rank: with N features and P ranks, rank r holds columns ``[r * N/P, (r + 1) * N/P)`` of
``x``, ``z``, ``weight`` and ``bias``. :func:`tp_gated_norm` and the :class:`TPGatedRMSNorm` /
:class:`TPGatedLayerNorm` modules take those local shards and return the local shard of exactly
the function the unsharded operator computes (docs/design.md section 1: fp32 math, one rounding).

How the work is split, decided once per (N, group_size, rank, P) and the same on every rank
(:func:`shard_layout`):

* **Aligned** (``N/P`` is a multiple of ``group_size``; e.g. P divides the number of groups):
  every group lies inside one rank's shard. No communication; the local shard goes straight
  through :func:`gatednorm.layer_norm_fwd` (whatever backend it picks, fused kernels included).
* **Spanning** (anything else: one group over the whole hidden dimension, or group boundaries
  that do not fall on shard boundaries): each rank reduces its part of every group it touches,
  **one** ``all_reduce`` of a small (parts x slots, spanning groups, rows) tensor combines the
  parts of the groups that cross a shard boundary, and every rank finishes its columns locally.
  Activations are never gathered. The numerics (Chan's combination of per-rank means and M2, and
  the range rescue with a scale common to the ranks of a group, agreed on inside that same
  all_reduce) are described in :mod:`gatednorm.distributed.spanning`.

Statistics: ``mean``/``rstd`` cover the *local groups*, the groups that intersect this rank's
shard, ``first_group .. first_group + num_local_groups - 1`` (see :func:`shard_layout`), in the
library's group-major layout: index ``j * M + m`` for local group j and row m. The values are those
of the full group (identical on every rank that shares a group), i.e. the slice
``[first_group * M, (first_group + num_local_groups) * M)`` of the unsharded operator's statistics.

Every rank of the group must make the same call (same shapes, options and requires_grad
pattern): the collectives are matched by order. Importing this package needs only torch, and
``import gatednorm`` does not import it.

Submodules: :mod:`~gatednorm.distributed.layout` (shard arithmetic, per-group reductions),
:mod:`~gatednorm.distributed.spanning` (the spanning forward/backward and its autograd Function),
:mod:`~gatednorm.distributed.api` (:func:`tp_gated_norm`), :mod:`~gatednorm.distributed.modules`
(the modules, :func:`shard_weight`, :func:`gather_weight`).
"""

from __future__ import annotations

from .api import tp_gated_norm
from .layout import ShardLayout, shard_layout
from .modules import TPGatedLayerNorm, TPGatedRMSNorm, gather_weight, shard_weight

__all__ = [
    "ShardLayout",
    "TPGatedLayerNorm",
    "TPGatedRMSNorm",
    "gather_weight",
    "shard_layout",
    "shard_weight",
    "tp_gated_norm",
]
