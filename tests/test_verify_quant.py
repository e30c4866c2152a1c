"""`gatednorm verify` with the quantized cases (gated_norm_quant): the CLI, the report, the judgement's rows.

The quantized cases run by default beside the norm's; ``--quant`` runs only them, ``--no-quant`` none.
Each case gives two rows against ``float64/<format>``: ``scale`` and ``q``, judged as
gatednorm.verify.quantized.judge_quant decides (the criterion of ``python -m gatednorm.verify.quant``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gatednorm
from gatednorm import ops
from gatednorm import verify as V
from gatednorm.cli import build_parser, main
from gatednorm.spec import QUANT_FORMATS, quant_dtype, quant_max
from gatednorm.verify import cases, parallel, quantized, report, runner, session

SRC = str(Path(__file__).resolve().parents[1] / "src")
COMMON = ["--device", "cpu", "--quick", "--no-progress", "--plain", "--progress-every", "0"]
CPU = torch.device("cpu")


def _quant_rows(rows):
    return [r for r in rows if r["quantity"] in V.QUANT_QUANTITIES]


# --- the command line ------------------------------------------------------------------------------------


def test_quant_quick_json_has_passing_quant_rows_per_backend(tmp_path, capsys):
    """`gatednorm verify --device cpu --quant --quick --json PATH`: only quantized rows, all passing, for every
    backend verify picks on CPU (native; triton under TRITON_INTERPRET=1, as conftest sets without a GPU)."""
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["verify", "--quant", *COMMON, "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = report.load_json_report(str(js))
    assert data == json.loads(js.read_text())  # the current schema as written
    assert data["schema_version"] == report.SCHEMA_VERSION and data["complete"] is True
    results = data["results"]
    assert results and _quant_rows(results) == results  # --quant: nothing else
    assert all(r["passed"] for r in results)
    meta = data["meta"]
    assert meta["failed"] == 0 and meta["cases_run"] == meta["cases"] == len(results) // 2
    assert meta["shapes"] == [s.name for s in quantized.quant_shapes(quick=True)]
    assert "--quant" in meta["upstream"]
    backends = set(V.available_backends(CPU)) - {"compiled"}
    assert set(meta["backends"]) == backends == {r["backend"] for r in results}
    # every backend x format x input dtype has a scale and a q row in the summary
    keys = {(s["backend"], s["reference"], s["dtype"], s["quantity"]) for s in data["summary"]}
    assert keys == {(b, f"float64/{f}", d, q) for b in backends for f in QUANT_FORMATS
                    for d in ("float32", "bfloat16", "float16") for q in ("scale", "q")}
    assert all(s["passed"] and s["worst_ratio"] <= 1 for s in data["summary"])
    assert "float64/fp8_e4m3fnuz" in out and V.QUANT_RULE in out and "FAIL" not in out
    text = md.read_text()
    assert "## Quantized output" in text and "| native | float64/int8 |" in text


def test_console_command_quant_quick_json(tmp_path):
    """The same through the installed entry point's module (`python -m gatednorm verify ...`), native only."""
    js = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "gatednorm", "verify", "--quant", *COMMON, "--backend", "native",
                           "--json", str(js)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(js.read_text())
    assert data["results"] and all(r["passed"] and r["quantity"] in ("scale", "q") for r in data["results"])
    assert {r["reference"] for r in data["results"]} == {f"float64/{f}" for f in QUANT_FORMATS}


