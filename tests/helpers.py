"""Inputs and tolerances shared by the tests.

Inputs: :func:`make_inputs` is the one factory of the standard (x, z, weight, bias) set: fresh random
data (never zeros), seeded (by default from the running test's id, see conftest.py), drawn on the CPU
in float64 and rounded to the requested dtypes, then moved to the device, optionally in a
non-contiguous layout. Special data (extreme ranges, NaN/Inf, constant groups) is built where it is used.

Tolerance: one model, the one ``gatednorm verify`` applies (:mod:`gatednorm.verify.tolerance`,
docs/design.md section "Tolerances"). Per element::

    |got - ref| <= u(O) * (|ref| + e) + e + min_spacing(O) / 2,   e = K * u(C) * A

with O the result's dtype, C the compute dtype (float32; float64 for float64 inputs), A the
magnitude of the terms that make up the value (:func:`~gatednorm.verify.tolerance.magnitudes`) and
K = 8 + log2(group_size) (+ 8 + log2(M) for sums over rows). Non-finite reference values must be
matched exactly. The helpers below only compute the float64 reference, A and K for a test's call and
hand them to that model; they define no tolerance of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from gatednorm.reference import gated_norm_reference
from gatednorm.spec import canonical_activation
from gatednorm.verify import tolerance as model

# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

#: Layouts of :func:`relayout` (same values, other strides).
LAYOUTS = ("contiguous", "transposed", "sliced_rows", "strided_cols")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of the 2-D tensor ``t`` in a non-contiguous ``layout`` of :data:`LAYOUTS`.

    Memory that is not part of the view holds NaN: a kernel that reads it shows up in the result.
    """
    if layout == "contiguous":
        return t
    m, n = t.shape
    if layout == "transposed":  # column-major storage
        return t.t().contiguous().t()
    if layout == "sliced_rows":  # row stride n + 7, offset 3
        base = torch.full((m, n + 7), float("nan"), dtype=t.dtype, device=t.device)
        base[:, 3:3 + n] = t
        return base[:, 3:3 + n]
    if layout == "strided_cols":  # feature stride 2
        base = torch.full((m, 2 * n), float("nan"), dtype=t.dtype, device=t.device)
        base[:, ::2] = t
        return base[:, ::2]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers of its element size (2, 4 or 8 bytes): torch.equal on them compares bits,
    so NaN equals the same NaN and -0 differs from +0."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def forget_forward_launch_shapes(launch) -> None:
    """Drop the triton launcher's cached forward launch shapes (``launch.fwd_tuned`` per GPU model and
    ``launch._fwd_config`` per group size, both read from FWD_TUNED / FWD_OUTPUT_TUNED_BY_MODEL), so a test that
    changes those tables is read afresh, and the tests after it the tables as shipped."""
    launch.fwd_tuned.cache_clear()
    launch._fwd_config.cache_clear()


