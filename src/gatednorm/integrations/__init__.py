"""Drop-in replacement of the gated-norm entry points of sglang, vLLM, fla, mamba_ssm and transformers.

    handle = gatednorm.patch("sglang")      # or patch() for every installed target
    ...                                     # the framework's own functions and modules now run gatednorm
    handle.undo()                           # the original objects are back (also: `with gatednorm.patch(...):`)

Importing gatednorm patches nothing. ``GATEDNORM_PATCH=sglang,fla`` (or ``all``) names targets that
:func:`apply_env_patch` patches; the opt-in hook written by ``gatednorm install-hook``
(:mod:`gatednorm.integrations.hook`) calls it at interpreter start, or call it yourself. See docs/usage.md.

Layout: ``_core`` keeps the bookkeeping (plans, handles, undo), ``counters`` the call counts,
``_wrappers`` builds the replacement callables, and one module per target (``sglang``, ``vllm``, ...)
plans what to replace. Imports run one way: this package -> targets -> ``_wrappers`` -> ``counters``,
and ``_core`` and ``counters`` import no module of this package.
"""

from __future__ import annotations

import importlib
import warnings

from ..ops import BACKENDS
from ..settings import env_text
from ._core import (
    PatchHandle,
    Planner,
    UnknownLayoutError,
    apply_plan,
    package_installed,
    patched,
    rebind_imported_names,
)
from .counters import call_counts, reset_call_counts

#: Patch targets, in the order ``patch()`` applies them.
TARGETS = ("sglang", "vllm", "fla", "mamba_ssm", "transformers")

__all__ = [
    "TARGETS",
    "PatchHandle",
    "UnknownLayoutError",
    "apply_env_patch",
    "call_counts",
    "patch",
    "patched",
    "reset_call_counts",
]


def _target_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def patch(*targets: str, backend: str | None = None) -> PatchHandle:
    """Replace the gated-norm entry points of the named frameworks with gatednorm's.

    Args:
        *targets: any of ``"sglang"``, ``"vllm"``, ``"fla"``, ``"mamba_ssm"``, ``"transformers"``
            (``"all"`` or nothing: every one that is installed).
        backend: backend the replacements use, whatever the environment says (None: decided per call,
            ``USE_NATIVE_LAYERNORM`` / ``GATEDNORM_BACKEND`` / auto; docs/design.md "Choosing a backend").

    Returns:
        A :class:`PatchHandle`; ``handle.undo()`` (or leaving a ``with`` block) restores the originals.
        ``handle.skipped`` says which targets were skipped and why, and which secondary kernel copies of a
        patched target (vLLM's KDA file, a fused_norm_gate or mamba copy) failed to import and were left alone
        (with a ``RuntimeWarning``; the target's main gated-norm file is patched).

    A named target that is not installed is skipped with a warning; one that is installed but
    whose module layout or signatures are not the known ones raises :class:`UnknownLayoutError`
    naming what was not found (nothing is left patched). A named target whose import fails raises
    ``ImportError`` (with no targets named: skipped with a warning), and does so on every call: the
    framework is imported through its package ``__init__`` each time, so submodules that an earlier
    failed import left behind cannot make a later call succeed (see :meth:`Planner.module`).
    Attributes already replaced by an earlier, still active patch are left alone, so patching twice
    is harmless. Functions other modules imported by name before the patch (``from m import f``)
    are replaced there too.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    explicit = bool(targets) and targets != ("all",)
    names = list(dict.fromkeys(targets)) if explicit else list(TARGETS)
    for name in names:
        if not isinstance(name, str) or name not in TARGETS:
            raise ValueError(f"targets must be among {TARGETS} (or 'all'), got {name!r}")
    handle = PatchHandle(backend=backend)
    try:
        for name in names:
            module = _target_module(name)
            if not package_installed(module.PACKAGE):
                handle.skipped[name] = f"{module.PACKAGE} is not installed"
                if explicit:
                    warnings.warn(f"gatednorm.patch: {module.PACKAGE} is not installed; {name!r} skipped",
                                  RuntimeWarning, stacklevel=2)
                continue
            planner = Planner(name, backend)
            try:
                module.plan(planner)
            except UnknownLayoutError:
                raise
            except ImportError as exc:
                message = f"gatednorm.patch: {module.PACKAGE} is installed but importing it failed: {exc!r}"
                if explicit:
                    raise ImportError(message) from exc
                handle.skipped[name] = message
                warnings.warn(message + f"; {name!r} skipped", RuntimeWarning, stacklevel=2)
                continue
            first = len(handle._records)
            apply_plan(name, planner.finish(), handle)
            rebind_imported_names(handle, first)
            for path, why in planner.skipped.items():
                handle.skipped[path] = why
                warnings.warn(f"gatednorm.patch: {path} ({name}) not patched, {why}; the rest of {name!r} is patched",
                              RuntimeWarning, stacklevel=2)
    except BaseException:
        handle.undo()
        raise
    return handle


def apply_env_patch() -> PatchHandle | None:
    """Patch the targets named by ``GATEDNORM_PATCH`` (comma-separated targets, or ``all``).

    Called by the opt-in ``.pth`` hook (``gatednorm install-hook``) at interpreter start, or
    explicitly; ``import gatednorm`` does not call it. Returns the :class:`PatchHandle`, or None
    when the variable is unset, ``0``/``none``/``false``/``off``, or the patch failed.

    Failures are reported as warnings, never raised: an environment variable must not make
    interpreter start (or the caller) fail.
    """
    value = env_text("GATEDNORM_PATCH")
    if not value or value.lower() in ("0", "none", "false", "off"):
        return None
    targets = [t.strip() for t in value.split(",") if t.strip()]
    if any(t.lower() in ("all", "1", "true", "on") for t in targets):
        targets = []
    try:
        return patch(*targets)
    except Exception as exc:  # noqa: BLE001 - reported, see docstring
        warnings.warn(f"GATEDNORM_PATCH={value!r}: patch failed: {exc}", RuntimeWarning, stacklevel=2)
        return None
