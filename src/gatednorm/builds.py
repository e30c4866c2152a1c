"""Building the optional compiled parts (the native backend's C kernel, the triton plans' C++ entry): where they
are kept and how one is built without racing another process.

Each is built on first use into :func:`cache_dir`, under a name keyed by its source and its build's inputs, so a
built file is reused by every later process and a changed source or compiler builds anew.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

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
