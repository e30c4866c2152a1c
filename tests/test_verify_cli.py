"""`gatednorm verify`: the precision report runs, writes its outputs, and fails when a backend is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from gatednorm import native, ops
from gatednorm import verification as V
from gatednorm.cli import build_parser, main


def test_parser_has_verify_and_is_extensible():
    parser = build_parser()
    args = parser.parse_args(["verify", "--quick", "--device", "cpu"])
    assert args.command == "verify" and args.quick and callable(args.func)


def test_quick_float32_passes_and_writes_reports(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native",
               "--no-upstream", "--no-progress", "--plain", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max ulps" in out and "F.layer_norm" in out and "F.group_norm" in out and "F.rms_norm" in out
    data = json.loads(js.read_text())
    assert data["meta"]["failed"] == 0 and data["summary"] and data["results"]
    quantities = {r["quantity"] for r in data["results"]}
    assert quantities == set(V.QUANTITIES)
    assert all(r["passed"] for r in data["results"])
    text = md.read_text()
    assert "| backend | reference |" in text and "## Tolerance" in text


@pytest.fixture
def broken_backend(monkeypatch):
    """A backend whose forward is off by 1e-3 relative: verify must catch it."""
    mod = types.ModuleType("gatednorm_broken_backend")

    def forward(x, weight, bias, z, spec, out):
        mean, rstd = native.forward(x, weight, bias, z, spec, out)
        out.mul_(1 + 1e-3)
        return mean, rstd

    mod.forward, mod.backward = forward, native.backward
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(ops, "BACKENDS", (*ops.BACKENDS, "broken"))
    monkeypatch.setitem(ops._BACKEND_MODULES, "broken", mod.__name__)
    return "broken"


def test_failure_gives_nonzero_exit(broken_backend, tmp_path, capsys):
    js = tmp_path / "r.json"
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", broken_backend,
               "--no-grad", "--no-upstream", "--no-progress", "--plain", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out
    data = json.loads(js.read_text())
    assert data["meta"]["failed"] > 0
    assert any(r["quantity"] == "y" and not r["passed"] for r in data["results"])


def test_unavailable_backend_is_a_usage_error(capsys):
    assert main(["verify", "--quick", "--device", "cpu", "--backend", "nonexistent", "--no-progress"]) == 2
    assert "nonexistent" in capsys.readouterr().err


def test_available_backends_on_cpu():
    names = V.available_backends(torch.device("cpu"))
    assert "native" in names and "auto" not in names


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "gatednorm", "verify", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--json" in proc.stdout


# --- the metrics themselves -------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "spacing_at_one", "u"), [
    (torch.float32, 2.0**-23, 2.0**-24),
    (torch.float16, 2.0**-10, 2.0**-11),
    (torch.bfloat16, 2.0**-7, 2.0**-8),
])
def test_ulp_and_unit_roundoff(dtype, spacing_at_one, u):
    vals = torch.tensor([1.0, 1.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    spacing = V.ulp_of(vals, dtype)
    assert spacing.tolist() == [spacing_at_one, spacing_at_one, spacing_at_one, 2 * spacing_at_one,
                                V.min_spacing(dtype)]
    assert V.unit_roundoff(dtype) == u
    # the spacing is the gap to the next representable value
    one = torch.tensor(1.0, dtype=dtype)
    assert float(torch.nextafter(one, torch.tensor(2.0, dtype=dtype)) - one) == spacing_at_one


def test_compare_counts_ulps_and_nonfinite_mismatches():
    ref = torch.tensor([1.0, 2.0, float("nan"), float("inf"), 1e6], dtype=torch.float64)
    got = torch.tensor([1.0 + 2**-7, 2.0, float("nan"), float("inf"), float("inf")]).bfloat16()
    c = V.compare(got, ref, allowed=1.0)
    assert c.max_ulps == 1.0 and c.nonfinite_mismatch == 1 and not c.passed
    c = V.compare(got[:4], ref[:4], allowed=2**-7)
    assert c.passed and c.worst_ratio == 1.0
    # a finite reference that overflows the output dtype must be matched by inf
    c = V.compare(torch.tensor([float("inf")]).half(), torch.tensor([1e6], dtype=torch.float64), allowed=0.0)
    assert c.passed


@pytest.mark.upstream
def test_run_case_against_upstream_kernel():
    """One case against fla's kernel (interpreter on CPU): needs fla-core and TRITON_INTERPRET=1."""
    fla = V.upstream_kernel(torch.device("cpu"))
    if fla[0] is None:
        pytest.skip(fla[2])
    shape = V.Shape("8x1920/g640", (8,), 1920, 640)
    variant = V.Variant(False, "before", "swish", True, True, "bfloat16")
    results = V.run_case("native", shape, variant, torch.device("cpu"), torch.Generator().manual_seed(0), fla=fla)
    upstream = [r for r in results if r.reference == "fla"]
    assert {r.quantity for r in upstream} == set(V.QUANTITIES)
    assert all(r.passed for r in results), [(r.quantity, r.comparison.worst_ratio, r.error) for r in results]
