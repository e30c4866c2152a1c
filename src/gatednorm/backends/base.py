"""The interface every backend implements, and the gradient request it receives.

A backend sees validated, non-empty (M, N) rows on a device it supports, in a dtype it supports:
:mod:`gatednorm.ops` has normalised everything else (argument checks, empty batches, the meta device,
float64 routing, which gradients are needed, the absent mean of RMSNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from ..spec import NormSpec, QuantSpec


class GradsNeeded(NamedTuple):
    """Which gradients a backward call must produce (dz only with a gate, dbias only with a bias)."""

    dx: bool
    dz: bool
    dweight: bool
    dbias: bool


#: (dx, dz, dweight, dbias): each None when not asked for.
Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@runtime_checkable
class Backend(Protocol):
    """One implementation of the gated norm (docs/design.md, section 4)."""

    #: the name users pass as ``backend=`` (several implementations may share one, per device)
    name: str
    #: False: float64 calls are routed to the native backend (the kernels compute in float32)
    supports_float64: bool

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None,
                spec: NormSpec, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Write the gated norm of x (M, N) into out (M, N, any floating dtype, any strides).

        Returns (mean | None, rstd): 1-D, G*M long, group-major, in the compute dtype.
        """
        ...

    def backward(self, dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 z: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor, spec: NormSpec,
                 needs: GradsNeeded) -> Grads:
        """(dx, dz, dweight, dbias) in x's, z's, weight's and bias's dtypes; None where not needed.

        dy (M, N) may have another floating dtype than x: the residual path (ops.gated_norm_residual_rows)
        normalises a float32 sum into x's narrower dtype, so its dy is, say, bf16 beside a float32 x.
        """
        ...


@runtime_checkable
class FusedQuantBackend(Protocol):
    """What a backend adds for a fused quantized forward (docs/design.md, "Quantized output"). Optional:
    :mod:`gatednorm.ops` looks for ``forward_quant`` and, without it, runs the backend's :meth:`Backend.forward`
    into a float32 buffer and quantizes that (the generic path)."""

    def forward_quant(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      z: torch.Tensor | None, spec: NormSpec, qspec: QuantSpec, q: torch.Tensor,
                      scale: torch.Tensor) -> bool:
        """Write the quantized gated norm of x (M > 0, N) into q (M, N, contiguous, the quant dtype) and
        scale (M, N // qspec.block, float32, any strides); return True. Return False, having written
        nothing, for a call this backend does not fuse: the generic path then runs instead."""
        ...


@runtime_checkable
class OutputOnlyBackend(Protocol):
    """What a backend adds where an inference call that discards mean and rstd (``layernorm_fn`` / ``rmsnorm_fn``
    without autograd) runs better otherwise: the statistics cost it more than the output (the compiled backend), or
    another launch shape pays (the triton backend's output-only tile). Optional: :mod:`gatednorm.ops` looks
    for ``forward_output`` and, without it, calls :meth:`Backend.forward` and drops the statistics."""

    def forward_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       z: torch.Tensor | None, spec: NormSpec) -> torch.Tensor:
        """Return what :meth:`Backend.forward` writes, as new contiguous (M, N) rows of x's dtype (M > 0);
        keep no statistics. The backend allocates the rows: its computation may already hold a buffer
        that can become them."""
        ...


