"""The precision report behind ``gatednorm verify``: case matrix, tolerances, error metrics.

Every backend available on a device is run over a matrix of variants (LayerNorm/RMSNorm x
gate none/after/before x swish/sigmoid x bias x groups x float32/bfloat16/float16) and shapes,
and compared with

* ``float64``: :func:`gatednorm.reference.gated_norm_reference` on the same (exactly upcast)
  inputs, evaluated on CPU: output, statistics (mean, rstd) and gradients (dx, dz, dweight, dbias);
* ``torch``: ``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` computed in float32 and rounded
  once, where they express the same function (no gate);
* ``fla``: the upstream Triton kernel of flash-linear-attention (``fla-core``), when importable
  and runnable on the device (compiled on GPUs, interpreter on CPU with ``TRITON_INTERPRET=1``);
  swish gate only (upstream has no sigmoid gate).

Tolerance (per element, documented in the report as well)
---------------------------------------------------------
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
reference rounded to O (for ``torch``/``fla``: to their rounded output).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .functional import layer_norm_fwd, layernorm_fn
from .reference import gated_norm_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
GATES = ("none", "after", "before")
ACTIVATIONS = ("swish", "sigmoid")
QUANTITIES = ("y", "mean", "rstd", "dx", "dz", "dweight", "dbias")
EPS = 1e-6

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
    """The documented tolerance per output dtype (for the report)."""
    rows = []
    for name, dt in DTYPES.items():
        c = torch.float64 if dt == torch.float64 else torch.float32
        rows.append({
            "dtype": name,
            "rounding u(O)": unit_roundoff(dt),
            "compute u(C)": unit_roundoff(c),
            "rule": "|got-ref| <= u(O)*(|ref|+e) + e + min_spacing(O)/2, e = K*u(C)*A, K = 8+log2(gs)",
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
    """Per-element bound (float64) of module docstring; ``pairs=2`` when both sides are approximations."""
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


def magnitudes(x, weight, bias, z, dy, group_size: int, norm_before_gate: bool, is_rms_norm: bool,
               activation: str, eps: float = EPS) -> dict[str, torch.Tensor]:
    """Float64 magnitudes A of each computed quantity (see module docstring); shapes like the quantity."""
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
    k = BASE_K + math.log2(max(group_size, 1))
    if over_rows:
        k += BASE_K + math.log2(max(rows, 1))
    return k


# ---------------------------------------------------------------------------
# The case matrix
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """x is (*lead, n); ``group_size`` is the grouped variant's group size (None: only one group)."""

    name: str
    lead: tuple[int, ...]
    n: int
    group_size: int | None

    @property
    def rows(self) -> int:
        return math.prod(self.lead)


QUICK_SHAPES = (
    Shape("33x256/g64", (33,), 256, 64),
    Shape("2x4x96/g32", (2, 4), 96, 32),
    Shape("8x1920/g640", (8,), 1920, 640),  # group size not a power of two (padded lanes)
)

FULL_SHAPES = (
    Shape("heads 64x16x128", (64, 16), 128, None),  # one 128-wide head per row (gated delta net)
    Shape("hidden 256x4096/g128", (256,), 4096, 128),
    Shape("mamba2 128x5120/g640", (128,), 5120, 640),
    Shape("wide 32x8192", (32,), 8192, 1024),
    Shape("odd 100x1000/g200", (100,), 1000, 200),
)


@dataclass(frozen=True)
class Variant:
    is_rms_norm: bool
    gate: str  # none | after | before
    activation: str  # swish | sigmoid (irrelevant without gate)
    has_bias: bool
    grouped: bool
    dtype: str

    @property
    def norm_before_gate(self) -> bool:
        return self.gate != "before"

    def label(self) -> str:
        parts = ["rms" if self.is_rms_norm else "ln", f"gate={self.gate}"]
        if self.gate != "none":
            parts.append(self.activation)
        parts += ["bias" if self.has_bias else "nobias", "groups" if self.grouped else "1group", self.dtype]
        return " ".join(parts)


