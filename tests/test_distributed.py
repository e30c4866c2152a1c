"""Tensor-parallel gated norm (gatednorm.distributed) on CPU: gloo over loopback, 2 and 4 processes.

Each world size is spawned once (cached at module level) for the cases the session selected; the
workers run those cases in order and write their results to JSON files, and each case is its own
pytest item that reads them. Every case draws the same full-size tensors on every rank (shared
seed), runs the tensor-parallel operator on the rank's shard, and compares that shard with the same
columns of (a) the float64 reference on the full tensor and (b) gatednorm's single-process operator
on the full tensor: within one rounding of the output dtype. Gradients are compared with autograd
through the float64 reference and with gatednorm's own backward on the full tensor. The number of
collectives per call is counted. The ``rescue-*`` cases hold the spanning path's range rescue to the
float64 reference for values near the ends of the float32 range (|x| ~ 1e25, 3e37; 1e-30 with eps = 0).

Budget: about 30 s on 2 cores (dominated by starting 6 Python processes).
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch

import gatednorm
from gatednorm.reference import gated_norm_reference

# ---------------------------------------------------------------------------
# Cases (module level: the spawned workers import this module)
# ---------------------------------------------------------------------------

HIDDEN = 96  # full hidden size N: 48 per rank with 2 ranks, 24 with 4
ROWS = (2, 3)  # leading dims of x: M = 6 rows

# group sizes per world size: None = one group over every rank
GROUP_SIZES = {
    2: [16, 32, 48, None],  # 16, 48: aligned (no communication); 32: group 1 = [32, 64) straddles ranks
    4: [12, 16, 32, 48, None],  # 12: aligned; 16/32: boundaries inside shards; 48: each group = 2 whole shards
}
GATES = ["none", "after", "before"]


def _variants():
    for rms in (False, True):
        for gate in GATES:
            acts = ["swish"] if gate == "none" else ["swish", "sigmoid"]
            for act in acts:
                for bias in ([False] if rms else [True, False]):
                    if not rms and not bias and gate != "after":
                        continue  # LayerNorm without bias: one gate variant is enough
                    yield rms, gate, act, bias


def case_names(world: int) -> list[str]:
    names = []
    for gs in GROUP_SIZES[world]:
        for rms, gate, act, bias in _variants():
            names.append(f"gs{gs}-{'rms' if rms else 'ln'}-{gate}-{act}-{'bias' if bias else 'nobias'}")
    names += ["offset-ln-fp64", "offset-ln-fp32", "stats-layout", "collective-count", "module-rms", "module-ln",
              "weight-helpers", "thn-gate", "empty-rows", "errors"]
    return names + rescue_case_names(world)


# Range rescue on the spanning path: magnitude name -> (scale of the data, eps)
RESCUE_SCALES = {"big": (1e25, 1e-5), "huge": (3e37, 1e-5), "tiny": (1e-30, 0.0)}
# spanning layouts only: 16 with 4 ranks also has whole groups inside a shard next to partial ones
RESCUE_GROUP_SIZES = {2: [32, None], 4: [16, 32, None]}


def rescue_case_names(world: int) -> list[str]:
    return [f"rescue-gs{gs}-{norm}-{gate}-{mag}" for gs in RESCUE_GROUP_SIZES[world] for norm in ("ln", "rms")
            for gate in ("after", "before") for mag in RESCUE_SCALES]


def _parse(name: str):
    gs, norm, gate, act, bias = name.split("-")
    gs = None if gs == "gsNone" else int(gs[2:])
    return gs, norm == "rms", gate, act, bias == "bias"


class _Soft:
    """Collects assertion failures so a failing rank still makes every collective of its case (no deadlock)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except AssertionError as e:
            self.errors.append(str(e) or repr(e))

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.errors.append(message)

    def done(self) -> None:
        if self.errors:
            raise AssertionError("; ".join(self.errors))


def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's numbers at |ref| (float64)."""
    mag = ref.abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(dtype).eps


