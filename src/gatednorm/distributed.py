"""Tensor-parallel gated norm: the hidden dimension sharded over a ``torch.distributed`` process group.

Mamba2-style layers under tensor parallelism hold a contiguous slice of the hidden dimension on
each rank: with N features and P ranks, rank r holds columns ``[r * N/P, (r + 1) * N/P)`` of
``x``, ``z``, ``weight`` and ``bias``. :func:`tp_gated_norm` and the :class:`TPGatedRMSNorm` /
:class:`TPGatedLayerNorm` modules take those local shards and return the local shard of exactly
the function the unsharded operator computes (DESIGN.md section 1: fp32 math, one rounding).

How the work is split, decided once per (N, group_size, rank, P) and the same on every rank:

* **Aligned** (``N/P`` is a multiple of ``group_size``; e.g. P divides the number of groups):
  every group lies inside one rank's shard. No communication; the local shard goes straight
  through :func:`gatednorm.layer_norm_fwd` (whatever backend it picks, fused kernels included).
* **Spanning** (anything else: one group over the whole hidden dimension, or group boundaries
  that do not fall on shard boundaries): each rank reduces its part of every group it touches
  in the compute dtype, **one** ``all_reduce`` of a small (slots x spanning groups x rows)
  tensor combines the parts of the groups that cross a shard boundary, and every rank finishes
  its columns locally. Activations are never gathered.

Numerics of the spanning LayerNorm (why not E[x^2] - E[x]^2): each rank r computes, for its
part of a group (n_r columns, a static count), the local mean mu_r and the local sum of squared
deviations M2_r = sum((x - mu_r)^2) — a two-pass computation on data it holds. Chan et al.'s
pairwise formula combines them exactly:

    mean = sum_r n_r * mu_r / n          (evaluated as mu_0 + sum_r n_r * (mu_r - mu_0) / n)
    M2   = sum_r M2_r + sum_r n_r * (mu_r - mean)^2

The second term needs every rank's mu_r, not just their sum, so the all_reduce buffer gives each
participating rank its own slot for mu_r (others contribute zeros: a sum-reduce then acts as a
gather of the means) plus one shared slot where the M2_r are summed. Every quantity that is
squared is a difference of nearby values computed before squaring, so nothing cancels
catastrophically even for data with mean 1e4 and std 1e-2. RMSNorm needs only sum(x^2), which
has no cancellation: one summed slot.

Backward: dweight and dbias need no reduction across ranks (each rank owns its columns). dx
(and dz when the gate comes before the norm) needs, per row and group, ``sum(dy' * w * xhat)``
and, for LayerNorm, ``sum(dy' * w)`` over the whole group (dy' = dy, times act(z) when the gate
comes after the norm): in the spanning case the backward does one ``all_reduce`` of those
partial sums for the groups that cross a shard boundary. In the aligned case it does none.

Statistics: ``mean``/``rstd`` cover the *local groups* — the groups that intersect this
rank's shard, ``first_group .. first_group + num_local_groups - 1`` (see :func:`shard_layout`) —
in the library's group-major layout: index ``j * M + m`` for local group j and row m. The
values are those of the full group (identical on every rank that shares a group), i.e. the
slice ``[first_group * M, (first_group + num_local_groups) * M)`` of the unsharded operator's
statistics.

Every rank of the group must make the same call (same shapes, options and requires_grad
pattern): the collectives are matched by order. Importing this module needs only torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .functional import layer_norm_fwd
from .modules import AffineGatedNormBase
from .native import gate_activation, gate_activation_and_derivative
from .spec import NormSpec, canonical_activation, compute_dtype, prepare

__all__ = [
    "ShardLayout",
    "TPGatedLayerNorm",
    "TPGatedRMSNorm",
    "gather_weight",
    "shard_layout",
    "shard_weight",
    "tp_gated_norm",
]


# ---------------------------------------------------------------------------
# Static layout of one rank's shard
# ---------------------------------------------------------------------------


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
    #: Most ranks any spanning group touches (slots for per-rank means in the LayerNorm buffer).
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
# Local pieces of the spanning path (plain torch ops on (M, shard) tensors)
# ---------------------------------------------------------------------------


def _segment_sums(t: torch.Tensor, lay: ShardLayout, mean: bool = False) -> torch.Tensor:
    """(M, shard) -> (M, num_local_groups): sums (or means) over each local group's columns.

    Full groups are reduced together through a reshape; the (at most two) partial ones by slices.
    Each sum is over a contiguous slice of one row: deterministic and batch invariant.
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
            block = t[:, lo:lo + (k - j) * gs].reshape(m, k - j, gs)
            parts.append(block.mean(dim=-1) if mean else block.sum(dim=-1))
            j = k
        else:
            seg = t[:, lo:lo + lay.seg_len[j]]
            parts.append(seg.mean(dim=-1, keepdim=True) if mean else seg.sum(dim=-1, keepdim=True))
            j += 1
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


