"""gatednorm.patch() bookkeeping, errors, GATEDNORM_PATCH / USE_NATIVE_LAYERNORM (route 2), the .pth hook,
route 3 (monkey patch before the model is built), and the one-way imports of gatednorm.integrations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from helpers import check_forward

import gatednorm
from gatednorm import integrations
from gatednorm.integrations import UnknownLayoutError, call_counts, reset_call_counts


@pytest.fixture(autouse=True)
def _nothing_left_patched():
    reset_call_counts()
    yield
    assert gatednorm.patched() == []


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="targets"):
        gatednorm.patch("not-a-framework")
    with pytest.raises(ValueError, match="backend"):
        gatednorm.patch("fla", backend="cuda")


def test_public_names():
    assert gatednorm.patch is integrations.patch and gatednorm.patched is integrations.patched
    assert {"patch", "patched"} <= set(gatednorm.__all__)


def test_target_not_installed_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setattr(integrations, "package_installed", lambda name: False)
    with pytest.warns(RuntimeWarning, match="mamba_ssm is not installed"):
        handle = gatednorm.patch("mamba_ssm")
    assert handle.skipped == {"mamba_ssm": "mamba_ssm is not installed"} and handle.replaced == []
    handle = gatednorm.patch()  # default: every installed target, silently skipping the others
    assert set(handle.skipped) == set(integrations.TARGETS)


def _fake_tree(monkeypatch, leaf_attrs: dict) -> types.ModuleType:
    """A mamba_ssm package tree in sys.modules whose layernorm_gated has ``leaf_attrs``."""
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.layernorm_gated"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    leaf = sys.modules[names[-1]]
    leaf.__dict__.update(leaf_attrs)
    return leaf


def test_unknown_layout_raises_naming_what_is_missing_and_patches_nothing(monkeypatch):
    def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, new_flag=False):
        raise AssertionError("never called")

    class RMSNorm(torch.nn.Module):
        def forward(self, x, z=None):
            raise AssertionError("never called")

    leaf = _fake_tree(monkeypatch, {"_layer_norm_fwd": _layer_norm_fwd, "RMSNorm": RMSNorm})
    with pytest.raises(UnknownLayoutError) as info:
        gatednorm.patch("mamba_ssm")
    message = str(info.value)
    for missing in ("_layer_norm_fwd: upstream signature", "_layer_norm_bwd not found", "LayerNormFn not found",
                    "none of LayerNorm found"):
        assert missing in message
    assert leaf._layer_norm_fwd is _layer_norm_fwd and "forward" in vars(RMSNorm)


def test_missing_module_raises_naming_the_paths(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    with pytest.raises(UnknownLayoutError, match="mamba_ssm.ops.triton.layernorm_gated"):
        gatednorm.patch("mamba_ssm")


def test_published_layout_fake_tree_is_patched_and_restored(monkeypatch):
    """The documented mamba_ssm signatures on a module tree built here (what runs where the package can't)."""

    def _layer_norm_fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False):
        raise AssertionError("original called")

    def _layer_norm_bwd(dy, x, weight, bias, eps, mean, rstd, z=None, group_size=None, norm_before_gate=True,
                        is_rms_norm=False, recompute_output=False, dz=None, out=None):
        raise AssertionError("original called")

    class LayerNormFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True,
                    is_rms_norm=False):
            raise AssertionError("original called")

    def layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False):
        return LayerNormFn.apply(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm)

    def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        return LayerNormFn.apply(x, weight, bias, z, eps, group_size, norm_before_gate, True)

    class RMSNorm(torch.nn.Module):
        def __init__(self, n, eps=1e-5, group_size=None, norm_before_gate=True):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n))
            self.register_parameter("bias", None)
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

        def forward(self, x, z=None):
            return rmsnorm_fn(x, self.weight, self.bias, z, self.eps, self.group_size, self.norm_before_gate)

    class LayerNorm(RMSNorm):
        pass

    attrs = dict(_layer_norm_fwd=_layer_norm_fwd, _layer_norm_bwd=_layer_norm_bwd, LayerNormFn=LayerNormFn,
                 layernorm_fn=layernorm_fn, rmsnorm_fn=rmsnorm_fn, RMSNorm=RMSNorm, LayerNorm=LayerNorm)
    leaf = _fake_tree(monkeypatch, attrs)
    before = dict(vars(leaf)), dict(vars(LayerNormFn)), dict(vars(RMSNorm)), dict(vars(LayerNorm))
    with gatednorm.patch("mamba_ssm"):
        assert len(gatednorm.patched()) == 8  # fwd, bwd, 2 functions, LayerNormFn.forward/backward, 2 forwards
        x, z = torch.randn(5, 32), torch.randn(5, 32)
        mod = RMSNorm(32, group_size=8)
        y = mod(x, z)
        check_forward(y, None, None, x, mod.weight, None, z, 1e-5, 8, True, True, stats=False)
        y = LayerNormFn.apply(x, mod.weight, None, z, 1e-5, 8, True, True)
        check_forward(y, None, None, x, mod.weight, None, z, 1e-5, 8, True, True, stats=False)
    after = dict(vars(leaf)), dict(vars(LayerNormFn)), dict(vars(RMSNorm)), dict(vars(LayerNorm))
    for b, a in zip(before, after, strict=True):
        assert a.keys() == b.keys() and all(a[k] is b[k] for k in b)


