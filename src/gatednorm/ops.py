"""The one door: backend registry, dispatch, torch.library custom ops and autograd.

Every call of the operator, from the public functions, the modules, the integrations, the
tensor-parallel layer and ``gatednorm verify``, reaches a backend through this module:

* :func:`gated_norm_rows` / :func:`gated_norm_rows_backward`: the internal entry points for
  already-validated 2-D rows (see :func:`gatednorm.spec.prepare`); :func:`gated_norm_residual_rows`:
  the same operator on ``x + residual`` with the prenorm output (docs/design.md, "Residual and prenorm").
* :func:`planned_forward` / :func:`planned_quant`: a call whose signature ran before, through the decisions
  cached for it (argument checks, backend, launches; "Eager plans" below).
* :func:`resolve_backend`: the backend *name* for a call (per call ``backend=``, the environment, auto;
  :func:`explain_backend` says why).
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
import functools
import itertools
from collections.abc import Callable, Iterator

import torch

from . import numerics
from .backends import base as backend_base
from .backends.base import Backend, Grads, GradsNeeded, quantize_by_steps
from .huge_pages import advise_huge_pages
from .settings import backend_choice_key, env_flag, env_text
from .spec import (
    NormSpec,
    QuantSpec,
    compute_dtype,
    prepare,
    prepare_quant,
    quant_dtype,
    residual_sum_dtype,
    round_to_dtype,
)

#: Names accepted by ``backend=`` and ``GATEDNORM_BACKEND``.
BACKENDS = ("auto", "native", "triton", "compiled")

# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

#: Any device type: the key of an implementation registered for every device without its own entry.
ANY_DEVICE = "*"

_LOADERS: dict[tuple[str, str], Callable[[], Backend]] = {}
_IMPLS: dict[tuple[str, str], Backend] = {}
#: Implementations whose loader raised ImportError (Triton absent): remembered, since a failed import is slow.
_UNAVAILABLE: dict[tuple[str, str], ImportError] = {}
#: triton_available()'s answer, asked for on every CUDA call without backend= (about 0.7 us through
#: select_impl); None until asked, reset whenever the registry changes.
_TRITON_IMPORTABLE: bool | None = None
#: Eager plans (see "Eager plans" below): signature key -> _EagerPlan, or _NO_PLAN for a signature plans do
#: not serve. Every registry change empties it (a plan holds the implementation it resolved).
_PLANS: dict[tuple, object] = {}


def register_impl(name: str, device_type: str, loader: Callable[[], Backend]) -> None:
    """Register ``loader`` (called once, on first use) as the implementation of backend ``name`` for
    tensors of ``device_type`` (``ANY_DEVICE`` for every device type without an entry of its own)."""
    global _TRITON_IMPORTABLE
    _LOADERS[(name, device_type)] = loader
    _IMPLS.pop((name, device_type), None)
    _UNAVAILABLE.pop((name, device_type), None)
    _TRITON_IMPORTABLE = None
    _PLANS.clear()


def select_impl(name: str, device: torch.device) -> Backend:
    """The implementation serving backend ``name`` (a concrete name, not "auto") on ``device``.

    Raises ``ImportError`` when it cannot be loaded (the triton backend without Triton).
    """
    key = (name, device.type)
    impl = _IMPLS.get(key)
    if impl is not None:
        return impl
    if key not in _LOADERS and key not in _UNAVAILABLE:
        key = (name, ANY_DEVICE)
        impl = _IMPLS.get(key)
        if impl is not None:
            return impl
    if key in _UNAVAILABLE:
        raise _UNAVAILABLE[key]
    try:
        impl = _IMPLS[key] = _LOADERS[key]()
    except ImportError as exc:
        _UNAVAILABLE[key] = exc
        raise
    return impl


@contextlib.contextmanager
def override_impl(name: str, device_type: str, impl: Backend | ImportError) -> Iterator[Backend | ImportError]:
    """Within the block, ``impl`` serves backend ``name`` on ``device_type`` (tests: the accelerator path
    on CPU tensors, small blocks, another rescue threshold); an ``ImportError`` instead makes the backend
    unavailable there (as the triton backend is without Triton). Restores the previous registration."""
    global _TRITON_IMPORTABLE
    key = (name, device_type)
    saved = _LOADERS.get(key), _IMPLS.get(key), _UNAVAILABLE.get(key)
    _TRITON_IMPORTABLE = None
    _PLANS.clear()
    _IMPLS.pop(key, None)
    _UNAVAILABLE.pop(key, None)
    if isinstance(impl, ImportError):
        _UNAVAILABLE[key] = impl
    else:
        _LOADERS[key] = lambda: impl
        _IMPLS[key] = impl
    try:
        yield impl
    finally:
        _IMPLS.pop(key, None)
        _UNAVAILABLE.pop(key, None)
        _LOADERS.pop(key, None)
        for table, value in zip((_LOADERS, _IMPLS, _UNAVAILABLE), saved, strict=True):
            if value is not None:
                table[key] = value
        _TRITON_IMPORTABLE = None
        _PLANS.clear()


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

def triton_available() -> bool:
    """Whether gatednorm's Triton backend can be *imported* in this process (checked once, then cached).

    True means: Triton is installed and gatednorm's kernel module loads. It says nothing about
    devices, and Triton imports fine on a machine without a GPU, so True does not mean that
    ``backend="triton"`` can run your tensors: the backend runs CUDA tensors, and CPU tensors only
    under Triton's interpreter (``TRITON_INTERPRET=1``, slow, for testing). To ask about a device, use
    ``resolve_backend("triton", device)`` (raises ``ValueError`` saying why not) or
    :func:`gatednorm.info`, which lists per device what ``auto`` picks and why.
    """
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            select_impl("triton", torch.device("cpu"))
        except ImportError:
            _TRITON_IMPORTABLE = False
        else:
            _TRITON_IMPORTABLE = True
    return _TRITON_IMPORTABLE


# Under torch.compile the answer is a constant, so dynamo never traces the import. This is exactly what
# torch.compiler.assume_constant_result sets; calling that decorator here would import torch._dynamo
# (about 1.5 s) with every `import gatednorm`.
triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _triton_supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # Triton's interpreter runs kernels on CPU tensors (slowly): only on explicit request.
    return device.type == "cpu" and env_flag("TRITON_INTERPRET")


def requested_backend(backend: str | None) -> tuple[str, str]:
    """``(name, source)``: the backend a call asks for, before its device is considered.

    The precedence (docs/design.md, "Choosing a backend"): the call's ``backend=`` argument (source
    ``"backend="``); else ``USE_NATIVE_LAYERNORM=1`` gives ``"native"`` (source
    ``"USE_NATIVE_LAYERNORM"``); else ``GATEDNORM_BACKEND`` (source ``"GATEDNORM_BACKEND"``); else
    ``"auto"`` (source ``"default"``). ``name`` may be ``"auto"``. Unknown names raise ``ValueError``.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend, "backend="
    name = env_text("GATEDNORM_BACKEND").lower()
    if name and name not in BACKENDS:  # checked even where USE_NATIVE_LAYERNORM wins: a typo must not hide
        raise ValueError(f"GATEDNORM_BACKEND must be one of {BACKENDS}, got {name!r}")
    if env_flag("USE_NATIVE_LAYERNORM"):
        return "native", "USE_NATIVE_LAYERNORM"
    if name:
        return name, "GATEDNORM_BACKEND"
    return "auto", "default"


