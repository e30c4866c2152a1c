"""The compiled backend's CPU backward formula is :func:`gatednorm.numerics.backward_rows`, rewritten for Inductor.

``backends.compiled._backward_rows_recomputed`` repeats the backward of ``numerics.backward_rows`` (with the
gate derived from one sigmoid, as the compiled backend uses on CPU) so that Inductor recomputes the gate in
every loop instead of storing it, and sums dweight/dbias in row blocks. It must stay the same formula: run
eagerly (no Inductor), its dx and dz are numerics' bit for bit, and its dweight/dbias are the same float32
terms summed in another order. This pins the copy so that the two cannot drift apart.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gatednorm import numerics
from gatednorm.backends.compiled import _backward_rows_recomputed, _gate_from_one_sigmoid
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
