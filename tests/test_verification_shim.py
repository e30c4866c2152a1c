"""gatednorm.verification (the module before the verify package) re-exports every public name of gatednorm.verify."""

from __future__ import annotations

import subprocess
import sys

import gatednorm.verify as V
from gatednorm import verification


def test_every_verify_name_is_reachable_from_the_shim():
    missing = [name for name in V.__all__ if not hasattr(verification, name)]
    assert not missing, f"gatednorm.verification lacks {missing}"
    different = [name for name in V.__all__ if getattr(verification, name) is not getattr(V, name)]
    assert not different, f"gatednorm.verification re-exports other objects for {different}"
    assert set(verification.__all__) == set(V.__all__)


def test_star_import_from_the_shim_gives_the_verify_names():
    """``from gatednorm.verification import *`` in a fresh interpreter binds exactly verify's names."""
    code = ("import gatednorm.verify as V\n"
            "before = set(globals())\n"
            "from gatednorm.verification import *\n"
            "got = set(globals()) - before - {'before'}\n"
            "assert got == set(V.__all__), sorted(got ^ set(V.__all__))\n"
            "assert all(globals()[n] is getattr(V, n) for n in V.__all__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