def _within_one_rounding(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|got - ref| <= one ulp of dtype at ref, plus float32 compute error (relative to the row scale)."""
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().clamp_min(1.0)
    compute = 1e-12 if dtype == torch.float64 else 2e-6
    tol = _ulp(ref, dtype) + compute * scale
    if dtype == torch.float32:
        tol = tol + 8e-6 * ref.abs()  # float32 output: the compute error dominates the rounding
    bad = (got - ref).abs() > tol
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} values off, first got "
                             f"{got.flatten()[i].item()!r} want {ref.flatten()[i].item()!r} (tol "
                             f"{tol.flatten()[i].item():.3g})")


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    """Max error relative to max(1, max |ref|) (gradients and statistics)."""
    got, ref = got.double(), ref.double()
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    err = float((got - ref).abs().max()) / scale if ref.numel() else 0.0
    if not err <= rtol:
        raise AssertionError(f"{what}: relative error {err:.3g} > {rtol:.3g}")


def _data(seed: int, n: int, rms: bool, gate: str, bias: bool, dtype: torch.dtype, rows=ROWS):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, n, generator=gen) * 1.5 + 0.3
    z = torch.randn(*rows, n, generator=gen) * 2 if gate != "none" else None
    w = 1 + 0.3 * torch.randn(n, generator=gen)
    b = 0.2 * torch.randn(n, generator=gen) if bias and not rms else None
    dy = torch.randn(*rows, n, generator=gen)
    def cast(t):
        return None if t is None else t.to(dtype)

    return cast(x), cast(z), cast(w), cast(b), cast(dy)


def _local_groups(gs: int, rank: int, world: int, n: int = HIDDEN) -> tuple[int, int]:
    shard = n // world
    return (rank * shard) // gs, ((rank + 1) * shard - 1) // gs + 1


def _run_variant(name: str, rank: int, world: int) -> None:
    from gatednorm.distributed import shard_weight, tp_gated_norm

    gs, rms, gate, act, bias = _parse(name)
    soft = _Soft()
    n = HIDDEN
    full_gs = n if gs is None else gs
    kw = dict(eps=1e-5, group_size=gs, norm_before_gate=gate != "before", is_rms_norm=rms, activation=act)
    seed = sum(map(ord, name))  # same seed on every rank (str hash is salted per process)
    sh = lambda t: None if t is None else t[..., rank * n // world:(rank + 1) * n // world]  # noqa: E731

    # Forward, bf16 and fp32: one rounding of the float64 reference; same as the full single-process op.
    for dtype in (torch.bfloat16, torch.float32):
        x, z, w, b, _ = _data(seed, n, rms, gate, bias, dtype)
        ref, ref_mean, ref_rstd = gated_norm_reference(x, w, b, z, 1e-5, gs, kw["norm_before_gate"], rms, act)
        full, _, _ = gatednorm.layer_norm_fwd(x, w, b, 1e-5, z=z, group_size=gs,
                                              norm_before_gate=kw["norm_before_gate"], is_rms_norm=rms,
                                              activation=act, backend="native")
        # x and z shards are non-contiguous views of the full tensors: strided input on purpose
        y, mean, rstd = tp_gated_norm(sh(x), shard_weight(w, rank, world),
                                      None if b is None else shard_weight(b, rank, world), sh(z), **kw)
        soft.check(y.shape == sh(x).shape and y.dtype == dtype, f"y is {y.shape} {y.dtype}")
        soft(_within_one_rounding, y, sh(ref), dtype, f"{dtype} y vs float64 reference")
        soft(_within_one_rounding, y, sh(full), dtype, f"{dtype} y vs single-process operator")
        # statistics: the local groups' slice of the full group-major statistics
        g0, g1 = _local_groups(full_gs, rank, world)
        m = x.numel() // n
        soft.check(rstd.shape == ((g1 - g0) * m,), f"rstd shape {tuple(rstd.shape)}")
        soft(_close, rstd, ref_rstd[g0 * m:g1 * m], 1e-5, "rstd")
        if rms:
            soft.check(mean is None, "RMSNorm mean is not None")
        else:
            soft(_close, mean, ref_mean[g0 * m:g1 * m], 1e-5, "mean")

    # Backward, fp32: against autograd through the float64 reference and gatednorm's full backward.
    x, z, w, b, dy = _data(seed + 1, n, rms, gate, bias, torch.float32)
    leaves64 = [t.double().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    ref, _, _ = gated_norm_reference(leaves64[0], leaves64[2], leaves64[3], leaves64[1], 1e-5, gs,
                                     kw["norm_before_gate"], rms, act)
    ref.backward(dy.double())
    leaves32 = [t.clone().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    full = gatednorm.layernorm_fn(leaves32[0], leaves32[2], leaves32[3], leaves32[1], 1e-5, gs,
                                  kw["norm_before_gate"], rms, activation=act, backend="native")
    full.backward(dy)
    xs = sh(x).clone().requires_grad_()
    zs = sh(z).clone().requires_grad_() if z is not None else None
    ws = shard_weight(w, rank, world).requires_grad_()
    bs = shard_weight(b, rank, world).requires_grad_() if b is not None else None
    y, _, _ = tp_gated_norm(xs, ws, bs, zs, **kw)
    y.backward(sh(dy))
    for label, got, r64, r32 in (("dx", xs, leaves64[0], leaves32[0]), ("dz", zs, leaves64[1], leaves32[1]),
                                 ("dweight", ws, leaves64[2], leaves32[2]), ("dbias", bs, leaves64[3], leaves32[3])):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == torch.float32, label
        soft(_close, got.grad, sh(r64.grad), 2e-5, f"{label} vs float64 autograd")
        soft(_close, got.grad, sh(r32.grad), 2e-5, f"{label} vs gatednorm full backward")

    # Backward, bf16 (gradients rounded once to bf16): against gatednorm's full backward in bf16.
    x, z, w, b, dy = _data(seed + 2, n, rms, gate, bias, torch.bfloat16)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    gatednorm.layernorm_fn(leaves[0], leaves[2], leaves[3], leaves[1], 1e-5, gs, kw["norm_before_gate"], rms,
                           activation=act, backend="native").backward(dy)
    mine = [sh(t).clone().requires_grad_() if t is not None else None for t in (x, z, w, b)]
    tp_gated_norm(mine[0], mine[2], mine[3], mine[1], **kw)[0].backward(sh(dy))
    for label, got, want in zip(("dx", "dz", "dweight", "dbias"), mine, leaves, strict=True):
        if got is not None:
            soft.check(got.grad.dtype == torch.bfloat16, f"bf16 {label} is {got.grad.dtype}")
            soft(_close, got.grad, sh(want.grad), 2 ** -7, f"bf16 {label} vs gatednorm full backward")
    soft.done()


def _run_offset(dtype: torch.dtype, rank: int, world: int) -> None:
    """LayerNorm of data with mean 1e4 and std 1e-2 (one group over all ranks, and an unaligned grouping).

    E[x^2] - E[x]^2 would lose everything here in float32 (x^2 ~ 1e8, ulp 8, variance 1e-4) and be off by
    ~1e-4 relative in float64; the per-rank (mean, M2) combination must be as good as the single-process
    two-pass operator.
    """
    from gatednorm.distributed import tp_gated_norm

    soft = _Soft()
    n, m = HIDDEN, 8
    gen = torch.Generator().manual_seed(7)
    x = (1e4 + 1e-2 * torch.randn(m, n, generator=gen, dtype=torch.float64)).to(dtype)
    z = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    w = (1 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    b = (0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    sl = slice(rank * n // world, (rank + 1) * n // world)
    ulp_mean = 1e4 * torch.finfo(dtype).eps  # spacing of dtype's numbers at the mean
    for gs in (None, 32):
        ref, ref_mean, ref_rstd = gated_norm_reference(x, w, b, z, 1e-6, gs, True, False)
        full, _, _ = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=gs, backend="native")
        y, mean, rstd = tp_gated_norm(x[:, sl], w[sl], b[sl], z[:, sl], eps=1e-6, group_size=gs)
        g0, g1 = _local_groups(n if gs is None else gs, rank, world)
        want_c = torch.float64 if dtype == torch.float64 else torch.float32
        soft.check(mean.dtype == want_c and rstd.dtype == want_c, f"stats dtype {mean.dtype}, {rstd.dtype}")
        mean_err = float((mean.double() - ref_mean[g0 * m:g1 * m]).abs().max())
        soft.check(mean_err <= 2 * ulp_mean, f"gs={gs}: mean off by {mean_err:.3g} > 2 ulp ({ulp_mean:.3g})")
        # The data's own quantization (ulp(1e4) / std: 2e-10 in float64, 0.1 in float32) bounds what any
        # method can reach: a mean error of d moves rstd by ~(d / std)^2 and y by d * rstd * |w * act(z)|.
        soft(_close, rstd / ref_rstd[g0 * m:g1 * m], torch.ones_like(rstd).double(),
             1e-9 if dtype == torch.float64 else 0.02, f"gs={gs}: rstd")
        err_tp = float((y.double() - ref[:, sl]).abs().max())
        err_full = float((full[:, sl].double() - ref[:, sl]).abs().max())
        gain = float(ref_rstd.max()) * float((w.double() * torch.nn.functional.silu(z.double())).abs().max())
        bound = max(2 * err_full, 2 * ulp_mean * gain, 1e-12)
        soft.check(err_tp <= bound, f"gs={gs}: y error {err_tp:.3g} > {bound:.3g} (single-process {err_full:.3g})")
        if rank == 0 and os.environ.get("GATEDNORM_TEST_VERBOSE"):
            print(f"offset {dtype} gs={gs}: mean err {mean_err:.3g} y err tp {err_tp:.3g} single {err_full:.3g}")
    soft.done()


def _run_stats_layout(rank: int, world: int) -> None:
    """Explicit layout: local group j, row m at j*M + m; same values on ranks sharing a group."""
    import torch.distributed as dist

    from gatednorm.distributed import shard_layout, tp_gated_norm

    n, gs, m = HIDDEN, 32, 5
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    w = torch.ones(n)
    sl = slice(rank * n // world, (rank + 1) * n // world)
    _, mean, rstd = tp_gated_norm(x[:, sl], w[sl], None, None, group_size=gs)
    lay = shard_layout(n, gs, rank, world)
    for j in range(lay.num_local_groups):
        g = lay.first_group + j
        grp = x[:, g * gs:(g + 1) * gs].double()
        for row in range(m):
            assert abs(mean[j * m + row].item() - grp[row].mean().item()) < 1e-5
            var = grp[row].var(unbiased=False).item()
            assert abs(rstd[j * m + row].item() - (var + 1e-6) ** -0.5) < 1e-4
    # ranks sharing a group hold identical bits for it
    everyone = [None] * world
    dist.all_gather_object(everyone, (lay.first_group, lay.num_local_groups, rstd.tolist()))
    seen: dict[int, list[float]] = {}
    for g0, count, values in everyone:
        for j in range(count):
            vals = values[j * m:(j + 1) * m]
            assert seen.setdefault(g0 + j, vals) == vals, f"group {g0 + j} differs between ranks"


def _run_collective_count(rank: int, world: int) -> None:
    import torch.distributed as dist

    from gatednorm.distributed import tp_gated_norm

    counts = {"all_reduce": 0, "other": 0}
    real = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                    "broadcast", "reduce_scatter_tensor")}

    def wrap(name):
        def f(*a, **k):
            counts["all_reduce" if name == "all_reduce" else "other"] += 1
            return real[name](*a, **k)
        return f

    n = HIDDEN
    sl = slice(rank * n // world, (rank + 1) * n // world)
    gen = torch.Generator().manual_seed(11)
    x, z, w = torch.randn(4, n, generator=gen), torch.randn(4, n, generator=gen), torch.randn(n, generator=gen)
    b = torch.randn(n, generator=gen)
    aligned = 12 if world == 4 else 16
    try:
        for name in real:
            setattr(dist, name, wrap(name))
        for gs, rms, nbg, expect_fwd in ((aligned, False, True, 0), (None, False, True, 1), (32, True, False, 1),
                                         (None, True, True, 1)):
            for needs in ("x", "w", "z", "none"):
                counts.update(all_reduce=0, other=0)
                xs = x[:, sl].clone().requires_grad_(needs == "x")
                ws = w[sl].clone().requires_grad_(needs == "w")
                zs = z[:, sl].clone().requires_grad_(needs == "z")
                y, _, _ = tp_gated_norm(xs, ws, None if rms else b[sl], zs, group_size=gs, is_rms_norm=rms,
                                        norm_before_gate=nbg)
                assert counts == {"all_reduce": expect_fwd, "other": 0}, (gs, rms, needs, counts)
                if needs != "none":
                    y.sum().backward()
                    # dx always needs the group sums; dz only when the gate comes before the norm
                    reduce_bwd = expect_fwd and (needs == "x" or (needs == "z" and not nbg))
                    want = expect_fwd + (1 if reduce_bwd else 0)
                    assert counts == {"all_reduce": want, "other": 0}, (gs, rms, nbg, needs, counts)
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _run_module(rms: bool, rank: int, world: int) -> None:
    from gatednorm.distributed import TPGatedLayerNorm, TPGatedRMSNorm, gather_weight, shard_weight

    n, gs = HIDDEN, 32
    torch.manual_seed(5)  # same parameters on every rank
    full_mod = (gatednorm.RMSNorm if rms else gatednorm.LayerNorm)(n, eps=1e-5, group_size=gs,
                                                                   norm_before_gate=False)
    with torch.no_grad():
        full_mod.weight.normal_(1, 0.3)
        if full_mod.bias is not None:
            full_mod.bias.normal_(0, 0.2)
    tp_mod = (TPGatedRMSNorm if rms else TPGatedLayerNorm)(n, eps=1e-5, group_size=gs, norm_before_gate=False)
    assert tp_mod.weight.shape == (n // world,)
    tp_mod.load_state_dict(full_mod.state_dict())  # full-size checkpoint -> shard on load
    assert torch.equal(tp_mod.weight, shard_weight(full_mod.weight.detach(), rank, world))
    assert torch.equal(gather_weight(tp_mod.weight), full_mod.weight.detach())
    tp_mod.load_state_dict(tp_mod.state_dict())  # shard-size checkpoint loads as is
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(9))
    z = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(10))
    sl = slice(rank * n // world, (rank + 1) * n // world)
    y_full = full_mod(x, z)
    y_tp = tp_mod(x[..., sl], z[..., sl])
    _within_one_rounding(y_tp, y_full[..., sl].detach(), torch.float32, "module y")
    y_full.square().sum().backward()
    y_tp.square().sum().backward()
    _close(tp_mod.weight.grad, full_mod.weight.grad[sl], 2e-5, "module dweight")
    if not rms:
        _close(tp_mod.bias.grad, full_mod.bias.grad[sl], 2e-5, "module dbias")
    # concatenating every rank's output is the full output
    assert torch.allclose(gather_weight(y_tp.detach()), y_full.detach(), rtol=1e-5, atol=1e-5)
    assert "rank" in repr(tp_mod)


def _run_weight_helpers(rank: int, world: int) -> None:
    from gatednorm.distributed import gather_weight, shard_weight

    full = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    local = shard_weight(full, rank, world)
    assert local.shape == (HIDDEN // world,) and local.is_contiguous()
    assert torch.equal(local, full[rank * HIDDEN // world:(rank + 1) * HIDDEN // world])
    assert torch.equal(gather_weight(local), full)
    assert torch.equal(torch.cat([shard_weight(full, r, world) for r in range(world)]), full)
    for bad in ((full, world, world), (full, -1, world)):
        try:
            shard_weight(*bad)
        except ValueError as e:
            assert "rank" in str(e)
        else:
            raise AssertionError(f"shard_weight{bad[1:]} did not raise")
    try:
        shard_weight(torch.ones(HIDDEN + 1), 0, world)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("shard_weight of an indivisible size did not raise")


def _run_thn_gate(rank: int, world: int) -> None:
    """x (T*H, n) with a (T, H, n) gate, spanning groups."""
    from gatednorm.distributed import tp_gated_norm

    n, t, h = HIDDEN, 3, 2
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(t * h, n, generator=gen)
    z = torch.randn(t, h, n, generator=gen)
    w = torch.randn(n, generator=gen)
    sl = slice(rank * n // world, (rank + 1) * n // world)
    ref, _, _ = gated_norm_reference(x, w, None, z, 1e-6, 32, False, True)
    y, _, _ = tp_gated_norm(x[:, sl], w[sl], None, z[..., sl], group_size=32, norm_before_gate=False,
                            is_rms_norm=True)
    _within_one_rounding(y, ref[:, sl], torch.float32, "(T, H, N) gate")


def _run_empty(rank: int, world: int) -> None:
    from gatednorm.distributed import tp_gated_norm

    n = HIDDEN // world
    x = torch.randn(0, n, requires_grad=True)
    y, mean, rstd = tp_gated_norm(x, torch.ones(n), torch.zeros(n), None, group_size=None)
    assert y.shape == (0, n) and mean.shape == (0,) and rstd.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, n)


def _run_errors(rank: int, world: int) -> None:
    from gatednorm.distributed import TPGatedRMSNorm, shard_layout, tp_gated_norm

    n = HIDDEN // world
    x, w = torch.randn(2, n), torch.ones(n)
    cases = [
        (lambda: tp_gated_norm(x, w, None, None, group_size=7), ValueError, "group_size"),
        (lambda: tp_gated_norm(x, w, None, None, group_size=2.0), TypeError, "group_size"),
        (lambda: tp_gated_norm(x, w, None, None, full_hidden_size=HIDDEN + world), ValueError, "full_hidden_size"),
        (lambda: tp_gated_norm(x, torch.ones(n + 1), None, None), ValueError, "weight"),
        (lambda: tp_gated_norm(x, w, None, torch.randn(3, n)), ValueError, "z"),
        (lambda: tp_gated_norm(x, w, None, None, eps=-1.0), ValueError, "eps"),
        (lambda: TPGatedRMSNorm(HIDDEN + 1), ValueError, "hidden size"),
        (lambda: TPGatedRMSNorm(HIDDEN, group_size=7), ValueError, "group_size"),
        (lambda: shard_layout(HIDDEN, 16, world, world), ValueError, "rank"),
    ]
    for fn, exc, word in cases:
        try:
            fn()
        except exc as e:
            assert word in str(e), (word, str(e))
        else:
            raise AssertionError(f"expected {exc.__name__} mentioning {word!r}")


def _zero_part(n: int, gs: int, world: int) -> tuple[int, int]:
    """Columns of the first rank's part of the first spanning group (a part that can be all zeros while
    its group is not: the case where the per-part power-of-two scales must not be what is combined)."""
    shard = n // world
    for g in range(n // gs):
        lo, hi = g * gs, (g + 1) * gs
        if lo // shard != (hi - 1) // shard:
            return lo, (lo // shard + 1) * shard
    raise AssertionError("no spanning group")


def _rescue_x(seed: int, n: int, gs: int, world: int, scale: float) -> torch.Tensor:
    """(6, n) float64 rows of magnitude ``scale``, each with a twist; row 2 stays in range.

    0, 5: plain; 1: the second half of the columns 2^30 times nearer to 1 (parts of one group on
    different ranks with different exponents); 2: unscaled; 3: scale * (1 + 0.1 * noise) (LayerNorm's
    mean well above its std); 4: one rank's part of a spanning group all zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, n, generator=gen, dtype=torch.float64).clamp(-3, 3) + 0.3
    x = base * scale
    x[1, n // 2:] *= 2.0 ** (-30 if scale > 1 else 30)
    x[2] = base[2]
    x[3] = scale * (1 + 0.1 * base[3])
    lo, hi = _zero_part(n, gs, world)
    x[4, lo:hi] = 0
    return x


def _rel_rows(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    """Max error of each row relative to that row's max |ref| (rows of very different magnitudes)."""
    got, ref = got.double().flatten(0, -2), ref.double().flatten(0, -2)
    err = (got - ref).abs().amax(dim=-1) / ref.abs().amax(dim=-1).clamp_min(1e-300)
    if not bool((err <= rtol).all()):
        i = int(err.nan_to_num(float("inf")).argmax())
        raise AssertionError(f"{what}: row {i} relative error {float(err[i]):.3g} > {rtol:.3g}")


def _run_rescue(name: str, rank: int, world: int) -> None:
    """Spanning path with values near the ends of the float32 range, against the float64 reference.

    Forward (bf16 and fp32): y within one rounding; rstd within 1e-5 relative; mean within 1e-5 of the
    group's standard deviation; every statistic identical on the ranks sharing its group. Gradients
    (fp32, |x| ~ 1e25 only: further up dx ~ 1 / |x| leaves the float32 normal range): per row within
    2e-5 of the row's largest value.
    """
    import torch.distributed as dist

    from gatednorm.distributed import shard_layout, shard_weight, tp_gated_norm

    _, gs_text, norm, gate, mag = name.split("-")
    gs = None if gs_text == "gsNone" else int(gs_text[2:])
    rms, nbg = norm == "rms", gate == "after"
    scale, eps = RESCUE_SCALES[mag]
    soft = _Soft()
    n = HIDDEN
    full_gs = n if gs is None else gs
    lay = shard_layout(n, full_gs, rank, world)
    assert not lay.aligned, name
    sl = slice(rank * n // world, (rank + 1) * n // world)
    seed = sum(map(ord, name))
    gen = torch.Generator().manual_seed(seed + 1)
    # |act(z)| <= 1.8: the gate-before product x * act(z) stays inside the float32 range at 3e37
    z64 = torch.randn(6, n, generator=gen, dtype=torch.float64).clamp(-2, 2)
    w64 = 1 + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    b64 = None if rms else 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
    dy64 = torch.randn(6, n, generator=gen, dtype=torch.float64)
    x64 = _rescue_x(seed, n, full_gs, world, scale)
    kw = dict(eps=eps, group_size=gs, norm_before_gate=nbg, is_rms_norm=rms)
    m = x64.shape[0]
    g0, g1 = lay.first_group, lay.first_group + lay.num_local_groups

    for dtype in (torch.bfloat16, torch.float32):
        x, z, w = x64.to(dtype), z64.to(dtype), w64.to(dtype)
        b = None if b64 is None else b64.to(dtype)
        ref, ref_mean, ref_rstd = gated_norm_reference(x, w, b, z, eps, gs, nbg, rms)
        y, mean, rstd = tp_gated_norm(x[:, sl], w[sl], None if b is None else b[sl], z[:, sl], **kw)
        what = f"{dtype} scale {scale:g}"
        soft.check(bool(torch.isfinite(y).all()), f"{what}: y has non-finite values")
        soft(_within_one_rounding, y, ref[:, sl], dtype, f"{what}: y vs float64 reference")
        want_rstd = ref_rstd[g0 * m:g1 * m]
        soft(_close, rstd.double() / want_rstd, torch.ones_like(want_rstd), 1e-5, f"{what}: rstd / reference")
        if rms:
            soft.check(mean is None, "RMSNorm mean is not None")
        else:
            mean_err = ((mean.double() - ref_mean[g0 * m:g1 * m]) * want_rstd).abs().max()
            soft.check(bool(mean_err <= 1e-5), f"{what}: mean off by {float(mean_err):.3g} standard deviations")
        # ranks sharing a group agree on its statistics bit for bit (they agreed on one scale)
        everyone = [None] * world
        dist.all_gather_object(everyone, (g0, lay.num_local_groups, rstd.tolist(),
                                          None if mean is None else mean.tolist()))
        seen: dict[int, tuple] = {}
        for first, count, rs, mu in everyone:
            for j in range(count):
                vals = (rs[j * m:(j + 1) * m], None if mu is None else mu[j * m:(j + 1) * m])
                soft.check(seen.setdefault(first + j, vals) == vals, f"{what}: group {first + j} differs between ranks")

    if mag == "big":
        leaves64 = [t.clone().requires_grad_() if t is not None else None for t in (x64, z64, w64, b64)]
        ref, _, _ = gated_norm_reference(leaves64[0], leaves64[2], leaves64[3], leaves64[1], eps, gs, nbg, rms)
        ref.backward(dy64)
        mine = [None if t is None else shard_weight(t.float(), rank, world).requires_grad_()
                for t in (x64, z64, w64, b64)]
        y, _, _ = tp_gated_norm(mine[0], mine[2], mine[3], mine[1], **kw)
        y.backward(dy64[:, sl].float())
        for label, got, want in zip(("dx", "dz", "dweight", "dbias"), mine, leaves64, strict=True):
            if got is None:
                continue
            soft.check(got.grad is not None and bool(torch.isfinite(got.grad).all()), f"{label} missing or not finite")
            if label in ("dx", "dz"):
                soft(_rel_rows, got.grad, want.grad[:, sl], 2e-5, f"{label} vs float64 autograd")
            else:
                soft(_close, got.grad, want.grad[sl], 2e-5, f"{label} vs float64 autograd")
    soft.done()


def _run_case(name: str, rank: int, world: int) -> None:
    special = {
        "offset-ln-fp64": lambda: _run_offset(torch.float64, rank, world),
        "offset-ln-fp32": lambda: _run_offset(torch.float32, rank, world),
        "stats-layout": lambda: _run_stats_layout(rank, world),
        "collective-count": lambda: _run_collective_count(rank, world),
        "module-rms": lambda: _run_module(True, rank, world),
        "module-ln": lambda: _run_module(False, rank, world),
        "weight-helpers": lambda: _run_weight_helpers(rank, world),
        "thn-gate": lambda: _run_thn_gate(rank, world),
        "empty-rows": lambda: _run_empty(rank, world),
        "errors": lambda: _run_errors(rank, world),
    }
    if name in special:
        special[name]()
    elif name.startswith("rescue-"):
        _run_rescue(name, rank, world)
    else:
        _run_variant(name, rank, world)


def _worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    results = {}
    try:
        for name in names:
            try:
                _run_case(name, rank, world)
                results[name] = None
            except Exception:  # recorded per case; the other cases still run
                results[name] = traceback.format_exc()
            dist.barrier()  # keeps the collectives of consecutive cases apart even after a failure
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict[int, dict[int, dict[str, str | None]] | str] = {}


def _selected_cases(world: int, session: pytest.Session) -> list[str]:
    """The cases of ``world`` this session runs (all of them unless -k or node ids deselect some)."""
    selected = {item.callspec.params["name"] for item in session.items
                if getattr(item, "originalname", None) == "test_tensor_parallel"
                and item.callspec.params.get("world") == world}
    return [name for name in case_names(world) if name in selected]


def _results(world: int, request: pytest.FixtureRequest) -> tuple[list[str], dict[int, dict[str, str | None]]]:
    """Spawn `world` gloo processes once per session for the selected cases; (cases run, per-rank results)."""
    names = _selected_cases(world, request.session)
    if world not in _RESULTS:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if not dist.is_available() or not dist.is_gloo_available():
            pytest.skip("torch.distributed with gloo is not available")
        outdir = str(request.getfixturevalue("tmp_path_factory").mktemp(f"tp{world}"))
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        try:
            mp.spawn(_worker, args=(world, _free_port(), outdir, names), nprocs=world, join=True)
            per_rank = {}
            for rank in range(world):
                with open(os.path.join(outdir, f"rank{rank}.json")) as f:
                    per_rank[rank] = json.load(f)
            _RESULTS[world] = per_rank
        except Exception:  # every case of this world reports the failure, without spawning again
            _RESULTS[world] = traceback.format_exc()
    got = _RESULTS[world]
    if isinstance(got, str):
        pytest.fail(f"spawning {world} gloo processes failed:\n{got}")
    return names, got


@pytest.mark.parametrize(("world", "name"), [pytest.param(world, name, id=f"tp{world}-{name}")
                                             for world in (2, 4) for name in case_names(world)])
def test_tensor_parallel(world, name, request):
    """One case on every rank of a gloo group of `world` processes (details of failures in the message)."""
    names, results = _results(world, request)
    failures = []
    for rank, per_case in results.items():
        assert set(per_case) == set(names), f"rank {rank} ran {len(per_case)} of {len(names)} cases"
        if per_case[name] is not None:
            failures.append(f"[world {world} rank {rank}] {name}\n{per_case[name]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:8])


def test_import_gatednorm_does_not_import_distributed():
    import subprocess
    import sys

    code = "import sys, gatednorm; assert 'gatednorm.distributed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shard_layout_arithmetic():
    from gatednorm.distributed import shard_layout

    # 96 columns, 4 ranks (24 each), groups of 16: rank 1 holds [24, 48) = 8 of group 1 + group 2
    lay = shard_layout(96, 16, 1, 4)
    assert (lay.first_group, lay.num_local_groups, lay.seg_len) == (1, 2, (8, 16))
    assert not lay.aligned and lay.num_spanning == 2 and lay.num_slots == 2
    assert lay.partials == ((0, 0, 1, (8, 8)),)
    # one group over all ranks: every rank has one partial group with four slots
    lay = shard_layout(96, 96, 2, 4)
    assert lay.partials == ((0, 0, 2, (24, 24, 24, 24)),)
    # aligned: no spanning groups
    lay = shard_layout(96, 12, 3, 4)
    assert lay.aligned and lay.num_local_groups == 2 and lay.partials == ()