def make_inputs(
    m: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    *,
    gate: bool = True,
    bias: bool = True,
    param_dtype: torch.dtype | None = None,
    gate_dtype: torch.dtype | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    layout: str | tuple[str, str] = "contiguous",
):
    """Fresh random ``(x, z, weight, bias)`` for an (m, n) call.

    x ~ 0.5 + 2 N(0, 1) (a mean offset exercises the centring), z ~ 2 N(0, 1) (``None`` without
    ``gate``), weight ~ 1 + 0.5 N(0, 1), bias ~ 0.5 N(0, 1) (``None`` without ``bias``). Drawn on the
    CPU in float64 (the same values on every device), from ``seed`` or, by default, from torch's
    global generator, which conftest.py seeds per test from the test's id: reruns see the same data.
    x is in ``dtype``, z in ``gate_dtype`` (default ``dtype``), weight and bias in ``param_dtype``
    (default ``dtype``). ``layout`` (one of :data:`LAYOUTS`, or a pair for x and z) gives x and z
    other strides with the same values.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x_layout, z_layout = (layout, layout) if isinstance(layout, str) else layout
    param_dtype = param_dtype or dtype
    gate_dtype = gate_dtype or dtype

    def draw(*size, scale, shift=0.0):
        return shift + scale * torch.randn(*size, generator=g, dtype=torch.float64)

    x = relayout(draw(m, n, scale=2.0, shift=0.5).to(device=device, dtype=dtype), x_layout)
    z = relayout(draw(m, n, scale=2.0).to(device=device, dtype=gate_dtype), z_layout) if gate else None
    w = draw(n, scale=0.5, shift=1.0).to(device=device, dtype=param_dtype)
    b = draw(n, scale=0.5).to(device=device, dtype=param_dtype) if bias else None
    return x, z, w, b


def make_like(t: torch.Tensor, *, seed: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fresh N(0, 1) data of ``t``'s shape and device (an upstream gradient dy, typically); the same
    generator rules as :func:`make_inputs`."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, dtype or t.dtype)


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


# ---------------------------------------------------------------------------
# Tolerance: thin wrappers over gatednorm.verify.tolerance
# ---------------------------------------------------------------------------

def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """C: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def assert_within(
    got: torch.Tensor,
    ref: torch.Tensor,
    magnitude: torch.Tensor,
    group_size: int,
    *,
    compute: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    rows: int = 1,
    over_rows: bool = False,
    pairs: int = 1,
    exact: torch.Tensor | None = None,
    what: str = "value",
    fixed: tuple | None = None,
) -> model.Comparison:
    """``got`` within verify's tolerance of ``ref``: ``magnitude`` is A, the factor K follows from
    ``group_size`` (and ``rows`` for a sum over rows); ``pairs=2`` when ``ref`` is an approximation too,
    the bound then taken at ``exact`` (float64). Returns the comparison (for tests that measure it).

    ``fixed=(rtol, atol)`` (optionally a third item, see :func:`_assert_fixed`): also
    ``|got - ref| <= atol + rtol * |ref|``. For the checks whose earlier fixed bound is tighter than the model on
    the test's data (the model allowed more than 1.5x that bound on some elements): kept, so no check got weaker.
    """
    out_dtype = out_dtype or got.dtype
    assert got.numel() == ref.numel(), f"{what}: {got.numel()} elements, reference {ref.numel()}"
    k = model.k_factor(group_size, rows, over_rows)
    allowed = model.allowed_error(ref if exact is None else exact, magnitude, out_dtype, k, compute, pairs)
    res = model.compare(got, ref, allowed, out_dtype)
    assert res.passed, (
        f"{what} beyond the tolerance of {out_dtype}: err/tol {res.worst_ratio:.3g} (max err {res.max_abs:.3e},"
        f" {res.max_ulps:.3g} ulps), non-finite mismatches {res.nonfinite_mismatch} of {res.numel}"
    )
    if fixed is not None:
        _assert_fixed(got, ref, fixed, what)
    return res


def _assert_fixed(got, ref, fixed, what):
    """|got - ref| <= atol + rtol * |ref| where both are finite; ``fixed[2]`` ("max" | "max1") scales atol by
    max |ref| (or max(1, max |ref|)), as the tests' earlier normwise bounds did."""
    g = got.detach().double().cpu().reshape(-1)
    r = ref.detach().double().cpu().reshape(-1)
    fin = torch.isfinite(r) & torch.isfinite(g)
    err, mag = (g - r).abs()[fin], r.abs()[fin]
    rtol, atol = fixed[0], fixed[1]
    if len(fixed) == 3:
        top = float(mag.max()) if mag.numel() else 0.0
        atol *= max(1.0, top) if fixed[2] == "max1" else max(top, 1e-30)
    bad = err > atol + rtol * mag
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements beyond the kept fixed bound (rtol {rtol:.3g}, "
                           f"atol {atol:.3g}); max err {float(err.max()):.3e}")


