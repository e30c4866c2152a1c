"""Tolerances and data helpers shared by the tests."""

from __future__ import annotations

import itertools

import torch

# One rounding of the output dtype: |got - ref| <= ATOL + RTOL * |ref| against the float64 reference.
# RTOL is one ulp at the bottom of a binade (2^-mantissa_bits), which covers the half-ulp of the final
# rounding plus the much smaller float32 accumulation error; ATOL covers float32 compute error on
# values of order one (and fp16/bf16 values near zero). float64 inputs compute in float64.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),  # fp32 output: the compute error (~N * 2^-24), not the rounding, dominates
    torch.bfloat16: (2.0**-8, 1e-5),
    torch.float16: (2.0**-10, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for an output of ``dtype``."""
    return TOLERANCES[dtype]


def assert_one_rounding(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or got.dtype
    rtol, atol = tolerance(dtype)
    got64, ref64 = got.double(), ref.double()
    assert got.shape == ref.shape
    assert torch.equal(torch.isnan(got64), torch.isnan(ref64)), "NaN positions differ"
    finite = torch.isfinite(ref64)
    bound = atol + rtol * ref64.abs()
    err = (got64 - ref64).abs()
    bad = finite & ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} of {got.numel()} elements beyond one rounding of {dtype}: "
        f"max err {float(err[finite].max()):.3e}, rtol {rtol:.2e}, atol {atol:.1e}"
    )
    assert torch.equal(got64[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)])


def make_inputs(m, n, dtype, *, gate=True, bias=True, param_dtype=None, seed=None, device="cpu"):
    """Fresh random x, z, weight, bias (weight around 1, bias around 0)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    param_dtype = param_dtype or dtype
    x = (torch.randn(m, n, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    z = torch.randn(m, n, generator=g).mul(2).to(device=device, dtype=dtype) if gate else None
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(device=device, dtype=param_dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(device=device, dtype=param_dtype) if bias else None
    return x, z, w, b


# Kernel variants as (is_rms_norm, norm_before_gate, activation, has_bias, has_z);
# norm_before_gate and activation only matter with a gate.
VARIANTS = [
    (rms, nbg, act, bias, True)
    for rms, nbg, act, bias in itertools.product((False, True), (False, True), ("swish", "sigmoid"), (False, True))
] + [(rms, True, "swish", bias, False) for rms, bias in itertools.product((False, True), (False, True))]


def variant_id(v) -> str:
    rms, nbg, act, bias, hz = v
    gate = ("after" if nbg else "before") + "-" + act if hz else "nogate"
    return f"{'rms' if rms else 'ln'}-{gate}{'-bias' if bias else ''}"
