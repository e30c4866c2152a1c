"""What the reports share about the host they run on: the names of its devices, and a closed stdout.

``gatednorm info`` (:mod:`gatednorm.diagnostics`) and ``gatednorm verify`` (:mod:`gatednorm.verify.report`)
are siblings that must not import each other (the layer rules in pyproject.toml), so what they share
lives here, in the lowest layer: it imports nothing of gatednorm. :func:`device_name` is how both name
a device; :func:`quiet_closed_stdout` is how both (and :mod:`gatednorm.cli`) go quiet when the reader of
their output goes away early.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

__all__ = ["cpu_name", "device_name", "quiet_closed_stdout"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name"), else what the platform module tells."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """A human description of ``device``: the CPU's model name, a CUDA/ROCm GPU's name, else the device type."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_name()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def quiet_closed_stdout() -> None:
    """After a ``BrokenPipeError`` on stdout (``gatednorm info | head -1``): send the rest to ``os.devnull``.

    Points file descriptor 1 at ``os.devnull``, so that what is still buffered, flushed again later or at
    interpreter exit, does not raise a second time ("Exception ignored ... BrokenPipeError"). A stdout
    without a file descriptor (replaced, captured) is left as it is.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both OSError and ValueError
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