@runtime_checkable
class FusedResidualBackend(Protocol):
    """What a backend adds to fuse the residual sum into its forward (docs/design.md, "Residual and prenorm").
    Optional: :mod:`gatednorm.ops` looks for ``forward_residual`` and, without it, sums x + residual in
    float32 with one torch op and runs :meth:`Backend.forward` on the sum (the generic path)."""

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, z: torch.Tensor | None, spec: NormSpec, out: torch.Tensor,
                         residual_out: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Write the gated norm of s = x + residual (M > 0, N; x and residual float32/bf16/fp16, summed in
        float32, one rounding) into out (M, N, x's dtype or another floating dtype) and, when given, s
        rounded once to residual_out's dtype into residual_out (M, N, unit feature stride). Returns s's
        (mean | None, rstd), as :meth:`Backend.forward`."""
        ...


@runtime_checkable
class PlannedBackend(Protocol):
    """What a backend adds to cut the host time of repeated calls (docs/design.md, "Eager plans"). Optional, each
    method on its own: :mod:`gatednorm.ops` caches, per call signature, the checked arguments and this backend,
    and asks ``plan_forward`` / ``plan_forward_output`` / ``plan_backward`` / ``plan_forward_quant`` once for
    launches decided in advance
    (``plan_autograd``, for differentiable calls through both, until it answers);
    without them (or where they return None) the cached call runs :meth:`Backend.forward` /
    :meth:`Backend.backward` / :meth:`Backend.forward_quant`."""

    def plan_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     z: torch.Tensor | None, spec: NormSpec) -> Callable[..., tuple | None] | None:
        """A callable for later calls with tensors of the same signature as these (dtypes, devices, N, the
        row strides of 2-D x and z or contiguous rows of any rank, the parameters' strides; any M):
        ``plan(x, weight, bias, z)`` returns ``(y, mean | None, rstd)`` as :meth:`Backend.forward` computes
        them (y new, in x's shape and dtype), or None, having written nothing, for a call it does not serve.
        None here: no plan for this signature."""
        ...

    def plan_forward_output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            z: torch.Tensor | None, spec: NormSpec) -> Callable[..., tuple | None] | None:
        """As :meth:`plan_forward`, for the calls of the signature that discard the statistics (those
        :meth:`OutputOnlyBackend.forward_output` serves without a plan), where the backend runs them otherwise
        (another launch shape); the plan still returns ``(y, mean | None, rstd)``. None here: plan_forward's
        plan serves them too."""
        ...

    def plan_backward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      z: torch.Tensor | None, spec: NormSpec) -> Callable[..., Grads | None] | None:
        """As :meth:`plan_forward`, for the backward of the same signature: ``plan(dy, x, weight, bias, z, mean,
        rstd, needs)`` with the forward's saved (M, N) rows returns what :meth:`Backend.backward` returns, or
        None, having written nothing, for a call it does not serve. None here: no plan for this signature."""
        ...

    def plan_autograd(self, forward_plan: Callable[..., tuple | None] | None,
                      backward_plan: Callable[..., Grads | None] | None) -> Callable[..., tuple | None] | bool | None:
        """Differentiable calls of a signature without a Python autograd Function, from the two plans
        :meth:`plan_forward` and :meth:`plan_backward` returned for it: ``entry(fallback, x, z, weight, bias)``
        (x, z (M, N) rows; grad mode on, an input requiring grad) returns ``(y, mean | None, rstd)`` with y
        differentiable through the backend's own autograd node, or None, having done nothing (the Function's path
        runs). The node's backward calls ``fallback(dy, x, weight, bias, z, mean, rstd, needs)`` -> (dx, dz,
        dweight, dbias) for what it does not serve itself (needs: (dx, dz, dweight, dbias) flags). None here: not
        yet (ask again on a later call); False: never for this signature."""
        ...

    def plan_forward_quant(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           z: torch.Tensor | None, spec: NormSpec,
                           qspec: QuantSpec) -> Callable[..., tuple | None] | None:
        """As :meth:`plan_forward`, for the quantized forward of :meth:`Backend.forward_quant` where it covers the
        signature: ``plan(x, weight, bias, z)`` returns ``(q (M, N), scale storage)``, both new (the storage
        (M, G), or (G, M) for column-major scales), or None, having written nothing, for a call it does not
        serve. None here: no plan for this signature (the quantized call then runs ``forward_quant``)."""
        ...


def quantize_by_steps(forward: Callable[..., object], x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, z: torch.Tensor | None, spec: NormSpec, y_dtype: torch.dtype,
                      step_elements: int, quantize: Callable[[torch.Tensor, int, int], object]) -> None:
    """The quantized output as a forward and a quantizer, a step of rows at a time: ``forward`` (a
    :meth:`Backend.forward`) writes rows r0 .. r1 - 1 of y into a reused (rows, N) buffer of ``y_dtype`` of about
    ``step_elements`` elements (so y never exists whole, and a step is still in the cache when it is read back),
    then ``quantize(y_rows, r0, r1)`` writes their codes and scales. Each row's quantization depends on that row
    alone, so the steps keep batch invariance wherever the forward has it. The generic path of
    :func:`gatednorm.ops.gated_norm_quant_rows` and the native backend's rows its C forward does not take."""
    m, n = x.shape
    step = max(1, min(m, step_elements // n))
    y = torch.empty((step, n), dtype=y_dtype, device=x.device)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        y_rows = y[: r1 - r0]
        forward(x[r0:r1], weight, bias, None if z is None else z[r0:r1], spec, y_rows)
        quantize(y_rows, r0, r1)


#: The eager plans' key of a call's tensors built in C (:mod:`gatednorm.ops`, "Eager plans"), set by a backend
#: whose extension provides one (the triton backend's C++ plans or the native CPU node, once loaded:
#: :func:`use_call_key_of`); None: ops builds it in Python.
#: ``call_key(x, weight, bias, z) -> (key, differentiable) | None``: ``key`` bytes equal between two calls exactly
#: where the Python key's tensor fields are equal, ``differentiable`` what ``ops.needs_autograd`` says; None where
#: the Python path must decide (x not exactly a torch.Tensor, rank 0 or empty; other classes or layouts).
call_key: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                   tuple[bytes, bool] | None] | None = None


def use_call_key_of(module: ModuleType) -> None:
    """Build the eager plans' keys with a loaded extension's ``call_key`` (backends/call_key.h, compiled into the
    triton plans' extension and the native CPU node): tells it the classes it keys on, then sets :data:`call_key`.
    Both extensions compile the same header, so a process where both load builds equal keys either way."""
    global call_key
    module.key_classes(torch.Tensor, torch.nn.Parameter)
    call_key = module.call_key
