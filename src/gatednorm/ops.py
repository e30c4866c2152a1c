"""The one door: backend registry, dispatch, torch.library custom ops and autograd.

Every call of the operator, from the public functions, the modules, the integrations, the
tensor-parallel layer and ``gatednorm verify``, reaches a backend through this module:

* :func:`gated_norm_rows` / :func:`gated_norm_rows_backward`: the internal entry points for
  already-validated 2-D rows (see :func:`gatednorm.spec.prepare`).
* :func:`resolve_backend`: the backend *name* for a call (per call ``backend=``, the environment, auto).
* the registry (:func:`register_impl`, :func:`select_impl`, :func:`override_impl`): which
  implementation of the :class:`~gatednorm.backends.base.Backend` protocol serves a name on a device.
  Backends are imported here and nowhere else, lazily (Triton is optional, Inductor is heavy).

Dispatch normalises once, before any backend runs: float64 on a backend without float64 kernels goes
to native; empty batches and the meta device never reach a backend; the gradients asked for are
trimmed to those that exist (no dz without z, no dbias without bias); RMSNorm's absent mean is None
here and a 0-element tensor only inside the custom ops (which must return tensors).

Eager calls go straight to the backend (no custom-op dispatch overhead). Under ``torch.compile`` the
same calls go through the ``gatednorm::*`` custom ops registered here, with fake (meta)
implementations, so graphs trace without breaks and the kernels stay opaque to Inductor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .backends.base import Backend, Grads, GradsNeeded
from .settings import env_flag, env_text
from .spec import NormSpec, compute_dtype

#: Names accepted by ``backend=`` and ``GATEDNORM_BACKEND``.
BACKENDS = ("auto", "native", "triton", "compiled")

# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

#: Any device type: the key of an implementation registered for every device without its own entry.
ANY_DEVICE = "*"

_LOADERS: dict[tuple[str, str], Callable[[], Backend]] = {}
_IMPLS: dict[tuple[str, str], Backend] = {}


def register_impl(name: str, device_type: str, loader: Callable[[], Backend]) -> None:
    """Register ``loader`` (called once, on first use) as the implementation of backend ``name`` for
    tensors of ``device_type`` (``ANY_DEVICE`` for every device type without an entry of its own)."""
    _LOADERS[(name, device_type)] = loader
    _IMPLS.pop((name, device_type), None)


def select_impl(name: str, device: torch.device) -> Backend:
    """The implementation serving backend ``name`` (a concrete name, not "auto") on ``device``."""
    key = (name, device.type)
    impl = _IMPLS.get(key)
    if impl is not None:
        return impl
    if key not in _LOADERS:
        key = (name, ANY_DEVICE)
        impl = _IMPLS.get(key)
        if impl is not None:
            return impl
    impl = _IMPLS[key] = _LOADERS[key]()
    return impl


@contextlib.contextmanager
def override_impl(name: str, device_type: str, impl: Backend) -> Iterator[Backend]:
    """Within the block, ``impl`` serves backend ``name`` on ``device_type`` (tests: the accelerator path
    on CPU tensors, small blocks, another rescue threshold). Restores the previous registration."""
    key = (name, device_type)
    saved_loader, saved_impl = _LOADERS.get(key), _IMPLS.get(key)
    _LOADERS[key] = lambda: impl
    _IMPLS[key] = impl
    try:
        yield impl
    finally:
        _IMPLS.pop(key, None)
        if saved_loader is None:
            _LOADERS.pop(key, None)
        else:
            _LOADERS[key] = saved_loader
            if saved_impl is not None:
                _IMPLS[key] = saved_impl


def _native_cpu() -> Backend:
    from .backends.native_cpu import NativeCPUBackend

    return NativeCPUBackend()


def _native_accel() -> Backend:
    from .backends.native_accel import NativeAccelBackend

    return NativeAccelBackend()


def _compiled() -> Backend:
    from .backends.compiled import CompiledBackend

    return CompiledBackend()


def _triton() -> Backend:
    from .backends.triton import TritonBackend  # ImportError without Triton: see triton_available()

    return TritonBackend()


register_impl("native", "cpu", _native_cpu)
register_impl("native", ANY_DEVICE, _native_accel)
register_impl("compiled", ANY_DEVICE, _compiled)
register_impl("triton", ANY_DEVICE, _triton)

# ---------------------------------------------------------------------------
# Backend names
# ---------------------------------------------------------------------------

_TRITON_IMPORTABLE: list[bool] = []  # filled once: a failed import is slow, and would repeat every call


def triton_available() -> bool:
    """True when the fused Triton backend can be imported (checked once per process).

    Importable is not the same as usable: the triton backend runs on CUDA tensors, and on CPU
    tensors only under ``TRITON_INTERPRET=1``.
    """
    if not _TRITON_IMPORTABLE:
        try:
            select_impl("triton", torch.device("cpu"))
        except ImportError:
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


# Under torch.compile the answer is a constant, so dynamo never traces the import. This is exactly what
# torch.compiler.assume_constant_result sets; calling that decorator here would import torch._dynamo
# (about 1.5 s) with every `import gatednorm`.
triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _triton_supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Triton's interpreter runs kernels on CPU tensors (slowly): only on explicit request.
    return device.type == "cpu" and env_flag("TRITON_INTERPRET")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the backend name for a call on ``device``.

    ``USE_NATIVE_LAYERNORM=1`` forces native (the migration guide's switch); otherwise ``backend``
    (per call), else ``GATEDNORM_BACKEND``, else ``auto``. ``auto`` takes triton on CUDA tensors
    where Triton is importable, native elsewhere. An explicit request that cannot be honoured
    raises ``ValueError``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if env_flag("USE_NATIVE_LAYERNORM"):
        return "native"
    if backend is None:
        backend = env_text("GATEDNORM_BACKEND").lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"GATEDNORM_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "native"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' was requested but Triton (or gatednorm's kernels) cannot be imported")
        if not _triton_supports(device):
            raise ValueError(
                f"backend='triton' does not support tensors on {device} "
                "(CUDA only; CPU tensors need TRITON_INTERPRET=1)"
            )
    if backend == "compiled" and not hasattr(torch, "compile"):
        raise ValueError("backend='compiled' was requested but torch.compile is not available in this PyTorch")
    return backend


def _impl_for(name: str, x: torch.Tensor) -> Backend:
    """The implementation for a call: float64 goes to native where the backend computes in float32."""
    impl = select_impl(name, x.device)
    if x.dtype == torch.float64 and not impl.supports_float64:
        impl = select_impl("native", x.device)
    return impl


# ---------------------------------------------------------------------------
# Eager implementations (the hot path: no custom-op dispatch, no placeholder tensors)
# ---------------------------------------------------------------------------


def _no_work(x: torch.Tensor) -> bool:
    """Empty batches and the meta device: shapes only, no backend call."""
    return x.shape[0] == 0 or x.device.type == "meta"


def _empty_stats(x: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor | None, torch.Tensor]:
    stats = (x.shape[1] // spec.group_size) * x.shape[0]
    c = compute_dtype(x.dtype)
    mean = None if spec.is_rms_norm else x.new_empty(stats, dtype=c)
    return mean, x.new_empty(stats, dtype=c)


def _forward_eager(x, weight, bias, z, spec: NormSpec, backend: str):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _no_work(x):
        return (out, *_empty_stats(x, spec))
    mean, rstd = _impl_for(backend, x).forward(x, weight, bias, z, spec, out)
    return out, mean, rstd


def _forward_out_eager(x, weight, bias, z, out, spec: NormSpec, backend: str):
    if _no_work(x):
        return _empty_stats(x, spec)
    forward = _impl_for(backend, x).forward
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


def _backward_eager(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str, needs: GradsNeeded) -> Grads:
    if _no_work(x):
        return (
            torch.empty(x.shape, dtype=x.dtype, device=x.device) if needs.dx else None,
            torch.empty(x.shape, dtype=z.dtype, device=x.device) if needs.dz else None,
            torch.zeros_like(weight) if needs.dweight else None,
            torch.zeros_like(bias) if needs.dbias else None,
        )
    return _impl_for(backend, x).backward(dy, x, weight, bias, z, mean, rstd, spec, needs)


# ---------------------------------------------------------------------------
# torch.library custom ops (used under torch.compile, and by anyone calling torch.ops.gatednorm)
# ---------------------------------------------------------------------------


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """Stands for an absent statistic or gradient (custom ops return tensors only)."""
    return torch.empty(0, dtype=compute_dtype(x.dtype), device=x.device)


@torch.library.custom_op("gatednorm::forward", mutates_args=())
def forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
    eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd); mean is a 0-element tensor for RMSNorm."""
    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    out, mean, rstd = _forward_eager(x, weight, bias, z, spec, backend)
    return out, (mean if mean is not None else _placeholder(x)), rstd


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
    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    mean, rstd = _forward_out_eager(x, weight, bias, z, out, spec, backend)
    return (mean if mean is not None else _placeholder(x)), rstd


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
    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    needs = GradsNeeded(needs_dx, needs_dz, needs_dweight, needs_dbias)
    grads = _backward_eager(dy, x, weight, bias, z, None if is_rms_norm else mean, rstd, spec, backend, needs)
    # each absent gradient gets its own empty tensor: custom-op outputs must not alias each other
    return tuple(g if g is not None else _placeholder(x) for g in grads)


