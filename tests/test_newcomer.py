"""A new user's first hour (issue 13): setup, CLI conventions, backend precedence, module checks,
patch failures that leave no trace, verify's messages and its JSON schema, ``gatednorm.info()``."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import gatednorm
from gatednorm import integrations, ops
from gatednorm.backends.native_cpu import NativeCPUBackend
from gatednorm.cli import main
from gatednorm.verify import report, runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("GATEDNORM_PATCH", "GATEDNORM_BACKEND", "USE_NATIVE_LAYERNORM")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=240)


# --- setup and packaging --------------------------------------------------------------------------------------

def _recipe(makefile: str, target: str) -> str:
    """The recipe lines of ``target`` in the Makefile."""
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        body.append(line)
    return "\n".join(body)


def test_make_run_installs_only_the_main_job():
    makefile = (ROOT / "Makefile").read_text()
    main_job = _recipe(makefile, "$(STAMP)")
    for framework in ("sglang", "vllm", "fla-core", "mamba", "transformers", "test"):
        assert framework not in main_job, framework
    # torch first, from its pin, before anything that could pull another torch
    assert main_job.index("$(TORCH_PIN)") < main_job.index("-e ")
    test_job = _recipe(makefile, "$(TEST_STAMP)")
    assert "--no-deps" in test_job and "echo" in test_job  # one line says why
    # every install with dependencies comes before the --no-deps ones (pip's check would list their pins)
    assert test_job.index("-c constraints-integrations.txt") < test_job.index("--no-deps")
    assert re.search(r"^run: setup$", makefile, re.M) and re.search(r"^test: setup-test$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make lint" in ci


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"  # a TOML table warns: deprecated in setuptools >= 77
    requires = data["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires), requires
    assert "slow" in " ".join(data["tool"]["pytest"]["ini_options"]["markers"])


def test_version_has_one_source():
    from gatednorm import _version

    assert gatednorm.__version__ == _version.__version__
    data = _pyproject()
    assert data["project"]["dynamic"] == ["version"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gatednorm._version.__version__"}


# --- CLI conventions ------------------------------------------------------------------------------------------

def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"gatednorm {gatednorm.__version__}"


def test_no_subcommand_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: gatednorm" in out and "verify" in out and "info" in out


def test_console_entry_point_without_arguments():
    proc = subprocess.run([sys.executable, "-m", "gatednorm"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: gatednorm" in proc.stdout, proc.stderr


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"gatednorm {gatednorm.__version__}" in out and "torch" in out and "cpu" in out and "auto" in out
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"][0]["device"] == "cpu"


# --- gatednorm.info() and triton_available() ------------------------------------------------------------------

def test_info_dict():
    data = gatednorm.info()
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert data["gatednorm"] == gatednorm.__version__ and data["torch"] == torch.__version__
    assert set(data["triton"]) >= {"version", "backend_importable", "note"}
    assert data["triton"]["backend_importable"] == gatednorm.triton_available()
    # the triton plans' C++ entry: in use, or why not (here: no CUDA driver, another Triton, no backend)
    assert isinstance(data["triton_cxx_plans"], str) and data["triton_cxx_plans"]
    assert data["triton_cxx_plans"] in gatednorm.diagnostics.format_info(data)
    # the native backend's CPU autograd node: in use, or why not (no C++ compiler, GATEDNORM_CPU_NODE=0)
    assert isinstance(data["native_cpu_node"], str) and data["native_cpu_node"]
    assert data["native_cpu_node"] in gatednorm.diagnostics.format_info(data)
    cpu = data["devices"][0]
    assert cpu["device"] == "cpu" and cpu["auto"] == "native" and "CUDA" in cpu["auto_reason"]
    assert cpu["default"] == gatednorm.resolve_backend(None, torch.device("cpu"))
    assert cpu["backends"]["native"] == "ok"
    if gatednorm.triton_available() and not os.environ.get("TRITON_INTERPRET"):
        assert "CUDA" in cpu["backends"]["triton"]


def test_info_explains_the_environment(monkeypatch):
    monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")
    cpu = gatednorm.info()["devices"][0]
    assert cpu["default"] == "native" and "USE_NATIVE_LAYERNORM" in cpu["default_reason"]
    monkeypatch.delenv("USE_NATIVE_LAYERNORM")
    monkeypatch.setenv("GATEDNORM_BACKEND", "bogus")
    cpu = gatednorm.info()["devices"][0]
    assert cpu["default"] is None and "GATEDNORM_BACKEND" in cpu["default_reason"]


def test_info_reports_every_variable_gatednorm_reads(monkeypatch):
    """settings.VARIABLES, what ``gatednorm info`` reports, is every name in settings' table and every name the
    package reads (string literals in src/gatednorm), so a bug report shows each setting that changed what ran."""
    from gatednorm import settings

    src = pathlib.Path(gatednorm.__file__).parent
    read = set()
    for path in src.rglob("*.py"):
        read |= set(re.findall(r'"((?:GATEDNORM|USE_NATIVE|TRITON)_[A-Z_]+)"', path.read_text()))
    table = set(re.findall(r"^``([A-Z_]+)``", settings.__doc__, re.MULTILINE))
    assert len(settings.VARIABLES) == len(set(settings.VARIABLES))
    assert set(settings.VARIABLES) == table == read, (set(settings.VARIABLES) ^ table, set(settings.VARIABLES) ^ read)
    monkeypatch.setenv("GATEDNORM_TRITON_SPLIT_GROUPS", "0")
    data = gatednorm.info()
    assert data["settings"]["GATEDNORM_TRITON_SPLIT_GROUPS"] == "0"
    assert "GATEDNORM_TRITON_SPLIT_GROUPS=0" in gatednorm.diagnostics.format_info(data)


def test_triton_available_says_importable_not_usable():
    doc = gatednorm.triton_available.__doc__
    assert "import" in doc and "TRITON_INTERPRET" in doc and "info" in doc
    if not gatednorm.triton_available():
        pytest.skip("Triton is not importable here")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    env_before = os.environ.pop("TRITON_INTERPRET", None)
    try:  # importable, yet CPU tensors cannot use it: the error says why
        with pytest.raises(ValueError, match="CUDA"):
            gatednorm.resolve_backend("triton", torch.device("cpu"))
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before


def test_import_stays_light_and_info_loads_triton_lazily():
    code = textwrap.dedent("""
        import sys, gatednorm
        heavy = [m for m in ("triton", "torch._dynamo", "transformers", "fla") if m in sys.modules]
        print("HEAVY", heavy)
        data = gatednorm.info()
        print("TRITON", data["triton"]["version"] is None or "triton" in sys.modules)
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout and "TRITON True" in proc.stdout