def test_route3_monkey_patch_before_the_model_is_built():
    pytest.importorskip("fla")
    import fla.modules.norm.fused_norm_gate as fused

    x, g = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    with gatednorm.patch("fla", backend="native"):
        norm = fused.FusedRMSNormGated(64, eps=1e-5)  # "the model" built after the patch
        y = norm(x, g)
    assert call_counts() == {"fla.modules.norm.fused_norm_gate.FusedRMSNormGated.forward@native": 1}
    check_forward(y, None, None, x, norm.weight, None, g, 1e-5, None, True, True, stats=False)


ROUTE2_SCRIPT = textwrap.dedent("""
    import sys, torch
    {prelude}
    import gatednorm
    {apply}
    from gatednorm.reference import gated_norm_reference
    import fla.modules.norm.layernorm_gated as m
    assert m.layernorm_fn.__module__ == "gatednorm.integrations._wrappers", m.layernorm_fn.__module__
    x, z, w = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    y = m.rmsnorm_fn(x, w, None, z, group_size=16, norm_before_gate=False)
    ref = gated_norm_reference(x, w, None, z, 1e-6, 16, False, True)[0]
    err = float((y.double() - ref).abs().max())
    print("ERR", err)
    print("CALLS", sorted(gatednorm.integrations.call_counts()))
    print("PATCHED", len(gatednorm.patched()))
""")


def _run(script: str, **env: str) -> str:
    full_env = {**os.environ, **env}
    for key in ("GATEDNORM_PATCH", "USE_NATIVE_LAYERNORM", "GATEDNORM_BACKEND"):
        if key not in env:
            full_env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_route2_environment_switches_in_a_subprocess():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    # triton requested for CPU tensors (possible under TRITON_INTERPRET=1), but USE_NATIVE_LAYERNORM wins
    script = ROUTE2_SCRIPT.format(prelude="", apply="gatednorm.integrations.apply_env_patch()")
    out = _run(script, GATEDNORM_PATCH="fla", USE_NATIVE_LAYERNORM="1", GATEDNORM_BACKEND="triton",
               TRITON_INTERPRET="1")
    assert "CALLS ['fla.modules.norm.layernorm_gated.rmsnorm_fn@native']" in out
    # kept as a fixed bound: the child process prints only its max abs error, not its inputs or output
    assert float(out.split("ERR ")[1].split()[0]) < 2e-5


def test_import_does_not_apply_the_env_patch():
    out = _run("import gatednorm; print('PATCHED', gatednorm.patched())", GATEDNORM_PATCH="all")
    assert "PATCHED []" in out


def test_env_patch_with_an_unknown_target_warns_and_returns_none():
    script = ("import gatednorm.integrations as g; h = g.apply_env_patch(); "
              "print('HANDLE', h, 'PATCHED', g.patched())")
    out = _run(script, GATEDNORM_PATCH="nope")
    assert "HANDLE None PATCHED []" in out and "GATEDNORM_PATCH='nope'" in out


def test_env_patch_unset_or_off_does_nothing(monkeypatch):
    for value in (None, "", " ", "0", "off", "None"):
        if value is None:
            monkeypatch.delenv("GATEDNORM_PATCH", raising=False)
        else:
            monkeypatch.setenv("GATEDNORM_PATCH", value)
        assert integrations.apply_env_patch() is None


_IMPORT_ORDER_SCRIPT = textwrap.dedent("""
    import importlib, sys
    for name in {order!r}:
        importlib.import_module("gatednorm.integrations." + name)
    import gatednorm.integrations as g
    assert g.call_counts is sys.modules["gatednorm.integrations.counters"].call_counts
    print("OK")
""")


@pytest.mark.parametrize("order", [("_core", "_wrappers"), ("_wrappers", "_core"), ("counters",), ("hook",),
                                   ("transformers", "fla")])
def test_submodules_import_in_any_order(order):
    assert "OK" in _run(_IMPORT_ORDER_SCRIPT.format(order=list(order)))


def test_imports_run_one_way_and_reach_no_backend_module():
    """``_core``/``counters``/``hook`` import no sibling; nothing here imports a backend module directly."""
    import ast
    import pathlib

    forbidden = {"backends", "native", "triton_kernels", "compiled"}
    for path in pathlib.Path(integrations.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(filter(None, ({0: "", 1: "integrations", 2: ""}[node.level], node.module)))
                modules = [base] + [".".join(filter(None, (base, a.name))) for a in node.names]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                parts = module.removeprefix("gatednorm.").split(".")
                assert parts[0] not in forbidden, f"{path.name} imports {module}"
                if path.stem in ("_core", "counters", "hook"):
                    assert parts[0] != "integrations", f"{path.name} imports {module}"


def test_install_hook_patches_at_interpreter_start(tmp_path):
    pytest.importorskip("fla")
    from gatednorm.cli import main

    site_dir = str(tmp_path)
    assert main(["install-hook", "--site-dir", site_dir]) == 0
    pth = tmp_path / "gatednorm-patch-hook.pth"
    assert pth.exists()
    # site.addsitedir processes .pth files as interpreter start does for site-packages
    prelude = f"import site; site.addsitedir({site_dir!r}); assert 'gatednorm' in sys.modules"
    out = _run(ROUTE2_SCRIPT.format(prelude=prelude, apply=""), GATEDNORM_PATCH="fla")
    assert "fla.modules.norm.layernorm_gated.rmsnorm_fn@" in out
    # without GATEDNORM_PATCH the hook does not even import gatednorm
    out = _run(f"import site, sys; site.addsitedir({site_dir!r}); print('LOADED', 'gatednorm' in sys.modules)")
    assert "LOADED False" in out
    assert main(["uninstall-hook", "--site-dir", site_dir]) == 0
    assert not pth.exists()
    assert main(["uninstall-hook", "--site-dir", site_dir]) == 0  # nothing to remove: still fine