def auto_backend(device: torch.device) -> str:
    """What ``"auto"`` picks for tensors on ``device``: triton on CUDA when Triton is importable, else native."""
    return "triton" if device.type == "cuda" and triton_available() else "native"


def native_cpu_kernel_status() -> str:
    """'in use' when the native backend's C kernel for CPU is built (built here on first use, about a
    second with a C compiler), else why its pure-PyTorch block loops run instead."""
    from .backends import native_cpu_kernel

    return native_cpu_kernel.status()


def native_cpu_node_status() -> str:
    """'in use' when the native backend's small CPU calls run through its C++ extension (the eager plans' forward,
    an autograd node for differentiable calls), else why they run in Python; builds nothing (the first planned small
    call builds it, 15-25 s with a C++ compiler, once per machine), so a first ``gatednorm info`` stays quick."""
    from .backends import native_cpu_node

    return native_cpu_node.status(build=False)


def triton_cxx_plans_status() -> str:
    """'in use' when the triton backend's eager plans run their per-call host work in C++ (built here on first
    use where Triton's C launcher is the one it repeats, 10-60 s with a C++ compiler), else why the plans run in
    Python."""
    if not triton_available():
        return "no triton backend here"
    from .backends.triton import cxx_plans

    return cxx_plans.status()


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why the concrete backend ``name`` cannot run tensors on ``device`` (None when it can)."""
    if name == "triton":
        if not triton_available():
            return "Triton (or gatednorm's kernels) cannot be imported here; pip install 'gatednorm[triton]'"
        if not _triton_supports(device):
            return (f"the triton backend runs CUDA tensors, not tensors on {device} "
                    "(CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1)")
    elif name == "compiled" and not hasattr(torch, "compile"):
        return "the compiled backend needs torch.compile, which this PyTorch does not have"
    return None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend name a call with ``backend=`` on ``device`` runs.

    Precedence (docs/design.md, "Choosing a backend"; :func:`requested_backend`): an explicit
    ``backend=`` wins; else ``USE_NATIVE_LAYERNORM=1`` means native; else ``GATEDNORM_BACKEND``; else
    ``auto``. ``auto`` takes triton on CUDA tensors where Triton is importable, native elsewhere. A
    named backend that cannot run on ``device`` raises ``ValueError`` naming where the name came
    from: a call never falls back to another backend silently.
    """
    name, source = requested_backend(backend)
    if name == "auto":
        return auto_backend(device)
    problem = backend_problem(name, device)
    if problem is not None:
        where = f"backend={name!r}" if source == "backend=" else f"{source} (backend {name!r})"
        raise ValueError(f"{where} cannot be used: {problem}")
    return name


def auto_reason(device: torch.device) -> str:
    """Why :func:`auto_backend` picks what it picks for ``device`` (one sentence, for messages and info)."""
    if auto_backend(device) == "triton":
        return "CUDA tensors run gatednorm's Triton kernels"
    if device.type == "cuda":
        return "Triton cannot be imported here, so CUDA tensors run native (pip install 'gatednorm[triton]')"
    if device.type == "cpu":
        return "Triton serves CUDA tensors only; cpu tensors run native (its C kernel where built, else PyTorch ops)"
    return f"Triton serves CUDA tensors only; {device.type} tensors run native (plain PyTorch ops)"


def explain_backend(backend: str | None, device: torch.device) -> tuple[str | None, str]:
    """``(name, why)``: what :func:`resolve_backend` gives for ``backend`` on ``device`` and why, or
    ``(None, the error)`` where it raises. For :func:`gatednorm.info` and messages; not on the hot path."""
    try:
        name, source = requested_backend(backend)
    except ValueError as exc:
        return None, str(exc)
    origin = {"backend=": f"backend={name!r} passed",
              "USE_NATIVE_LAYERNORM": "USE_NATIVE_LAYERNORM=1",
              "GATEDNORM_BACKEND": f"GATEDNORM_BACKEND={name}",
              "default": "no backend=, USE_NATIVE_LAYERNORM or GATEDNORM_BACKEND, so auto"}[source]
    if name == "auto":
        return auto_backend(device), f"{origin}: {auto_reason(device)}"
    problem = backend_problem(name, device)
    if problem is not None:
        return None, f"{origin}, but {problem}"
    return name, origin


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
    """Empty batches, the meta device and fake tensors (``FakeTensorMode``: shape propagation, memory
    planning): shapes only, no backend call (a backend would read the data, which fake tensors do not have)."""
    return x.shape[0] == 0 or x.is_meta or (x.__class__ is not torch.Tensor and _is_fake(x))


def _is_fake(x: torch.Tensor) -> bool:
    """Whether x is a fake tensor (or a wrapper subclass of fake ones). Imported here, on the rare path of tensor
    subclasses, not with gatednorm: ``import gatednorm`` does not load torch's fake-tensor machinery itself."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(x))


def _new_rows(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous (M, N) tensor on x's device, in x's dtype or ``dtype``; a fresh CPU one of 32 MiB or more
    on huge pages (:mod:`gatednorm.huge_pages`: no page fault per 4 KiB on its first write). empty_like takes
    about 0.8 us of host time where ``torch.empty(x.shape, dtype=..., device=...)`` takes 2 (parsing the Size)."""
    return advise_huge_pages(torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format))


