"""The native backend's small CPU calls in C++ (``native_cpu_node.cpp``): the eager plans' forward, and an autograd
node for differentiable calls; built on first use where it can be.

Why
---
A differentiable call of one block of rows on CPU (training or fine-tuning at small shapes, a gradient taken
through a decode step) runs the C kernel for a few microseconds, forward and backward, inside the Python of an
autograd Function: its apply, ctx and saved tensors, and its backward called back from the engine. On the 2-core
VM, ``rmsnorm_fn`` bf16 forward+backward at 1x128 took 2.7-3.0x a plain autograd pair ``(x * z).backward(dy)``
(session 28, with the eager plans: ``benchmarks/results/cpu_backward_plan_ab.md``), the same share of Python the
triton plans' C++ entry removed on the GPU hosts (docs/design.md, "The plans in C++"). Here the forward and a
``GatedNormCPUBackward`` node are C++: the same C kernel calls with the same fields as the Python plans pack
(:func:`.native_cpu_kernel.planned_forward`, :func:`~.native_cpu_kernel.planned_backward`), so the same bits.

When it is used
---------------
By :meth:`.native_cpu.NativeCPUBackend.plan_autograd`, for the signatures whose forward and backward the C kernel's
eager plans serve (:class:`.native_cpu.KernelForwardPlan`, :class:`.native_cpu.KernelBackwardPlan`), on calls of
at most one block of rows while the kernel is on (``GATEDNORM_CPU_KERNEL``, read on every call), unless
``GATEDNORM_CPU_NODE=0`` (read when a signature is planned); and by :class:`.native_cpu.KernelForwardPlan` itself
for calls without autograd (:func:`forward_entry`: its allocations and kernel call in one C call, ``rmsnorm_fn``
bf16 at 1x128 11.0-11.3 -> 8.3-9.1 us on the VM, ``benchmarks/results/cpu_forward_node_ab.md``). Built once into
``$GATEDNORM_CACHE_DIR`` (a C++ compiler and PyTorch's headers; 15-25 s on the 2-core VM) on a background thread
started by the first planned call: calls before it is ready run in Python. Where it declines, nothing is written: a
call with a group out of range (the rescue is Python's) goes the Python way, and the node hands a dy the kernel
does not take, and a backward that records its own graph (``create_graph=True``), to the Function's backward.
:func:`status` says whether it is in use or why not.

Once loaded, its ``call_key`` (``backends/call_key.h``, which the triton plans' extension compiles too) builds the
eager plans' signature keys (:func:`.base.use_call_key_of`): the whole signature of a call 2.4 -> 0.7 us on the VM.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from types import ModuleType

from ..builds import AUTOGRAD_NODE_H, CALL_KEY_H, BackgroundBuild, build_torch_extension
from ..settings import env_off
from . import base, native_cpu_kernel

_SOURCE = native_cpu_kernel.HEADER.with_name("native_cpu_node.cpp")


def _build() -> tuple[ModuleType | None, str]:
    """(the loaded extension, '') or (None, why not)."""
    if native_cpu_kernel.library() is None:
        return None, f"the C kernel is not in use ({native_cpu_kernel.status()})"
    module, why = build_torch_extension(_SOURCE, "gatednorm_native_cpu_node", [],
                                        [native_cpu_kernel.HEADER, AUTOGRAD_NODE_H, CALL_KEY_H])
    if module is not None:
        base.use_call_key_of(module)  # its call_key builds the eager plans' keys from then on (any device's calls)
    return module, why


_BUILD = BackgroundBuild("gatednorm-cpu-node-build", _build)


def wanted() -> bool:
    """Whether small calls should use the extension (its forward and node): unless ``GATEDNORM_CPU_NODE=0``."""
    return not env_off("GATEDNORM_CPU_NODE")


def extension(wait: bool = True) -> ModuleType | None:
    """The loaded extension, or None (see :func:`status`); ``wait=False`` builds it on a background thread and
    returns None until it is done."""
    return _BUILD.get(wait)


def settled() -> bool:
    """Whether the build has finished (the extension loaded, or failed: :func:`status` says why)."""
    return _BUILD.settled()


def status(build: bool = True) -> str:
    """'in use', or why the eager plans' Python (their calls, the autograd Function) serves small CPU calls;
    ``build=False`` (gatednorm info) builds nothing: before the first planned small call has built it, it says so."""
    if not wanted():
        return "disabled by GATEDNORM_CPU_NODE=0"
    if not build and not settled():
        return "not built yet (built on the first planned small CPU call, with a C++ compiler, 15-25 s once)"
    return "in use" if extension() is not None else _BUILD.why()


def served() -> tuple[int, int]:
    """(forward, backward) differentiable calls the node has served in this process ((0, 0) before it is loaded)."""
    module = _BUILD.loaded()
    return (0, 0) if module is None else module.served()[:2]


def served_plain() -> int:
    """Calls without autograd whose forward the extension made (:func:`forward_entry`) in this process."""
    module = _BUILD.loaded()
    return 0 if module is None else module.served()[2]


def _bound(method: str, forward_fields: tuple, groups: int,
           block_elements: int) -> Callable[..., tuple | None] | bool | None:
    """The extension's ``method`` bound to a signature's plan (its fields from
    :func:`.native_cpu_kernel.planned_forward_fields`), None while the extension builds, False where it cannot serve
    (switched off, the build failed)."""
    if not wanted():
        return False
    module = extension(wait=False)
    if module is None:
        return False if settled() else None
    lib = native_cpu_kernel.library()
    if lib is None:
        return False
    code_x, _, code_z, _, code_w, code_b, tail = forward_fields
    n, group_size, eps, rstd_max, is_rms, gate_before, sigmoid = tail[:7]
    entry_points = (ctypes.cast(lib.gn_forward_packed, ctypes.c_void_p).value,
                    ctypes.cast(lib.gn_backward_packed, ctypes.c_void_p).value)
    plan = module.plan(*entry_points, n, groups, group_size, block_elements, code_x, code_z, code_w, code_b, eps,
                       rstd_max, int(is_rms), int(gate_before), int(sigmoid))
    return functools.partial(getattr(module, method), plan)


def node_entry(forward_fields: tuple, groups: int, block_elements: int) -> Callable[..., tuple | None] | bool | None:
    """The differentiable entry (:meth:`~gatednorm.backends.base.PlannedBackend.plan_autograd`) of a signature
    whose eager plans the C kernel serves: ``entry(fallback, x, z, weight, bias)``, the forward and a
    GatedNormCPUBackward node in C++ (see :func:`_bound` for None / False)."""
    autograd = _bound("autograd", forward_fields, groups, block_elements)
    return functools.partial(_differentiable_call, autograd) if callable(autograd) else autograd


def forward_entry(forward_fields: tuple, groups: int, block_elements: int) -> Callable[..., tuple | None] | bool | None:
    """:class:`.native_cpu.KernelForwardPlan`'s call in C++: ``call(x, z, weight, bias)`` -> (y, mean | None, rstd)
    or None, nothing written (see :func:`_bound` for None / False). The plan asks ``native_cpu_kernel.ready()``
    before each call."""
    return _bound("forward", forward_fields, groups, block_elements)


def _differentiable_call(autograd: Callable[..., tuple | None], fallback: Callable[..., tuple],
                         x, z, weight, bias) -> tuple | None:
    """The node's call while the kernel is on (``GATEDNORM_CPU_KERNEL`` may turn it off between calls), else None."""
    if not native_cpu_kernel.ready():
        return None
    return autograd(fallback, x, z, weight, bias)
