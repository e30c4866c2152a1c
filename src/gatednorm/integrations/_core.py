"""Patch bookkeeping shared by every integration target.

A *plan* is a list of ``(owner, name, new)`` triples, where ``owner`` is a module or a
class and ``new`` replaces ``owner.__dict__[name]``. Applying a plan records what was
there before (or that nothing was: then undo deletes the attribute again, so a class
that inherited the attribute inherits it again), so :meth:`PatchHandle.undo` restores
the exact original objects. A global table of live replacements makes patching the
same attribute twice a no-op, and lets :func:`patched` list what is replaced now.

This module imports nothing else of ``gatednorm``: the replacements themselves are built by
``_wrappers`` and the target modules, and handed to the :class:`Planner` (imports run one way:
targets -> ``_core``, ``_wrappers`` -> ``counters``).

Module-level functions that other modules imported by name (``from m import f``)
are also rebound: after a plan is applied, ``sys.modules`` is scanned once for
attributes that are the very objects we replaced, and those bindings are replaced too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field


class UnknownLayoutError(ImportError):
    """An installed framework does not have the module layout or signatures gatednorm knows."""


_MISSING = object()


@dataclass
class _Record:
    target: str
    owner: object
    name: str
    original: object  # the raw value from owner.__dict__, or _MISSING
    new: object
    binding: bool = False  # a `from m import f` copy found by the sys.modules scan

    def describe(self) -> str:
        owner = getattr(self.owner, "__qualname__", None) if isinstance(self.owner, type) else None
        if owner is not None:
            owner = f"{self.owner.__module__}.{owner}"
        else:
            owner = getattr(self.owner, "__name__", repr(self.owner))
        text = f"{self.target}: {owner}.{self.name}"
        return text + " (imported name)" if self.binding else text


# (id(owner), name) -> record, for every replacement currently in place.
_ACTIVE: dict[tuple[int, str], _Record] = {}
_LOCK = threading.RLock()


@dataclass
class PatchHandle:
    """What one :func:`gatednorm.patch` call replaced; ``undo()`` puts the originals back.

    Attributes:
        backend: the backend the replacements use (None: per call / environment).
        skipped: target -> why it was not patched (not installed, import failed, ...); also module path -> why,
            for a patched target's secondary kernel copy whose import failed.
    """

    backend: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    _records: list[_Record] = field(default_factory=list)
    _undone: bool = False

    @property
    def replaced(self) -> list[str]:
        """Human-readable ``target: module.attribute`` for every replacement this handle made."""
        return [r.describe() for r in self._records]

    @property
    def targets(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self._records:
            seen.setdefault(r.target, None)
        return list(seen)

    def undo(self) -> None:
        """Restore every object this handle replaced (the original objects, by identity). Idempotent."""
        with _LOCK:
            if self._undone:
                return
            for record in reversed(self._records):
                _restore(record)
            self._undone = True

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "undone" if self._undone else "active"
        return (f"PatchHandle({state}, {len(self._records)} replacements, targets={self.targets}, "
                f"skipped={self.skipped})")


def _raw(owner: object, name: str) -> object:
    return vars(owner).get(name, _MISSING)


def _restore(record: _Record) -> None:
    key = (id(record.owner), record.name)
    current = _raw(record.owner, record.name)
    if current is not record.new:
        warnings.warn(
            f"gatednorm: {record.describe()} was changed by someone else after patching; left as it is",
            RuntimeWarning,
            stacklevel=3,
        )
    elif record.original is _MISSING:
        delattr(record.owner, record.name)
    else:
        setattr(record.owner, record.name, record.original)
    if _ACTIVE.get(key) is record:
        del _ACTIVE[key]


def apply_plan(target: str, plan: list[tuple[object, str, object]], handle: PatchHandle) -> None:
    """Apply ``(owner, name, new)`` replacements, recording them in ``handle`` (skips live ones)."""
    with _LOCK:
        for owner, name, new in plan:
            key = (id(owner), name)
            if key in _ACTIVE:  # already replaced by an earlier patch: patching twice is harmless
                continue
            original = _raw(owner, name)
            if original is _MISSING and not isinstance(owner, type):
                raise UnknownLayoutError(f"{target}: {getattr(owner, '__name__', owner)} has no attribute {name!r}")
            setattr(owner, name, new)
            record = _Record(target, owner, name, original, new)
            _ACTIVE[key] = record
            handle._records.append(record)


def rebind_imported_names(handle: PatchHandle, first: int = 0) -> None:
    """Replace ``from m import f`` copies of the functions replaced by ``handle._records[first:]``.

    Only plain functions are looked for: classes are patched in place (their ``forward``),
    so every binding of a class already sees the replacement.
    """
    with _LOCK:
        swaps: dict[int, _Record] = {}
        owners: set[int] = set()
        for r in handle._records[first:]:
            owners.add(id(r.owner))
            if isinstance(r.owner, types.ModuleType) and isinstance(r.original, types.FunctionType):
                swaps[id(r.original)] = r
        if not swaps:
            return
        for mod_name, module in list(sys.modules.items()):
            if not isinstance(module, types.ModuleType) or id(module) in owners:
                continue
            if mod_name == "gatednorm" or mod_name.startswith("gatednorm."):
                continue  # our own code keeps its references to the originals
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                r = swaps.get(id(value))
                if r is None or value is not r.original:
                    continue
                key = (id(module), attr)
                if key in _ACTIVE:
                    continue
                setattr(module, attr, r.new)
                record = _Record(r.target, module, attr, value, r.new, binding=True)
                _ACTIVE[key] = record
                handle._records.append(record)


def patched() -> list[str]:
    """Every replacement currently in place, as ``"target: module.attribute"`` strings."""
    with _LOCK:
        return [r.describe() for r in _ACTIVE.values()]


def signature_mismatch(original: object, replacement: object, *, names_only: bool = False) -> str | None:
    """Describe how ``replacement``'s signature differs from ``original``'s (None when they agree).

    Compares parameter names, kinds and defaults (annotations are ignored). ``names_only``
    compares just the names, for classes whose copies differ only in a default.
    """
    try:
        a = inspect.signature(original)
    except (TypeError, ValueError):
        return None
    b = inspect.signature(replacement)

    def describe(sig: inspect.Signature) -> list[tuple]:
        if names_only:
            return [p.name for p in sig.parameters.values()]
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    if describe(a) == describe(b):
        return None
    return f"upstream signature {a} differs from the supported one {b}"


# ---------------------------------------------------------------------------
# Planning helpers used by the target modules
# ---------------------------------------------------------------------------


def _search_locations(top: str) -> list[str]:
    module = sys.modules.get(top)
    if module is not None:
        return list(getattr(module, "__path__", []) or [])
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return list(spec.submodule_search_locations)


def module_source_exists(path: str) -> bool:
    """Whether ``path`` names a module file of an installed package, found without importing it."""
    top, *rest = path.split(".")
    for base in _search_locations(top):
        where = os.path.join(base, *rest[:-1]) if rest else base
        last = rest[-1] if rest else ""
        if not rest or os.path.isfile(os.path.join(where, last + ".py")) or os.path.isdir(os.path.join(where, last)):
            return True
    return False


def package_installed(name: str) -> bool:
    return name in sys.modules or bool(_search_locations(name))


class Planner:
    """Collects the replacements of one target and the layout problems found on the way."""

    def __init__(self, target: str, backend: str | None) -> None:
        self.target = target
        self.backend = backend
        self.plan: list[tuple[object, str, object]] = []
        self.problems: list[str] = []
        self.found: list[str] = []
        self.skipped: dict[str, str] = {}  # optional module path -> why it was left unpatched

    def module(self, path: str, *, optional: bool = False) -> types.ModuleType | None:
        """The module at ``path``, imported if needed; None when this version of the package has no such file.

        The framework's top-level package is imported first, as ``import <package>`` would, whenever
        it is not loaded: a package whose ``__init__`` failed earlier (mamba_ssm without its CUDA
        extensions) leaves the submodules it had finished in ``sys.modules``, and importing ``path``
        directly would then skip the failing ``__init__`` and succeed the second time. This way every
        attempt fails the same way, and leaves what a plain ``import <package>`` leaves. (Removing those
        submodules instead is not safe: re-running a module that registers types or ops with torch, as
        vLLM's do, raises "already registered" on the next import.)

        ``optional``: a secondary copy of the kernels (vLLM's KDA file, a framework's fused_norm_gate or mamba
        copy, the Mamba2 mixer's file) whose own import raises, with any exception, is recorded in :attr:`skipped`
        and None returned, so the framework's main gated-norm file is still patched; the framework's package
        failing to import still raises.
        """
        if path in sys.modules:
            module = sys.modules[path]
        elif not module_source_exists(path):
            return None
        else:
            top = path.partition(".")[0]
            if top not in sys.modules:
                importlib.import_module(top)
            try:
                module = importlib.import_module(path)
            except Exception as exc:  # optional: whatever its import raises (vLLM's files also raise RuntimeError)
                if not optional:
                    raise
                self.skipped[path] = f"importing it failed: {exc!r}"
                return None
        self.found.append(path)
        return module

    def label(self, owner: object, name: str) -> str:
        if isinstance(owner, type):
            return f"{owner.__module__}.{owner.__qualname__}.{name}"
        return f"{owner.__name__}.{name}"

    def function(self, module, name: str, make: Callable, *, required: bool = True) -> Callable | None:
        """Replace ``module.name`` with ``make(label, original)`` after checking the signatures agree."""
        original = vars(module).get(name)
        if original is None:
            if required:
                self.problems.append(f"{module.__name__}.{name} not found")
            return None
        new = make(self.label(module, name), original)
        why = signature_mismatch(original, new)
        if why:
            self.problems.append(f"{module.__name__}.{name}: {why}")
            return None
        self.plan.append((module, name, new))
        return original

    def method(self, cls, name: str, new: Callable, *, names_only: bool = False) -> None:
        original = getattr(cls, name, None)
        if original is None:
            self.problems.append(f"{cls.__module__}.{cls.__qualname__}.{name} not found")
            return
        why = signature_mismatch(original, new, names_only=names_only)
        if why:
            self.problems.append(f"{cls.__module__}.{cls.__qualname__}.{name}: {why}")
            return
        self.plan.append((cls, name, new))

    def autograd_function(self, module, name: str, make: Callable, *, required: bool = True) -> None:
        """Replace ``forward`` and ``backward`` of the ``torch.autograd.Function`` ``module.name`` with
        the pair ``make(label, backend, original_forward)`` returns (``apply`` stays upstream's)."""
        cls = vars(module).get(name)
        if cls is None:
            if required:
                self.problems.append(f"{module.__name__}.{name} not found")
            return
        forward, backward = make(self.label(cls, "forward"), self.backend, cls.forward)
        self.plan.append((cls, "forward", staticmethod(forward)))
        self.plan.append((cls, "backward", staticmethod(backward)))

    def cls(self, module, *names: str, required: bool = True) -> type | None:
        """The first of ``names`` that ``module`` defines (classes were renamed between releases)."""
        for name in names:
            value = vars(module).get(name)
            if isinstance(value, type):
                return value
        if required:
            self.problems.append(f"{module.__name__}: none of {', '.join(names)} found")
        return None

    def require_any(self, paths: tuple[str, ...]) -> None:
        if not any(p in self.found for p in paths):
            self.problems.append("none of the modules " + ", ".join(paths) + " found")

    def finish(self) -> list[tuple[object, str, object]]:
        if self.problems:
            raise UnknownLayoutError(
                f"gatednorm.patch({self.target!r}): the installed {self.target} has a layout gatednorm does not "
                "know: " + "; ".join(self.problems)
            )
        return self.plan