def _empty_stats(x: torch.Tensor, spec: NormSpec) -> tuple[torch.Tensor | None, torch.Tensor]:
    stats = (x.shape[1] // spec.group_size) * x.shape[0]
    c = compute_dtype(x.dtype)
    mean = None if spec.is_rms_norm else x.new_empty(stats, dtype=c)
    return mean, x.new_empty(stats, dtype=c)


def _forward_eager(x, weight, bias, z, spec: NormSpec, backend: str, stats: bool = True):
    if _no_work(x):
        return (_new_rows(x), *_empty_stats(x, spec))
    return _forward_with(_impl_for(backend, x), x, weight, bias, z, spec, stats)


def _forward_with(impl: Backend, x, weight, bias, z, spec: NormSpec, stats: bool):
    """(out, mean | None, rstd) of non-empty rows from ``impl`` (the eager path and the eager plans')."""
    forward_output = None if stats else getattr(impl, "forward_output", None)
    if forward_output is not None:  # the caller discards the statistics (backends.base.OutputOnlyBackend)
        return forward_output(x, weight, bias, z, spec), None, None
    out = _new_rows(x)
    mean, rstd = impl.forward(x, weight, bias, z, spec, out)
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
    tmp = _new_rows(x, out.dtype)
    mean, rstd = forward(x, weight, bias, z, spec, tmp)
    out.copy_(tmp.view(out.shape))
    return mean, rstd


def _backward_eager(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str, needs: GradsNeeded) -> Grads:
    if _no_work(x):
        return (
            _new_rows(x) if needs.dx else None,
            _new_rows(x, z.dtype) if needs.dz else None,
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


@torch.library.custom_op("gatednorm::forward_output", mutates_args=())
def forward_output_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
    eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str, backend: str,
) -> torch.Tensor:
    """out only: a call that discards the statistics (the backend's forward_output where it has one, e.g. the
    triton backend's output-only launch tile)."""
    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    return _forward_eager(x, weight, bias, z, spec, backend, stats=False)[0]


@forward_output_op.register_fake
def _(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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


# vmap rules of the custom ops (reached where torch.func.vmap runs around or inside torch.compile: eager calls
# under a transform take formula_rows instead). The operator is row-wise, so a batch of calls over the same
# weight and bias is one call over the batch's rows stacked: (B, M, N) -> (B * M, N), the group-major
# statistics (G, B * M) handed back per sample as (B, G * M). Per-sample weights or bias, and parameter
# gradients (summed per sample, not over the batch), take one call per sample, as torch's fallback does
# (without its warning that no rule exists).


def _batch_first(t: torch.Tensor | None, bdim: int | None, batch: int) -> torch.Tensor | None:
    """t with its batch dimension first (an unbatched t expanded to the batch)."""
    if t is None:
        return None
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch, *t.shape)


def _stacked_rows(t: torch.Tensor | None, bdim: int | None, batch: int) -> torch.Tensor | None:
    """The (B * M, N) rows of a batch of (M, N) row tensors."""
    t = _batch_first(t, bdim, batch)
    return None if t is None else t.reshape(-1, t.shape[-1])


def _stats_per_sample(stat: torch.Tensor, batch: int, m: int) -> torch.Tensor:
    """Group-major statistics of B * M rows, (G * B * M,) -> (B, G * M): each sample's own group-major layout."""
    if stat.numel() == 0:  # RMSNorm's mean placeholder
        return stat.new_empty(batch, 0)
    return stat.view(-1, batch, m).transpose(0, 1).reshape(batch, -1)


def _stats_stacked(stat: torch.Tensor, bdim: int | None, batch: int, m: int) -> torch.Tensor:
    """The inverse of :func:`_stats_per_sample`: (B, G * M) per-sample statistics -> (G * B * M,)."""
    stat = _batch_first(stat, bdim, batch)
    if stat.numel() == 0:
        return stat.new_empty(0)
    return stat.reshape(batch, -1, m).transpose(0, 1).reshape(-1)


def _per_sample_calls(op, batch: int, in_dims: tuple, args: tuple) -> tuple[tuple, tuple]:
    """``op`` once per sample (the batched arguments indexed along their batch dimension), outputs stacked."""
    outs = []
    for i in range(batch):
        sample = tuple(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims, strict=True))
        outs.append(op(*sample))
    stacked = tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return stacked, (0,) * len(stacked)