@dataclass
class _Consts:
    """Small device tensors a layout needs: column -> local group index (None with one local group,
    where (M, 1) statistics broadcast as they are) and per-slot column counts of each partial group."""

    col_group: torch.Tensor | None
    slot_counts: tuple[torch.Tensor, ...]


_CONSTS: dict[tuple, _Consts] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _constants(lay: ShardLayout, device: torch.device, dtype: torch.dtype) -> _Consts:
    """Built with device-side ops only (arange, fill: legal inside CUDA graph capture); cached per
    (layout, device, dtype) except while capturing (the graph's memory pool must not leak into the cache)."""
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
    consts = _Consts(col_group, tuple(slot_counts))
    if not _capturing(device):
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        _CONSTS[key] = consts
    return consts


def _per_column(stat: torch.Tensor, consts: _Consts) -> torch.Tensor:
    """(M, local groups) -> something that broadcasts to (M, shard): each column gets its group's value."""
    if consts.col_group is None:
        return stat  # (M, 1)
    return stat.index_select(1, consts.col_group)


def _all_reduce(buf: torch.Tensor, group) -> None:
    if buf.numel() == 0:
        # No rows: every rank of the group sees the same (replicated) row count, so all skip together.
        return
    # dist.all_reduce is looked up at call time so tests can count collectives.
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)


def _span_stats(xc: torch.Tensor, lay: ShardLayout, spec: NormSpec, group, consts: _Consts):
    """Full-group (mean | None, var) per row and local group, (M, num_local_groups) each, from the local xc.

    One all_reduce (see the module docstring for the combination formula).
    """
    m = xc.shape[0]
    gs = lay.group_size
    c = xc.dtype
    if spec.is_rms_norm:
        ss = _segment_sums(xc * xc, lay)
        buf = torch.zeros(1, lay.num_spanning, m, device=xc.device, dtype=c)
        for j, span, _slot, _counts in lay.partials:
            buf[0, span] = ss[:, j]
        _all_reduce(buf, group)
        for j, span, _slot, _counts in lay.partials:
            ss[:, j] = buf[0, span]
        return None, ss / gs

    mu = _segment_sums(xc, lay, mean=True)  # local means (the full-group mean for whole groups)
    d = xc - _per_column(mu, consts)
    m2 = _segment_sums(d * d, lay)  # local sums of squared deviations (two-pass)
    slots = lay.num_slots
    buf = torch.zeros(slots + 1, lay.num_spanning, m, device=xc.device, dtype=c)
    for j, span, slot, _counts in lay.partials:
        buf[slot, span] = mu[:, j]  # own slot: the sum-reduce gathers the per-rank means
        buf[slots, span] = m2[:, j]  # shared slot: M2_r summed
    _all_reduce(buf, group)
    mean = mu.clone()
    for (j, span, _slot, _counts), n_r in zip(lay.partials, consts.slot_counts, strict=True):
        mus = buf[:slots, span]  # (slots, M); slots a group does not use hold 0 with n_r = 0
        # sum_r n_r mu_r / n, written as mu_0 + sum_r (n_r / n) (mu_r - mu_0): the differences of nearby
        # means are exact, so the mean is as accurate as the first rank's local mean (no large partial sums).
        mean_j = mus[0] + (n_r * (mus - mus[0])).sum(dim=0) / gs
        dev = mus - mean_j
        m2[:, j] = buf[slots, span] + (n_r * dev * dev).sum(dim=0)
        mean[:, j] = mean_j
    return mean, m2 / gs


def _span_forward(x, weight, bias, z, lay: ShardLayout, spec: NormSpec, group):
    """Spanning-path forward on 2-D local shards. Returns (y in x.dtype, mean | None, rstd) with
    1-D group-major stats of the local groups."""
    m = x.shape[0]
    c = compute_dtype(x.dtype)
    consts = _constants(lay, x.device, c)
    xc = x.to(c)
    gate = None
    if z is not None:
        gate = gate_activation(z.to(c), spec.activation)
        if not spec.norm_before_gate:
            xc = xc * gate
    mean, var = _span_stats(xc, lay, spec, group, consts)
    rstd = torch.sqrt(var + spec.eps).reciprocal()
    if mean is not None:
        xc = xc - _per_column(mean, consts)
    y = xc * _per_column(rstd, consts) * weight.to(c)
    if bias is not None:
        y = y + bias.to(c)
    if gate is not None and spec.norm_before_gate:
        y = y * gate
    out = y.to(x.dtype)  # the one rounding
    gm = lay.num_local_groups * m
    mean_flat = mean.t().reshape(gm) if mean is not None else None
    return out, mean_flat, rstd.t().reshape(gm)


