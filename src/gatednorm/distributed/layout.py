"""Where a rank's columns fall relative to the groups, and the per-column helpers built on that.

Pure arithmetic (:class:`ShardLayout`, :func:`shard_layout`) plus the small torch pieces every
spanning computation needs: reductions over each local group's columns (:func:`segment_reduce`),
and the broadcast of per-group values back to columns (:func:`per_column`, with the device
constants of :func:`constants`).

Terms: the full hidden dimension has N columns split evenly over P ranks (shards of N/P); a group
is ``group_size`` consecutive columns of the full dimension. A rank's *local groups* are the groups
that intersect its shard; a *spanning* group is one that crosses a shard boundary (held by two or
more ranks). Only the first and the last local group of a shard can be partial.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["ShardLayout", "shard_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """Where rank ``rank``'s columns fall relative to the groups (pure arithmetic, no tensors).

    Columns of the shard: ``[col_start, col_start + shard_size)`` of the full hidden dimension.
    Local groups: ``first_group .. first_group + num_local_groups - 1`` (those intersecting the shard).
    Within the shard, local group j covers columns ``[seg_start[j], seg_start[j] + seg_len[j])``;
    only the first and the last local group can be partial (``seg_len < group_size``).
    """

    hidden_size: int
    group_size: int
    rank: int
    world_size: int
    shard_size: int
    col_start: int
    first_group: int
    num_local_groups: int
    seg_start: tuple[int, ...]
    seg_len: tuple[int, ...]
    #: Groups that cross a shard boundary, in order; the all_reduce buffer has one column per entry.
    num_spanning: int
    #: Most ranks any spanning group touches (per-rank slots in the all_reduce buffer).
    num_slots: int
    #: For each partial local group: (local index j, index among spanning groups, this rank's slot,
    #: column counts of that group on its ranks by slot, length num_slots).
    partials: tuple[tuple[int, int, int, tuple[int, ...]], ...]

    @property
    def aligned(self) -> bool:
        """True when no group crosses a shard boundary (no communication at all)."""
        return self.num_spanning == 0


def _group_rank_range(g: int, gs: int, shard: int) -> tuple[int, int]:
    """First and last rank holding a column of group g."""
    return (g * gs) // shard, ((g + 1) * gs - 1) // shard


@functools.lru_cache(maxsize=256)
def shard_layout(hidden_size: int, group_size: int, rank: int, world_size: int) -> ShardLayout:
    """The :class:`ShardLayout` of ``rank`` for a hidden size split evenly over ``world_size`` ranks.

    Raises ``ValueError`` when world_size does not divide hidden_size, group_size does not divide
    hidden_size, or rank is out of range.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if hidden_size <= 0 or hidden_size % world_size:
        raise ValueError(f"the full hidden size ({hidden_size}) must be a positive multiple of the "
                         f"tensor-parallel world size ({world_size})")
    if group_size <= 0 or hidden_size % group_size:
        raise ValueError(f"group_size must be a positive divisor of the full hidden size {hidden_size}, "
                         f"got {group_size}")
    gs = group_size
    shard = hidden_size // world_size
    a = rank * shard
    b = a + shard
    g0 = a // gs
    g1 = (b - 1) // gs
    seg_start, seg_len = [], []
    for g in range(g0, g1 + 1):
        lo, hi = max(a, g * gs), min(b, (g + 1) * gs)
        seg_start.append(lo - a)
        seg_len.append(hi - lo)
    spanning = [g for g in range(hidden_size // gs) if len(set(_group_rank_range(g, gs, shard))) > 1]
    span_index = {g: i for i, g in enumerate(spanning)}
    num_slots = max((last - first + 1 for first, last in (_group_rank_range(g, gs, shard) for g in spanning)),
                    default=0)
    partials = []
    for j, g in enumerate(range(g0, g1 + 1)):
        if seg_len[j] == gs:
            continue
        first, _ = _group_rank_range(g, gs, shard)
        counts = []
        for s in range(num_slots):
            q = first + s
            counts.append(max(0, min((q + 1) * shard, (g + 1) * gs) - max(q * shard, g * gs)))
        partials.append((j, span_index[g], rank - first, tuple(counts)))
    return ShardLayout(
        hidden_size=hidden_size, group_size=gs, rank=rank, world_size=world_size, shard_size=shard,
        col_start=a, first_group=g0, num_local_groups=g1 - g0 + 1, seg_start=tuple(seg_start),
        seg_len=tuple(seg_len), num_spanning=len(spanning), num_slots=num_slots, partials=tuple(partials),
    )


# ---------------------------------------------------------------------------
# Per-group reductions and per-column broadcasts on (M, shard) tensors
# ---------------------------------------------------------------------------

Reduction = Literal["sum", "mean", "amax"]


def _reduce(t: torch.Tensor, op: Reduction, keepdim: bool) -> torch.Tensor:
    if op == "sum":
        return t.sum(dim=-1, keepdim=keepdim)
    if op == "mean":
        return t.mean(dim=-1, keepdim=keepdim)
    return t.amax(dim=-1, keepdim=keepdim)


def segment_reduce(t: torch.Tensor, lay: ShardLayout, op: Reduction = "sum") -> torch.Tensor:
    """(M, shard) -> (M, num_local_groups): sum, mean or max over each local group's columns.

    A mean divides by this rank's column count of the group (the local mean of a partial group).
    Full groups are reduced together through a reshape; the (at most two) partial ones by slices.
    Each reduction is over a contiguous slice of one row: deterministic and batch invariant.
    """
    m = t.shape[0]
    gs = lay.group_size
    parts = []
    j = 0
    while j < lay.num_local_groups:
        lo = lay.seg_start[j]
        if lay.seg_len[j] == gs:
            k = j
            while k < lay.num_local_groups and lay.seg_len[k] == gs:
                k += 1
            parts.append(_reduce(t[:, lo:lo + (k - j) * gs].reshape(m, k - j, gs), op, keepdim=False))
            j = k
        else:
            parts.append(_reduce(t[:, lo:lo + lay.seg_len[j]], op, keepdim=True))
            j += 1
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class Consts:
    """Small device tensors a layout needs: column -> local group index (None with one local group,
    where (M, 1) statistics broadcast as they are) and, per partial group, the column counts of its
    ranks by slot, (num_slots, 1) (0 for the slots a group does not use)."""

    col_group: torch.Tensor | None
    slot_counts: tuple[torch.Tensor, ...]


_CONSTS: dict[tuple, Consts] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def constants(lay: ShardLayout, device: torch.device, dtype: torch.dtype) -> Consts:
    """The :class:`Consts` of ``lay`` on ``device``.

    Built with device-side ops only (arange, fill: legal inside CUDA graph capture); cached per
    (layout, device, dtype) except while capturing (the graph's memory pool must not leak into the cache).
    """
    key = (lay, device, dtype)
    hit = _CONSTS.get(key)
    if hit is not None:
        return hit
    col_group = None
    if lay.num_local_groups > 1:
        cols = torch.arange(lay.col_start, lay.col_start + lay.shard_size, device=device)
        col_group = torch.div(cols, lay.group_size, rounding_mode="floor") - lay.first_group
    slot_counts = []
    for _j, _span, _slot, counts in lay.partials:
        t = torch.zeros(lay.num_slots, 1, device=device, dtype=dtype)
        for s, c in enumerate(counts):
            if c:
                t[s] = c
        slot_counts.append(t)
    consts = Consts(col_group, tuple(slot_counts))
    if not _capturing(device):
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        _CONSTS[key] = consts
    return consts


def per_column(stat: torch.Tensor, consts: Consts) -> torch.Tensor:
    """(M, local groups) -> something that broadcasts to (M, shard): each column gets its group's value."""
    if consts.col_group is None:
        return stat  # (M, 1)
    return stat.index_select(1, consts.col_group)