@forward_op.register_vmap
def _(info, in_dims, x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    x_dim, w_dim, b_dim, z_dim = in_dims[:4]
    args = (x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend)
    if w_dim is not None or b_dim is not None:
        return _per_sample_calls(forward_op, info.batch_size, in_dims, args)
    batch, (m, n) = info.batch_size, _batch_first(x, x_dim, info.batch_size).shape[1:]
    out, mean, rstd = forward_op(_stacked_rows(x, x_dim, batch), weight, bias, _stacked_rows(z, z_dim, batch),
                                 *args[4:])
    return (out.view(batch, m, n), _stats_per_sample(mean, batch, m), _stats_per_sample(rstd, batch, m)), (0, 0, 0)


@forward_output_op.register_vmap
def _(info, in_dims, x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    x_dim, w_dim, b_dim, z_dim = in_dims[:4]
    args = (x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend)
    if w_dim is not None or b_dim is not None:
        return _per_sample_calls(lambda *a: (forward_output_op(*a),), info.batch_size, in_dims, args)[0][0], 0
    batch, (m, n) = info.batch_size, _batch_first(x, x_dim, info.batch_size).shape[1:]
    out = forward_output_op(_stacked_rows(x, x_dim, batch), weight, bias, _stacked_rows(z, z_dim, batch), *args[4:])
    return out.view(batch, m, n), 0


@backward_op.register_vmap
def _(info, in_dims, dy, x, weight, bias, z, mean, rstd, eps, group_size, norm_before_gate, is_rms_norm, activation,
      backend, needs_dx, needs_dz, needs_dweight, needs_dbias):
    dy_dim, x_dim, w_dim, b_dim, z_dim, mean_dim, rstd_dim = in_dims[:7]
    args = (dy, x, weight, bias, z, mean, rstd, eps, group_size, norm_before_gate, is_rms_norm, activation, backend,
            needs_dx, needs_dz, needs_dweight, needs_dbias)
    if w_dim is not None or b_dim is not None or needs_dweight or needs_dbias:
        return _per_sample_calls(backward_op, info.batch_size, in_dims, args)
    batch, (m, n) = info.batch_size, _batch_first(x, x_dim, info.batch_size).shape[1:]
    dx, dz, dweight, dbias = backward_op(
        _stacked_rows(dy, dy_dim, batch), _stacked_rows(x, x_dim, batch), weight, bias, _stacked_rows(z, z_dim, batch),
        _stats_stacked(mean, mean_dim, batch, m), _stats_stacked(rstd, rstd_dim, batch, m), *args[7:])
    # absent gradients stay the op's unbatched placeholders (dz: not asked for, or no z)
    has_dz = needs_dz and z is not None
    return ((dx.view(batch, m, n) if needs_dx else dx), (dz.view(batch, m, n) if has_dz else dz), dweight,
            dbias), (0 if needs_dx else None, 0 if has_dz else None, None, None)


# ---------------------------------------------------------------------------
# Eager backend call, or the custom op while compiling
# ---------------------------------------------------------------------------

_compiling = torch.compiler.is_compiling


def _run_forward(x, weight, bias, z, spec: NormSpec, backend: str, out_dtype: torch.dtype | None = None,
                 stats: bool = True):
    """(out, mean | None, rstd) for validated 2-D x/z; out in ``out_dtype`` (default x's dtype). ``stats=False``:
    the caller discards mean and rstd, which may then be None."""
    if out_dtype is not None and out_dtype != x.dtype:
        # The residual path normalises a float32 sum into x's dtype: the backend's one rounding
        # targets the output buffer directly (no float32 output and second cast).
        out = _new_rows(x, out_dtype)
        return (out, *_run_forward_out(x, weight, bias, z, out, spec, backend))
    if _compiling():
        if not stats:  # one output, so a backend's output-only path (forward_output) serves the compiled call too
            return forward_output_op(x, weight, bias, z, *spec, backend), None, None
        out, mean, rstd = forward_op(x, weight, bias, z, *spec, backend)
        return out, (None if spec.is_rms_norm else mean), rstd
    return _forward_eager(x, weight, bias, z, spec, backend, stats)


def _run_forward_out(x, weight, bias, z, out, spec: NormSpec, backend: str):
    """(mean | None, rstd); writes out."""
    if _compiling():
        mean, rstd = forward_out_op(x, weight, bias, z, out, *spec, backend)
        return (None if spec.is_rms_norm else mean), rstd
    return _forward_out_eager(x, weight, bias, z, out, spec, backend)


def _run_backward(dy, x, weight, bias, z, mean, rstd, spec: NormSpec, backend: str, needs: GradsNeeded) -> Grads:
    """(dx, dz, dweight, dbias), None for those not asked for; ``needs`` asks only for gradients that
    exist (no dz without z, no dbias without bias)."""
    if _compiling():
        grads = backward_op(dy, x, weight, bias, z, mean if mean is not None else _placeholder(x), rstd,
                            *spec, backend, *needs)
        return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return _backward_eager(dy, x, weight, bias, z, mean, rstd, spec, backend, needs)


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------


#: GradsNeeded for ctx.needs_input_grad[:4] (x, weight, bias, z): built once, not per backward. An absent
#: z or bias never needs a gradient (autograd says False for None inputs).
_NEEDS = {(dx, dw, db, dz): GradsNeeded(dx, dz, dw, db)
          for dx, dw, db, dz in itertools.product((False, True), repeat=4)}


def _forward_saved(ctx, x, weight, bias, z, spec, backend, out_dtype, plan):
    """(y, mean | None, rstd) of the rows, with what the backward needs saved on ctx: x, weight, bias, z,
    mean, rstd (the backward recomputes xhat) and the call's spec, backend and plan."""
    # plan: the call's _EagerPlan (eager calls whose signature ran before), whose decisions replace the
    # per-call ones in both directions; None: the full path.
    if plan is not None:
        out, mean, rstd = plan.forward_rows(x, weight, bias, z)
    else:
        out, mean, rstd = _run_forward(x, weight, bias, z, spec, backend, out_dtype)
    ctx.save_for_backward(x, weight, bias, z, mean, rstd)
    ctx.spec = spec
    ctx.backend = backend
    ctx.plan = plan
    return out, mean, rstd


def _saved_backward(ctx, dy):
    """The gradients of the Functions' eight inputs (x, weight, bias, z, then four constants) from dy."""
    if dy is None:  # only mean/rstd were used downstream: no gradient flows
        return None, None, None, None, None, None, None, None
    x, weight, bias, z, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
        return (*_differentiable_grads(ctx, dy, x, weight, bias, z), None, None, None, None)
    needs = _NEEDS[ctx.needs_input_grad[:4]]
    # dy has the output's dtype, which may differ from x's (a float32 residual sum normalised into
    # bf16): backends read dy in its own dtype and return dx in x's.
    if ctx.plan is not None and not _compiling():  # compiled autograd traces backward_op instead
        dx, dz, dw, db = ctx.plan.backward_rows(dy, x, weight, bias, z, mean, rstd, needs)
    else:
        dx, dz, dw, db = _run_backward(dy, x, weight, bias, z, mean, rstd, ctx.spec, ctx.backend, needs)
    return dx, dw, db, dz, None, None, None, None


def _differentiable_grads(ctx, dy, x, weight, bias, z) -> tuple:
    """(dx, dweight, dbias, dz) for a backward that records its own graph (``create_graph=True``: double backward,
    gradient penalties, Hessian-vector products). The analytic backward is not differentiable again, so the
    forward is recomputed in torch ops (:func:`formula_rows`, as under torch.func) and autograd differentiates
    it, with the graph kept; None where no gradient is asked."""
    return _differentiable_rows_grads(ctx.spec, dy, x, weight, bias, z, ctx.needs_input_grad[:4])


def _differentiable_rows_grads(spec: NormSpec, dy, x, weight, bias, z, needs: tuple[bool, ...]) -> tuple:
    """:func:`_differentiable_grads` for the saved rows and ``needs`` in (x, weight, bias, z) order."""
    y = formula_rows(x, weight, bias, z, spec, out_dtype=dy.dtype)[0]
    return grads_with_graph(y, (x, weight, bias, z), needs, dy)


def grads_with_graph(output: torch.Tensor, inputs: tuple, needs: tuple[bool, ...], grad_output: torch.Tensor) -> tuple:
    """The gradients of ``output`` (recomputed in torch ops) with respect to ``inputs``, their graph kept
    (``create_graph=True``), one per input: None where ``needs`` says no gradient is asked."""
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


class GatedNormFunction(torch.autograd.Function):
    """y, mean, rstd = gated_norm(x, weight, bias, z); differentiable in x, weight, bias, z.

    Saves only x, z, weight, bias, mean and rstd; the backward recomputes xhat.
    mean and rstd are returned as non-differentiable outputs (mean is None for RMSNorm).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, z, spec, backend, out_dtype=None, plan=None):
        out, mean, rstd = _forward_saved(ctx, x, weight, bias, z, spec, backend, out_dtype, plan)
        if mean is None:
            ctx.mark_non_differentiable(rstd)
        else:
            ctx.mark_non_differentiable(mean, rstd)
        # no zero-filled gradients for mean/rstd (a fill launch each, per backward)
        ctx.set_materialize_grads(False)
        return out, mean, rstd

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        return _saved_backward(ctx, dy)


class GatedNormOutputFunction(torch.autograd.Function):
    """y = gated_norm(x, weight, bias, z), for callers that discard mean and rstd (layernorm_fn, rmsnorm_fn, the
    modules): GatedNormFunction with y its only output. Autograd wraps, versions and tracks every output of a
    Function on each call: on the CPU machine (torch 2.13) a minimal Function of three outputs took 40.5 us of
    host time per forward+backward against 35.6 with one, and gatednorm's own calls 47.5 -> 45.0 us with a no-op
    backend (benchmarks/bench_host.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, z, spec, backend, out_dtype=None, plan=None):
        return _forward_saved(ctx, x, weight, bias, z, spec, backend, out_dtype, plan)[0]

    @staticmethod
    def backward(ctx, dy):
        return _saved_backward(ctx, dy)


# Function.apply's Python wrapper (torch/autograd/function.py) costs about 1.8 us of every call, most of it
# in running functorch's unwrap_if_dead over each argument, constants included. Where that wrapper takes
# its plain path (no functorch transform active) and torch.compile is not tracing (dynamo recognises
# Function.apply only), _autograd_apply does the same for the four tensor arguments and calls the C++
# apply the wrapper ends in.
# These are torch internals (checked on torch 2.11 and 2.13): where one is missing, every call takes the
# public Function.apply.
try:
    _C_APPLY = super(torch.autograd.Function, GatedNormFunction).apply
    _C_APPLY_OUTPUT = super(torch.autograd.Function, GatedNormOutputFunction).apply
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
except AttributeError:  # pragma: no cover - a torch whose internals moved
    _C_APPLY = _C_APPLY_OUTPUT = None
#: Whether a torch.func transform (vmap, grad, jvp, ...) is active around this call (see formula_rows).
_functorch_active = torch._C._are_functorch_transforms_active


def functorch_active() -> bool:
    """Whether a torch.func transform is active around this call and torch.compile is not tracing it: such a
    call is computed by :func:`formula_rows`."""
    return _functorch_active() and not _compiling()


def _autograd_apply(x, weight, bias, z, spec: NormSpec, backend: str, out_dtype: torch.dtype | None, plan=None,
                    stats: bool = True):
    """``(y, mean | None, rstd)`` of ``GatedNormFunction.apply(...)``, without the wrapper's cost where it adds
    nothing; ``stats=False``: ``(y, None, None)`` of ``GatedNormOutputFunction`` (the caller discards them)."""
    if _C_APPLY is None or _compiling() or _functorch_active():
        if not stats:
            return GatedNormOutputFunction.apply(x, weight, bias, z, spec, backend, out_dtype, plan), None, None
        return GatedNormFunction.apply(x, weight, bias, z, spec, backend, out_dtype, plan)
    return _plain_apply(x, weight, bias, z, spec, backend, out_dtype, plan, stats)


def _plain_apply(x, weight, bias, z, spec: NormSpec, backend: str, out_dtype, plan, stats: bool):
    """:func:`_autograd_apply` where the wrapper's plain path is known to hold (C++ apply found, not compiling,
    no functorch transform: the eager plans check this before every call)."""
    x, weight = _unwrap_if_dead(x), _unwrap_if_dead(weight)
    bias = None if bias is None else _unwrap_if_dead(bias)
    z = None if z is None else _unwrap_if_dead(z)
    if not stats:
        return _C_APPLY_OUTPUT(x, weight, bias, z, spec, backend, out_dtype, plan), None, None
    return _C_APPLY(x, weight, bias, z, spec, backend, out_dtype, plan)


def formula_rows(x2d, weight, bias, z2d, spec: NormSpec, out: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None):
    """(y, mean | None, rstd) as :func:`gated_norm_rows` returns them, computed by :mod:`gatednorm.numerics`'
    formulas in torch ops (the native accelerator path's: C math, one rounding, the range rescue), which autograd
    and torch.func see through: for calls under a torch.func transform (vmap, grad, jvp, jacrev, hessian; the
    backends' kernels read memory a batched or wrapped tensor does not have) and for backward passes that record
    their own graph (the Functions' analytic backward is not differentiable again)."""
    y, mean, rstd = numerics.forward_rows(x2d, weight, bias, z2d, spec, out=out)
    y = out if out is not None else y.flatten(1).to(out_dtype or x2d.dtype)
    return y, (None if mean is None else numerics.group_major(mean)), numerics.group_major(rstd)


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
    *, backend: str | None = None, out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y (M, N), mean | None, rstd) of validated rows (from :func:`gatednorm.spec.prepare`).

    ``backend`` is a name or None (environment / auto). Differentiable when an input requires grad;
    ``out`` (x's shape, any floating dtype and strides) is written and returned as y, and is only
    allowed without autograd (the caller checks). Without ``out``, y is in ``out_dtype`` (default x's
    dtype): still the one rounding from C, also when differentiable. ``stats=False``: the caller discards
    mean and rstd; a call without autograd may then return None for both (a backend with ``forward_output``
    skips making them).
    """
    name = resolve_backend(backend, x2d.device)
    if functorch_active():
        return formula_rows(x2d, weight, bias, z2d, spec, out, out_dtype)
    if out is not None:
        mean, rstd = _run_forward_out(x2d, weight, bias, z2d, out, spec, name)
        return out, mean, rstd
    if needs_autograd(x2d, weight, bias, z2d):
        return _autograd_apply(x2d, weight, bias, z2d, spec, name, out_dtype, stats=stats)
    return _run_forward(x2d, weight, bias, z2d, spec, name, out_dtype, stats)


# ---------------------------------------------------------------------------
# Eager plans (docs/design.md, "Eager plans")
# ---------------------------------------------------------------------------
# Most of an eager call's host time goes to decisions that depend on its signature only: the argument
# checks (spec.prepare), the backend (resolve_backend, the registry), and in the backend the launch shape and
# the compiled kernel. A plan keeps them per signature, so a repeated call builds one key, looks it up and
# runs. The key holds everything those decisions read except M (a serving batch changes M on every call, and
# no decision depends on it): per tensor its class, dtype, device, rank and row strides (2-D) or
# contiguity, the parameters' shapes and strides, the scalar arguments and their types (True == 1 in a
# key, but prepare accepts only one of them), backend= and the three environment variables that choose a
# backend. A key seen before passed prepare and resolve_backend with an equal signature, so the plan's call
# raises nothing they would have raised. Registry changes drop every plan. The tensors' fields are read in C
# where a backend's extension offers that (backends.base.call_key, from backends/call_key.h: the native CPU node's
# and the triton backend's C++ plans' extensions), the same fields packed into bytes.

_NO_PLAN = object()
#: More signatures than this (a program sweeping shapes of many widths) start the table afresh.
MAX_PLANS = 4096


def _rows_signature(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return t.__class__, t.dtype, t.device, t.dim(), t.stride() if t.dim() == 2 else t.is_contiguous()


def _param_signature(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.__class__, t.dtype, t.device, t.shape, t.stride())


def _rows_of(x: torch.Tensor, z: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (M, N) rows of x and of a gate of x's shape, as spec.prepare makes them (a view where one exists)."""
    if x.dim() == 2:
        return x, z
    return x.reshape(-1, n), (None if z is None else z.reshape(-1, n))


class _EagerPlan:
    """The checked call of one signature: its NormSpec, the backend that serves it (``name``, ``impl``) and that
    backend's own forward and backward plans (:class:`~gatednorm.backends.base.PlannedBackend`), if any."""

    __slots__ = ("name", "impl", "spec", "launch", "output_launch", "backward_launch", "n", "fused_autograd",
                 "autograd_planner", "node_backward")

    def __init__(self, name: str, impl: Backend, spec: NormSpec, launch: Callable[..., tuple | None] | None,
                 backward_launch: Callable[..., Grads | None] | None, n: int,
                 output_launch: Callable[..., tuple | None] | None = None) -> None:
        self.name, self.impl, self.spec, self.launch, self.backward_launch = name, impl, spec, launch, backward_launch
        self.n = n
        #: the forward plan of calls that discard the statistics (PlannedBackend.plan_forward_output), else launch's
        self.output_launch = output_launch if output_launch is not None else launch
        #: the backend's differentiable entry (PlannedBackend.plan_autograd) once it has one; its planner until
        #: then (None: the backend has none for this signature)
        self.fused_autograd = None
        self.autograd_planner = getattr(impl, "plan_autograd", None)
        self.node_backward = functools.partial(_node_backward, self)

    def forward_rows(self, x, weight, bias, z, stats: bool = True):
        """(y, mean | None, rstd) of x's rows (x of the signature, M > 0), y in x's shape: the backend's plan
        (``stats=False``: its plan for calls that discard the statistics), or what _forward_eager does for these
        rows."""
        launch = self.launch if stats else self.output_launch
        if launch is not None:
            done = launch(x, weight, bias, z)
            if done is not None:
                return done
        x2d, z2d = _rows_of(x, z, self.n)
        y, mean, rstd = _forward_with(self.impl, x2d, weight, bias, z2d, self.spec, stats)
        return (y if x2d is x else y.view_as(x)), mean, rstd

    def backward_rows(self, dy, x, weight, bias, z, mean, rstd, needs: GradsNeeded) -> Grads:
        """(dx, dz, dweight, dbias) of the forward's saved (M, N) rows: the backend's plan, or its backward."""
        if self.backward_launch is not None:
            done = self.backward_launch(dy, x, weight, bias, z, mean, rstd, needs)
            if done is not None:
                return done
        return self.impl.backward(dy, x, weight, bias, z, mean, rstd, self.spec, needs)

    def autograd(self, x, weight, bias, z, stats: bool = True):
        """(y in x's shape, mean | None, rstd), differentiable: the backend's own autograd node on the (M, N) views
        where it offers one (PlannedBackend.plan_autograd: no Python Function, :func:`_node_backward` its
        fallback), else GatedNormFunction on them, as gated_norm_rows runs it, with this plan deciding both
        directions; ``stats=False``: (y, None, None) from the Function (the node's call returns the statistics
        anyway; the callers discard them)."""
        x2d, z2d = _rows_of(x, z, self.n)
        entry = self.fused_autograd
        if entry is None and self.autograd_planner is not None:
            entry = self._fused_entry()
        done = None if entry is None else entry(self.node_backward, x2d, z2d, weight, bias)
        if done is None:
            done = _plain_apply(x2d, weight, bias, z2d, self.spec, self.name, None, self, stats)
        y, mean, rstd = done
        return (y if x2d is x else y.view_as(x)), mean, rstd

    def _fused_entry(self):
        """Ask the backend for its differentiable entry (see :meth:`PlannedBackend.plan_autograd`): the entry, or
        None (not yet; asked again next call, or never again where the backend said False)."""
        entry = self.autograd_planner(self.launch, self.backward_launch)
        if entry is None:
            return None
        self.autograd_planner = None
        if entry is False:
            return None
        self.fused_autograd = entry
        return entry


def _node_backward(plan: _EagerPlan, dy, x, weight, bias, z, mean, rstd, needs: tuple[bool, ...]) -> tuple:
    """(dx, dz, dweight, dbias) for a backend's autograd node (PlannedBackend.plan_autograd) where the node does
    not compute them itself: what the Functions' backward returns for the same saved tensors (``needs``: the
    (dx, dz, dweight, dbias) flags), a graph recorded where grad mode is on (``create_graph=True``)."""
    if torch.is_grad_enabled():
        dx, dw, db, dz = _differentiable_rows_grads(plan.spec, dy, x, weight, bias, z,
                                                    (needs[0], needs[2], needs[3], needs[1]))
        return dx, dz, dw, db
    return tuple(plan.backward_rows(dy, x, weight, bias, z, mean, rstd, GradsNeeded(*needs)))


def _plannable_call(x) -> bool:
    """Whether an eager plan may serve a call on x (a plain tensor with elements; :func:`_call_signature` has
    checked the context: torch.compile, torch.func)."""
    return not (x.__class__ is not torch.Tensor or x.dim() == 0 or x.numel() == 0)


def _scalar_signature(eps, group_size, norm_before_gate, is_rms_norm, activation, backend) -> tuple:
    """The scalar part of a call's key (see "Eager plans" above), whichever builds the tensors' part."""
    return (eps, group_size, norm_before_gate, is_rms_norm, activation, backend, eps.__class__, group_size.__class__,
            norm_before_gate.__class__, is_rms_norm.__class__, backend_choice_key())


def _signature_key(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend) -> tuple:
    """The key of a call's signature (see "Eager plans" above) in Python: (the tensors' part, the scalars' part);
    raises AttributeError / TypeError for arguments that are not what the checks expect (the full path then says
    what is wrong). x's part is :func:`_rows_signature` written out (every call builds this key)."""
    return ((x.__class__, x.dtype, x.device, x.dim(), x.stride() if x.dim() == 2 else x.is_contiguous(),
             x.shape[-1], _rows_signature(z), _param_signature(weight), _param_signature(bias)),
            _scalar_signature(eps, group_size, norm_before_gate, is_rms_norm, activation, backend))


def _call_signature(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                    backend) -> tuple[tuple, bool] | None:
    """(key, differentiable) of a call plans may serve, or None where they may not (see :func:`planned_forward`).
    The tensors' part of the key comes from a backend's C function where one is loaded
    (``backends.base.call_key``, one call in place of some twenty attribute reads), else from
    :func:`_signature_key`; the two kinds never compare equal (bytes against a tuple), so a table that holds both
    (the C function arrives during a run) only plans a signature once more. Raises what _signature_key raises."""
    if _compiling() or _functorch_active() or _C_APPLY is None:  # first: torch.compile must not trace the C call
        return None
    call_key = backend_base.call_key
    tensors = None if call_key is None else call_key(x, weight, bias, z)
    if tensors is None:
        if not _plannable_call(x):
            return None
        return (_signature_key(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                               backend), needs_autograd(x, weight, bias, z))
    scalars = _scalar_signature(eps, group_size, norm_before_gate, is_rms_norm, activation, backend)
    return (tensors[0], scalars), tensors[1]


def _remember(key: tuple, plan):
    """Remember a new plan under its signature's key (the table emptied when full); returns the plan."""
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _plan_impl(call, x, z, backend):
    """(backend name, the implementation) that serve a checked call's plan, or None where plans do not serve
    the call (heads regrouped, no storage, z not of x's shape). Resolves the backend first, as the full path
    does, so a bad name raises the same error here."""
    name = resolve_backend(backend, x.device)
    if call.heads != 1 or x.is_meta or (z is not None and z.shape != x.shape):
        return None
    return name, _impl_for(name, call.x2d)


def _plan_for(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, backend):
    """A new plan for this signature (_NO_PLAN where plans do not serve it). Checks the call as the full
    path does, in the same order, so a bad call raises the same error here."""
    call = prepare(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                   regroup_heads=True)
    served = _plan_impl(call, x, z, backend)
    if served is None:
        return _NO_PLAN
    name, impl = served
    planner = getattr(impl, "plan_forward", None)
    launch = None if planner is None else planner(x, weight, bias, z, call.spec)
    planner = getattr(impl, "plan_forward_output", None)
    output_launch = None if planner is None else planner(x, weight, bias, z, call.spec)
    planner = getattr(impl, "plan_backward", None)
    backward_launch = None if planner is None else planner(x, weight, bias, z, call.spec)
    return _EagerPlan(name, impl, call.spec, launch, backward_launch, x.shape[-1], output_launch)


def planned_forward(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                    backend: str | None, stats: bool = True):
    """``(y in x's shape, mean | None, rstd)`` of an eager call, through its signature's plan (differentiable
    when an input requires grad: GatedNormFunction with the plan deciding forward and backward); or None,
    with nothing done, where the caller must take the full path: torch.compile tracing, a functorch
    transform, an empty batch, a signature plans do not serve. ``stats=False``: the caller
    discards mean and rstd (which may then be None). Raises what :func:`gatednorm.spec.prepare` and
    :func:`resolve_backend` raise for a bad call the first time its signature is seen."""
    try:
        signature = _call_signature(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                    backend)
        if signature is None:
            return None
        key, differentiable = signature
        plan = _PLANS.get(key)  # hashing the key: inside the try (unhashable scalars)
    except (AttributeError, TypeError):  # not tensors, unhashable scalars: the full path says what is wrong
        return None
    if plan is None:
        plan = _remember(key, _plan_for(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm,
                                        activation, backend))
    if plan is _NO_PLAN or (z is not None and z.shape != x.shape):
        return None
    if differentiable:
        return plan.autograd(x, weight, bias, z, stats)
    return plan.forward_rows(x, weight, bias, z, stats)


class _QuantPlan:
    """The checked quantized call of one signature: NormSpec, QuantSpec, the backend that serves it and that
    backend's own launch plan (:meth:`~gatednorm.backends.base.PlannedBackend.plan_forward_quant`), if any."""

    __slots__ = ("impl", "spec", "qspec", "n", "launch")

    def __init__(self, impl: Backend, spec: NormSpec, qspec: QuantSpec, n: int,
                 launch: Callable[..., tuple | None] | None) -> None:
        self.impl, self.spec, self.qspec, self.n, self.launch = impl, spec, qspec, n, launch

    def __call__(self, x, weight, bias, z) -> tuple[torch.Tensor, torch.Tensor]:
        done = None if self.launch is None else self.launch(x, weight, bias, z)
        if done is None:
            x2d, z2d = _rows_of(x, z, self.n)
            done = _forward_quant_with(self.impl, x2d, weight, bias, z2d, self.spec, self.qspec)
        q, storage = done
        return q, _scale_view(storage, self.qspec)


def _quant_plan_for(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, quant,
                    quant_group_size, scale_format, round_to, column_major_scales, backend):
    """A new plan for this quantized call's signature (_NO_PLAN where plans do not serve it), checked as
    :func:`_plan_for` checks a forward."""
    call, qspec = prepare_quant(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                quant, quant_group_size, scale_format, round_to, column_major_scales,
                                regroup_heads=True)
    served = _plan_impl(call, x, z, backend)
    if served is None:
        return _NO_PLAN
    impl = served[1]
    planner = getattr(impl, "plan_forward_quant", None)
    launch = None if planner is None else planner(x, weight, bias, z, call.spec, qspec)
    return _QuantPlan(impl, call.spec, qspec, x.shape[-1], launch)


def planned_quant(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation, quant,
                  quant_group_size, scale_format, round_to, column_major_scales, backend: str | None):
    """``(q (M, N), scale (M, N // block))`` of an eager ``gated_norm_quant`` call through its signature's plan
    (the arguments as that function takes them); or None, with nothing done, where the caller must take the
    full path (which also raises for inputs that require grad). Raises what
    :func:`gatednorm.spec.prepare_quant` and :func:`resolve_backend` raise for a bad call the first time its
    signature is seen."""
    try:
        signature = _call_signature(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
                                    backend)
        if signature is None or signature[1]:
            return None
        key = ("quant", signature[0], quant, quant_group_size, quant_group_size.__class__, scale_format, round_to,
               column_major_scales, column_major_scales.__class__)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):
        return None
    if plan is None:
        plan = _remember(key, _quant_plan_for(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm,
                                              activation, quant, quant_group_size, scale_format, round_to,
                                              column_major_scales, backend))
    if plan is _NO_PLAN or (z is not None and z.shape != x.shape):
        return None
    return plan(x, weight, bias, z)


def residual_sum(x2d: torch.Tensor, residual2d: torch.Tensor) -> torch.Tensor:
    """``s = x + residual`` (M, N), contiguous, in :func:`gatednorm.spec.residual_sum_dtype` (float32,
    or float64 when either is float64): the sum of the exact operands, rounded once. An operand already
    in that dtype is used as it is and the other is promoted by the add (inside the kernel on GPUs).
    Differentiable (autograd casts ds back to each operand's dtype)."""
    c = residual_sum_dtype(x2d.dtype, residual2d.dtype)
    if residual2d.dtype == c:
        return torch.add(residual2d, x2d)
    if x2d.dtype == c:
        return torch.add(x2d, residual2d)
    return torch.add(x2d.to(c), residual2d)  # both narrower than C (bf16 + fp16): one widened temporary


def gated_norm_residual_rows(
    x2d: torch.Tensor, residual2d: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    z2d: torch.Tensor | None, spec: NormSpec, residual_out_dtype: torch.dtype, *, prenorm: bool,
    backend: str | None = None, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(y, mean | None, rstd, residual_out | None): the operator on ``s = x + residual`` (docs/design.md,
    "Residual and prenorm"), for validated rows (:func:`gatednorm.spec.prepare_residual`).

    s is :func:`residual_sum` (no residual: s is x); y = norm(s) [gated], rounded once to x's dtype (or
    written into ``out``); mean/rstd are s's statistics. With ``prenorm``, residual_out is s rounded to
    ``residual_out_dtype`` (x itself where no rounding is needed and no gradient is recorded), else None.

    Differentiable through autograd: the norm's backward gives ds in s's dtype, the prenorm output's
    gradient is added to it in that dtype, and the sum's backward rounds ds once to x's and to the
    residual's dtype. What the backward keeps is s (the norm's input), z, weight, bias, mean and rstd.
    """
    if residual2d is not None:
        fused = _fused_residual_forward(backend, x2d, residual2d, out)
        if fused is not None:
            return _gated_norm_residual_fused(fused, x2d, residual2d, weight, bias, z2d, spec,
                                              residual_out_dtype, prenorm, out)
        s = residual_sum(x2d, residual2d)
    elif prenorm and needs_autograd(x2d, weight, bias, z2d):
        # No residual, but two outputs whose gradients meet at x: taking s = x in C makes them meet there
        # and reach x rounded once (as fla's backward does), not as two narrow gradients added in x's dtype.
        s = x2d.to(compute_dtype(x2d.dtype))
    else:
        s = x2d
    y, mean, rstd = gated_norm_rows(s, weight, bias, z2d, spec, backend=backend, out=out,
                                    out_dtype=None if out is not None else x2d.dtype)
    return y, mean, rstd, (s.to(residual_out_dtype) if prenorm else None)


# A backend may fuse the residual sum into its forward (``forward_residual``, see
# backends.base.FusedResidualBackend): x and residual are read once and summed in float32 in registers, y and
# (prenorm) the sum rounded to the residual output's dtype written once: in bf16 about 10 bytes moved per
# element instead of 22 (the float32 sum written, read back, then cast). The values are those of the generic
# path above: the same float32 sum, the same norm of it. When gradients are recorded the kernel writes the
# sum in float32 as its second output instead, and the backward keeps it, as the generic path keeps s.


def _fused_residual_forward(backend: str | None, x2d: torch.Tensor, residual2d: torch.Tensor,
                            out: torch.Tensor | None) -> Backend | None:
    """The backend implementation where it has ``forward_residual`` and the call can take it, else None (generic path):
    not while compiling (the custom ops cover the generic path), not for empty batches or the meta device,
    not for float64 sums, not for an ``out`` that no 2-D view expresses."""
    if (_compiling() or _functorch_active() or _no_work(x2d)
            or residual_sum_dtype(x2d.dtype, residual2d.dtype) != torch.float32):
        return None
    if out is not None:
        try:
            out.view(x2d.shape)
        except RuntimeError:
            return None
    impl = _impl_for(resolve_backend(backend, x2d.device), x2d)
    return impl if hasattr(impl, "forward_residual") else None


def _gated_norm_residual_fused(impl: Backend, x2d, residual2d, weight, bias, z2d, spec: NormSpec,
                               residual_out_dtype: torch.dtype, prenorm: bool, out: torch.Tensor | None):
    """:func:`gated_norm_residual_rows` through the backend's fused forward (see above)."""
    if needs_autograd(x2d, weight, bias, z2d) or (torch.is_grad_enabled() and residual2d.requires_grad):
        y, residual_out, mean, rstd = GatedNormResidualFunction.apply(
            x2d, residual2d, weight, bias, z2d, impl, spec, residual_out_dtype, prenorm)
        return y, mean, rstd, residual_out
    y = out.view(x2d.shape) if out is not None else _new_rows(x2d)
    residual_out = _new_rows(x2d, residual_out_dtype) if prenorm else None
    mean, rstd = impl.forward_residual(x2d, residual2d, weight, bias, z2d, spec, y, residual_out)
    return (out if out is not None else y), mean, rstd, residual_out


