"""The triton plans' per-call host work in C++ (``cxx_plans.cpp``), built on first use where it can be.

Why
---
A launch-bound call (decode, 8192x128) is timed by its host time. On an H100 (session 19,
benchmarks/probe_host_layers.py) one torch.mul took 6.7 us per call and the leanest Python that can allocate
the outputs and call Triton's C launcher 9.0; :class:`.plans.ForwardPlan` took 10.7-11.6, of which the two
allocations from Python were 4.1 and Triton's launcher 3.8 (it parses ~25 Python arguments per call); a planned
forward+backward took 183-191 us against 85-94 for a plain autograd pair, the backward plan's Python running at
64 us on the autograd engine's thread. The C++ entry makes a forward or backward plan's whole call (variant,
allocations, alignment check, ``cuLaunchKernelEx``) in one C call with the tensors' ATen handles, and
differentiable calls go through a C++ autograd node (``GatedNormBackward``) instead of the Python Function:
the same kernels, grids and arguments, so the same bits (tests/test_plans.py compares its launches with the
Python plans' on CPU, recorded; tests/test_gpu.py's plan tests run through it on a GPU). Measured on an H100
(session 21, ``benchmarks/bench_host.py`` at 8192x128, on and off alternating in one machine start): a planned
forward 1.53-1.62x one torch.mul's host time (2.27x in Python), forward+backward 1.23-1.30x a plain autograd
pair's (1.98x in Python).

When it is used
---------------
By the :class:`.plans.ForwardPlan` s, :class:`.plans.BackwardPlan` s and :class:`.plans.QuantPlan` s (the fused
quantized forward, since session 23: its GPU tests passed through the entry on an H100 and ``gated_norm_quant``
fp8 at 8192x128 went from 2.66-2.79x to 1.66-1.72x one torch.mul's host time) whose kernels were launched
through Triton 3.6's C launcher (the ABI the C++ repeats: ``launch.DIRECT_LAUNCH_TRITON_VERSIONS``), where this
module builds (a C++ compiler: ``$CXX``, else c++ / g++ / clang++; PyTorch's headers; Triton's ``cuda.h``),
unless ``GATEDNORM_CXX_PLANS=0`` (the Python plans; read when the backend loads, as
``GATEDNORM_TRITON_FAST_LAUNCH``; see :data:`ENABLED`). The extension is built once into ``$GATEDNORM_CACHE_DIR``
(default ``~/.cache/gatednorm``), keyed by the source, PyTorch's version, Python's and the compiler (10 s on a
2-core machine, 16-25 s on the H100 hosts), on a background thread started by the first plan: plans made before
it is ready attach to it when it is. :func:`status` says whether it is in use or why not. Once loaded, its
``call_key`` also builds the eager plans' signature keys (``backends.base.call_key``, gatednorm.ops).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import triton

from ...builds import AUTOGRAD_NODE_H, CALL_KEY_H, BackgroundBuild, build_torch_extension
from ...settings import env_text
from .. import base
from .launch import _DIRECT_LAUNCH

#: Whether plans use the C++ entry: with Triton 3.6's C launcher (whose launch the C++ repeats), unless
#: ``GATEDNORM_CXX_PLANS=0`` (read once, when the backend loads; see gatednorm.settings). On by default since
#: session 21: its CPU tests compare every kernel parameter with the Python plans' launches; the launch itself
#: (cuLaunchKernelEx with Triton 3.6's ABI) and the node on the engine's thread ran on an H100: tests/test_gpu.py's
#: 28 plan tests and 126 of its other 176 through it, all passing (the device time ran out before the last 50,
#: groups of three parts).
ENABLED = _DIRECT_LAUNCH and env_text("GATEDNORM_CXX_PLANS") != "0"

_SOURCE = Path(__file__).with_name("cxx_plans.cpp")
#: Triton's copy of the CUDA driver API header (types only; libcuda is opened at run time).
_CUDA_INCLUDE = Path(triton.__file__).parent / "backends" / "nvidia" / "include"


def _build() -> tuple[ModuleType | None, str]:
    """(the loaded extension, set up, '') or (None, why not); once loaded, its call_key builds the eager plans'
    keys (gatednorm.ops, "Eager plans")."""
    cuda_h = _CUDA_INCLUDE / "cuda.h"
    if not cuda_h.exists():
        return None, f"Triton ships no {cuda_h}"
    module, why = build_torch_extension(_SOURCE, "gatednorm_cxx_plans", [_CUDA_INCLUDE],
                                        [cuda_h, AUTOGRAD_NODE_H, CALL_KEY_H])
    if module is None:
        return None, why
    module.setup(triton.knobs.runtime, getattr(torch._C, "_cuda_getCurrentRawStream", None))
    base.use_call_key_of(module)
    return module, ""


_BUILD = BackgroundBuild("gatednorm-cxx-plans-build", _build)


def extension(wait: bool = True) -> ModuleType | None:
    """The loaded extension, or None (see :func:`status`). Built on the first call; ``wait=False`` (the plans)
    starts that build on a background thread and returns None until it is done, so a first call does not wait
    the build's seconds: its plan runs in Python meanwhile."""
    return _BUILD.get(wait)


def loaded() -> ModuleType | None:
    """The extension if it is loaded already, else None; starts no build (for counters and plans attached to it)."""
    return _BUILD.loaded()


def settled() -> bool:
    """Whether the build has finished (the extension loaded, or failed: :func:`status` says why)."""
    return _BUILD.settled()


def status() -> str:
    """'in use', or why the Python plan runs instead."""
    if env_text("GATEDNORM_CXX_PLANS") == "0":
        return "disabled by GATEDNORM_CXX_PLANS=0"
    if not ENABLED:
        return f"not used with Triton {triton.__version__} (its C launcher's ABI is repeated for Triton 3.6 only)"
    module = extension()
    if module is None:
        return _BUILD.why()
    return "in use" if module.driver_available() else "built; no CUDA driver (libcuda.so.1) here"
