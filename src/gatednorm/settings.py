"""Environment settings, read in one place with one policy: on every call.

Reading ``os.environ`` costs well under a microsecond, so every setting is looked up when it is
used; tests and users may change these variables at run time and the next call follows. Two
exceptions, both read when the triton backend first loads: ``TRITON_INTERPRET`` (Triton itself decides
at kernel-definition time whether it interprets) and ``GATEDNORM_TRITON_FAST_LAUNCH`` (a lookup per
kernel launch, about 0.8 us, would be a measurable share of a small call's host time).

================================  =============================================================================
variable                          effect
================================  =============================================================================
``USE_NATIVE_LAYERNORM``          the migration guide's switch, ``1``: calls without ``backend=`` run native
                                  (it takes precedence over ``GATEDNORM_BACKEND``; an explicit ``backend=``
                                  wins over both)
``GATEDNORM_BACKEND``             backend for calls without ``backend=`` when ``USE_NATIVE_LAYERNORM`` is not
                                  set (auto/native/triton/compiled; an unknown name raises on every call)
``GATEDNORM_PATCH``               targets to patch (read by the opt-in ``.pth`` hook and ``apply_env_patch()``)
``TRITON_INTERPRET``              Triton's interpreter: lets the triton backend run on CPU tensors
``GATEDNORM_TRITON_FAST_LAUNCH``  ``0``: Triton's own (slower) launch path instead of the cached launcher
================================  =============================================================================

The backend precedence, in one table: docs/design.md, section 4, "Choosing a backend"
(implemented by :func:`gatednorm.ops.resolve_backend`).
"""

from __future__ import annotations

import os

_TRUE = ("1", "true", "yes", "on")


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on (any case)."""
    value = os.environ.get(name)
    return value is not None and value.strip().lower() in _TRUE


def env_text(name: str) -> str:
    """The stripped value of ``name`` ('' when unset)."""
    return os.environ.get(name, "").strip()
