"""The quantized cases of ``gatednorm verify``: :func:`gatednorm.gated_norm_quant` against float64.

``gatednorm verify`` runs them by default beside the norm's cases (``--quant`` runs only them,
``--no-quant`` none): each case is one (backend, :class:`QuantShape`, :class:`QuantVariant`), ordered,
sharded and seeded like the norm's cases, and reported as two checks, ``scale`` and ``q``, against
the reference ``float64/<format>`` (:func:`gatednorm.verify.runner.run_case`).
:mod:`gatednorm.verify.quant` re-exports this module's names and is ``python -m gatednorm.verify.quant``.

Reference: the float64 norm (:func:`gatednorm.reference.gated_norm_reference`), quantized in float64
by the rules of docs/design.md ("Quantized output") with its own rounding onto the fp8/int8 grids
(:func:`grid_round`): independent of :func:`gatednorm.numerics.quantize_blocks` and of torch's float8 casts.

Judgement (:func:`judge_quant`, :func:`check_quant`), per block of k features, with ``e`` the allowed
error of the float32 (or ``round_to``) y of section 3's model at each element and ``emax`` its maximum
over the block:

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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..functional import gated_norm_quant
from ..reference import gated_norm_reference
from ..spec import QUANT_FORMATS, quant_max
from .cases import Shape, breadth_first
from .tolerance import Comparison, allowed_error, k_factor, magnitudes, ulp_of

__all__ = [
    "FULL_QUANT_SHAPES",
    "QUANT_EPS",
    "QUANT_QUANTITIES",
    "QUANT_RULE",
    "QUICK_QUANT_SHAPES",
    "SCALE_MIN",
    "QuantCase",
    "QuantCheck",
    "QuantInputs",
    "QuantJudgement",
    "QuantShape",
    "QuantVariant",
    "call_quant",
    "check_quant",
    "grid_gaps",
    "grid_round",
    "judge_case",
    "judge_quant",
    "make_quant_inputs",
    "pow2_ceil",
    "quant_case_order",
    "quant_cases",
    "quant_shape",
    "quant_shapes",
    "reference_name",
    "reference_quant",
    "reference_scales",
    "reference_y",
    "run_quant_case",
]

#: float32's unit roundoff doubled: the bound used for one float32 rounding (division, cast).
_U32 = 2.0**-23
#: The smallest scale (numerics.QUANT_SCALE_MIN, restated: the reference does not import the implementation).
SCALE_MIN = 2.0**-126
#: log2 of the smallest normal of each fp8 format (below it the grid spacing is constant).
_MIN_NORMAL_EXP = {"fp8_e4m3": -6, "fp8_e4m3fnuz": -7}
#: The quantities of a quantized case, in the order of the report.
QUANT_QUANTITIES = ("scale", "q")
#: The eps of every quantized case.
QUANT_EPS = 1e-6
#: The smallest err/tol of a check that fails (just above 1), see :meth:`QuantJudgement.comparisons`.
_JUST_ABOVE_ONE = math.nextafter(1.0, 2.0)

#: The criterion of the ``scale`` and ``q`` checks in one paragraph (the report quotes it).
QUANT_RULE = (
    "Quantized output (reference float64/<format>: the float64 norm quantized in float64 by the rule of "
    "docs/design.md section 6): scale within [S(amax-emax), S(amax+emax)] (S the scale rule on the float64 "
    "block maximum, emax the block's float32 error of y, widened by one float32 rounding; ue8m0: a power of two); "
    "q between Q(v-dv) and Q(v+dv), v = y64/scale, dv = e/scale + 2^-23|v| (Q: clamp, round half to even onto "
    "the grid), i.e. q*scale within half a quantization step of y64 plus the float32 error of y; a block holding "
    "NaN/Inf: scale NaN/+Inf and every q NaN (fp8) or 0 (int8). scale rows: abs error of the scale, ulps of "
    "float32 (ue8m0: powers of two) from the rule's scale, err/tol against the bound on that side; q rows: abs "
    "error of q*scale vs y64, 'ulps' in quantization steps from the correctly rounded q, err/tol the error "
    "beyond half a step over the float32 error of y (0: correctly rounded; <= 1: the neighbour y's error "
    "allows).")


def reference_name(quant: str) -> str:
    """The ``reference`` of a quantized case's checks: ``float64/<quant>``."""
    return f"float64/{quant}"


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