def magnitudes(x, weight, bias, z, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False,
               activation="swish", dy=None) -> dict[str, torch.Tensor]:
    """A of every quantity of a call (verify's :func:`~gatednorm.verify.tolerance.magnitudes`)."""
    gs = group_size or x.shape[-1]
    return model.magnitudes(x, weight, bias, z, dy, gs, norm_before_gate, is_rms_norm,
                            canonical_activation(activation), eps)


def check_forward(y, mean, rstd, x, weight, bias, z, eps=1e-6, group_size=None, norm_before_gate=True,
                  is_rms_norm=False, activation="swish", *, out_dtype=None, stats=True, fixed=None):
    """y (and, with ``stats``, mean and rstd) of one forward call against float64, within the tolerance.

    Also checks the contract's shapes and dtypes: y like x (dtype ``out_dtype``, default x's), the
    statistics group-major (G*M,) in C, mean ``None`` for RMSNorm. ``fixed``: quantity -> (rtol, atol)
    of :func:`assert_within`. Returns the float64 reference.
    """
    fixed = fixed or {}
    n = x.shape[-1]
    gs = group_size or n
    c = compute_dtype(x.dtype)
    with torch.no_grad():
        ref = gated_norm_reference(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)
    mag = magnitudes(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)
    assert y.shape == x.shape and y.dtype == (out_dtype or x.dtype), (y.shape, y.dtype)
    assert_within(y, ref[0], mag["y"], gs, compute=c, what="y", fixed=fixed.get("y"))
    if stats:
        stat_shape = ((n // gs) * x[..., 0].numel(),)
        assert rstd.dtype == c and rstd.shape == stat_shape, (rstd.dtype, rstd.shape)
        assert_within(rstd, ref[2], mag["rstd"], gs, compute=c, out_dtype=c, what="rstd", fixed=fixed.get("rstd"))
        if is_rms_norm:
            assert mean is None
        else:
            assert mean.dtype == c and mean.shape == stat_shape, (mean.dtype, mean.shape)
            assert_within(mean, ref[1], mag["mean"], gs, compute=c, out_dtype=c, what="mean", fixed=fixed.get("mean"))
    return ref


def check_pair(got, other, x, weight, bias, z, eps=1e-6, group_size=None, norm_before_gate=True,
               is_rms_norm=False, activation="swish", *, fixed=None, what="y"):
    """y of two approximations (ours against another implementation, or two of our paths) within the
    tolerance of two approximations (verify's ``pairs=2``), taken at the float64 value."""
    gs = group_size or x.shape[-1]
    with torch.no_grad():
        exact = gated_norm_reference(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)[0]
    mag = magnitudes(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)["y"]
    assert got.shape == other.shape, (got.shape, other.shape)
    return assert_within(got, other.double(), mag, gs, compute=compute_dtype(x.dtype), pairs=2, exact=exact,
                         fixed=fixed, what=f"{what} against the other approximation")


def check_forward_pair(ours, theirs, x, weight, bias, z, eps=1e-6, group_size=None, norm_before_gate=True,
                       is_rms_norm=False, activation="swish", *, fixed=None, what="the other approximation"):
    """(y, mean, rstd) of two approximations within the tolerance of two approximations (``pairs=2``),
    taken at the float64 values; mean ``None`` in both for RMSNorm. ``fixed``: quantity -> (rtol, atol)."""
    fixed = fixed or {}
    gs = group_size or x.shape[-1]
    c = compute_dtype(x.dtype)
    with torch.no_grad():
        ref = gated_norm_reference(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)
    mag = magnitudes(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation)
    for i, name in enumerate(("y", "mean", "rstd")):
        if ours[i] is None or theirs[i] is None:
            assert ours[i] is None and theirs[i] is None and name == "mean" and is_rms_norm, name
            continue
        assert ours[i].shape == theirs[i].shape and ours[i].dtype == theirs[i].dtype, name
        assert_within(ours[i], theirs[i].double(), mag[name], gs, compute=c, pairs=2, exact=ref[i],
                      fixed=fixed.get(name), what=f"{name} against {what}")
    return ref


GRAD_NAMES = ("dx", "dz", "dweight", "dbias")


def reference_gradients(x, weight, bias, z, dy, eps=1e-6, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, activation="swish") -> dict[str, torch.Tensor | None]:
    """dx, dz, dweight, dbias of the float64 reference (autograd), ``None`` where there is no input."""
    leaves = {k: (t.detach().double().requires_grad_() if t is not None else None)
              for k, t in zip(GRAD_NAMES, (x, z, weight, bias), strict=True)}
    y, _, _ = gated_norm_reference(leaves["dx"], leaves["dweight"], leaves["dbias"], leaves["dz"], eps, group_size,
                                   norm_before_gate, is_rms_norm, activation)
    y.backward(dy.double().reshape(y.shape))
    return {k: (t.grad if t is not None else None) for k, t in leaves.items()}


def check_gradients(grads: Sequence[torch.Tensor | None], x, weight, bias, z, dy, eps=1e-6, group_size=None,
                    norm_before_gate=True, is_rms_norm=False, activation="swish", *, against=None, fixed=None):
    """(dx, dz, dweight, dbias) of one backward call against float64 autograd, within the tolerance.

    Each gradient is judged in its own dtype (dweight/dbias as sums over the M rows). ``None`` where
    the input is absent (or the gradient was not asked for). ``against``: another approximation's
    gradients, compared with the bound of two approximations (taken at the float64 value). ``fixed``:
    name -> (rtol, atol) of :func:`assert_within`.
    """
    fixed = fixed or {}
    n = x.shape[-1]
    gs = group_size or n
    rows = x[..., 0].numel()
    c = compute_dtype(x.dtype)
    ref = reference_gradients(x, weight, bias, z, dy, eps, gs, norm_before_gate, is_rms_norm, activation)
    mag = magnitudes(x, weight, bias, z, eps, gs, norm_before_gate, is_rms_norm, activation, dy=dy)
    for i, (name, got) in enumerate(zip(GRAD_NAMES, grads, strict=True)):
        if got is None:
            continue
        assert ref[name] is not None, f"{name} returned for an absent input"
        assert got.shape == ref[name].shape, (name, got.shape)
        over = name in ("dweight", "dbias")
        if against is None:
            assert_within(got, ref[name], mag[name], gs, compute=c, rows=rows, over_rows=over, what=name,
                          fixed=fixed.get(name))
        else:
            assert_within(got, against[i].double(), mag[name], gs, compute=c, rows=rows, over_rows=over,
                          pairs=2, exact=ref[name], what=f"{name} against the other approximation",
                          fixed=fixed.get(name))
    return ref


class RecordingBackend:
    """A Backend forwarding to ``inner`` and recording the x and z it receives (forward, backward,
    forward_quant), to prove which tensors reach a backend (served through ``ops.override_impl``)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.supports_float64 = inner, inner.name, inner.supports_float64
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        if hasattr(inner, "forward_quant"):  # ops looks the optional method up with getattr
            self.forward_quant = self._forward_quant

    def forward(self, x, weight, bias, z, spec, out):
        self.seen.append(("forward", x, z))
        return self.inner.forward(x, weight, bias, z, spec, out)

    def backward(self, dy, x, weight, bias, z, mean, rstd, spec, needs):
        self.seen.append(("backward", x, z))
        return self.inner.backward(dy, x, weight, bias, z, mean, rstd, spec, needs)

    def _forward_quant(self, x, weight, bias, z, spec, qspec, q, scale):
        self.seen.append(("forward_quant", x, z))
        return self.inner.forward_quant(x, weight, bias, z, spec, qspec, q, scale)
