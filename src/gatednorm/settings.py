"""Environment settings, read in one place with one policy: on every call.

Reading a variable costs about 0.15 us (:func:`_lookup`), so every setting is looked up when it is
used; tests and users may change these variables at run time and the next call follows. The
exceptions, read when the triton backend first loads: ``TRITON_INTERPRET`` (Triton itself decides
at kernel-definition time whether it interprets), ``GATEDNORM_TRITON_FAST_LAUNCH`` and
``GATEDNORM_CXX_PLANS`` (a lookup per kernel launch, about 0.8 us, would be a measurable share of a small
call's host time) and ``GATEDNORM_TRITON_SPLIT_GROUPS`` (launch shapes are cached per group size); and
``GATEDNORM_CACHE_DIR``, read when a built extension (the native CPU kernel and its autograd node, the triton
plans' C++ entry) is first built (once per process).

==================================  =============================================================================
variable                            effect
==================================  =============================================================================
``USE_NATIVE_LAYERNORM``            the migration guide's switch, ``1``: calls without ``backend=`` run native
                                    (it takes precedence over ``GATEDNORM_BACKEND``; an explicit ``backend=``
                                    wins over both)
``GATEDNORM_BACKEND``               backend for calls without ``backend=`` when ``USE_NATIVE_LAYERNORM`` is not
                                    set (auto/native/triton/compiled; an unknown name raises on every call)
``GATEDNORM_PATCH``                 targets to patch (read by the opt-in ``.pth`` hook and ``apply_env_patch()``)
``TRITON_INTERPRET``                Triton's interpreter: lets the triton backend run on CPU tensors
``GATEDNORM_TRITON_FAST_LAUNCH``    ``0``: Triton's own (slower) launch path instead of the cached launcher
``GATEDNORM_CXX_PLANS``             ``0``: the triton backend's eager plans make their calls in Python instead of
                                    C++ (gatednorm.backends.triton.cxx_plans; the default with Triton 3.6 and a
                                    C++ compiler; the fused quantized forward's plan too since session 23)
``GATEDNORM_TRITON_SPLIT_GROUPS``   ``0``: groups that are not a power of two are one tile padded to the next power
                                    of two (default: read unpadded, two power-of-two parts (640) in the fused
                                    quantized kernel, three equal parts (96) in the forward and backward kernels)
``GATEDNORM_CPU_KERNEL``            ``0``: the native backend's pure-PyTorch block loops on CPU instead of its C
                                    kernel (which is then not built either)
``GATEDNORM_CPU_NODE``              ``0``: the native backend's eager plans of small CPU calls stay in Python (their
                                    calls, and the autograd Function of differentiable ones) instead of the C++
                                    extension's calls and autograd node (gatednorm.backends.native_cpu_node; the
                                    default where a C++ compiler builds it; read when a call signature is planned)
``GATEDNORM_CPU_OPENMP``            ``0``: the C kernel's threads are always gatednorm's own pool (default: PyTorch's
                                    OpenMP team where the kernel was built with OpenMP, the pool after a late
                                    start of the team; docs/design.md, "The native backend on CPU")
``GATEDNORM_CACHE_DIR``             where the C kernel, the CPU autograd node and the C++ plans entry are built
                                    (default ``~/.cache/gatednorm``)
``GATEDNORM_HUGE_PAGES``            ``0``: large CPU outputs keep the allocator's 4 KiB pages (default: advised
                                    onto transparent huge pages, see gatednorm.huge_pages)
==================================  =============================================================================

The backend precedence, in one table: docs/design.md, section 4, "Choosing a backend"
(implemented by :func:`gatednorm.ops.resolve_backend`).
"""

from __future__ import annotations

import os

#: Every variable gatednorm reads, in the table's order: ``gatednorm info`` (gatednorm.diagnostics) reports each
#: one that is set, so a bug report shows every setting that changed what ran. tests/test_newcomer.py checks this
#: against the table above and against the names the package reads.
VARIABLES = ("USE_NATIVE_LAYERNORM", "GATEDNORM_BACKEND", "GATEDNORM_PATCH", "TRITON_INTERPRET",
             "GATEDNORM_TRITON_FAST_LAUNCH", "GATEDNORM_CXX_PLANS", "GATEDNORM_TRITON_SPLIT_GROUPS",
             "GATEDNORM_CPU_KERNEL", "GATEDNORM_CPU_NODE", "GATEDNORM_CPU_OPENMP", "GATEDNORM_CACHE_DIR",
             "GATEDNORM_HUGE_PAGES")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: Encoded keys of the names looked up so far (the encoding of a name never changes).
_KEYS: dict[str, object] = {}


def _lookup(name: str) -> str | None:
    """``os.environ.get(name)``, without its cost on the hot path.

    ``os.environ.get`` of an unset variable takes about 0.7 us (``Mapping.get`` raises and catches a
    ``KeyError`` inside), and a call without ``backend=`` reads two variables. This does the same
    lookup ``os.environ.__getitem__`` does (encode the key, look it up in the underlying dict, decode
    the value) in about 0.15 us, so every call still sees the current environment. Where
    ``os.environ`` is not the interpreter's own mapping (replaced by an embedder or a test), the
    public path runs.
    """
    env = os.environ
    if type(env) is not os._Environ:
        return env.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = env.encodekey(name)
    value = env._data.get(key)
    return None if value is None else env.decodevalue(value)


#: The variables that choose the backend of a call without ``backend=`` (see :func:`backend_choice_key`).
_BACKEND_CHOICE = ("GATEDNORM_BACKEND", "USE_NATIVE_LAYERNORM", "TRITON_INTERPRET")


def backend_choice_key() -> tuple:
    """The current values of GATEDNORM_BACKEND, USE_NATIVE_LAYERNORM and TRITON_INTERPRET, as a key: equal keys
    mean equal values (raw, undecoded: a key, not the settings). One call where three :func:`_lookup`s cost
    about 0.35 us: the eager plans (gatednorm.ops) put it into every call's signature."""
    env = os.environ
    if type(env) is not os._Environ:
        return tuple(env.get(name) for name in _BACKEND_CHOICE)
    keys = _BACKEND_CHOICE_KEYS or _encoded_names(env)
    get = env._data.get
    return get(keys[0]), get(keys[1]), get(keys[2])


def _encoded_names(env: os._Environ) -> tuple:
    return tuple(env.encodekey(name) for name in _BACKEND_CHOICE)


#: The encoded names of _BACKEND_CHOICE, as os.environ keeps its keys (encoded once: the encoding never changes).
_BACKEND_CHOICE_KEYS = _encoded_names(os.environ) if type(os.environ) is os._Environ else None


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1/true/yes/on (any case)."""
    value = _lookup(name)
    return value is not None and value.strip().lower() in _TRUE


def env_off(name: str) -> bool:
    """True when the environment variable ``name`` is set to 0/false/no/off (any case): a switch that is on
    unless turned off."""
    value = _lookup(name)
    return value is not None and value.strip().lower() in _FALSE


def env_text(name: str) -> str:
    """The stripped value of ``name`` ('' when unset)."""
    value = _lookup(name)
    return "" if value is None else value.strip()
