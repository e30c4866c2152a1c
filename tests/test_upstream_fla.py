"""Against the upstream kernel: flash-linear-attention's layer_norm_fwd and LayerNormFn.

On CPU they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported). Both sides compute in float32 and round once, so they agree to within
one rounding of the output dtype (reduction order differs, so not bit for bit).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from helpers import assert_one_rounding, make_inputs

import gatednorm
from gatednorm.reference import gated_norm_reference

pytestmark = pytest.mark.upstream

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("upstream kernel needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
fla_gated = pytest.importorskip("fla.modules.norm.layernorm_gated")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = list(itertools.product([False, True], ["none", "after", "before"], [True, False], [None, 48]))


def _close_to_each_other(ours, theirs, dtype):
    """Two single roundings of nearby float32 values: at most one ulp apart (plus fp32 noise)."""
    from helpers import tolerance

    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2 * rtol, atol=2 * atol)


@pytest.mark.parametrize("rms,gate,bias,group_size", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_stats_match_upstream(rms, gate, bias, group_size, dtype):
    x, z, w, b = make_inputs(16, 96, dtype, gate=gate != "none", bias=bias, device=DEVICE)
    nbg = gate != "before"
    theirs = fla_gated.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=group_size, norm_before_gate=nbg,
                                      is_rms_norm=rms)
    ours = gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, group_size=group_size, norm_before_gate=nbg,
                                    is_rms_norm=rms)
    ref = gated_norm_reference(x, w, b, z, 1e-6, group_size, nbg, rms)
    _close_to_each_other(ours[0], theirs[0], dtype)
    assert_one_rounding(ours[0].cpu(), ref[0].cpu())
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=0)  # rstd, group-major in both
    if rms:
        assert ours[1] is None and theirs[1] is None
    else:
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rms,gate,bias,group_size", CASES)
def test_gradients_match_upstream(rms, gate, bias, group_size):
    dtype = torch.float32
    x, z, w, b = make_inputs(16, 96, dtype, gate=gate != "none", bias=bias, device=DEVICE)
    nbg = gate != "before"
    leaves = [t for t in (x, w, b, z) if t is not None]
    dy = torch.randn_like(x)

    def grads(fn):
        inputs = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(inputs)
        xx, ww = next(it), next(it)
        bb = next(it) if bias else None
        zz = next(it) if gate != "none" else None
        y = fn(xx, ww, bb, zz, 1e-6, group_size, nbg, rms)
        return y, torch.autograd.grad(y, inputs, dy)

    y_theirs, g_theirs = grads(fla_gated.LayerNormFn.apply)
    y_ours, g_ours = grads(gatednorm.layernorm_fn)
    _close_to_each_other(y_ours, y_theirs, dtype)
    for ours, theirs in zip(g_ours, g_theirs, strict=True):
        scale = max(1.0, float(theirs.abs().max()))
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
