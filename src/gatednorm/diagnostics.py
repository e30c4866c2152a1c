"""``gatednorm.info()`` / ``gatednorm info``: what this installation can run, and which backend a call gets.

:func:`info` returns a plain dict (JSON-serialisable); :func:`format_info` renders it as the text
``gatednorm info`` prints. Nothing here runs at ``import gatednorm``: Triton is imported (through
:func:`gatednorm.ops.triton_available`) only when :func:`info` is called.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any

import torch

from . import huge_pages, ops
from ._platform import device_name
from ._version import __version__
from .settings import VARIABLES, env_text


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> dict[str, Any]:
    """Triton's version and whether gatednorm's kernels import (``backend_importable``), and why not."""
    version = _version("triton")
    entry: dict[str, Any] = {"version": version, "backend_importable": False}
    if version is None:
        entry["note"] = "not installed (pip install 'gatednorm[triton]' for the fused GPU kernels)"
        return entry
    entry["backend_importable"] = ops.triton_available()
    entry["note"] = ("importable; it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
                     if entry["backend_importable"] else "installed, but gatednorm's Triton kernels do not import")
    return entry


def _devices() -> list[tuple[torch.device, str]]:
    """``(device, name)`` for the CPU and every accelerator PyTorch reports (CUDA/ROCm, XPU, MPS, ...)."""
    found = [(torch.device("cpu"), device_name("cpu"))]
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available():
        kind = accelerator.current_accelerator().type
        count = accelerator.device_count()
    elif torch.cuda.is_available():
        kind, count = "cuda", torch.cuda.device_count()
    else:
        return found
    for index in range(count):
        device = torch.device(kind, index)
        found.append((device, device_name(device)))
    return found


def info() -> dict[str, Any]:
    """What this installation runs: versions, settings, and per device which backend a call gets and why.

    Returns a JSON-serialisable dict:

    * ``gatednorm``, ``python``, ``torch``: versions;
    * ``triton``: ``{"version": str | None, "backend_importable": bool, "note": str}``;
      ``backend_importable`` is :func:`gatednorm.triton_available` (importable is not usable: see
      each device's ``backends``);
    * ``settings``: the environment variables that steer dispatch, as set ('' when unset);
    * ``native_cpu_kernel``: ``"in use"`` when the native backend's C kernel (forward and backward) is built
      (on the first call here, about a second with a C compiler), else why the pure-PyTorch block kernels run;
    * ``triton_cxx_plans``: ``"in use"`` when the triton backend's eager plans make their calls from C++
      (gatednorm.backends.triton.cxx_plans; built on the first call here where Triton 3.6 is installed, 10-60 s),
      else why they run in Python;
    * ``devices``: one entry per device (``cpu``, then every accelerator PyTorch reports), with
      ``device``, ``name``, ``auto`` (what ``backend="auto"`` picks there) and ``auto_reason``,
      ``default`` (what a call without ``backend=`` runs, given the environment; None when that raises)
      and ``default_reason``, and ``backends`` (each concrete backend: ``"ok"`` or why it cannot run).

    Importing Triton (to answer ``backend_importable``) can take a second or two; nothing else is slow.
    """
    devices = []
    for device, name in _devices():
        default, default_reason = ops.explain_backend(None, device)
        backends = {b: ops.backend_problem(b, device) or "ok" for b in ops.BACKENDS if b != "auto"}
        devices.append({"device": str(device), "name": name,
                        "auto": ops.auto_backend(device), "auto_reason": ops.auto_reason(device),
                        "default": default, "default_reason": default_reason, "backends": backends})
    return {
        "gatednorm": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _triton(),
        "settings": {name: env_text(name) for name in VARIABLES},  # every variable gatednorm reads
        "native_cpu_kernel": ops.native_cpu_kernel_status(),
        "native_cpu_node": ops.native_cpu_node_status(),
        "triton_cxx_plans": ops.triton_cxx_plans_status(),
        "huge_pages": huge_pages.status(),
        "devices": devices,
    }


def format_info(data: dict[str, Any]) -> str:
    """:func:`info`'s dict as the text ``gatednorm info`` prints."""
    triton = data["triton"]
    lines = [
        f"gatednorm {data['gatednorm']}",
        f"python    {data['python']}",
        f"torch     {data['torch']}",
        f"triton    {triton['version'] or 'absent'}: {triton['note']}",
        "settings  " + (", ".join(f"{k}={v}" for k, v in data["settings"].items() if v) or "(none set)"),
        f"native CPU kernel: {data['native_cpu_kernel']}",
        f"native CPU small calls in C++ (forward, autograd node): {data['native_cpu_node']}",
        f"triton plans in C++: {data['triton_cxx_plans']}",
        f"huge pages for large CPU outputs: {data['huge_pages']}",
        "",
    ]
    for d in data["devices"]:
        lines.append(f"{d['device']} ({d['name']})")
        lines.append(f"  auto    -> {d['auto']}: {d['auto_reason']}")
        lines.append(f"  default -> {d['default'] or 'error'}: {d['default_reason']}")
        for name, state in d["backends"].items():
            lines.append(f"  {name:<8}   {state}")
    return "\n".join(lines)
