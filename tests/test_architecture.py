"""The package's structure as behaviour: one door to the backends, one formula, a light import.

* the registry decides which implementation serves a call, and tests route through it (no patching);
* :mod:`gatednorm.numerics` (the formula the reference and the whole-tensor paths share) agrees with
  PyTorch's own norms in float64, so the reference is held to an independent definition;
* ``import gatednorm`` imports neither ``torch._dynamo`` nor Triton nor any backend, and patches nothing.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import check_pair, make_inputs

import gatednorm
from gatednorm import numerics, ops
from gatednorm.backends.base import Backend
from gatednorm.backends.native_accel import NativeAccelBackend
from gatednorm.backends.native_cpu import NativeCPUBackend
from gatednorm.spec import NormSpec

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "gatednorm"


class RecordingBackend:
    """Wraps another implementation and records the calls that reach it."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.supports_float64 = inner.supports_float64
        self.calls: list[str] = []

    def forward(self, *args):
        self.calls.append("forward")
        return self.inner.forward(*args)

    def backward(self, *args):
        self.calls.append("backward")
        return self.inner.backward(*args)


def test_registry_selects_per_device_type():
    assert isinstance(ops.select_impl("native", torch.device("cpu")), NativeCPUBackend)
    # every other device type takes the accelerator path (meta stands in for a GPU here)
    assert isinstance(ops.select_impl("native", torch.device("meta")), NativeAccelBackend)
    for name in ("native", "compiled"):
        assert isinstance(ops.select_impl(name, torch.device("cpu")), Backend)


def test_override_routes_every_entry_point_and_restores():
    before = ops.select_impl("native", torch.device("cpu"))
    rec = RecordingBackend(NativeCPUBackend())
    x, z, w, b = make_inputs(5, 64, torch.float32, seed=1)
    x.requires_grad_()
    with ops.override_impl("native", "cpu", rec):
        y = gatednorm.layernorm_fn(x, w, b, z, group_size=32, backend="native")
        y.sum().backward()
        gatednorm.layer_norm_fwd(x.detach(), w, b, 1e-6, z=z, backend="native")
        gatednorm.LayerNorm(64, backend="native")(x.detach())
    assert rec.calls == ["forward", "backward", "forward", "forward"]
    assert ops.select_impl("native", torch.device("cpu")) is before


def test_empty_batch_never_reaches_a_backend():
    rec = RecordingBackend(NativeCPUBackend())
    x = torch.empty(0, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    with ops.override_impl("native", "cpu", rec):
        y = gatednorm.rmsnorm_fn(x, w, None, group_size=16, backend="native")
        y.sum().backward()
    assert rec.calls == [] and y.shape == (0, 64) and (w.grad == 0).all()


def test_float64_goes_to_native_for_float32_kernels():
    fake = RecordingBackend(NativeCPUBackend())
    fake.supports_float64 = False  # like the triton backend, whose kernels compute in float32
    rec = RecordingBackend(NativeCPUBackend())
    x, z, w, b = make_inputs(3, 32, torch.float64, seed=2)
    with ops.override_impl("compiled", "cpu", fake), ops.override_impl("native", "cpu", rec):
        gatednorm.layer_norm_fwd(x, w, b, 1e-6, z=z, backend="compiled")
        gatednorm.layer_norm_fwd(x.float(), w.float(), b.float(), 1e-6, z=z.float(), backend="compiled")
    assert rec.calls == ["forward"] and fake.calls == ["forward"]


@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_numerics_formula_equals_torch_norms_in_float64(group_size, rms):
    """The shared formula (and so the reference) against F.layer_norm / F.group_norm / F.rms_norm."""
    m, n = 7, 64
    x, _, w, b = make_inputs(m, n, torch.float64, gate=False, seed=3)
    gs = group_size or n
    spec = NormSpec(1e-5, gs, True, rms, "swish")
    y, mean, rstd = numerics.forward_rows(x, w, None if rms else b, None, spec, rescue=True)
    if rms:
        want = F.rms_norm(x.view(m, n // gs, gs), (gs,), eps=1e-5).view(m, n) * w
    elif group_size is None:
        want = F.layer_norm(x, (n,), w, b, eps=1e-5)
    else:
        want = F.group_norm(x.view(m, n, 1), n // gs, w, b, eps=1e-5).view(m, n)
    check_pair(y.reshape(m, n), want, x, w, None if rms else b, None, 1e-5, gs, True, rms)
    assert rstd.shape == (m, n // gs) and (mean is None) == rms


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_gate_derivative_is_the_derivative(activation):
    z = torch.randn(257, dtype=torch.float64, requires_grad=True)
    act, dact = numerics.gate_activation_and_derivative(z.detach(), activation)
    numerics.gate_activation(z, activation).sum().backward()
    torch.testing.assert_close(dact, z.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(act, numerics.gate_activation(z.detach(), activation), rtol=0, atol=0)


def _imports_of(path: pathlib.Path) -> set[str]:
    """Absolute names of the gatednorm modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("gatednorm")}


def test_no_module_outside_ops_imports_a_backend():
    """Backends are reached through the registry in ops only (the old-path shims excepted)."""
    shims = {"native.py", "compiled.py", "triton_kernels.py"}
    offenders = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] == "backends" or str(rel) in shims or str(rel) == "ops.py":
            continue
        bad = sorted(n for n in _imports_of(path) if n.startswith("gatednorm.backends")
                     and n != "gatednorm.backends.base" and not n.startswith("gatednorm.backends.base."))
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_import_is_light_and_patches_nothing():
    code = (
        "import json, sys, gatednorm\n"
        "heavy = ['torch._dynamo', 'triton', 'gatednorm.backends.native_cpu', 'gatednorm.backends.triton',"
        " 'gatednorm.backends.compiled', 'gatednorm.integrations._wrappers', 'transformers']\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    env = dict(os.environ, GATEDNORM_PATCH="all")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == [], out.stdout
    assert out.stderr == ""