class GatedNormResidualFunction(torch.autograd.Function):
    """(y, residual_out | None, mean, rstd) of s = x + residual through a fused forward; differentiable in x,
    residual, weight, bias, z. Saves s in float32 (the fused forward's second output), weight, bias, z, mean,
    rstd: what the generic path's autograd graph keeps. The backward is the generic path's: ds from the
    backend's backward on s (float32), plus d(residual_out) added in float32, rounded once to x's and to the
    residual's dtype."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, z, impl, spec, residual_out_dtype, prenorm):
        y = _new_rows(x)
        s = _new_rows(x, torch.float32)
        mean, rstd = impl.forward_residual(x, residual, weight, bias, z, spec, y, s)
        residual_out = None
        if prenorm:
            residual_out = s if residual_out_dtype == torch.float32 else s.to(residual_out_dtype)
        ctx.save_for_backward(s, weight, bias, z, mean, rstd)
        ctx.spec, ctx.impl = spec, impl
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.mark_non_differentiable(*(t for t in (mean, rstd) if t is not None))
        ctx.set_materialize_grads(False)
        return y, residual_out, mean, rstd

    @staticmethod
    def backward(ctx, dy, dresidual_out, _dmean, _drstd):
        if torch.is_grad_enabled():
            # It keeps the float32 sum s, not x and residual, so no graph of its gradients back to them exists.
            raise RuntimeError(
                "gatednorm does not support double backward (create_graph=True) through a backend's fused "
                "residual forward: pass backend='native', or add the residual to x before the norm"
            )
        s, weight, bias, z, mean, rstd = ctx.saved_tensors
        need_x, need_res, need_w, need_b, need_z = ctx.needs_input_grad[:5]
        ds = dz = dw = db = None
        if dy is not None:
            needs = GradsNeeded(need_x or need_res, need_z and z is not None, need_w, need_b and bias is not None)
            ds, dz, dw, db = ctx.impl.backward(dy, s, weight, bias, z, mean, rstd, ctx.spec, needs)
        if dresidual_out is not None and (need_x or need_res):
            ds = dresidual_out.to(torch.float32) if ds is None else ds.add_(dresidual_out)
        x_dtype, res_dtype = ctx.dtypes
        dx = ds.to(x_dtype) if (need_x and ds is not None) else None
        dres = ds.to(res_dtype) if (need_res and ds is not None) else None
        return dx, dres, dw, db, dz, None, None, None, None


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
                         GradsNeeded(needs_dx, needs_dz and z2d is not None, needs_dweight,
                                     needs_dbias and bias is not None))


# ---------------------------------------------------------------------------
# Quantized output (docs/design.md, "Quantized output")
# ---------------------------------------------------------------------------
# A backend may fuse norm and quantization (``forward_quant``, see backends.base.FusedQuantBackend);
# every backend without it, and every call its fused kernel does not cover, takes the generic path:
# the backend's own forward writes y into a float32 buffer (or bf16/fp16 for round_to; y is then
# rounded exactly once, as the forward always does), and numerics.quantize_blocks quantizes it.

#: The generic path runs forward + quantization over row blocks of at most this many elements, so
#: its float32 buffer (and the quantizer's temporaries) stay bounded on huge inputs.
QUANT_BLOCK_ELEMENTS = 1 << 24


def _quant_outputs(x: torch.Tensor, qspec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (M, N), scale storage): (M, G) row-major, or (G, M) row-major for column-major scales."""
    m, n = x.shape
    groups = n // qspec.block
    q = torch.empty((m, n), dtype=quant_dtype(qspec.quant), device=x.device)
    shape = (groups, m) if qspec.column_major_scales else (m, groups)
    return q, torch.empty(shape, dtype=torch.float32, device=x.device)