def test_default_run_includes_the_quant_cases_and_no_quant_skips_them(tmp_path):
    js = tmp_path / "r.json"
    args = ["verify", *COMMON, "--dtype", "float32", "--backend", "native", "--no-upstream", "--no-grad"]
    assert main([*args, "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    quant_rows = _quant_rows(data["results"])
    assert quant_rows and all(r["passed"] for r in data["results"])
    assert len(quant_rows) < len(data["results"])  # and the norm's rows
    assert main([*args, "--no-quant", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["results"] and not _quant_rows(data["results"])
    assert not any(name in data["meta"]["shapes"] for name in (s.name for s in quantized.quant_shapes(True)))


def test_quant_and_no_quant_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["verify", "--quant", "--no-quant"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_session_options_match_the_cli_defaults():
    """session.options() (what `python -m gatednorm.verify.quant` runs verify with) has the CLI's defaults."""
    parsed = vars(build_parser().parse_args(["verify"]))
    parsed.pop("command"), parsed.pop("func")
    assert parsed == session.OPTION_DEFAULTS == vars(session.options())
    with pytest.raises(TypeError, match="unknown verify option"):
        session.options(bogus=1)


def test_plan_interleaves_quant_cases_in_proportion():
    plan = session.make_plan(session.options(device="cpu", quick=True, backend=["native"], dtype=["float32"]), 0.0)
    kinds = [isinstance(v, quantized.QuantVariant) for _, _, v in plan.cases]
    n_quant = sum(kinds)
    assert n_quant == len(quantized.quant_cases(quick=True, dtypes=("float32",)))
    assert 0 < n_quant < len(kinds)
    share = n_quant / len(kinds)
    for prefix in (10, 50, len(kinds) // 2):  # every prefix holds both kinds in about the run's shares
        assert abs(sum(kinds[:prefix]) - share * prefix) <= 1
    only = session.make_plan(session.options(device="cpu", quick=True, backend=["native"], quant="only"), 0.0)
    assert only.cases and all(isinstance(v, quantized.QuantVariant) for _, _, v in only.cases)
    assert only.shapes == quantized.quant_shapes(quick=True)
    # breadth first: the first cases cover every quant format and input dtype
    first = only.cases[:6]
    assert {v.quant for _, _, v in first} == set(QUANT_FORMATS)
    assert {v.dtype for _, _, v in first} == {"float32", "bfloat16", "float16"}


def test_interleave_keeps_each_order_and_the_proportions():
    a, b = list(range(12)), [f"q{i}" for i in range(3)]
    merged = cases.interleave(a, b)
    assert [x for x in merged if isinstance(x, int)] == a and [x for x in merged if isinstance(x, str)] == b
    assert [i for i, x in enumerate(merged) if isinstance(x, str)] == [2, 7, 12]
    assert cases.interleave(a, []) == a and cases.interleave([], b) == b


def test_jobs_workers_get_the_quant_selection(tmp_path, capsys):
    """--jobs: workers run the parent's selection (--quant / --no-quant); the merged report equals one process's."""
    for mode, flag in (("only", "--quant"), ("skip", "--no-quant")):
        plan = session.make_plan(session.options(device="cpu", quick=True, quant=mode), 0.0)
        cmd = parallel.worker_command(plan, 0, 2, "j", "p", None)
        assert flag in cmd and build_parser().parse_args(cmd[cmd.index("verify"):]).quant == mode
    args = ["verify", "--quant", *COMMON, "--backend", "native", "--dtype", "bfloat16"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    assert main([*args, "--jobs", "2", "--json", str(tmp_path / "two.json")]) == 0
    capsys.readouterr()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))

    def key(r):
        return r["backend"], r["shape"], r["variant"], r["reference"], r["quantity"]

    assert sorted(one["results"], key=key) == sorted(two["results"], key=key) and one["summary"] == two["summary"]


def test_interrupted_quant_run_reports_what_ran(monkeypatch, tmp_path):
    """Ctrl-C during a --quant run: the partial report covers the cases that finished, exit code 3."""
    calls = []

    def run_case(*a, **kw):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(a[:3])
        return real(*a, **kw)

    real = runner.run_case
    monkeypatch.setattr(runner, "run_case", run_case)
    js = tmp_path / "r.json"
    assert main(["verify", "--quant", *COMMON, "--backend", "native", "--json", str(js)]) == 3
    data = json.loads(js.read_text())
    meta = data["meta"]
    assert data["complete"] is False and meta["cases_run"] == 4 and meta["stopped"] == "KeyboardInterrupt"
    assert {(r["shape"], r["variant"]) for r in data["results"]} == {(s.name, v.label()) for _, s, v in calls}
    assert len(data["results"]) == 8  # scale and q per case


def test_module_entry_point_is_verify_quant(tmp_path):
    """`python -m gatednorm.verify.quant` (the old command) runs `gatednorm verify --quant`, without warnings."""
    js = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "gatednorm.verify.quant",
                           "--device", "cpu", "--quick", "--backend", "native", "--dtype", "float16",
                           "--json", str(js)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    data = json.loads(js.read_text())
    assert data["results"] and {r["dtype"] for r in data["results"]} == {"float16"}
    assert all(r["passed"] and r["quantity"] in ("scale", "q") for r in data["results"])


# --- a broken quantizer is caught ------------------------------------------------------------------------


@pytest.fixture
def broken_quantizer(monkeypatch):
    """A backend whose norm is native's but whose fused quantizer drops the first feature of every row
    (writes q = 0 there): registered through the public hooks (ops.BACKENDS, ops.override_impl)."""
    native = ops.select_impl("native", CPU)

    class BrokenQuant:
        name = "brokenq"
        supports_float64 = False

        def forward(self, x, weight, bias, z, spec, out):
            return native.forward(x, weight, bias, z, spec, out)

        def backward(self, *args, **kwargs):
            return native.backward(*args, **kwargs)

        def forward_quant(self, x, weight, bias, z, spec, qspec, q, scale):
            round_to = None if qspec.round_to == "none" else getattr(torch, qspec.round_to)
            q2, s2 = gatednorm.gated_norm_quant(
                x, weight, bias, spec.eps, z, spec.group_size, spec.norm_before_gate, spec.is_rms_norm,
                activation=spec.activation, quant=qspec.quant, quant_group_size=qspec.block,
                scale_format=qspec.scale_format, round_to=round_to, backend="native")
            q.copy_(q2)
            scale.copy_(s2)
            q.view(torch.uint8)[:, 0] = 0  # the bug: +0 in every format
            return True

    monkeypatch.setattr(ops, "BACKENDS", (*ops.BACKENDS, "brokenq"))
    with ops.override_impl("brokenq", "cpu", BrokenQuant()):
        yield "brokenq"


def test_broken_quantizer_fails_the_run(broken_quantizer, tmp_path, capsys):
    """The default run (norm + quant) of a backend whose norm is right and quantizer wrong: exit 1, the q rows
    fail, its scale rows and norm rows pass."""
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["verify", *COMMON, "--backend", broken_quantizer, "--dtype", "float32", "--no-grad", "--no-upstream",
               "--verbose", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 1, out
    data = json.loads(js.read_text())
    assert data["meta"]["failed"] > 0
    failed = [r for r in data["results"] if not r["passed"]]
    assert failed and {r["quantity"] for r in failed} == {"q"}
    assert all(r["worst_ratio"] > 1 and r["error"] == "" for r in failed)
    assert all(r["passed"] for r in data["results"] if r["quantity"] != "q")  # scales and the norm itself
    assert {s["reference"] for s in data["summary"] if not s["passed"]} == {f"float64/{f}" for f in QUANT_FORMATS}
    assert "FAIL" in out and "failing cases:" in out
    assert "## Failures" in md.read_text()


def test_broken_quantizer_fails_the_quant_only_run(broken_quantizer, capsys):
    assert main(["verify", "--quant", *COMMON, "--backend", broken_quantizer, "--dtype", "bfloat16"]) == 1
    assert "FAIL" in capsys.readouterr().out


# --- the rows of one case: the checking function on correct and corrupted results ------------------------


QUICK_CASES = quantized.quant_cases(quick=True)


def _case(i: int):
    case = QUICK_CASES[i % len(QUICK_CASES)]
    shape, variant = case.shape, case.variant
    inp = quantized.make_quant_inputs(shape, variant, CPU, torch.Generator().manual_seed(i))
    q, scale = quantized.call_quant(inp, shape, variant, "native")
    return inp, shape, variant, q, scale


def _rows(inp, shape, variant, q, scale):
    j = quantized.judge_case(inp, shape, variant, q, scale)
    return j, j.comparisons()


@pytest.mark.parametrize("i", range(0, 90, 7))
def test_rows_pass_and_agree_with_check_quant(i):
    inp, shape, variant, q, scale = _case(i)
    j, (cs, cq) = _rows(inp, shape, variant, q, scale)
    assert j.check().passed and cs.passed and cq.passed, (variant.label(), j.detail)
    assert cs.numel == scale.numel() and cq.numel == q.numel()
    assert cq.max_ulps <= 1  # q is the correct rounding or its neighbour
    # the dequantized error is within one step at the top of the grid (half a step plus y's error) times the scale
    top_step = {"int8": 1.0, "fp8_e4m3": 32.0, "fp8_e4m3fnuz": 16.0}[variant.quant]
    assert cq.max_abs <= top_step * float(scale.max())


@pytest.mark.parametrize("i", [0, 13, 26, 41, 57, 70])
def test_rows_catch_corrupted_results(i):
    """Corruptions of a correct result are reported on the right row, and the rows agree with check_quant."""
    inp, shape, variant, q, scale = _case(i)
    fmt = variant.quant

    def bits(t):
        return t.view(torch.uint8) if t.dtype != torch.int8 else t

    # a scale 1% off: the scale row fails (its q no longer fits either)
    j, (cs, _) = _rows(inp, shape, variant, q, scale * 1.01)
    assert not cs.passed and cs.worst_ratio > 1 and not j.check().passed
    # one q one code away (the next magnitude) where it stays finite: the q row fails, the scale row passes
    q2 = q.clone().reshape(-1)
    b = bits(q2)
    k = int(torch.nonzero(q2.float().abs() < quant_max(fmt) / 4)[0])
    b[k] = b[k] + 1 if fmt != "int8" else (b[k] + 1 if b[k] < 100 else b[k] - 1)
    j, (cs, cq) = _rows(inp, shape, variant, q2.reshape(q.shape), scale)
    assert cs.passed and not cq.passed and cq.worst_ratio > 1 and cq.max_ulps >= 1
    assert j.check().q_outside == 1 and not j.check().passed
    # a finite block reported non-finite
    s3 = scale.clone()
    s3.reshape(-1)[0] = float("nan")
    j, (cs, _) = _rows(inp, shape, variant, q, s3)
    assert cs.nonfinite_mismatch >= 1 and not cs.passed and not j.check().passed


def test_nonfinite_block_rows():
    """A NaN in x: its block's scale must be NaN and its q marked; the rows pass, and fail when it is hidden."""
    case = next(c for c in quantized.quant_cases(quick=True) if c.variant.quant == "fp8_e4m3" and c.shape.block == 128)
    shape, variant = case.shape, case.variant
    inp = quantized.make_quant_inputs(shape, variant, CPU, torch.Generator().manual_seed(3))
    inp.x.reshape(-1, shape.n)[1, 5] = float("nan")
    q, scale = quantized.call_quant(inp, shape, variant, "native")
    j, (cs, cq) = _rows(inp, shape, variant, q, scale)
    assert cs.passed and cq.passed and not bool(j.fin.all())
    hidden = scale.clone()
    hidden.reshape(-1, shape.n // shape.block)[1].nan_to_num_(nan=1.0)
    _, (cs, _) = _rows(inp, shape, variant, q, hidden)
    assert not cs.passed and cs.nonfinite_mismatch >= 1


@pytest.mark.parametrize("fmt", list(QUANT_FORMATS))
def test_grid_gaps_are_the_distances_to_the_neighbouring_codes(fmt):
    qmax = quant_max(fmt)
    if fmt == "int8":
        grid = torch.arange(-127, 128, dtype=torch.float64)
    else:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(quant_dtype(fmt)).double()
        grid = codes[torch.isfinite(codes) & (codes.abs() <= qmax)].unique()  # -0.0 and 0.0 are one value
    down, up = quantized.grid_gaps(grid, fmt)
    diffs = grid[1:] - grid[:-1]
    assert torch.equal(up[:-1], diffs) and torch.equal(down[1:], diffs)
    assert up[-1] == down[0] == float("inf")
