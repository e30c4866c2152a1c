"""Backend dispatch, torch.library ops and autograd: the single place that routes calls.

Eager calls go straight to the chosen backend module (no custom-op dispatch
overhead). Under ``torch.compile`` the same calls go through the
``gatednorm::*`` custom ops registered here, with fake (meta) implementations,
so graphs trace without breaks and the kernels stay opaque to Inductor.

A backend module provides::

    forward(x, weight, bias, z, spec, out) -> (mean | None, rstd)
    backward(dy, x, weight, bias, z, mean, rstd, spec, needs_dx, needs_dz,
             needs_dweight, needs_dbias) -> (dx, dz, dweight, dbias)

on 2-D (M, N) tensors, already validated by :mod:`gatednorm.spec`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .spec import NormSpec, compute_dtype

BACKENDS = ("auto", "native", "triton", "compiled")

# Backends that are plain modules of this package, imported lazily (Triton is optional).
_BACKEND_MODULES = {
    "native": "gatednorm.native",
    "triton": "gatednorm.triton_kernels",
    "compiled": "gatednorm.compiled",  # native formula under torch.compile (issue 3)
}


def env_flag(name: str) -> bool:
    value = os.environ.get(name)  # read per call (cheap when unset): tests and users flip these at run time
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


# --- triton branch: cached backend lookups (hot path, and importlib cannot be traced by dynamo) ---
_LOADED: dict[str, ModuleType] = {}


_TRITON_IMPORTABLE: list[bool] = []  # filled once: a failed import is slow, and would repeat every call


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when the fused Triton backend can be imported (checked once per process)."""
    if not _TRITON_IMPORTABLE:
        try:
            load_backend("triton")
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


def _triton_supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Triton's interpreter runs kernels on CPU tensors (slowly): only on explicit request.
    return device.type == "cpu" and env_flag("TRITON_INTERPRET")


def load_backend(name: str) -> ModuleType:
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(_BACKEND_MODULES[name])
    return mod
# --- end triton branch ---


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the backend for a call on ``device``.

    ``USE_NATIVE_LAYERNORM=1`` forces native (the migration guide's switch);
    otherwise ``backend`` (per call), else ``GATEDNORM_BACKEND``, else ``auto``.
    ``auto`` takes triton where it is importable and supports the device. An
    explicit request that cannot be honoured raises ``ValueError``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if env_flag("USE_NATIVE_LAYERNORM"):
        return "native"
    if backend is None:
        raw = os.environ.get("GATEDNORM_BACKEND")
        backend = (raw.strip().lower() or "auto") if raw else "auto"
        if backend not in BACKENDS:
            raise ValueError(f"GATEDNORM_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        return "native"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' was requested but Triton (or gatednorm's kernels) cannot be imported")
        if not _triton_supports(device):
            raise ValueError(
                f"backend='triton' does not support tensors on {device} "
                "(CUDA only; CPU tensors need TRITON_INTERPRET=1)"
            )
    # --- begin: compiled backend (issue 3) ---
    if backend == "compiled" and not hasattr(torch, "compile"):  # no import here: traced under torch.compile
        raise ValueError("backend='compiled' was requested but torch.compile is not available in this PyTorch")
    # --- end: compiled backend ---
    return backend


# ---------------------------------------------------------------------------
# Eager implementations (the hot path: no custom-op dispatch, no placeholder tensors)
# ---------------------------------------------------------------------------

def _spec(eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str) -> NormSpec:
    return NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)


def _empty_stat(x: torch.Tensor) -> torch.Tensor:
    """Placeholder for an absent statistic or gradient (custom ops return tensors only)."""
    return torch.empty(0, dtype=compute_dtype(x.dtype), device=x.device)


def _forward_eager(x, weight, bias, z, spec: NormSpec, backend: str):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean, rstd = load_backend(backend).forward(x, weight, bias, z, spec, out)
    return out, mean, rstd


def _forward_out_eager(x, weight, bias, z, out, spec: NormSpec, backend: str):
    forward = load_backend(backend).forward
    try:
        out2d = out.view(x.shape)
    except RuntimeError:  # strides that no 2-D view can express: compute, then copy once
        out2d = None
    if out2d is not None:
        return forward(x, weight, bias, z, spec, out2d)
    tmp = torch.empty(x.shape, dtype=out.dtype, device=x.device)
    mean, rstd = forward(x, weight, bias, z, spec, tmp)
    out.copy_(tmp.view(out.shape))
    return mean, rstd


def _backward_eager(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str,
                    needs_dx, needs_dz, needs_dweight, needs_dbias):
    return load_backend(backend).backward(dy, x, weight, bias, z, mean, rstd, spec,
                                          needs_dx, needs_dz, needs_dweight, needs_dbias)


# ---------------------------------------------------------------------------
# torch.library custom ops (used under torch.compile, and by anyone calling torch.ops.gatednorm)
# ---------------------------------------------------------------------------