@backward_op.register_fake
def _(dy, x, weight, bias, z, mean, rstd, eps, group_size, norm_before_gate, is_rms_norm, activation, backend,
      needs_dx, needs_dz, needs_dweight, needs_dbias):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=contiguous) if needs_dx else _placeholder(x),
        torch.empty_like(z, memory_format=contiguous) if (needs_dz and z is not None) else _placeholder(x),
        torch.empty_like(weight) if needs_dweight else _placeholder(x),
        torch.empty_like(bias) if (needs_dbias and bias is not None) else _placeholder(x),
    )


# ---------------------------------------------------------------------------
# Eager backend call, or the custom op while compiling
# ---------------------------------------------------------------------------

_compiling = torch.compiler.is_compiling


def _run_forward(x, weight, bias, z, spec: NormSpec, backend: str):
    """(out, mean | None, rstd) for validated 2-D x/z."""
    if _compiling():
        out, mean, rstd = forward_op(x, weight, bias, z, *spec, backend)
        return out, (None if spec.is_rms_norm else mean), rstd
    return _forward_eager(x, weight, bias, z, spec, backend)


def _run_forward_out(x, weight, bias, z, out, spec: NormSpec, backend: str):
    """(mean | None, rstd); writes out."""
    if _compiling():
        mean, rstd = forward_out_op(x, weight, bias, z, out, *spec, backend)
        return (None if spec.is_rms_norm else mean), rstd
    return _forward_out_eager(x, weight, bias, z, out, spec, backend)