# --- backend precedence (docs/design.md, "Choosing a backend") ------------------------------------------------

class _Recording:
    def __init__(self) -> None:
        self.inner = NativeCPUBackend()
        self.name, self.supports_float64 = "recording", True
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.inner.forward(*args)

    def backward(self, *args):
        return self.inner.backward(*args)


@pytest.fixture
def compiled_is_recorded():
    """backend='compiled' on CPU served by a recording native implementation (no torch.compile here)."""
    rec = _Recording()
    with ops.override_impl("compiled", "cpu", rec):
        yield rec


def test_explicit_backend_wins_over_use_native_layernorm(monkeypatch, compiled_is_recorded):
    monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")
    x, w = torch.randn(3, 32), torch.ones(32)
    gatednorm.layer_norm_fwd(x, w, None, 1e-6, backend="compiled")
    assert compiled_is_recorded.calls == 1  # before: USE_NATIVE_LAYERNORM silently ran native
    gatednorm.RMSNorm(32, backend="compiled")(x)
    assert compiled_is_recorded.calls == 2
    gatednorm.layer_norm_fwd(x, w, None, 1e-6)  # no backend=: the switch's native
    assert compiled_is_recorded.calls == 2


def test_precedence_table(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("GATEDNORM_BACKEND", "compiled")
    assert gatednorm.resolve_backend(None, cpu) == "compiled"  # row 3
    monkeypatch.setenv("USE_NATIVE_LAYERNORM", "1")
    assert gatednorm.resolve_backend(None, cpu) == "native"  # row 2 above row 3
    assert gatednorm.resolve_backend("compiled", cpu) == "compiled"  # row 1 above both
    assert gatednorm.resolve_backend("auto", cpu) == "native"  # an explicit auto is auto
    monkeypatch.setenv("GATEDNORM_BACKEND", "bogus")  # still checked while row 2 decides
    with pytest.raises(ValueError, match="GATEDNORM_BACKEND"):
        gatednorm.resolve_backend(None, cpu)


def test_unusable_request_names_where_it_came_from(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.override_impl("triton", ops.ANY_DEVICE, ImportError("no module named 'triton'")):  # as without Triton
        with pytest.raises(ValueError, match=r"backend='triton' cannot be used: Triton"):
            gatednorm.resolve_backend("triton", torch.device("cpu"))
        monkeypatch.setenv("GATEDNORM_BACKEND", "triton")
        with pytest.raises(ValueError, match="GATEDNORM_BACKEND"):
            gatednorm.resolve_backend(None, torch.device("cpu"))


def test_precedence_is_documented_in_one_table():
    design = (ROOT / "docs" / "design.md").read_text()
    assert design.count("| # | setting | scope | effect |") == 1
    for doc in ("README.md", "docs/usage.md"):
        text = (ROOT / doc).read_text()
        assert "design.md#choosing-a-backend" in text, doc
        assert "even over an explicit" not in text and "it wins over\n  `backend=`" not in text, doc
    settings_doc = sys.modules["gatednorm.settings"].__doc__
    assert "explicit ``backend=``" in settings_doc and "wins" in settings_doc
    assert "Choosing a backend" in settings_doc


# --- modules check their arguments when built -----------------------------------------------------------------

@pytest.mark.parametrize("cls", [gatednorm.LayerNorm, gatednorm.RMSNorm])
@pytest.mark.parametrize("kwargs,exc,word", [
    ({"eps": -1e-5}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": "1e-5"}, TypeError, "eps"),
    ({"group_size": 5}, ValueError, "group_size"),
    ({"group_size": 0}, ValueError, "group_size"),
    ({"group_size": 64.0}, TypeError, "group_size"),
    ({"norm_before_gate": 1}, TypeError, "norm_before_gate"),
    ({"activation": "gelu"}, ValueError, "activation"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_module_arguments_are_checked_at_construction(cls, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        cls(256, **kwargs)


def test_module_hidden_size_checks():
    with pytest.raises(TypeError, match="hidden_size"):
        gatednorm.RMSNorm(256.0)
    with pytest.raises(ValueError, match="hidden_size"):
        gatednorm.RMSNorm(-1)
    norm = gatednorm.RMSNorm(256, eps=0, group_size=64, backend="triton")  # valid names; the device decides later
    assert norm.eps == 0.0 and isinstance(norm.eps, float)


# --- a failed patch target leaves no trace --------------------------------------------------------------------

def _broken_mamba(tmp_path: pathlib.Path) -> None:
    """A mamba_ssm whose package __init__ fails after a submodule loaded (like the real one without CUDA)."""
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import mamba_ssm.ops.triton.layer_norm\nimport selective_scan_cuda_missing\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "layer_norm.py").write_text("X = 1\n")
    # a module that would patch cleanly: if the second attempt reached it, patch() would succeed
    (pkg / "ops" / "triton" / "layernorm_gated.py").write_text("raise AssertionError('must not be imported')\n")


@pytest.fixture
def broken_mamba(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    _broken_mamba(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_failed_target_import_fails_alike_every_time(broken_mamba):
    for _ in range(3):  # before the fix: ImportError, then the second call imported layernorm_gated directly
        with pytest.raises(ImportError, match="selective_scan_cuda_missing"):
            gatednorm.patch("mamba_ssm")
        # what a plain `import mamba_ssm` leaves (its finished submodules), never the module patch() wanted
        assert "mamba_ssm" not in sys.modules and "mamba_ssm.ops.triton.layernorm_gated" not in sys.modules
    assert gatednorm.patched() == []


def test_failed_target_is_skipped_the_same_way_every_time(broken_mamba, monkeypatch):
    monkeypatch.setattr(integrations, "TARGETS", ("mamba_ssm",))  # patch(): every target, here only this one
    skipped = []
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="mamba_ssm"):
            handle = gatednorm.patch()
        skipped.append(handle.skipped.get("mamba_ssm", ""))
        assert handle.targets == []
        handle.undo()
    assert skipped[0] == skipped[1] and "importing it failed" in skipped[0]


def test_real_frameworks_that_do_not_import_fail_alike_twice():
    """make test's mamba_ssm (no CUDA extensions), sglang and vLLM (no dependencies): the same error twice.
    Removing the failed import's modules instead would break vLLM's re-import (torch opaque types)."""
    code = textwrap.dedent("""
        import importlib.util, warnings
        warnings.simplefilter("ignore")
        import gatednorm
        for target in ("mamba_ssm", "vllm", "sglang"):
            if importlib.util.find_spec(target) is None:
                continue
            results = []
            for _ in range(2):
                try:
                    gatednorm.patch(target).undo(); results.append("ok")
                except Exception as exc:
                    results.append(type(exc).__name__)
            print("RESULTS", target, results)
    """)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("RESULTS")]
    if not lines:
        pytest.skip("none of mamba_ssm, vllm, sglang is installed")
    for target, results in lines:
        first, second = eval(results)  # noqa: S307 - our own printed list
        assert first == second, (target, results)


# --- verify's messages ----------------------------------------------------------------------------------------

def test_verify_unknown_backend_names_the_valid_ones(capsys):
    assert main(["verify", "--quick", "--backend", "bogus", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'bogus'" in err and "native, triton, compiled" in err
    assert "not available on" not in err


def test_verify_unavailable_backend_says_why(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.override_impl("triton", ops.ANY_DEVICE, ImportError("no module named 'triton'")):  # as without Triton
        assert main(["verify", "--quick", "--device", "cpu", "--backend", "triton", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backend 'triton' cannot run on cpu" in err and "Triton" in err and "Available on cpu: native" in err


def test_upstream_not_installed_says_so(monkeypatch):
    real = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name, *a: None if name == "fla" else real(name))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fwd, fn, why = runner.upstream_kernel(torch.device("cpu"))
    assert fwd is None and "not installed" in why and "TRITON_INTERPRET" not in why


def test_summary_points_to_the_tolerance_module(capsys):
    assert main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native", "--no-grad",
                 "--no-upstream", "--no-progress", "--plain", "--progress-every", "0", "--max-seconds", "0"]) == 3
    out = capsys.readouterr().out
    assert "(see gatednorm.verify.tolerance)" in out and "gatednorm.verification" not in out


# --- verify's JSON schema -------------------------------------------------------------------------------------

def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_json_schema_version_snake_case_and_one_complete(tmp_path):
    js = tmp_path / "r.json"
    assert main(["verify", "--quick", "--device", "cpu", "--dtype", "bfloat16", "--backend", "native", "--no-grad",
                 "--no-upstream", "--no-progress", "--plain", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["schema_version"] == report.SCHEMA_VERSION == 1
    assert list(data) == ["schema_version", "complete", "meta", "tolerance", "summary", "results"]
    bad = sorted(k for k in _keys(data) if not re.fullmatch(r"[a-z][a-z0-9_]*", k))
    assert not bad, bad
    assert data["complete"] is True and "complete" not in data["meta"]
    assert data["meta"]["backends"] == ["native"] and isinstance(data["meta"]["shapes"], list)
    assert data["meta"]["gatednorm"] == gatednorm.__version__
    assert report.load_json_report(str(js)) == data
    documented = (ROOT / "docs" / "verify-json.md").read_text()
    for key in _keys(data):  # every key is documented
        assert f"`{key}`" in documented, key


#: A report as gatednorm wrote it before schema_version (trimmed to one result).
V0_REPORT = {
    "complete": False,
    "meta": {"device": "cpu", "device_name": "x86_64", "torch": "2.13.0+cpu", "backends": "native, triton",
             "upstream": "skipped: fla needs TRITON_INTERPRET=1 on CPU", "shapes": "33x256/g64; 2x4x96/g32",
             "eps": 1e-6, "complete": False, "status": "incomplete: 1 of 2 cases run (SIGTERM)", "cases": 2,
             "cases_run": 1, "stopped": "SIGTERM", "interrupted_case": "native 2x4x96/g32 ln", "checks": 1,
             "failed": 0, "seconds": 1.5},
    "tolerance": [{"dtype": "float32", "rounding u(O)": 2**-24, "compute u(C)": 2**-24, "rule": "..."}],
    "summary": [{"backend": "native", "reference": "float64", "dtype": "float32", "quantity": "y", "cases": 1,
                 "failed": 0, "max_abs": 1e-7, "max_ulps": 1.0, "worst_ratio": 0.1, "mean_abs": 1e-8,
                 "passed": True}],
    "results": [{"backend": "native", "shape": "33x256/g64", "variant": "ln gate=none bias 1group float32",
                 "dtype": "float32", "reference": "float64", "quantity": "y", "error": "", "max_abs": 1e-7,
                 "mean_abs": 1e-8, "max_ulps": 1.0, "worst_ratio": 0.1, "nonfinite_mismatch": 0, "numel": 8448,
                 "passed": True}],
}


def test_old_format_report_still_loads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(V0_REPORT))
    data = report.load_json_report(str(path))
    assert data["schema_version"] == 1 and data["complete"] is False and "complete" not in data["meta"]
    assert data["meta"]["backends"] == ["native", "triton"]
    assert data["meta"]["shapes"] == ["33x256/g64", "2x4x96/g32"]
    assert data["tolerance"][0]["unit_roundoff_output"] == 2**-24 and "rounding u(O)" not in data["tolerance"][0]
    results = [runner.Result.from_dict(r) for r in data["results"]]  # what verify --jobs merges
    assert results[0].passed and results[0].comparison.numel == 8448
    assert V0_REPORT["meta"]["complete"] is False  # the input is not modified


def test_newer_or_foreign_reports_are_refused():
    with pytest.raises(ValueError, match="newer"):
        report.upgrade_json_report({**V0_REPORT, "schema_version": report.SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="not a gatednorm verify"):
        report.upgrade_json_report({"results": []})
