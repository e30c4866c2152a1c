"""The compiled backend's CPU backward formula is :func:`gatednorm.numerics.backward_rows`, rewritten for Inductor.

``backends.compiled._backward_rows_recomputed`` repeats the backward of ``numerics.backward_rows`` (with the
gate derived from one sigmoid, as the compiled backend uses on CPU) so that Inductor recomputes the gate in
every loop instead of storing it, and sums dweight/dbias in row blocks. It must stay the same formula: run
eagerly (no Inductor), its dx and dz are numerics' bit for bit, and its dweight/dbias are the same float32
terms summed in another order. This pins the copy so that the two cannot drift apart.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gatednorm import numerics
from gatednorm.backends.compiled import (
    _backward_rows_recomputed,
    _gate_from_one_sigmoid,
    _stats_from_sums,
    _sums_in_range,
)
from gatednorm.spec import NormSpec

# (gate: None / "after" / "before", activation, rms, bias)
VARIANTS = [v for v in itertools.product((None, "after", "before"), ("swish", "sigmoid"), (True, False),
                                         (False, True)) if not (v[0] is None and v[1] == "sigmoid")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [37, 8])  # 37: four row blocks and a rest; 8: one block, no rest
def test_recomputed_backward_is_numerics_backward(variant, dtype, m):
    gate, activation, rms, with_bias = variant
    n, gs = 48, 16
    spec = NormSpec(1e-5, gs, gate != "before", rms, activation)
    x, dy = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    z = torch.randn(m, n).to(dtype) if gate else None
    w = torch.randn(n).to(dtype)
    b = torch.randn(n).to(dtype) if with_bias else None
    _, mean, rstd = numerics.forward_rows(x, w, b, z, spec)
    needs = (True, z is not None, True, with_bias)
    want = numerics.backward_rows(dy, x, w, b, z, mean, rstd, spec, *needs, gate_fn=_gate_from_one_sigmoid)
    for blocked in (False, True):
        got = _backward_rows_recomputed(dy, x, w, b, z, mean, rstd, spec, *needs, blocked=blocked)
        for name, g, r in zip(("dx", "dz", "dweight", "dbias"), got, want, strict=True):
            assert (g is None) == (r is None), name
            if g is None:
                continue
            if name in ("dx", "dz"):
                assert torch.equal(g, r), f"{name} (blocked={blocked}) is not numerics' bit for bit"
            else:  # the same float32 terms summed in row blocks: within a few float32 roundings of the sum
                bound = 1e-5 * (r.abs() + 1)
                assert ((g - r).abs() <= bound).all(), f"{name} (blocked={blocked}) differs from numerics'"


def _sums_near_the_range_limits(gs: int, eps: float, dtype: torch.dtype) -> list[float]:
    """Sums of squares around where rstd = 1 / sqrt(sum / gs + eps) crosses SAFE_RSTD_MAX (sum / gs + eps =
    SAFE_VAR_MIN), a few dozen steps of the dtype's spacing either side, and the special values: 0, the smallest
    subnormal, the largest finite value, inf, NaN, and ordinary sums."""
    t0 = torch.tensor(gs * max(numerics.SAFE_VAR_MIN - eps, 0.0), dtype=dtype)
    values, up, down = [t0.item()], t0.clone(), t0.clone()
    for _ in range(40):
        up, down = torch.nextafter(up, up.new_tensor(1.0)), torch.nextafter(down, down.new_tensor(0.0))
        values += [up.item(), down.item()]
    info = torch.finfo(dtype)
    return values + [0.0, info.smallest_normal * info.eps, info.max, math.inf, math.nan, 1.0, 3.7e5, 2.0**-90]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 5e-31])  # 5e-31: a limit where float32 rounding decides the answer
@pytest.mark.parametrize("gs", [1, 3, 128, 640])
def test_range_check_from_sum_extremes_is_the_statistics_check(gs, eps, dtype):
    """``_sums_in_range`` (the graph's range check from the extremes of the sums, run eagerly here) answers what
    the check of every rstd answers (``_stats_from_sums``, then ``numerics.rstd_out_of_range``), for single sums
    at and around the limits and for batches whose extremes sit among ordinary sums."""
    spec = NormSpec(eps, gs, True, True, "swish")

    def check(sums: torch.Tensor) -> bool:
        got = bool(_sums_in_range(sums.view(-1, 1, 1), spec))
        _, rstd = _stats_from_sums(None, sums.clone().view(-1, 1, 1), spec)
        want = not bool(numerics.rstd_out_of_range(rstd).any())
        assert got == want, f"sums {sums.tolist()}: from the extremes {got}, from every rstd {want}"
        return want

    values = _sums_near_the_range_limits(gs, eps, dtype)
    answers = {check(torch.tensor([v], dtype=dtype)) for v in values}
    assert answers == {True, False}  # both sides of the limit are reached
    g = torch.Generator().manual_seed(gs)
    for v in values:
        batch = torch.rand(37, generator=g, dtype=dtype) * 4 + 0.5
        batch[int(torch.randint(37, (1,), generator=g))] = v
        check(batch)