@torch.library.custom_op("gatednorm::forward", mutates_args=())
def forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
    eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd); mean is a 0-element tensor for RMSNorm (custom ops return tensors only)."""
    spec = _spec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    out, mean, rstd = _forward_eager(x, weight, bias, z, spec, backend)
    return out, (mean if mean is not None else _empty_stat(x)), rstd


@forward_op.register_fake
def _(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    m, n = x.shape
    stats = (n // group_size) * m
    c = compute_dtype(x.dtype)
    mean = x.new_empty(0 if is_rms_norm else stats, dtype=c)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, x.new_empty(stats, dtype=c)


@torch.library.custom_op("gatednorm::forward_out", mutates_args=("out",))
def forward_out_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None, out: torch.Tensor,
    eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    mean, rstd = _forward_out_eager(x, weight, bias, z, out, spec, backend)
    return (mean if mean is not None else _empty_stat(x)), rstd


@forward_out_op.register_fake
def _(x, weight, bias, z, out, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    m, n = x.shape
    stats = (n // group_size) * m
    c = compute_dtype(x.dtype)
    return x.new_empty(0 if is_rms_norm else stats, dtype=c), x.new_empty(stats, dtype=c)


@torch.library.custom_op("gatednorm::backward", mutates_args=())
def backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, eps: float, group_size: int, norm_before_gate: bool,
    is_rms_norm: bool, activation: str, backend: str,
    needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dz, dweight, dbias); a gradient not asked for is a 0-element tensor."""
    spec = _spec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    grads = _backward_eager(dy, x, weight, bias, z, None if is_rms_norm else mean, rstd, spec, backend,
                            needs_dx, needs_dz, needs_dweight, needs_dbias)
    # each absent gradient gets its own empty tensor: custom-op outputs must not alias each other
    return tuple(g if g is not None else _empty_stat(x) for g in grads)


@backward_op.register_fake
def _(dy, x, weight, bias, z, mean, rstd, eps, group_size, norm_before_gate, is_rms_norm, activation, backend,
      needs_dx, needs_dz, needs_dweight, needs_dbias):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=contiguous) if needs_dx else _empty_stat(x),
        torch.empty_like(z, memory_format=contiguous) if (needs_dz and z is not None) else _empty_stat(x),
        torch.empty_like(weight) if needs_dweight else _empty_stat(x),
        torch.empty_like(bias) if (needs_dbias and bias is not None) else _empty_stat(x),
    )


# ---------------------------------------------------------------------------
# What the functional API calls: eager backend call, or the custom op while compiling
# ---------------------------------------------------------------------------

_compiling = torch.compiler.is_compiling


def run_forward(x, weight, bias, z, spec: NormSpec, backend: str):
    """(out, mean | None, rstd) for validated 2-D x/z."""
    if _compiling():
        out, mean, rstd = forward_op(x, weight, bias, z, *spec, backend)
        return out, (None if spec.is_rms_norm else mean), rstd
    return _forward_eager(x, weight, bias, z, spec, backend)


def run_forward_out(x, weight, bias, z, out, spec: NormSpec, backend: str):
    """(mean | None, rstd); writes out."""
    if _compiling():
        mean, rstd = forward_out_op(x, weight, bias, z, out, *spec, backend)
        return (None if spec.is_rms_norm else mean), rstd
    return _forward_out_eager(x, weight, bias, z, out, spec, backend)


def run_backward(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str,
                 needs_dx: bool, needs_dz: bool, needs_dweight: bool, needs_dbias: bool):
    """(dx, dz, dweight, dbias), None for those not asked for (or absent: no z, no bias)."""
    needs_dz = needs_dz and z is not None
    needs_dbias = needs_dbias and bias is not None
    if _compiling():
        grads = backward_op(dy, x, weight, bias, z, mean if mean is not None else _empty_stat(x), rstd,
                            *spec, backend, needs_dx, needs_dz, needs_dweight, needs_dbias)
        return tuple(g if need else None
                     for g, need in zip(grads, (needs_dx, needs_dz, needs_dweight, needs_dbias), strict=True))
    return _backward_eager(dy, x, weight, bias, z, mean, rstd, spec, backend,
                           needs_dx, needs_dz, needs_dweight, needs_dbias)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------

class GatedNormFunction(torch.autograd.Function):
    """y, mean, rstd = gated_norm(x, weight, bias, z); differentiable in x, weight, bias, z.

    Saves only x, z, weight, bias, mean and rstd; the backward recomputes xhat.
    mean and rstd are returned as non-differentiable outputs (mean is None for RMSNorm).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, z, spec, backend):
        out, mean, rstd = run_forward(x, weight, bias, z, spec, backend)
        ctx.save_for_backward(x, weight, bias, z, mean, rstd)
        ctx.spec = spec
        ctx.backend = backend
        if mean is None:
            ctx.mark_non_differentiable(rstd)
        else:
            ctx.mark_non_differentiable(mean, rstd)
        # no zero-filled gradients for mean/rstd (a fill launch each, per backward)
        ctx.set_materialize_grads(False)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        if torch.is_grad_enabled():
            # The backward is analytic and itself not differentiable: refuse rather than return
            # gradients that silently miss their second-order terms.
            raise RuntimeError(
                "gatednorm does not support double backward (create_graph=True / higher-order gradients)"
            )
        if dy is None:  # only mean/rstd were used downstream: no gradient flows
            return None, None, None, None, None, None
        x, weight, bias, z, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dz, dw, db = run_backward(dy, x, weight, bias, z, mean, rstd, ctx.spec, ctx.backend,
                                      need[0], need[3], need[1], need[2])
        return dx, dw, db, dz, None, None