def _span_backward(dy, x, weight, bias, z, mean, rstd, lay: ShardLayout, spec: NormSpec, group,
                   needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool):
    """Spanning-path backward. One all_reduce of the partial row-group sums of (dy' * w * xhat) and,
    for LayerNorm, (dy' * w), when dx (or dz with the gate before the norm) is needed."""
    m, n = x.shape
    c = compute_dtype(x.dtype)
    gl = lay.num_local_groups
    consts = _constants(lay, x.device, c)
    weight_c = weight.to(c)
    xc = x.to(c)
    gate = dgate = None
    if z is not None:
        gate, dgate = gate_activation_and_derivative(z.to(c), spec.activation)
    x_in = xc
    if gate is not None and not spec.norm_before_gate:
        xc = xc * gate
    rstd_cols = _per_column(rstd.view(gl, m).t(), consts)
    if mean is not None:
        xc = xc - _per_column(mean.view(gl, m).t(), consts)
    xhat = xc * rstd_cols
    dyc = dy.to(c)
    dx = dz = dweight = dbias = None
    if gate is not None and spec.norm_before_gate:
        if needs_dz:
            y_pre = xhat * weight_c
            if bias is not None:
                y_pre = y_pre + bias.to(c)
            dz = (dyc * y_pre * dgate).to(z.dtype)
        dyc = dyc * gate
    if needs_dweight:
        dweight = (dyc * xhat).sum(dim=0).to(weight.dtype)
    if needs_dbias and bias is not None:
        dbias = dyc.sum(dim=0).to(bias.dtype)
    need_dxc = needs_dx or (needs_dz and gate is not None and not spec.norm_before_gate)
    if need_dxc:
        wdy = dyc * weight_c
        sums = [_segment_sums(xhat * wdy, lay)]
        if not spec.is_rms_norm:
            sums.append(_segment_sums(wdy, lay))
        buf = torch.zeros(len(sums), lay.num_spanning, m, device=x.device, dtype=c)
        for j, span, _slot, _counts in lay.partials:
            for k, s in enumerate(sums):
                buf[k, span] = s[:, j]
        _all_reduce(buf, group)
        for j, span, _slot, _counts in lay.partials:
            for k, s in enumerate(sums):
                s[:, j] = buf[k, span]
        gs = lay.group_size
        dxc = wdy - xhat * _per_column(sums[0] / gs, consts)
        if not spec.is_rms_norm:
            dxc = dxc - _per_column(sums[1] / gs, consts)
        dxc = dxc * rstd_cols
        if gate is not None and not spec.norm_before_gate:
            if needs_dz:
                dz = (dxc * x_in * dgate).to(z.dtype)
            dxc = dxc * gate
        if needs_dx:
            dx = dxc.to(x.dtype)
    return dx, dz, dweight, dbias


class _TPSpanFunction(torch.autograd.Function):
    """Autograd for the spanning path; saves only x, weight, bias, z, mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, lay, spec, group):
        out, mean, rstd = _span_forward(x, weight, bias, z, lay, spec, group)
        ctx.save_for_backward(x, weight, bias, z, mean, rstd)
        ctx.lay, ctx.spec, ctx.group = lay, spec, group
        if mean is None:
            mean = rstd.new_empty(0)
        ctx.mark_non_differentiable(mean, rstd)
        return out, mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, z, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dz, dw, db = _span_backward(
            dy, x, weight, bias, z, mean, rstd, ctx.lay, ctx.spec, ctx.group,
            need[0], need[3] and z is not None, need[1], need[2] and bias is not None,
        )
        return dx, dw, db, dz, None, None, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _group_rank_and_size(group) -> tuple[int, int]:
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
    all_reduce of a (slots, spanning groups, M) tensor in the forward and one of a (2 or 1, spanning groups, M)
    tensor in the backward when dx or the pre-norm gate's dz is needed. Differentiable in x, weight, bias, z;
    dweight/dbias are local (no reduction). Every rank of ``group`` must make the same call.
    """
    call = prepare(x, weight, bias, z, eps, None, norm_before_gate, is_rms_norm, activation)
    n = call.x2d.shape[1]
    rank, world = _group_rank_and_size(group)
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
        y, mean, rstd = _TPSpanFunction.apply(*args)
        mean = None if is_rms_norm else mean
    else:
        y, mean, rstd = _span_forward(*args)
    return y.view(call.out_shape), mean, rstd


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
    _, world = _group_rank_and_size(group)
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
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int (the full, unsharded size), got {hidden_size!r}")
        if rank is None or world_size is None:
            got_rank, got_world = _group_rank_and_size(group)
            rank = got_rank if rank is None else rank
            world_size = got_world if world_size is None else world_size
        gs = hidden_size if group_size is None else group_size
        if isinstance(gs, bool) or not isinstance(gs, int):
            raise TypeError(f"group_size must be an int or None, got {type(gs).__name__}")
        self.layout = shard_layout(hidden_size, gs, rank, world_size)  # validates sizes and rank
        self.hidden_size = hidden_size
        self.eps = eps
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
