"""The error model of ``gatednorm verify``: how far a result may be from the exact (float64) value.

:func:`magnitudes` gives the size A of the terms that make up each computed quantity (a forward
error analysis of the formula), :func:`allowed_error` turns it into a per-element bound and
:func:`compare` measures a result against a reference and that bound. The rule itself is
:data:`TOLERANCE_DOC` below (the report quotes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cases import DTYPES, EPS

#: The tolerance, explained; the module docstring and ``verify --markdown`` both show this text.
TOLERANCE_DOC = """\
A backend computes in C (float32; float64 for float64 inputs) and rounds once to the output
dtype O. With ``u(T) = 2**-p`` the unit roundoff of T (half an ulp, relative; p = 24 for
float32, 11 for float16, 8 for bfloat16, 53 for float64), the computed value before the final
rounding differs from the exact (float64) value by at most ``e = K * u(C) * A``, where

* ``A`` is the magnitude of the terms that make up the value (a forward error bound of the
  formula: e.g. for y it is ``(cond * |w| + |b|) * |act(z)|`` with ``cond = max|xc| * rstd`` of
  the row's group; a one-pass variance would not meet it for a large mean offset);
* ``K = 8 + log2(group_size)`` for per-row values (tree/pairwise reductions over a group);
  reductions over rows (dweight, dbias) add ``log2(M) + 8`` more.

The final rounding adds at most half an ulp of O, i.e. ``u(O) * |value|`` (plus half the
smallest subnormal spacing). Hence the check, per element::

    |got - ref| <= u(O) * (|ref| + e) + e + min_spacing(O) / 2

so float16/bfloat16 outputs must be within about one rounding (1 ulp) of the float64 value, and
float32 within its accumulation error. Comparisons between two approximations (``torch``,
``fla``) allow twice that. Non-finite reference values (after rounding to O) must be matched
exactly (same infinities, NaN where NaN). Errors in ulps are measured relative to the float64
reference rounded to O (for ``torch``/``fla``: to their rounded output)."""

# One source for the text: help() and the docs show the rule next to the code that applies it.
# (`or ""`: docstrings are None under python -OO.)
__doc__ = (__doc__ or "") + "\nTolerance (per element)\n-----------------------\n" + TOLERANCE_DOC + "\n"

#: The rule in one line (the table of :func:`tolerance_table` and the summary printed by verify).
TOLERANCE_RULE = "|got-ref| <= u(O)*(|ref|+e) + e + min_spacing(O)/2, e = K*u(C)*A"

#: Base of the accumulation factor K = BASE_K + log2(group_size): a few roundings per element
#: (centre, scale, weight, bias, gate, rsqrt) on top of the log-depth of a tree reduction.
BASE_K = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp, relative: 2**-p with p the significand bits (implicit bit included)."""
    return float(torch.finfo(dtype).eps) / 2.0


def min_spacing(dtype: torch.dtype) -> float:
    """The smallest gap between representable values (the subnormal spacing)."""
    fi = torch.finfo(dtype)
    return float(fi.smallest_normal) * float(fi.eps)


def tolerance_table() -> list[dict]:
    """The documented tolerance per output dtype (the ``tolerance`` list of ``verify --json``).

    Keys: ``dtype`` (the output dtype O), ``unit_roundoff_output`` (u(O)), ``compute_dtype`` (C),
    ``unit_roundoff_compute`` (u(C)) and ``rule`` (:data:`TOLERANCE_RULE` with K).
    """
    rows = []
    for name, dt in DTYPES.items():
        c = torch.float64 if dt == torch.float64 else torch.float32
        rows.append({
            "dtype": name,
            "unit_roundoff_output": unit_roundoff(dt),
            "compute_dtype": str(c).removeprefix("torch."),
            "unit_roundoff_compute": unit_roundoff(c),
            "rule": f"{TOLERANCE_RULE}, K = 8+log2(gs)",
        })
    return rows


def ulp_of(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of ``values`` (float64 tensor of values representable in dtype)."""
    fi = torch.finfo(dtype)
    p = round(-math.log2(float(fi.eps))) + 1  # significand bits including the implicit one
    _, exp = torch.frexp(values.abs().clamp_min(float(fi.smallest_normal)))
    return torch.ldexp(torch.ones_like(values), (exp - p).to(torch.int32))


# ---------------------------------------------------------------------------
# Comparison of one quantity
# ---------------------------------------------------------------------------

@dataclass
class Comparison:
    """Errors of one tensor against one reference."""

    max_abs: float
    mean_abs: float
    max_ulps: float
    worst_ratio: float  # max over elements of |err| / allowed (<= 1 passes)
    nonfinite_mismatch: int
    numel: int

    @property
    def passed(self) -> bool:
        return self.nonfinite_mismatch == 0 and self.worst_ratio <= 1.0


def allowed_error(ref: torch.Tensor, magnitude: torch.Tensor, out_dtype: torch.dtype, k: float,
                  compute_dtype: torch.dtype = torch.float32, pairs: int = 1) -> torch.Tensor:
    """Per-element bound (float64) of :data:`TOLERANCE_DOC`; ``pairs=2`` when both sides are approximations."""
    e = k * unit_roundoff(compute_dtype) * magnitude.double().cpu().reshape(ref.shape)
    bound = unit_roundoff(out_dtype) * (ref.double().cpu().abs() + e) + e + min_spacing(out_dtype) / 2
    return pairs * bound


def compare(got: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor | float,
            out_dtype: torch.dtype | None = None) -> Comparison:
    """Compare ``got`` with ``ref`` (float64, exact) elementwise, on CPU in float64.

    ``ref`` is rounded to ``out_dtype`` (default got's dtype) to decide which entries must be
    non-finite: there ``got`` has to match exactly (same infinity, NaN for NaN).
    """
    out_dtype = out_dtype or got.dtype
    g = got.detach().to("cpu", torch.float64).reshape(-1)
    r = ref.detach().to("cpu", torch.float64).reshape(-1)
    if g.shape != r.shape:
        raise ValueError(f"got has {g.numel()} elements but ref has {r.numel()}")
    r_round = r.to(out_dtype).double() if out_dtype != torch.float64 else r
    finite = torch.isfinite(r_round)
    both_nan = torch.isnan(g) & torch.isnan(r_round)
    same_inf = torch.isinf(g) & (g == r_round)
    mismatch = int((~finite & ~(both_nan | same_inf)).sum()) + int((finite & ~torch.isfinite(g)).sum())
    n = g.numel()
    if not bool(finite.any()):
        return Comparison(0.0, 0.0, 0.0, 0.0, mismatch, n)
    a = torch.as_tensor(allowed, dtype=torch.float64).to("cpu").reshape(-1).expand(n)[finite]
    gf, rf, rrf = g[finite], r[finite], r_round[finite]
    ok = torch.isfinite(gf)
    gf = torch.where(ok, gf, rf)  # already counted as mismatches
    err = (gf - rf).abs()
    ulps = (gf - rrf).abs() / ulp_of(rrf, out_dtype)
    ratio = err / a
    return Comparison(
        max_abs=float(err.max()),
        mean_abs=float(err.mean()),
        max_ulps=float(ulps.max()),
        worst_ratio=float(ratio.max()),
        nonfinite_mismatch=mismatch,
        numel=n,
    )


# ---------------------------------------------------------------------------
# Error magnitudes (float64 forward error analysis of the formula)
# ---------------------------------------------------------------------------

def _act(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(z), act'(z), and the magnitude of the terms of act'(z) (for its rounding error).

    The derivatives use ``1 - s`` (s = sigmoid(z)), which carries an absolute error of u * s when s
    is near 1, so the magnitudes are s * (1 + |z|) (swish) and s (sigmoid), not the derivative itself.
    """
    s = torch.sigmoid(z)
    if activation == "swish":
        return z * s, s * (1 + z * (1 - s)), s * (1 + z.abs())
    return s, s * (1 - s), s


def magnitudes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
               dy: torch.Tensor | None, group_size: int, norm_before_gate: bool, is_rms_norm: bool,
               activation: str, eps: float = EPS) -> dict[str, torch.Tensor]:
    """Float64 magnitudes A of each computed quantity (see :data:`TOLERANCE_DOC`); shapes like the quantity.

    The gradient magnitudes (dx, dz, dweight, dbias) are only computed when ``dy`` is given.
    """
    n = x.shape[-1]
    gs = group_size
    groups = n // gs
    xd = x.detach().to("cpu", torch.float64).reshape(-1, groups, gs)
    m = xd.shape[0]
    w = weight.detach().to("cpu", torch.float64).view(groups, gs)
    b = bias.detach().to("cpu", torch.float64).view(groups, gs) if bias is not None else torch.zeros_like(w)
    one = torch.ones_like(xd)
    gate, dgate_mag = one, torch.zeros_like(xd)
    if z is not None:
        zd = z.detach().to("cpu", torch.float64).reshape(-1, groups, gs)
        gate, _, dgate_mag = _act(zd, activation)
    xc = xd * gate if (z is not None and not norm_before_gate) else xd
    mean = torch.zeros(m, groups, 1, dtype=torch.float64) if is_rms_norm else xc.mean(-1, keepdim=True)
    var = ((xc - mean) ** 2).mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(var + eps)
    amax = xc.abs().amax(-1, keepdim=True)
    cond = amax * rstd  # bounds |xhat| and the centring error
    # Non-finite data (NaN/Inf rows, var = 0 with eps = 0) is checked by exact match, not by this bound;
    # a finite output of such a group (e.g. RMSNorm: x * 0 where another x is inf) must then be exact.
    cond = torch.where(torch.isfinite(cond), cond, torch.zeros_like(cond))
    gate_after = gate if (z is not None and norm_before_gate) else one
    pre = cond * w.abs() + b.abs()
    out = {
        "y": torch.nan_to_num(pre * gate_after.abs(), nan=0.0).reshape(x.shape),
        "mean": amax.reshape(m, groups).t().reshape(-1),
        "rstd": (rstd * cond.clamp_min(1)).reshape(m, groups).t().reshape(-1),
    }
    if dy is not None:
        dyd = dy.detach().to("cpu", torch.float64).reshape(-1, groups, gs).abs()
        g_eff = dyd * gate_after.abs()
        out["dweight"] = (g_eff * cond).sum(0).reshape(-1)
        out["dbias"] = g_eff.sum(0).reshape(-1)
        gw = g_eff * w.abs()
        dxc = rstd * cond * (gw + gw.mean(-1, keepdim=True) + cond * (gw * cond).mean(-1, keepdim=True))
        dxc = torch.nan_to_num(dxc, nan=0.0)
        if z is not None and not norm_before_gate:
            out["dx"] = (dxc * gate.abs()).reshape(x.shape)
            out["dz"] = (dxc * xd.abs() * dgate_mag).reshape(x.shape)
        else:
            out["dx"] = dxc.reshape(x.shape)
            if z is not None:
                out["dz"] = (dyd * pre * dgate_mag).reshape(x.shape)
    return out


def k_factor(group_size: int, rows: int = 1, over_rows: bool = False) -> float:
    """The accumulation factor K of :data:`TOLERANCE_DOC`: per-row values, or (``over_rows``) sums over rows."""
    k = BASE_K + math.log2(max(group_size, 1))
    if over_rows:
        k += BASE_K + math.log2(max(rows, 1))
    return k
