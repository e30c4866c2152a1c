"""The native backend: forward and analytic backward in plain PyTorch ops.

Runs on every device PyTorch runs on (CPU, CUDA, ROCm, XPU, MPS, NPU/GCU
plugins, meta). All math happens in the compute dtype C (float32, or float64
for float64 inputs) and the result is rounded once, when it is written to
``out``: exactly the function of DESIGN.md section 1.

Rows are processed in blocks so that the float32 temporaries stay small and
cache-resident on CPU instead of being full-size copies of the input; on
accelerators one block covers all rows (launch count matters more there).
Each row's result only depends on that row, so blocking never changes bits.
"""

from __future__ import annotations

import torch

from .spec import NormSpec, compute_dtype

#: On CPU, target this many elements per row block (a few MB of fp32 temporaries).
CPU_BLOCK_ELEMENTS = 1 << 16


def rows_per_block(m: int, n: int, device: torch.device) -> int:
    """Rows handled per block: cache-sized on CPU, everything at once elsewhere."""
    if device.type != "cpu" or m == 0:
        return max(m, 1)
    return max(1, min(m, CPU_BLOCK_ELEMENTS // n))


def gate_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z) in z's (compute) dtype: swish = z * sigmoid(z), or sigmoid(z)."""
    if activation == "swish":
        return torch.nn.functional.silu(z)
    return torch.sigmoid(z)


def gate_activation_and_derivative(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)). swish' = s * (1 + z * (1 - s)); sigmoid' = s * (1 - s)."""
    s = torch.sigmoid(z)
    one_minus_s = 1.0 - s
    if activation == "swish":
        return z * s, s * (1.0 + z * one_minus_s)
    return s, s * one_minus_s


def _forward_block(x, weight_c, bias_c, z, spec: NormSpec, out, mean_gm, rstd_gm):
    """Normalise rows x (m, N) into out; write stats into (G, m) views."""
    m, n = x.shape
    c = weight_c.dtype
    groups = n // spec.group_size
    xc = x.to(c)
    gate = None
    if z is not None:
        gate = gate_activation(z.to(c), spec.activation)
        if not spec.norm_before_gate:
            xc = xc * gate
    xg = xc.reshape(m, groups, spec.group_size)
    if not spec.is_rms_norm:
        mean = xg.mean(dim=-1, keepdim=True)
        xg = xg - mean  # two-pass variance: centre first, then square
        mean_gm.copy_(mean.view(m, groups).t())
    var = xg.square().mean(dim=-1, keepdim=True)
    rstd = torch.sqrt(var + spec.eps).reciprocal()
    rstd_gm.copy_(rstd.view(m, groups).t())
    y = (xg * rstd).view(m, n) * weight_c
    if bias_c is not None:
        y = y + bias_c
    if gate is not None and spec.norm_before_gate:
        y = y * gate
    out.copy_(y)  # the one rounding to the output dtype


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    spec: NormSpec,
    out: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Write the gated norm of x (M, N) into out (M, N); return (mean, rstd).

    mean (None for RMSNorm) and rstd are 1-D, G*M long, group-major.
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    groups = n // spec.group_size
    mean = None if spec.is_rms_norm else torch.empty(groups * m, dtype=c, device=x.device)
    rstd = torch.empty(groups * m, dtype=c, device=x.device)
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    step = rows_per_block(m, n, x.device)
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        _forward_block(
            x[rows],
            weight_c,
            bias_c,
            z[rows] if z is not None else None,
            spec,
            out[rows],
            mean_gm[:, rows] if mean_gm is not None else None,
            rstd_gm[:, rows],
        )
    return mean, rstd


def _backward_block(dy, x, weight_c, bias_c, z, mean_gm, rstd_gm, spec: NormSpec, dx, dz, dw_acc, db_acc):
    m, n = x.shape
    c = weight_c.dtype
    groups = n // spec.group_size
    shape3 = (m, groups, spec.group_size)
    xc = x.to(c)
    gate = dgate = None
    if z is not None:
        gate, dgate = gate_activation_and_derivative(z.to(c), spec.activation)
    x_in = xc
    if gate is not None and not spec.norm_before_gate:
        xc = xc * gate
    rstd = rstd_gm.t().reshape(m, groups, 1)
    xg = xc.reshape(shape3)
    if not spec.is_rms_norm:
        xg = xg - mean_gm.t().reshape(m, groups, 1)
    xhat = (xg * rstd).view(m, n)
    dyc = dy.to(c)
    if gate is not None and spec.norm_before_gate:
        # y = (xhat * w + b) * act(z): the pre-gate value feeds dz.
        y_pre = xhat * weight_c
        if bias_c is not None:
            y_pre = y_pre + bias_c
        if dz is not None:
            dz.copy_(dyc * y_pre * dgate)
        dyc = dyc * gate
    if dw_acc is not None:
        dw_acc += (dyc * xhat).sum(dim=0)
    if db_acc is not None:
        db_acc += dyc.sum(dim=0)
    if dx is None and (dz is None or spec.norm_before_gate):
        return
    wdy = (dyc * weight_c).view(shape3)
    xhat3 = xhat.view(shape3)
    c1 = (xhat3 * wdy).mean(dim=-1, keepdim=True)
    dxc = wdy - xhat3 * c1
    if not spec.is_rms_norm:
        dxc = dxc - wdy.mean(dim=-1, keepdim=True)
    dxc = (dxc * rstd).view(m, n)
    if gate is not None and not spec.norm_before_gate:
        # xc = x * act(z)
        if dz is not None:
            dz.copy_(dxc * x_in * dgate)
        dxc = dxc * gate
    if dx is not None:
        dx.copy_(dxc)


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    spec: NormSpec,
    needs_dx: bool = True,
    needs_dz: bool = True,
    needs_dweight: bool = True,
    needs_dbias: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Analytic gradients (dx, dz, dweight, dbias) from the saved inputs and stats.

    With xhat = (xc - mean) * rstd and g = dL/dxhat = w * dL/dy':
    LayerNorm dxc = rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops mean(g).
    dx and dz are in x's and z's dtypes, dweight/dbias in the parameters' dtypes,
    each rounded once from the compute dtype.
    """
    m, n = x.shape
    c = compute_dtype(x.dtype)
    groups = n // spec.group_size
    dx = torch.empty(m, n, dtype=x.dtype, device=x.device) if needs_dx else None
    dz = torch.empty(m, n, dtype=z.dtype, device=x.device) if (needs_dz and z is not None) else None
    dw_acc = torch.zeros(n, dtype=c, device=x.device) if needs_dweight else None
    db_acc = torch.zeros(n, dtype=c, device=x.device) if (needs_dbias and bias is not None) else None
    weight_c = weight.to(c)
    bias_c = bias.to(c) if bias is not None else None
    mean_gm = mean.view(groups, m) if mean is not None else None
    rstd_gm = rstd.view(groups, m)
    step = rows_per_block(m, n, x.device)
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        _backward_block(
            dy[rows],
            x[rows],
            weight_c,
            bias_c,
            z[rows] if z is not None else None,
            mean_gm[:, rows] if mean_gm is not None else None,
            rstd_gm[:, rows],
            spec,
            dx[rows] if dx is not None else None,
            dz[rows] if dz is not None else None,
            dw_acc,
            db_acc,
        )
    dweight = dw_acc.to(weight.dtype) if dw_acc is not None else None
    dbias = db_acc.to(bias.dtype) if db_acc is not None else None
    return dx, dz, dweight, dbias
