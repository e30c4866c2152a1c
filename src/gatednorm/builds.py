"""Building the optional compiled parts (the native backend's C kernel and its CPU autograd node, the triton plans'
C++ entry): where they are kept, how one is built without racing another process, and the PyTorch extensions'
shared steps (flags, build, load, a build on a background thread).

Each is built on first use into :func:`cache_dir`, under a name keyed by its source and its build's inputs, so a
built file is reused by every later process and a changed source or compiler builds anew.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

from .settings import env_text


def cache_dir() -> Path:
    """Where built extensions are kept: ``$GATEDNORM_CACHE_DIR``, else ``~/.cache/gatednorm``."""
    root = env_text("GATEDNORM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "gatednorm"


def build_once(command: list[str], path: Path, timeout: float, output_flag: str = "-o") -> str:
    """Run the compiler ``command`` with ``output_flag <temporary file>`` appended and move the result to
    ``path``, unless ``path`` exists; '' on success, else why it failed (the compiler's last words). The move is
    atomic, so processes building the same file at once each write the same bytes and none reads half a file."""
    if path.exists():
        return ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            proc = subprocess.run([*command, output_flag, str(out)], capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                return f"{command[0]} failed: {proc.stderr.strip()[-800:]}"
            os.replace(out, path)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"build failed: {type(exc).__name__}: {exc}"
    return ""


#: The C++ autograd node both PyTorch extensions record (backends/autograd_node.h: they include it; a change to it
#: must rebuild them, so it is part of their build keys).
AUTOGRAD_NODE_H = Path(__file__).parent / "backends" / "autograd_node.h"
#: The eager plans' signature key in C (call_key, key_classes), shared by the same two extensions (a build key too).
CALL_KEY_H = AUTOGRAD_NODE_H.with_name("call_key.h")


def torch_extension_flags(std: str, includes: Sequence[str | Path] = ()) -> list[str]:
    """Compiler flags for a CPython extension against this PyTorch (its headers, libraries and C++ ABI) in C++
    standard ``std``, with ``includes`` as more include directories."""
    torch_dir = Path(torch.__file__).parent
    torch_lib = str(torch_dir / "lib")
    # torch.utils.cpp_extension.include_paths()' two directories, without importing that module
    dirs = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
            sysconfig.get_paths()["include"], *includes]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", f"-std={std}", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in dirs),
            f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10", "-ldl"]


def build_torch_extension(source: Path, name: str, includes: Sequence[Path] = (),
                          key_files: Sequence[Path] = ()) -> tuple[ModuleType | None, str]:
    """(the extension module ``name`` built from the C++ ``source`` and loaded, '') or (None, why not): with
    ``$CXX``, else c++ / g++ / clang++, in C++20 (PyTorch 2.13's headers want it), else C++17 (an older compiler),
    into :func:`cache_dir` keyed by the source, ``key_files`` (headers it includes), the flags, PyTorch's version,
    Python's and the platform. ``source`` defines ``PyInit_<name>``."""
    compiler = env_text("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        return None, "no C++ compiler found (c++, g++, clang++)"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    inputs = source.read_bytes() + b"".join(f.read_bytes() for f in key_files)
    why = ""
    for std in ("c++20", "c++17"):
        flags = torch_extension_flags(std, includes)
        ident = " ".join([compiler, *flags, torch.__version__, sys.version, sys.platform]).encode()
        path = cache_dir() / f"{name}_{hashlib.sha256(inputs + ident).hexdigest()[:16]}{suffix}"
        why = build_once([compiler, str(source), *flags], path, timeout=600)
        if not why:
            break
    if why:
        return None, why
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return None, f"could not load {path}: {exc}"
    return module, ""


class BackgroundBuild:
    """One compiled extension per process, built on first use: :meth:`get` builds it in the calling thread, or
    (``wait=False``, for a hot path that must not wait the build's seconds) on a background thread, returning None
    until it is done. ``build() -> (module | None, why not)``; an exception it raises counts as a failed build."""

    def __init__(self, thread_name: str, build: Callable[[], tuple[ModuleType | None, str]]) -> None:
        self._thread_name, self._build = thread_name, build
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget_the_build_in_a_forked_child)

    def _load(self) -> None:
        with self._lock:
            if "module" not in self._state:
                try:
                    module, why = self._build()
                except Exception as exc:  # noqa: BLE001 - any failure leaves the Python path, and says why
                    module, why = None, f"build failed: {type(exc).__name__}: {exc}"
                self._state["why"], self._state["module"] = why, module

    def get(self, wait: bool = True) -> ModuleType | None:
        """The loaded extension, or None: its build failed (:meth:`why`), or, with ``wait=False``, is running."""
        if "module" in self._state:
            return self._state["module"]  # type: ignore[return-value]
        if wait:
            self._load()
            return self._state["module"]  # type: ignore[return-value]
        if "thread" not in self._state:
            with self._lock:
                if "thread" not in self._state:
                    thread = threading.Thread(target=self._load, name=self._thread_name, daemon=True)
                    self._state["thread"] = thread
                    thread.start()
        return None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background build :meth:`get` started (``wait=False``), if any."""
        thread = self._state.get("thread")
        if thread is not None:
            thread.join(timeout)  # type: ignore[attr-defined]

    def loaded(self) -> ModuleType | None:
        """The extension if it is loaded already, else None; starts no build."""
        return self._state.get("module")  # type: ignore[return-value]

    def settled(self) -> bool:
        """Whether the build has finished (the extension loaded, or failed: :meth:`why`)."""
        return "module" in self._state

    def why(self) -> str:
        """Why the build failed ('' while it has not or where it did not)."""
        return str(self._state.get("why", ""))

    def _forget_the_build_in_a_forked_child(self) -> None:
        """A child forked while the build ran has neither its thread nor, maybe, a usable lock: start afresh (the
        parent's finished build, if any, is in the cache)."""
        self._lock = threading.Lock()
        if "module" not in self._state:
            self._state.pop("thread", None)