def _run_backward(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str, needs: GradsNeeded) -> Grads:
    """(dx, dz, dweight, dbias), None for those not asked for (or absent: no z, no bias)."""
    needs = GradsNeeded(needs.dx, needs.dz and z is not None, needs.dweight, needs.dbias and bias is not None)
    if _compiling():
        grads = backward_op(dy, x, weight, bias, z, mean if mean is not None else _placeholder(x), rstd,
                            *spec, backend, *needs)
        return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return _backward_eager(dy, x, weight, bias, z, mean, rstd, spec, backend, needs)


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
        out, mean, rstd = _run_forward(x, weight, bias, z, spec, backend)
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
        dx, dz, dw, db = _run_backward(dy, x, weight, bias, z, mean, rstd, ctx.spec, ctx.backend,
                                       GradsNeeded(need[0], need[3], need[1], need[2]))
        return dx, dw, db, dz, None, None


# ---------------------------------------------------------------------------
# Internal entry points (validated 2-D rows)
# ---------------------------------------------------------------------------


def needs_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None) -> bool:
    """True when grad mode is on and any input requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad) or (z is not None and z.requires_grad)
    )


def gated_norm_rows(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z2d: torch.Tensor | None, spec: NormSpec,
    *, backend: str | None = None, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(y (M, N), mean | None, rstd) of validated rows (from :func:`gatednorm.spec.prepare`).

    ``backend`` is a name or None (environment / auto). Differentiable when an input requires grad;
    ``out`` (x's shape, any floating dtype and strides) is written and returned as y, and is only
    allowed without autograd (the caller checks).
    """
    name = resolve_backend(backend, x2d.device)
    if out is not None:
        mean, rstd = _run_forward_out(x2d, weight, bias, z2d, out, spec, name)
        return out, mean, rstd
    if needs_autograd(x2d, weight, bias, z2d):
        return GatedNormFunction.apply(x2d, weight, bias, z2d, spec, name)
    return _run_forward(x2d, weight, bias, z2d, spec, name)


def gated_norm_rows_backward(
    dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z2d: torch.Tensor | None,
    mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec, *, backend: str | None = None,
    needs_dx: bool = True, needs_dz: bool = True, needs_dweight: bool = True, needs_dbias: bool = True,
) -> Grads:
    """(dx, dz, dweight, dbias) of validated rows given dy (M, N) and the forward's statistics.

    Each is None when not asked for or absent (no z, no bias); dtypes are x's, z's, weight's, bias's.
    """
    name = resolve_backend(backend, x2d.device)
    return _run_backward(dy, x2d, weight, bias, z2d, mean, rstd, spec, name,
                         GradsNeeded(needs_dx, needs_dz, needs_dweight, needs_dbias))
