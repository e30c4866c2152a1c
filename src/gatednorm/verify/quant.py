"""Quantized output (:func:`gatednorm.gated_norm_quant`) against float64: the reference, the judgement, cases.

Reference: the float64 norm (:func:`gatednorm.reference.gated_norm_reference`), quantized in float64
by the rules of docs/design.md ("Quantized output") with its own rounding onto the fp8/int8 grids
(:func:`grid_round`): independent of :func:`gatednorm.numerics.quantize_blocks` and of torch's float8 casts.

Judgement (:func:`check_quant`), per block of k features, with ``e`` the allowed error of the float32
(or ``round_to``) y of section 3's model at each element and ``emax`` its maximum over the block:

* **scale**: within ``[S(amax - emax), S(amax + emax)]``, ``amax`` the float64 block maximum and S the
  scale rule (``max(a / qmax, 2^-126)``, ue8m0 rounded up to a power of two), widened by the one
  float32 rounding of the division. ue8m0 scales must be powers of two.
* **q**: ``Q(v - dv) <= q <= Q(v + dv)`` with ``v = y64 / scale`` (the returned scale), ``dv = e / scale +
  2^-23 |v|`` and Q the float64 quantizer (clamp, round half to even onto the grid; monotone). So
  q is the correctly rounded quantization of the exact value, except where float32 rounding can
  decide between two neighbours (a tie, or a clamp): then either. In other words, the dequantized
  ``q * scale`` is within half a quantization step of y64, plus the float32 error of y.
* **non-finite blocks**: where the float64 block holds a NaN, scale NaN; an Inf (and no NaN), scale
  +Inf; and every q of such a block NaN (fp8) or 0 (int8).

Also runnable on its own (the ``gatednorm verify`` matrix does not include these cases yet)::

    python -m gatednorm.verify.quant [--device cuda] [--backend triton] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..functional import gated_norm_quant
from ..reference import gated_norm_reference
from ..spec import QUANT_FORMATS, quant_max
from .tolerance import allowed_error, k_factor, magnitudes

#: float32's unit roundoff doubled: the bound used for one float32 rounding (division, cast).
_U32 = 2.0**-23
#: The smallest scale (numerics.QUANT_SCALE_MIN, restated: the reference does not import the implementation).
SCALE_MIN = 2.0**-126
#: log2 of the smallest normal of each fp8 format (below it the grid spacing is constant).
_MIN_NORMAL_EXP = {"fp8_e4m3": -6, "fp8_e4m3fnuz": -7}


# ---------------------------------------------------------------------------
# The float64 reference
# ---------------------------------------------------------------------------


def grid_round(v: torch.Tensor, quant: str) -> torch.Tensor:
    """float64 ``v`` clamped to [-qmax, qmax] and rounded half to even onto the grid of ``quant`` (as float64).

    fp8 e4m3: 3 mantissa bits, so the spacing at |v| in [2^e, 2^(e+1)) is 2^(e-3), and below the
    smallest normal (2^-6; fnuz 2^-7) it stays at that value's spacing. int8: the integers.
    """
    v = v.clamp(-quant_max(quant), quant_max(quant))
    if quant == "int8":
        return torch.round(v)  # half to even
    _, exponent = torch.frexp(v)  # v = m * 2^exponent with |m| in [0.5, 1): floor(log2 |v|) = exponent - 1
    e = (exponent - 1).clamp(min=_MIN_NORMAL_EXP[quant])
    spacing = torch.ldexp(torch.ones_like(v), e - 3)
    return torch.round(v / spacing) * spacing  # exact scalings by powers of two; round: half to even


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive float64 s (exact); NaN and Inf unchanged."""
    m, exponent = torch.frexp(s)
    up = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, exponent - 1, exponent))
    return torch.where(torch.isfinite(s), up, s)