def variants(dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")) -> Iterator[Variant]:
    for dtype in dtypes:
        for rms in (False, True):
            for gate in GATES:
                for act in (ACTIVATIONS if gate != "none" else ("swish",)):
                    for has_bias in (True, False):
                        for grouped in (False, True):
                            yield Variant(rms, gate, act, has_bias, grouped, dtype)


def case_applies(shape: Shape, variant: Variant) -> bool:
    """The grouped variant only runs on shapes with more than one group."""
    return not variant.grouped or (shape.group_size is not None and shape.group_size != shape.n)


def breadth_first(items: Sequence, keys: Sequence[Callable[[object], Hashable]]) -> list:
    """Reorder ``items`` so that every prefix covers the values of the keys as evenly as possible.

    Greedy: the next item is the one whose key values have been taken least often so far (the sum
    over keys of how often its value was taken), ties broken by how often its pairs of key values
    were taken, then by input order. A run cut short thus has seen every backend, dtype, shape,
    norm kind, gate ... (and most of their pairs) before it repeats any. Deterministic.
    """
    n, k = len(items), len(keys)
    if n <= 1 or not keys:
        return list(items)
    values: list[dict[Hashable, int]] = [{} for _ in keys]
    pts = torch.tensor([[values[j].setdefault(key(it), len(values[j])) for j, key in enumerate(keys)]
                        for it in items], dtype=torch.int64)
    sizes = [len(v) for v in values]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    pair_idx = [pts[:, i] * sizes[j] + pts[:, j] for i, j in pairs]
    single = [torch.zeros(d, dtype=torch.int64) for d in sizes]
    double = [torch.zeros(sizes[i] * sizes[j], dtype=torch.int64) for i, j in pairs]
    big = n * len(pairs) + 1  # a single count outweighs any sum of pair counts
    taken = torch.zeros(n, dtype=torch.bool)
    order = []
    for _ in range(n):
        score = sum(single[j][pts[:, j]] for j in range(k)) * big + sum(c[p] for c, p in zip(double, pair_idx,
                                                                                               strict=True))
        score[taken] = torch.iinfo(torch.int64).max
        i = int(torch.argmin(score))  # the first minimum: ties keep input order
        taken[i] = True
        order.append(i)
        for j in range(k):
            single[j][pts[i, j]] += 1
        for c, p in zip(double, pair_idx, strict=True):
            c[p[i]] += 1
    return [items[i] for i in order]


def case_order(backends: Sequence[str], shapes: Sequence[Shape], variants_: Sequence[Variant]
               ) -> list[tuple[str, Shape, Variant]]:
    """Every applicable (backend, shape, variant), ordered breadth first (see :func:`breadth_first`).

    A run stopped early (``--max-seconds``, SIGTERM) then has covered every backend, dtype and
    shape, the norm kinds and gates, before it repeats any of them; the full set is the same as
    the plain product.
    """
    jobs = [(b, s, v) for b in backends for s in shapes for v in variants_ if case_applies(s, v)]
    return breadth_first(jobs, [
        lambda j: j[0],  # backend
        lambda j: j[2].dtype,
        lambda j: j[1].name,  # shape
        lambda j: (j[2].is_rms_norm, j[2].gate),
        lambda j: j[2].grouped,
        lambda j: j[2].has_bias,
        lambda j: j[2].activation,
    ])


def shard_jobs(jobs: Sequence[tuple[str, Shape, Variant]], shard: int, shards: int
               ) -> list[tuple[str, Shape, Variant]]:
    """The jobs of worker ``shard`` of ``shards`` (``verify --jobs``), in their original order.

    Every backend's job for one (shape, variant) goes to the same worker: on a GPU the first use of
    a kernel variant JIT-compiles, and the upstream comparison runs for each backend, so one process
    compiling a variant once beats several compiling it side by side. Groups are dealt out largest
    first to the least loaded worker (cost ~ elements + a fixed per-case overhead); deterministic, so
    workers and the parent agree on the split without talking.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, shards) with shards >= 1, got shard={shard}, shards={shards}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (_, s, v) in enumerate(jobs):
        groups.setdefault((s.name, v.label()), []).append(i)
    overhead = 1 << 16

    def cost(idx: list[int]) -> int:
        s = jobs[idx[0]][1]
        return len(idx) * (s.rows * s.n + overhead)

    load = [0] * shards
    mine: list[int] = []
    for key in sorted(groups, key=lambda k: (-cost(groups[k]), k)):
        w = min(range(shards), key=lambda j: (load[j], j))
        load[w] += cost(groups[key])
        if w == shard:
            mine.extend(groups[key])
    return [jobs[i] for i in sorted(mine)]


def case_seed(seed: int, shape: Shape, variant: Variant) -> int:
    """The data seed of one case: independent of the order (and subset) of cases run, so a partial
    run draws the same inputs as a full one, and every backend sees the same data for a case."""
    return (seed * 1_000_003 + zlib.crc32(f"{shape.name}|{variant.label()}".encode())) % (2**63)


def available_backends(device: torch.device) -> list[str]:
    """Every concrete backend in ``ops.BACKENDS`` that can run on ``device`` (not 'auto')."""
    names = []
    for name in ops.BACKENDS:
        if name == "auto":
            continue
        try:
            if ops.resolve_backend(name, device) == name:
                names.append(name)
        except (ValueError, ImportError):
            continue
    return names


def upstream_kernel(device: torch.device) -> tuple[Callable | None, type | None, str]:
    """(layer_norm_fwd, LayerNormFn, why-not) of fla-core when it can run on ``device``."""
    if device.type == "cpu" and not ops.env_flag("TRITON_INTERPRET"):
        return None, None, "fla needs TRITON_INTERPRET=1 on CPU"
    if device.type not in ("cpu", "cuda"):
        return None, None, f"fla does not run on {device.type}"
    try:
        mod = importlib.import_module("fla.modules.norm.layernorm_gated")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, None, f"fla-core not importable ({type(exc).__name__})"
    return mod.layer_norm_fwd, mod.LayerNormFn, ""


# ---------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------

@dataclass
class Result:
    backend: str
    shape: str
    variant: str
    dtype: str
    reference: str  # float64 | torch | fla
    quantity: str
    comparison: Comparison
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.comparison.passed

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("comparison"))
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        """The inverse of :meth:`to_dict` (how ``verify --jobs`` reads its workers' JSON reports)."""
        comparison = Comparison(**{f.name: d[f.name] for f in dataclasses.fields(Comparison)})
        return cls(d["backend"], d["shape"], d["variant"], d["dtype"], d["reference"], d["quantity"], comparison,
                   d.get("error", ""))


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    z: torch.Tensor | None
    dy: torch.Tensor
    group_size: int
    variant: Variant = field(repr=False)


def make_inputs(shape: Shape, variant: Variant, device: torch.device, gen: torch.Generator) -> Inputs:
    """Fresh random data (drawn on CPU for reproducibility across devices), rows with a mean offset."""
    dtype = DTYPES[variant.dtype]
    full = (*shape.lead, shape.n)

    def rnd(*size, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*size, generator=gen, dtype=torch.float64)).to(device, dtype)

    x = rnd(*full, scale=1.5, shift=0.3)
    z = rnd(*full, scale=2.0) if variant.gate != "none" else None
    weight = rnd(shape.n, scale=0.2, shift=1.0)
    bias = rnd(shape.n, scale=0.2) if variant.has_bias else None
    dy = rnd(*full)
    gs = shape.group_size if (variant.grouped and shape.group_size) else shape.n
    return Inputs(x, weight, bias, z, dy, gs, variant)


def _grads(fn, inp: Inputs, upcast: bool = False):
    """Run fn(x, w, b, z) with autograd and return (y, {dx, dz, dweight, dbias}) on CPU."""
    def leaf(t):
        if t is None:
            return None
        t = t.detach().to("cpu", torch.float64) if upcast else t.detach().clone()
        return t.requires_grad_()

    x, w, b, z = leaf(inp.x), leaf(inp.weight), leaf(inp.bias), leaf(inp.z)
    y = fn(x, w, b, z)
    dy = inp.dy.to("cpu", torch.float64) if upcast else inp.dy
    y.backward(dy)
    return y, {"dx": x.grad, "dz": z.grad if z is not None else None,
               "dweight": w.grad, "dbias": b.grad if b is not None else None}


def reference_results(inp: Inputs) -> dict[str, torch.Tensor | None]:
    v = inp.variant
    y, mean, rstd = gated_norm_reference(inp.x.cpu(), inp.weight.cpu(), None if inp.bias is None else inp.bias.cpu(),
                                         None if inp.z is None else inp.z.cpu(), EPS, inp.group_size,
                                         v.norm_before_gate, v.is_rms_norm, v.activation)

    def f(x, w, b, z):
        return gated_norm_reference(x, w, b, z, EPS, inp.group_size, v.norm_before_gate, v.is_rms_norm,
                                    v.activation)[0]

    _, grads = _grads(f, inp, upcast=True)
    return {"y": y, "mean": mean, "rstd": rstd, **grads}


def torch_reference(inp: Inputs) -> torch.Tensor | None:
    """PyTorch's own norm in float32, rounded once to the output dtype, where it is the same function."""
    v = inp.variant
    if v.gate != "none":
        return None
    n, gs = inp.x.shape[-1], inp.group_size
    c = torch.float64 if inp.x.dtype == torch.float64 else torch.float32
    x = inp.x.to(c)
    w = inp.weight.to(c)
    b = inp.bias.to(c) if inp.bias is not None else None
    with torch.no_grad():
        if v.is_rms_norm:
            y = F.rms_norm(x.reshape(-1, n // gs, gs), (gs,), None, EPS).reshape(x.shape) * w
            if b is not None:
                y = y + b
        elif gs == n:
            y = F.layer_norm(x, (n,), w, b, EPS)
        else:
            y = F.group_norm(x.reshape(-1, n), n // gs, w, b, EPS).reshape(x.shape)
    return y.to(inp.x.dtype)


def torch_reference_name(v: Variant, grouped: bool) -> str:
    if v.is_rms_norm:
        return "F.rms_norm"
    return "F.group_norm" if grouped else "F.layer_norm"


def run_case(backend: str, shape: Shape, variant: Variant, device: torch.device, gen: torch.Generator,
             fla: tuple | None = None, gradients: bool = True) -> list[Result]:
    """Run one backend on one (shape, variant); compare with float64, torch and (optionally) fla."""
    inp = make_inputs(shape, variant, device, gen)
    v = variant
    out_dtype = DTYPES[v.dtype]
    cdt = torch.float64 if out_dtype == torch.float64 else torch.float32
    rows = shape.rows
    results: list[Result] = []

    def add(ref_name, quantity, got, ref, mag, over_rows=False, pairs=1, exact=None):
        # pairs=2: both sides are approximations; the bound is taken at the exact (float64) value.
        k = k_factor(inp.group_size, rows, over_rows)
        q_dtype = got.dtype if quantity not in ("mean", "rstd") else cdt
        allowed = allowed_error(ref if exact is None else exact, mag, q_dtype, k, cdt, pairs)
        results.append(Result(backend, shape.name, v.label(), v.dtype, ref_name, quantity,
                              compare(got, ref, allowed, q_dtype)))

    try:
        with torch.no_grad():
            y, mean, rstd = layer_norm_fwd(inp.x, inp.weight, inp.bias, EPS, z=inp.z, group_size=inp.group_size,
                                           norm_before_gate=v.norm_before_gate, is_rms_norm=v.is_rms_norm,
                                           activation=v.activation, backend=backend)
        grads = {}
        if gradients:
            def ours(x, w, b, z):
                return layernorm_fn(x, w, b, z, EPS, inp.group_size, v.norm_before_gate, v.is_rms_norm,
                                    activation=v.activation, backend=backend)
            _, grads = _grads(ours, inp)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed case, reported with its message
        bad = Comparison(math.nan, math.nan, math.nan, math.inf, 0, 0)
        return [Result(backend, shape.name, v.label(), v.dtype, "float64", "y", bad,
                       error=f"{type(exc).__name__}: {exc}")]

    ref = reference_results(inp)
    mag = magnitudes(inp.x, inp.weight, inp.bias, inp.z, inp.dy if gradients else None, inp.group_size,
                     v.norm_before_gate, v.is_rms_norm, v.activation)
    add("float64", "y", y, ref["y"], mag["y"])
    if not v.is_rms_norm:
        add("float64", "mean", mean, ref["mean"], mag["mean"])
    add("float64", "rstd", rstd, ref["rstd"], mag["rstd"])
    for q in ("dx", "dz", "dweight", "dbias"):
        if grads.get(q) is not None:
            add("float64", q, grads[q], ref[q], mag[q], over_rows=q in ("dweight", "dbias"))

    t_ref = torch_reference(inp)
    if t_ref is not None:
        add(torch_reference_name(v, inp.group_size != shape.n), "y", y, t_ref.double(), mag["y"], pairs=2,
            exact=ref["y"])

    if fla is not None and fla[0] is not None and v.activation == "swish" and out_dtype != torch.float64:
        results.extend(_compare_fla(fla, inp, y, mean, rstd, grads, mag, ref, backend, shape, rows, cdt))
    return results


def _compare_fla(fla, inp: Inputs, y, mean, rstd, grads, mag, ref, backend, shape, rows, cdt) -> list[Result]:
    fla_fwd, fla_fn, _ = fla
    v = inp.variant
    n = inp.x.shape[-1]
    out: list[Result] = []
    try:
        x2 = inp.x.reshape(-1, n).contiguous()
        z2 = inp.z.reshape(-1, n).contiguous() if inp.z is not None else None
        with torch.no_grad():
            fy, fmean, frstd = fla_fwd(x2, inp.weight, inp.bias, EPS, z=z2, group_size=inp.group_size,
                                       norm_before_gate=v.norm_before_gate, is_rms_norm=v.is_rms_norm)
        fgrads = {}
        if grads:
            def upstream(x, w, b, z):
                return fla_fn.apply(x, w, b, z, EPS, inp.group_size, v.norm_before_gate, v.is_rms_norm)
            _, fgrads = _grads(upstream, inp)
    except Exception as exc:  # noqa: BLE001
        bad = Comparison(math.nan, math.nan, math.nan, math.inf, 0, 0)
        return [Result(backend, shape.name, v.label(), v.dtype, "fla", "y", bad,
                       error=f"upstream failed: {type(exc).__name__}: {exc}")]

    def add(quantity, got, theirs, m, over_rows=False):
        k = k_factor(inp.group_size, rows, over_rows)
        q_dtype = got.dtype if quantity not in ("mean", "rstd") else cdt
        allowed = allowed_error(ref[quantity], m, q_dtype, k, cdt, pairs=2)
        out.append(Result(backend, shape.name, v.label(), v.dtype, "fla", quantity,
                          compare(got, theirs.double(), allowed, q_dtype)))

    add("y", y, fy.reshape(inp.x.shape), mag["y"])
    if not v.is_rms_norm:
        add("mean", mean, fmean, mag["mean"])
    add("rstd", rstd, frstd, mag["rstd"])
    for q in ("dx", "dz", "dweight", "dbias"):
        if grads.get(q) is not None and fgrads.get(q) is not None:
            add(q, grads[q], fgrads[q], mag[q], over_rows=q in ("dweight", "dbias"))
    return out


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

@dataclass
class SummaryRow:
    backend: str
    reference: str
    dtype: str
    quantity: str
    cases: int = 0
    failed: int = 0
    max_abs: float = 0.0
    mean_abs_sum: float = 0.0
    max_ulps: float = 0.0
    worst_ratio: float = 0.0

    @property
    def mean_abs(self) -> float:
        return self.mean_abs_sum / self.cases if self.cases else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("mean_abs_sum")
        d["mean_abs"] = self.mean_abs
        d["passed"] = self.failed == 0
        return d


def summarize(results: list[Result]) -> list[SummaryRow]:
    """Aggregate per (backend, reference, dtype, quantity): worst errors over all shapes and variants."""
    table: dict[tuple, SummaryRow] = {}
    mean_abs: dict[tuple, list[float]] = {}
    for r in results:
        key = (r.backend, r.reference, r.dtype, r.quantity)
        row = table.setdefault(key, SummaryRow(*key))
        row.cases += 1
        row.failed += not r.passed
        c = r.comparison
        if not r.error:
            row.max_abs = max(row.max_abs, c.max_abs)
            mean_abs.setdefault(key, []).append(c.mean_abs)
            row.max_ulps = max(row.max_ulps, c.max_ulps)
            row.worst_ratio = max(row.worst_ratio, c.worst_ratio)
        else:
            row.worst_ratio = math.inf
    for key, values in mean_abs.items():  # exactly rounded: the same table whatever the order (verify --jobs)
        table[key].mean_abs_sum = math.fsum(values)
    ref_order = {"float64": 0, "F.layer_norm": 1, "F.group_norm": 2, "F.rms_norm": 3, "fla": 4}
    q_order = {q: i for i, q in enumerate(QUANTITIES)}
    d_order = {d: i for i, d in enumerate(DTYPES)}
    return sorted(table.values(), key=lambda s: (s.backend, ref_order.get(s.reference, 9), d_order[s.dtype],
                                                 q_order[s.quantity]))