def _scale_view(storage: torch.Tensor, qspec: QuantSpec) -> torch.Tensor:
    """The (M, G) scale tensor over its storage: column-major strides (1, M) when asked for."""
    return storage.t() if qspec.column_major_scales else storage


def _quantize_generic(impl: Backend, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec,
                      q: torch.Tensor, scale: torch.Tensor) -> None:
    """impl.forward into a float32 (or round_to) buffer, then :func:`numerics.quantize_blocks`, by row blocks of
    about QUANT_BLOCK_ELEMENTS elements (:func:`.backends.base.quantize_by_steps`)."""
    quantize_by_steps(impl.forward, x, weight, bias, z, spec, round_to_dtype(qspec.round_to) or torch.float32,
                      QUANT_BLOCK_ELEMENTS,
                      lambda y_rows, r0, r1: numerics.quantize_blocks(y_rows, qspec, q[r0:r1], scale[r0:r1],
                                                                      y_is_scratch=True))


def _forward_quant_eager(x, weight, bias, z, spec: NormSpec, qspec: QuantSpec, backend: str):
    """(q, scale storage) of validated rows; see :func:`gated_norm_quant_rows`."""
    if _no_work(x):
        return _quant_outputs(x, qspec)
    return _forward_quant_with(_impl_for(backend, x), x, weight, bias, z, spec, qspec)


