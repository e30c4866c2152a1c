"""Running one case of ``gatednorm verify`` and comparing it with every reference.

:func:`run_case` runs a backend forward (and backward) on one (shape, variant) and compares with

* ``float64``: :func:`gatednorm.reference.gated_norm_reference` on the same (exactly upcast)
  inputs, evaluated on CPU: output, statistics (mean, rstd) and gradients (dx, dz, dweight, dbias);
* ``torch``: ``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` computed in float32 and rounded
  once, where they express the same function (no gate);
* ``fla``: the upstream Triton kernel of flash-linear-attention (``fla-core``), when importable
  and runnable on the device (compiled on GPUs, interpreter on CPU with ``TRITON_INTERPRET=1``);
  swish gate only (upstream has no sigmoid gate).

A quantized case (a :class:`~gatednorm.verify.quantized.QuantVariant`) runs
:func:`gatednorm.gated_norm_quant` instead and is compared with ``float64/<format>``, the float64 norm
quantized in float64 (:mod:`gatednorm.verify.quantized`): two results, ``scale`` and ``q``.

Each comparison is one :class:`Result`, judged by :mod:`gatednorm.verify.tolerance` (quantized cases:
by :func:`gatednorm.verify.quantized.judge_quant`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..functional import layer_norm_fwd, layernorm_fn
from ..reference import gated_norm_reference
from ..settings import env_flag
from . import quantized as quant
from .cases import DTYPES, EPS, Inputs, Shape, Variant, make_inputs
from .tolerance import Comparison, allowed_error, compare, k_factor, magnitudes

#: The quantities a case compares, in the order of the report.
QUANTITIES = ("y", "mean", "rstd", "dx", "dz", "dweight", "dbias")

#: What :func:`upstream_kernel` returns: (layer_norm_fwd, LayerNormFn, why-not), the functions None when
#: the upstream kernel cannot run.
Upstream = tuple[Callable | None, type | None, str]


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


def upstream_kernel(device: torch.device) -> Upstream:
    """(layer_norm_fwd, LayerNormFn, why-not) of fla-core when it can run on ``device``.

    The reasons, in the order they are checked: fla-core is not installed; Triton is not installed
    (fla's kernel is a Triton kernel); the device is a CPU without ``TRITON_INTERPRET=1``; the device
    is neither CPU nor CUDA; importing fla's module failed.
    """
    if importlib.util.find_spec("fla") is None:
        return None, None, "fla-core is not installed (pip install --no-deps fla-core==0.6.0 to compare with it)"
    if importlib.util.find_spec("triton") is None:
        return None, None, "fla-core needs Triton, which is not installed"
    if device.type == "cpu" and not env_flag("TRITON_INTERPRET"):
        return None, None, "fla needs TRITON_INTERPRET=1 on CPU"
    if device.type not in ("cpu", "cuda"):
        return None, None, f"fla does not run on {device.type}"
    try:
        mod = importlib.import_module("fla.modules.norm.layernorm_gated")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, None, f"fla-core not importable ({type(exc).__name__})"
    return mod.layer_norm_fwd, mod.LayerNormFn, ""


@dataclass
class Result:
    """One comparison: one quantity of one case against one reference."""

    backend: str
    shape: str
    variant: str
    dtype: str
    reference: str  # float64 | F.layer_norm | F.group_norm | F.rms_norm | fla
    quantity: str
    comparison: Comparison
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.comparison.passed

    def to_dict(self) -> dict:
        """A flat dict (the comparison's fields inlined, plus ``passed``): one row of the JSON report."""
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
    """The exact (float64, CPU) value of every quantity of :data:`QUANTITIES` for ``inp``."""
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
    """The name of the PyTorch function :func:`torch_reference` uses (the ``reference`` of its results)."""
    if v.is_rms_norm:
        return "F.rms_norm"
    return "F.group_norm" if grouped else "F.layer_norm"


def run_case(backend: str, shape: Shape, variant: Variant | quant.QuantVariant, device: torch.device,
             gen: torch.Generator, fla: Upstream | None = None, gradients: bool = True) -> list[Result]:
    """Run one backend on one (shape, variant); compare with float64, torch and (optionally) fla.

    A quantized case (``variant`` a :class:`~gatednorm.verify.quantized.QuantVariant`, ``shape`` a
    :class:`~gatednorm.verify.quantized.QuantShape`) goes to :func:`run_quantized_case` (``fla`` and ``gradients``
    do not apply to it).
    """
    if isinstance(variant, quant.QuantVariant):
        return run_quantized_case(backend, shape, variant, device, gen)
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


def run_quantized_case(backend: str, shape: quant.QuantShape, variant: quant.QuantVariant, device: torch.device,
                   gen: torch.Generator) -> list[Result]:
    """Run :func:`gatednorm.gated_norm_quant` on one quantized case; two results against ``float64/<format>``:
    ``scale`` and ``q`` (:meth:`gatednorm.verify.quantized.QuantJudgement.comparisons`)."""
    inp = quant.make_quant_inputs(shape, variant, device, gen)
    reference = quant.reference_name(variant.quant)
    try:
        q, scale = quant.call_quant(inp, shape, variant, backend)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed case, reported with its message
        bad = Comparison(math.nan, math.nan, math.nan, math.inf, 0, 0)
        return [Result(backend, shape.name, variant.label(), variant.dtype, reference, "q", bad,
                       error=f"{type(exc).__name__}: {exc}")]
    scale_cmp, q_cmp = quant.judge_case(inp, shape, variant, q, scale).comparisons()
    return [Result(backend, shape.name, variant.label(), variant.dtype, reference, quantity, cmp)
            for quantity, cmp in zip(quant.QUANT_QUANTITIES, (scale_cmp, q_cmp), strict=True)]


def _compare_fla(fla, inp: Inputs, y, mean, rstd, grads, mag, ref, backend, shape, rows, cdt) -> list[Result]:
    """Run the upstream kernel on the same inputs and compare our results with its (both approximations)."""
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
