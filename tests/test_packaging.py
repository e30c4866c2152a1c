"""Packaging: ``python -m build`` makes a wheel and an sdist, and the wheel alone works.

The wheel is unpacked into a fresh directory and imported from there by a separate interpreter (with the
source tree and the editable install out of its path), so what is tested is what users install.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SMOKE = """
import sys, torch, gatednorm
assert gatednorm.__file__.startswith(sys.argv[1]), gatednorm.__file__
x = torch.randn(4, 64, dtype=torch.bfloat16)
y = gatednorm.rmsnorm_fn(x, torch.ones(64, dtype=torch.bfloat16), None, torch.randn_like(x), group_size=32)
assert y.shape == x.shape and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
print(gatednorm.__version__)
"""


def test_build_wheel_and_sdist_and_install_the_wheel(tmp_path):
    pytest.importorskip("build")
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next(out.glob("gatednorm-*.whl"))
    sdist = next(out.glob("gatednorm-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gatednorm/py.typed" in names and "gatednorm/backends/triton/kernels.py" in names
    # the sources built on first use: the native backend's C kernel and CPU autograd node, the triton plans' C++ entry
    sources = {"gatednorm/backends/native_cpu_kernel.c", "gatednorm/backends/native_cpu_kernel.h",
               "gatednorm/backends/native_cpu_node.cpp", "gatednorm/backends/autograd_node.h",
               "gatednorm/backends/call_key.h",
               "gatednorm/backends/triton/cxx_plans.cpp"}
    assert sources <= set(names), sources - set(names)
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert any(m.endswith("/LICENSE") for m in members) and any(m.endswith("/py.typed") for m in members)
    assert any(m.endswith("/backends/native_cpu_kernel.c") for m in members)
    for source in sources:
        assert any(m.endswith("/src/" + source) for m in members), source

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    # -I: no user site, no PYTHONPATH, no script directory; the wheel's directory goes first on sys.path
    code = f"import sys; sys.path.insert(0, {str(site)!r}); exec({SMOKE!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(site)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __import__("gatednorm").__version__