def _forward_quant_with(impl: Backend, x, weight, bias, z, spec: NormSpec, qspec: QuantSpec):
    """(q, scale storage) of non-empty validated rows from ``impl``: its fused ``forward_quant`` where it covers
    the call, else the generic path (the eager path and the eager plans')."""
    q, storage = _quant_outputs(x, qspec)
    scale = _scale_view(storage, qspec)
    fused = getattr(impl, "forward_quant", None)
    if fused is None or not fused(x, weight, bias, z, spec, qspec, q, scale):
        _quantize_generic(impl, x, weight, bias, z, spec, qspec, q, scale)
    return q, storage


@torch.library.custom_op("gatednorm::forward_quant", mutates_args=())
def forward_quant_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
    eps: float, group_size: int, norm_before_gate: bool, is_rms_norm: bool, activation: str,
    quant: str, block: int, scale_format: str, round_to: str, column_major_scales: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale storage): the storage is (M, G), or (G, M) for column-major scales (the caller transposes)."""
    spec = NormSpec(eps, group_size, norm_before_gate, is_rms_norm, activation)
    qspec = QuantSpec(quant, block, scale_format, round_to, column_major_scales)
    return _forward_quant_eager(x, weight, bias, z, spec, qspec, backend)


@forward_quant_op.register_fake
def _(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, activation,
      quant, block, scale_format, round_to, column_major_scales, backend):
    return _quant_outputs(x, QuantSpec(quant, block, scale_format, round_to, column_major_scales))


def gated_norm_quant_rows(
    x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z2d: torch.Tensor | None,
    spec: NormSpec, qspec: QuantSpec, *, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (M, N), scale (M, N // qspec.block)) of validated rows (:func:`gatednorm.spec.prepare_quant`).

    Not differentiable (the caller refuses inputs that require grad). The backend is resolved as for
    :func:`gated_norm_rows`; its ``forward_quant`` runs where it has one and covers the call, else the
    generic path (forward into float32, then :func:`gatednorm.numerics.quantize_blocks`).
    """
    name = resolve_backend(backend, x2d.device)
    if functorch_active():
        # numerics.quantize_blocks branches on the data (the range rescue), which vmap cannot batch
        raise RuntimeError("gated_norm_quant does not support torch.func transforms (vmap, grad, jvp, ...); "
                           "call it outside the transform, e.g. per sample in a loop")
    if _compiling():
        q, storage = forward_quant_op(x2d, weight, bias, z2d, *spec, *qspec, name)
    else:
        q, storage = _forward_quant_eager(x2d, weight, bias, z2d, spec, qspec, name)
    return q, _scale_view(storage, qspec)
