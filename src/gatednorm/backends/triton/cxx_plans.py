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

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch
import triton

from ...builds import build_once, cache_dir
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
_lock = threading.Lock()
_state: dict[str, object] = {}


def _flags(std: str) -> list[str]:
    """Compiler flags for a CPython extension against this PyTorch (its headers, libraries and C++ ABI) and
    Triton's copy of cuda.h, in C++ standard ``std``."""
    torch_dir = Path(torch.__file__).parent
    torch_lib = str(torch_dir / "lib")
    # torch.utils.cpp_extension.include_paths()' two directories, without importing that module
    includes = [str(torch_dir / "include"), str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
                sysconfig.get_paths()["include"],
                str(Path(triton.__file__).parent / "backends" / "nvidia" / "include")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", f"-std={std}", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in includes), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}",
            "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]


def _build() -> tuple[ModuleType | None, str]:
    """(the loaded extension, '') or (None, why not)."""
    compiler = env_text("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        return None, "no C++ compiler found (c++, g++, clang++)"
    cuda_h = Path(triton.__file__).parent / "backends" / "nvidia" / "include" / "cuda.h"
    if not cuda_h.exists():
        return None, f"Triton ships no {cuda_h}"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    why = ""
    for std in ("c++20", "c++17"):  # PyTorch 2.13's headers want C++20; an older compiler may have only C++17
        flags = _flags(std)
        ident = " ".join([compiler, *flags, torch.__version__, sys.version, sys.platform]).encode()
        key = hashlib.sha256(_SOURCE.read_bytes() + cuda_h.read_bytes() + ident).hexdigest()[:16]
        path = cache_dir() / f"gatednorm_cxx_plans_{key}{suffix}"
        why = build_once([compiler, str(_SOURCE), *flags], path, timeout=600)
        if not why:
            break
    if why:
        return None, why
    try:
        spec = importlib.util.spec_from_file_location("gatednorm_cxx_plans", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return None, f"could not load {path}: {exc}"
    module.setup(triton.knobs.runtime, getattr(torch._C, "_cuda_getCurrentRawStream", None))
    module.key_classes(torch.Tensor, torch.nn.Parameter)
    return module, ""


def _load() -> None:
    with _lock:
        if "module" not in _state:
            try:
                module, why = _build()
            except Exception as exc:  # noqa: BLE001 - any failure leaves the plans in Python, and says why
                module, why = None, f"build failed: {type(exc).__name__}: {exc}"
            _state["why"], _state["module"] = why, module
            if module is not None:  # the eager plans' keys from here on (gatednorm.ops, "Eager plans")
                base.call_key = module.call_key


def extension(wait: bool = True) -> ModuleType | None:
    """The loaded extension, or None (see :func:`status`). Built on the first call; ``wait=False`` (the plans)
    starts that build on a background thread and returns None until it is done, so a first call does not wait
    the build's seconds: its plan runs in Python meanwhile."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    if wait:
        _load()
        return _state["module"]  # type: ignore[return-value]
    if "thread" not in _state:
        with _lock:
            if "thread" not in _state:
                _state["thread"] = threading.Thread(target=_load, name="gatednorm-cxx-plans-build", daemon=True)
                _state["thread"].start()  # type: ignore[attr-defined]
    return None


def _forget_the_build_in_a_forked_child() -> None:
    """A child forked while the build ran has neither its thread nor, maybe, a usable lock: start afresh (the
    parent's finished build, if any, is in the cache)."""
    global _lock
    _lock = threading.Lock()
    if "module" not in _state:
        _state.pop("thread", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_build_in_a_forked_child)


def loaded() -> ModuleType | None:
    """The extension if it is loaded already, else None; starts no build (for counters and plans attached to it)."""
    return _state.get("module")  # type: ignore[return-value]


def settled() -> bool:
    """Whether the build has finished (the extension loaded, or failed: :func:`status` says why)."""
    return "module" in _state


def status() -> str:
    """'in use', or why the Python plan runs instead."""
    if env_text("GATEDNORM_CXX_PLANS") == "0":
        return "disabled by GATEDNORM_CXX_PLANS=0"
    if not ENABLED:
        return f"not used with Triton {triton.__version__} (its C launcher's ABI is repeated for Triton 3.6 only)"
    module = extension()
    if module is None:
        return str(_state.get("why", ""))
    return "in use" if module.driver_available() else "built; no CUDA driver (libcuda.so.1) here"