def reference_scales(amax: torch.Tensor, quant: str, scale_format: str, *, float32_division: bool = True
                     ) -> torch.Tensor:
    """float64 scales of float64 block maxima: max(amax / qmax, 2^-126), ue8m0 rounded up to a power of two.

    ``float32_division``: round amax / qmax to float32 first, as the rule says (the float64 quotient of a
    float32 amax, rounded to float32, is the float32 quotient)."""
    s = amax / quant_max(quant)
    if float32_division:
        s = s.float().double()
    s = s.clamp(min=SCALE_MIN)
    return pow2_ceil(s) if scale_format == "ue8m0" else s


def reference_quant(y: torch.Tensor, quant: str, block: int | None, scale_format: str = "float32",
                    round_to: torch.dtype | None = None, *, float32_steps: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule of docs/design.md in float64: (q values (M, N), scales (M, N // k)), both float64.

    ``y`` (M, N) is the norm's output (float64, or the float32 y of an implementation). ``round_to``
    rounds y to that dtype first. ``float32_steps`` rounds each division to float32 as the rule
    does (for float32-exact y this reproduces an implementation's bits exactly); False gives the
    exact-arithmetic quantization of y.
    """
    m, n = y.shape
    k = block or n
    y = y.double()
    if round_to is not None:
        y = y.to(round_to).double()
    y3 = y.view(m, n // k, k)
    scale = reference_scales(y3.abs().amax(-1), quant, scale_format, float32_division=float32_steps)
    nan = y3.isnan().any(-1)
    scale = torch.where(nan, float("nan"), scale)  # amax ignores nothing here; NaN wins over Inf
    v = y3 / scale.unsqueeze(-1)
    if float32_steps:
        v = v.float().double()
    q = grid_round(v, quant)
    finite = torch.isfinite(scale).unsqueeze(-1)
    q = torch.where(finite, q, 0.0 if quant == "int8" else float("nan"))
    return q.view(m, n), scale


def reference_y(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y64 (M, N), e (M, N)): the float64 norm and the allowed error of the y an implementation quantizes
    (float32, or ``round_to``; one more rounding to float32 for float64 inputs), from section 3's model."""
    n = x.shape[-1]
    gs = group_size or n
    with torch.no_grad():
        y64 = gated_norm_reference(x.cpu(), weight.cpu(), None if bias is None else bias.cpu(),
                                   None if z is None else z.cpu(), eps, gs, norm_before_gate, is_rms_norm,
                                   activation)[0].reshape(-1, n)
    a = magnitudes(x, weight, bias, z, None, gs, norm_before_gate, is_rms_norm,
                   "swish" if activation == "silu" else activation, eps)["y"].reshape(-1, n)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    e = allowed_error(y64, a, round_to or torch.float32, k_factor(gs), compute)
    return y64, e


# ---------------------------------------------------------------------------
# Judgement
# ---------------------------------------------------------------------------


@dataclass
class QuantCheck:
    """The outcome of :func:`check_quant` (counts are of blocks for scales, of elements for q)."""

    passed: bool
    blocks: int
    scale_outside: int  # finite blocks whose scale is outside its bounds (or not a power of two for ue8m0)
    q_outside: int  # elements of finite blocks outside [Q(v - dv), Q(v + dv)]
    q_neighbour: int  # elements where q is the neighbour of the exact rounding: allowed, within y's error
    nonfinite_mismatch: int  # blocks whose non-finite handling differs from the rule
    detail: str = ""


def check_quant(q: torch.Tensor, scale: torch.Tensor, y64: torch.Tensor, err: torch.Tensor, quant: str,
                block: int | None, scale_format: str = "float32") -> QuantCheck:
    """Judge (q, scale) of an (M, N) call against the float64 y64 and its allowed error (module docstring).

    ``q`` (any shape of M * N elements, the quant dtype), ``scale`` (M * G elements, any strides).
    """
    m, n = y64.shape
    k = block or n
    g = n // k
    qv = q.detach().cpu().float().double().reshape(m, g, k)
    s = scale.detach().cpu().double().reshape(m, g)
    y3 = y64.reshape(m, g, k)
    e3 = err.reshape(m, g, k)
    has_nan = y3.isnan().any(-1)
    has_inf = y3.isinf().any(-1) & ~has_nan
    fin = ~(has_nan | has_inf)
    marked = (qv == 0) if quant == "int8" else qv.isnan()
    bad_nonfinite = ((has_nan & ~s.isnan()) | (has_inf & ~(s == math.inf)) | (fin & ~torch.isfinite(s))
                     | (~fin & ~marked.all(-1)))

    amax = y3.abs().amax(-1).where(fin, 0.0)
    emax = e3.amax(-1).where(fin, 0.0)
    lo = reference_scales((amax - emax).clamp(min=0.0), quant, "float32", float32_division=False) * (1 - _U32)
    hi = reference_scales(amax + emax, quant, "float32", float32_division=False) * (1 + _U32)
    if scale_format == "ue8m0":
        lo, hi = pow2_ceil(lo), pow2_ceil(hi)
    scale_bad = fin & ~((lo <= s) & (s <= hi))
    if scale_format == "ue8m0":
        scale_bad |= fin & (torch.frexp(s)[0] != 0.5)

    s_ok = s.where(fin & torch.isfinite(s) & (s > 0), 1.0).unsqueeze(-1)
    v = y3.where(fin.unsqueeze(-1), 0.0) / s_ok
    dv = e3.where(fin.unsqueeze(-1), 0.0) / s_ok + v.abs() * _U32
    q_lo, q_hi, q_exact = grid_round(v - dv, quant), grid_round(v + dv, quant), grid_round(v, quant)
    inside = (q_lo <= qv) & (qv <= q_hi)
    fin_e = fin.unsqueeze(-1).expand_as(qv)
    q_bad = fin_e & ~inside
    q_neighbour = fin_e & inside & (qv != q_exact)

    counts = (int(scale_bad.sum()), int(q_bad.sum()), int(q_neighbour.sum()), int(bad_nonfinite.sum()))
    detail = ""
    if counts[0]:
        i = scale_bad.nonzero()[0].tolist()
        detail += f"scale[{i}] = {s[tuple(i)].item()!r} outside [{lo[tuple(i)].item()!r}, {hi[tuple(i)].item()!r}]; "
    if counts[1]:
        i = q_bad.nonzero()[0].tolist()
        detail += (f"q[{i}] = {qv[tuple(i)].item()!r}, allowed [{q_lo[tuple(i)].item()!r}, "
                   f"{q_hi[tuple(i)].item()!r}] (v = {v[tuple(i)].item()!r}); ")
    if counts[3]:
        i = bad_nonfinite.nonzero()[0].tolist()
        detail += f"non-finite block {i}: scale {s[tuple(i)].item()!r}; "
    return QuantCheck(counts[0] == counts[1] == counts[3] == 0, m * g, counts[0], counts[1], counts[2], counts[3],
                      detail)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantCase:
    """One call of gated_norm_quant: x is (*lead, n), ``block`` the quant group size (None: per token)."""

    lead: tuple[int, ...]
    n: int
    group_size: int
    block: int | None
    is_rms_norm: bool
    gate: str  # "none" | "after" | "before"
    dtype: str
    quant: str
    scale_format: str
    round_to: str  # "none" | "bfloat16"

    @property
    def name(self) -> str:
        norm = "rms" if self.is_rms_norm else "ln"
        lead = "x".join(map(str, self.lead))
        k = f"k{self.block}" if self.block else "per-token"
        rt = "" if self.round_to == "none" else f" via {self.round_to}"
        return (f"{lead}x{self.n}/g{self.group_size} {k} {norm} gate-{self.gate} {self.dtype} -> {self.quant} "
                f"{self.scale_format}{rt}")


#: (lead, n, group size, quant block): DeepGEMM blocks, per token, padded groups, groups spanning blocks.
QUICK_QUANT_SHAPES = (((33,), 256, 64, None), ((2, 4), 128, 128, 128), ((8,), 1920, 640, 128),
                      ((5,), 384, 96, 96), ((6,), 512, 128, 512))
FULL_QUANT_SHAPES = QUICK_QUANT_SHAPES + (((64, 16), 128, 128, 128), ((256,), 4096, 128, 128),
                                          ((128,), 5120, 640, 128), ((32,), 8192, 1024, None),
                                          ((100,), 1000, 200, 200))


def quant_cases(quick: bool = False, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> list[QuantCase]:
    """Every shape x norm x gate x dtype once, with the quant format, scale format and round_to cycling
    through their values (each meets every shape), so the matrix stays linear in its factors."""
    shapes = QUICK_QUANT_SHAPES if quick else FULL_QUANT_SHAPES
    formats = list(itertools.product(QUANT_FORMATS, ("float32", "ue8m0")))
    cases = []
    for i, ((lead, n, gs, k), rms, gate, dtype) in enumerate(
            itertools.product(shapes, (False, True), ("none", "after", "before"), dtypes)):
        quant, fmt = formats[i % len(formats)]
        round_to = "bfloat16" if (dtype == "bfloat16" and i % 2) else "none"
        cases.append(QuantCase(lead, n, gs, k, rms, gate, dtype, quant, fmt, round_to))
    return cases


def run_quant_case(case: QuantCase, backend: str, device: torch.device, seed: int = 0) -> QuantCheck:
    """Run one case on ``backend`` and judge it against float64."""
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(seed)
    shape = (*case.lead, case.n)
    x = (0.5 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
    z = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype) if case.gate != "none" else None
    w = (1 + 0.5 * torch.randn(case.n, generator=g, dtype=torch.float64)).to(device, dtype)
    b = (0.5 * torch.randn(case.n, generator=g, dtype=torch.float64)).to(device, dtype)
    round_to = None if case.round_to == "none" else getattr(torch, case.round_to)
    eps = 1e-6
    nbg = case.gate != "before"
    with torch.no_grad():
        q, scale = gated_norm_quant(x, w, b, eps, z, case.group_size, nbg, case.is_rms_norm, quant=case.quant,
                                    quant_group_size=case.block, scale_format=case.scale_format,
                                    round_to=round_to, backend=backend)
    y64, e = reference_y(x, w, b, z, eps, case.group_size, nbg, case.is_rms_norm, "swish", round_to)
    return check_quant(q, scale, y64, e, case.quant, case.block, case.scale_format)


def main(argv: list[str] | None = None) -> int:
    """Run the quantized cases on the available backends; print failures and a summary; exit 1 on failure."""
    from . import runner  # the backends available on a device (runner imports the rest of verify)

    p = argparse.ArgumentParser(prog="python -m gatednorm.verify.quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", action="append", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", action="append", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backend or [b for b in runner.available_backends(device) if b != "compiled"]
    cases = quant_cases(args.quick, tuple(args.dtype or ("float32", "bfloat16", "float16")))
    failed = 0
    start = time.monotonic()
    for backend in backends:
        ties = 0
        for i, case in enumerate(cases):
            try:
                res = run_quant_case(case, backend, device, args.seed + i)
            except Exception as exc:  # noqa: BLE001 - report every case, keep going
                res = QuantCheck(False, 0, 0, 0, 0, 0, f"{type(exc).__name__}: {exc}")
            ties += res.q_neighbour
            if not res.passed:
                failed += 1
                print(f"FAIL {backend} {case.name}: {asdict(res)}")
        print(f"{backend}: {len(cases)} quantized cases; q elements one step from the exact rounding "
              f"(allowed: within the float32 / round_to error of y): {ties}")
    print(f"{'FAILED' if failed else 'OK'}: {failed} of {len(cases) * len(backends)} cases failed "
          f"({time.monotonic() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