def grid_gaps(q: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gap below, gap above) of float64 grid values ``q`` of ``quant``: the distances to the next grid
    value down and up; +Inf beyond ±qmax (everything there rounds to ±qmax)."""
    qmax = quant_max(quant)
    a = q.abs()
    if quant == "int8":
        toward = away = torch.ones_like(q)
    else:
        m, exponent = torch.frexp(a)
        e0 = _MIN_NORMAL_EXP[quant]
        e = torch.where(a == 0, e0, exponent - 1).clamp(min=e0)
        away = torch.ldexp(torch.ones_like(q), e - 3)  # the spacing of a's binade
        # at a power of two above the smallest normal the binade below is twice as fine
        toward = torch.where((m == 0.5) & (exponent - 1 > e0), away / 2, away)
    away = torch.where(a + away > qmax, math.inf, away)
    up = torch.where(q >= 0, away, toward)
    down = torch.where(q > 0, toward, away)
    return down, up


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


def _ratio(err: torch.Tensor, tol: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """err / tol (0 where err is 0, Inf where only tol is), made to agree with the interval check ``inside``:
    at most 1 inside, above 1 outside (the two differ only on a tie's boundary, where the interval decides)."""
    r = torch.where(err == 0, 0.0, err / tol).nan_to_num(nan=math.inf, posinf=math.inf)
    return torch.where(inside, r.clamp(max=1.0), r.clamp(min=_JUST_ABOVE_ONE))


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _mean(t: torch.Tensor) -> float:
    return float(t.mean()) if t.numel() else 0.0


@dataclass
class QuantJudgement:
    """Everything :func:`judge_quant` decided about one (q, scale), per block (M, G) and element (M, G, k).

    :meth:`check` condenses it to a :class:`QuantCheck`, :meth:`comparisons` to the ``scale`` and ``q``
    rows of ``gatednorm verify``; both pass exactly when every block and element is within the rule.
    """

    quant: str
    scale_format: str
    y: torch.Tensor  # y64 (M, G, k)
    s: torch.Tensor  # the returned scales (M, G), float64
    q: torch.Tensor  # the returned q values (M, G, k), float64
    fin: torch.Tensor  # blocks whose float64 y is finite
    s_rule: torch.Tensor  # the rule's scale of the float64 block maximum (float32 division)
    s_lo: torch.Tensor
    s_hi: torch.Tensor
    scale_bad: torch.Tensor  # finite blocks whose scale is outside [s_lo, s_hi] (or not a power of two: ue8m0)
    scale_nonfinite_bad: torch.Tensor  # blocks whose scale breaks the non-finite rule (or is non-finite)
    v: torch.Tensor  # y64 / s (finite blocks)
    dv: torch.Tensor
    q_lo: torch.Tensor
    q_hi: torch.Tensor
    q_exact: torch.Tensor  # the correctly rounded quantization of v
    q_bad: torch.Tensor  # elements of finite blocks outside [q_lo, q_hi]
    q_nonfinite_bad: torch.Tensor  # elements of non-finite blocks not marked (NaN; int8: 0)
    detail: str

    @property
    def q_neighbour(self) -> torch.Tensor:
        """Elements within the rule where q is not the correctly rounded value (a neighbour: allowed)."""
        return self.fin.unsqueeze(-1) & ~self.q_bad & (self.q != self.q_exact)

    def check(self) -> QuantCheck:
        """The counts of :class:`QuantCheck`."""
        m, g = self.s.shape
        nonfinite = self.scale_nonfinite_bad | self.q_nonfinite_bad.any(-1)
        counts = (int(self.scale_bad.sum()), int(self.q_bad.sum()), int(self.q_neighbour.sum()),
                  int(nonfinite.sum()))
        return QuantCheck(counts[0] == counts[1] == counts[3] == 0, m * g, *counts, self.detail)

    def comparisons(self) -> tuple[Comparison, Comparison]:
        """(scale, q) as the :class:`~gatednorm.verify.tolerance.Comparison` of a verify row.

        scale: ``max_abs``/``mean_abs`` of |scale - S| over finite blocks, S the rule's scale of the
        float64 block maximum; ``max_ulps`` in float32 ulps of S (ue8m0: in powers of two);
        ``worst_ratio`` |scale - S| over the distance from S to the bound on that side.

        q: ``max_abs``/``mean_abs`` of |q * scale - y64| over the elements of finite blocks; ``max_ulps``
        in quantization steps from the correctly rounded q; ``worst_ratio`` the part of |q * scale - y64|
        beyond half a quantization step (to q's neighbour on y's side, times the scale) over the float32
        error of y (``dv * scale``): 0 where q is the correctly rounded value, at most 1 where q is the
        neighbour that y's float32 error allows.

        Both ratios are at most 1 exactly where the interval check passes (a tie's boundary is decided
        by the interval). Non-finite results where the rule has finite ones, and blocks (scale) or
        elements (q) that break the non-finite rule, count as ``nonfinite_mismatch``.
        """
        m, g, k = self.q.shape
        fin, s = self.fin, self.s
        # scale
        s_ok = fin & torch.isfinite(s)
        err = (s - self.s_rule).abs()
        tol = torch.where(s >= self.s_rule, self.s_hi - self.s_rule, self.s_rule - self.s_lo).clamp(min=0.0)
        ratio = _ratio(err, tol, ~self.scale_bad)
        if self.scale_format == "ue8m0":  # one step of a UE8M0 scale is a factor of two
            ulps = (torch.log2(s.where(s_ok & (s > 0), 1.0)) - torch.log2(self.s_rule.where(fin, 1.0))).abs()
        else:
            ulps = err / ulp_of(self.s_rule.where(fin, 1.0), torch.float32)
        scale_cmp = Comparison(
            max_abs=_max(err[s_ok]), mean_abs=_mean(err[s_ok]), max_ulps=_max(ulps[s_ok]),
            worst_ratio=_max(ratio[fin]),
            nonfinite_mismatch=int((self.scale_nonfinite_bad | (fin & ~torch.isfinite(s))).sum()), numel=m * g)
        # q
        fin_e = fin.unsqueeze(-1).expand_as(self.q)
        scale_e = s.where(s_ok & (s > 0), 1.0).unsqueeze(-1)  # as judge_quant divides
        q_ok = fin_e & torch.isfinite(self.q)
        deq = (self.q * scale_e - self.y).abs()
        down, up = grid_gaps(self.q, self.quant)
        half_step = torch.where(self.q > self.v, down, up) / 2
        beyond = (deq - half_step * scale_e).clamp(min=0.0).nan_to_num(nan=math.inf)
        qratio = _ratio(beyond, self.dv * scale_e, ~self.q_bad)
        e_down, e_up = grid_gaps(self.q_exact, self.quant)
        steps = torch.where(self.q > self.q_exact, (self.q - self.q_exact) / e_up,
                            (self.q_exact - self.q) / e_down).where(self.q != self.q_exact, 0.0)
        q_cmp = Comparison(
            max_abs=_max(deq[q_ok]), mean_abs=_mean(deq[q_ok]), max_ulps=_max(steps[q_ok]),
            worst_ratio=_max(qratio[fin_e]),
            nonfinite_mismatch=int((self.q_nonfinite_bad | (fin_e & ~torch.isfinite(self.q))).sum()),
            numel=m * g * k)
        return scale_cmp, q_cmp


def judge_quant(q: torch.Tensor, scale: torch.Tensor, y64: torch.Tensor, err: torch.Tensor, quant: str,
                block: int | None, scale_format: str = "float32") -> QuantJudgement:
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
    scale_nonfinite_bad = (has_nan & ~s.isnan()) | (has_inf & ~(s == math.inf)) | (fin & ~torch.isfinite(s))
    q_nonfinite_bad = ~fin.unsqueeze(-1) & ~marked

    amax = y3.abs().amax(-1).where(fin, 0.0)
    emax = e3.amax(-1).where(fin, 0.0)
    lo = reference_scales((amax - emax).clamp(min=0.0), quant, "float32", float32_division=False) * (1 - _U32)
    hi = reference_scales(amax + emax, quant, "float32", float32_division=False) * (1 + _U32)
    if scale_format == "ue8m0":
        lo, hi = pow2_ceil(lo), pow2_ceil(hi)
    scale_bad = fin & ~((lo <= s) & (s <= hi))
    if scale_format == "ue8m0":
        scale_bad |= fin & (torch.frexp(s)[0] != 0.5)
    s_rule = reference_scales(amax, quant, scale_format)

    s_ok = s.where(fin & torch.isfinite(s) & (s > 0), 1.0).unsqueeze(-1)
    v = y3.where(fin.unsqueeze(-1), 0.0) / s_ok
    dv = e3.where(fin.unsqueeze(-1), 0.0) / s_ok + v.abs() * _U32
    q_lo, q_hi, q_exact = grid_round(v - dv, quant), grid_round(v + dv, quant), grid_round(v, quant)
    inside = (q_lo <= qv) & (qv <= q_hi)
    q_bad = fin.unsqueeze(-1).expand_as(qv) & ~inside

    detail = ""
    if scale_bad.any():
        i = tuple(scale_bad.nonzero()[0].tolist())
        detail += f"scale[{list(i)}] = {s[i].item()!r} outside [{lo[i].item()!r}, {hi[i].item()!r}]; "
    if q_bad.any():
        i = tuple(q_bad.nonzero()[0].tolist())
        detail += (f"q[{list(i)}] = {qv[i].item()!r}, allowed [{q_lo[i].item()!r}, "
                   f"{q_hi[i].item()!r}] (v = {v[i].item()!r}); ")
    nonfinite = scale_nonfinite_bad | q_nonfinite_bad.any(-1)
    if nonfinite.any():
        i = tuple(nonfinite.nonzero()[0].tolist())
        detail += f"non-finite block {list(i)}: scale {s[i].item()!r}; "
    return QuantJudgement(quant, scale_format, y3, s, qv, fin, s_rule, lo, hi, scale_bad, scale_nonfinite_bad,
                          v, dv, q_lo, q_hi, q_exact, q_bad, q_nonfinite_bad, detail)


def check_quant(q: torch.Tensor, scale: torch.Tensor, y64: torch.Tensor, err: torch.Tensor, quant: str,
                block: int | None, scale_format: str = "float32") -> QuantCheck:
    """Judge (q, scale) of an (M, N) call against the float64 y64 and its allowed error (module docstring).

    ``q`` (any shape of M * N elements, the quant dtype), ``scale`` (M * G elements, any strides).
    """
    return judge_quant(q, scale, y64, err, quant, block, scale_format).check()


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantShape(Shape):
    """x is (*lead, n), normalised in groups of ``group_size``; ``block`` is the quant group size (None: one
    scale per row). The name adds the block to the norm's shape name: ``"2x4x128/g128 k128"``."""

    block: int | None = None


@dataclass(frozen=True)
class QuantVariant:
    """The options of one quantized case: norm, gate, input dtype, quant format, scale format, round_to."""

    is_rms_norm: bool
    gate: str  # "none" | "after" | "before"
    dtype: str
    quant: str
    scale_format: str
    round_to: str  # "none" | "bfloat16"

    #: the gate's activation (the quantized cases use the default)
    activation: ClassVar[str] = "swish"

    @property
    def norm_before_gate(self) -> bool:
        return self.gate != "before"

    def label(self) -> str:
        """A short, unique, human-readable name (also part of the case's seed)."""
        rt = "" if self.round_to == "none" else f" via {self.round_to}"
        return (f"{'rms' if self.is_rms_norm else 'ln'} gate={self.gate} {self.dtype} -> {self.quant} "
                f"{self.scale_format}{rt}")


def quant_shape(lead: tuple[int, ...], n: int, group_size: int, block: int | None) -> QuantShape:
    """The :class:`QuantShape` of x (*lead, n), groups of ``group_size``, quant blocks of ``block``."""
    k = f"k{block}" if block else "per-token"
    return QuantShape(f"{'x'.join(map(str, lead))}x{n}/g{group_size} {k}", lead, n, group_size, block)


@dataclass(frozen=True)
class QuantCase:
    """One call of gated_norm_quant: its shape (x, groups, quant block) and its options."""

    shape: QuantShape
    variant: QuantVariant

    @property
    def name(self) -> str:
        return f"{self.shape.name} {self.variant.label()}"


#: (lead, n, group size, quant block): DeepGEMM blocks, per token, padded groups, groups spanning blocks.
QUICK_QUANT_SHAPES = (((33,), 256, 64, None), ((2, 4), 128, 128, 128), ((8,), 1920, 640, 128),
                      ((5,), 384, 96, 96), ((6,), 512, 128, 512))
FULL_QUANT_SHAPES = QUICK_QUANT_SHAPES + (((64, 16), 128, 128, 128), ((256,), 4096, 128, 128),
                                          ((128,), 5120, 640, 128), ((32,), 8192, 1024, None),
                                          ((100,), 1000, 200, 200))


def quant_cases(quick: bool = False, dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> list[QuantCase]:
    """Every shape x norm x gate x dtype once, with the quant format, scale format and round_to cycling
    through their values, so the matrix stays linear in its factors. The (quant, scale format) pair
    shifts by one per dtype, so that each pair meets every shape and every dtype."""
    shapes = QUICK_QUANT_SHAPES if quick else FULL_QUANT_SHAPES
    formats = list(itertools.product(QUANT_FORMATS, ("float32", "ue8m0")))
    cases = []
    for i, ((lead, n, gs, k), rms, gate, dtype) in enumerate(
            itertools.product(shapes, (False, True), ("none", "after", "before"), dtypes)):
        quant, fmt = formats[(i // len(dtypes) + i % len(dtypes)) % len(formats)]
        round_to = "bfloat16" if (dtype == "bfloat16" and i % 2) else "none"
        cases.append(QuantCase(quant_shape(lead, n, gs, k), QuantVariant(rms, gate, dtype, quant, fmt, round_to)))
    return cases


def quant_shapes(quick: bool = False) -> tuple[QuantShape, ...]:
    """The shapes of :func:`quant_cases` (the ``meta.shapes`` entries of a verify run)."""
    return tuple(quant_shape(*s) for s in (QUICK_QUANT_SHAPES if quick else FULL_QUANT_SHAPES))


def quant_case_order(backends: Sequence[str], quick: bool = False,
                     dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
                     ) -> list[tuple[str, QuantShape, QuantVariant]]:
    """Every (backend, shape, variant) of :func:`quant_cases`, breadth first (like the norm's cases,
    :func:`gatednorm.verify.cases.case_order`): a run cut short has seen every backend, dtype, shape,
    quant format and scale format before it repeats any."""
    jobs = [(b, c.shape, c.variant) for b in backends for c in quant_cases(quick, dtypes)]
    return breadth_first(jobs, [
        lambda j: j[0],  # backend
        lambda j: j[2].dtype,
        lambda j: j[1].name,  # shape
        lambda j: j[2].quant,
        lambda j: j[2].scale_format,
        lambda j: (j[2].is_rms_norm, j[2].gate),
        lambda j: j[2].round_to,
    ])


@dataclass
class QuantInputs:
    """The tensors of one quantized case, on the device under test, in the variant's dtype."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    z: torch.Tensor | None
    round_to: torch.dtype | None


def make_quant_inputs(shape: QuantShape, variant: QuantVariant, device: torch.device,
                      gen: torch.Generator) -> QuantInputs:
    """Fresh random data (drawn on CPU for reproducibility across devices), rows with a mean offset."""
    dtype = getattr(torch, variant.dtype)
    full = (*shape.lead, shape.n)
    x = (0.5 + 2 * torch.randn(full, generator=gen, dtype=torch.float64)).to(device, dtype)
    z = ((2 * torch.randn(full, generator=gen, dtype=torch.float64)).to(device, dtype)
         if variant.gate != "none" else None)
    w = (1 + 0.5 * torch.randn(shape.n, generator=gen, dtype=torch.float64)).to(device, dtype)
    b = (0.5 * torch.randn(shape.n, generator=gen, dtype=torch.float64)).to(device, dtype)
    round_to = None if variant.round_to == "none" else getattr(torch, variant.round_to)
    return QuantInputs(x, w, b, z, round_to)


def call_quant(inp: QuantInputs, shape: QuantShape, variant: QuantVariant, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of gated_norm_quant on ``backend`` for one case."""
    v = variant
    with torch.no_grad():
        return gated_norm_quant(inp.x, inp.weight, inp.bias, QUANT_EPS, inp.z, shape.group_size, v.norm_before_gate,
                                v.is_rms_norm, activation=v.activation, quant=v.quant, quant_group_size=shape.block,
                                scale_format=v.scale_format, round_to=inp.round_to, backend=backend)


def judge_case(inp: QuantInputs, shape: QuantShape, variant: QuantVariant, q: torch.Tensor,
               scale: torch.Tensor) -> QuantJudgement:
    """Judge one case's (q, scale) against float64 (:func:`judge_quant` on the case's reference y)."""
    v = variant
    y64, e = reference_y(inp.x, inp.weight, inp.bias, inp.z, QUANT_EPS, shape.group_size, v.norm_before_gate,
                         v.is_rms_norm, v.activation, inp.round_to)
    return judge_quant(q, scale, y64, e, v.quant, shape.block, v.scale_format)


def run_quant_case(case: QuantCase, backend: str, device: torch.device, seed: int = 0) -> QuantCheck:
    """Run one case on ``backend`` with data drawn from ``seed`` and judge it against float64."""
    shape, variant = case.shape, case.variant
    inp = make_quant_inputs(shape, variant, device, torch.Generator().manual_seed(seed))
    q, scale = call_quant(inp, shape, variant, backend)
    return judge_case(inp, shape, variant, q, scale).check()
