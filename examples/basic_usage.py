"""gatednorm in five minutes, on the CPU: modules, functions, gradients, statistics, backends.

    python examples/basic_usage.py

Runs in a few seconds with nothing but torch and gatednorm installed. Every step checks its result
against a float64 evaluation of the formula (docs/design.md, section 1), so the script doubles as a
smoke test: it exits with an AssertionError if anything is off.
"""

from __future__ import annotations

import torch

import gatednorm


def float64_reference(x, weight, z, group_size, eps):
    """norm(x) * weight * silu(z) per group, RMSNorm, in float64: the function gatednorm computes."""
    xd = x.double().unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    y = (xd * rstd).flatten(-2) * weight.double()
    return y * torch.nn.functional.silu(z.double())


def main() -> None:
    torch.manual_seed(0)
    tokens, heads, head_dim = 16, 8, 64
    x = torch.randn(tokens, heads * head_dim, dtype=torch.bfloat16)
    z = torch.randn_like(x)

    # 1. The module: one group per head (group_size=head_dim), the gate after the norm (Qwen3-Next style).
    norm = gatednorm.RMSNorm(heads * head_dim, eps=1e-6, group_size=head_dim, norm_before_gate=True,
                             dtype=torch.bfloat16)
    y = norm(x, z)
    ref = float64_reference(x, norm.weight, z, head_dim, 1e-6)
    err = (y.double() - ref).abs()
    one_rounding = ref.abs() * (2**-8 + 1e-5)  # half a bf16 ulp, plus float32 compute error
    print(f"RMSNorm {tuple(x.shape)} bf16: max error vs float64 {err.max():.2e}, "
          f"every element within one bf16 rounding: {bool((err <= one_rounding).all())}")
    assert (err <= one_rounding).all()

    # 2. Arguments are checked when the module is built, not at the first forward.
    try:
        gatednorm.RMSNorm(heads * head_dim, eps=-1e-5)
    except ValueError as exc:
        print(f"RMSNorm(eps=-1e-5) -> ValueError: {exc}")

    # 3. The upstream-compatible forward primitive: (out, mean, rstd), statistics group-major (g * M + m).
    out, mean, rstd = gatednorm.layer_norm_fwd(x, norm.weight, None, 1e-6, z=z, group_size=head_dim,
                                               is_rms_norm=True)
    assert mean is None and rstd.shape == (heads * tokens,) and rstd.dtype == torch.float32
    assert torch.equal(out, y)
    row, group = 3, 5
    want = torch.rsqrt(x[row, group * head_dim:(group + 1) * head_dim].double().pow(2).mean() + 1e-6)
    assert abs(rstd[group * tokens + row].item() - want.item()) <= 1e-6 * want.item()
    print(f"layer_norm_fwd: out {tuple(out.shape)}, rstd {tuple(rstd.shape)} (group-major: rstd[g*M + m])")

    # 4. Gradients: an analytic backward for x, z, weight (and bias for LayerNorm).
    xf = x.float().requires_grad_()
    zf = z.float().requires_grad_()
    ln = gatednorm.LayerNorm(heads * head_dim, group_size=head_dim, norm_before_gate=False)
    ln(xf, zf).square().sum().backward()
    assert xf.grad is not None and zf.grad is not None and ln.weight.grad is not None and ln.bias.grad is not None
    print(f"LayerNorm backward: |dx| {xf.grad.norm():.3f}, |dz| {zf.grad.norm():.3f}, "
          f"|dweight| {ln.weight.grad.norm():.3f}, |dbias| {ln.bias.grad.norm():.3f}")

    # 5. Backends: which one a call gets, and why (docs/design.md, "Choosing a backend").
    print("backend for CPU tensors:", gatednorm.resolve_backend(None, x.device))
    cpu = gatednorm.info()["devices"][0]
    print(f"gatednorm.info(): {cpu['device']}: auto -> {cpu['auto']} ({cpu['auto_reason']})")
    y_native = gatednorm.rmsnorm_fn(x, norm.weight, None, z, group_size=head_dim, backend="native")
    assert torch.equal(y_native, y)


if __name__ == "__main__":
    main()
