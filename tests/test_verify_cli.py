"""`gatednorm verify`: the precision report runs, writes its outputs, and fails when a backend is wrong."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gatednorm import cli, ops
from gatednorm import verify as V
from gatednorm.cli import build_parser, main
from gatednorm.verify import cases, parallel, report, runner, session, tolerance

#: run_case before any test replaces it (the tests below stop runs by patching runner.run_case)
REAL_RUN_CASE = runner.run_case


def test_parser_has_verify_and_is_extensible():
    parser = build_parser()
    args = parser.parse_args(["verify", "--quick", "--device", "cpu"])
    assert args.command == "verify" and args.quick and callable(args.func)


def test_parser_constants_agree_with_the_verify_package():
    """cli spells out the dtype names and the incomplete exit code so that it need not import gatednorm.verify."""
    assert cli.DTYPE_CHOICES == tuple(cases.DTYPES)
    assert cli.EXIT_INCOMPLETE == report.EXIT_INCOMPLETE


def test_cli_import_does_not_load_the_verify_package():
    code = "import sys, gatednorm.cli; print(sorted(m for m in sys.modules if m.startswith('gatednorm.verif')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_verification_module_still_exports_its_names():
    """gatednorm.verification moved to gatednorm.verify; the old module re-exports the same objects."""
    from gatednorm import verification

    for name in verification.__all__:
        assert getattr(verification, name) is getattr(V, name), name
    assert {"run_case", "compare", "magnitudes", "k_factor", "allowed_error", "summarize"} <= set(verification.__all__)


def test_quick_float32_passes_and_writes_reports(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native",
               "--no-upstream", "--no-progress", "--plain", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max ulps" in out and "F.layer_norm" in out and "F.group_norm" in out and "F.rms_norm" in out
    data = json.loads(js.read_text())
    assert data["meta"]["failed"] == 0 and data["summary"] and data["results"]
    assert data["complete"] is True and data["meta"]["cases_run"] == data["meta"]["cases"] > 0
    assert "INCOMPLETE" not in out
    quantities = {r["quantity"] for r in data["results"]}
    assert quantities == set(V.QUANTITIES) | set(V.QUANT_QUANTITIES)  # the quantized cases run by default
    assert all(r["passed"] for r in data["results"])
    text = md.read_text()
    assert "| backend | reference |" in text and "## Tolerance" in text and "incomplete" not in text
    assert V.TOLERANCE_DOC in text and V.TOLERANCE_DOC in tolerance.__doc__  # one text, two places


@pytest.fixture
def broken_backend(monkeypatch):
    """A backend whose forward is off by 1e-3 relative: verify must catch it."""
    native = ops.select_impl("native", torch.device("cpu"))

    class Broken:
        name = "broken"
        supports_float64 = False

        def forward(self, x, weight, bias, z, spec, out):
            mean, rstd = native.forward(x, weight, bias, z, spec, out)
            out.mul_(1 + 1e-3)
            return mean, rstd

        def backward(self, *args, **kwargs):
            return native.backward(*args, **kwargs)

    monkeypatch.setattr(ops, "BACKENDS", (*ops.BACKENDS, "broken"))
    with ops.override_impl("broken", "cpu", Broken()):
        yield "broken"


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


# --- stopping early: --max-seconds, SIGTERM, Ctrl-C ----------------------------------------------

QUICK_F32 = ["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native", "--no-upstream",
             "--no-progress", "--plain", "--progress-every", "0"]


def test_max_seconds_zero_gives_marked_partial_report(tmp_path, capsys):
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    before = signal.getsignal(signal.SIGTERM)
    rc = main([*QUICK_F32, "--max-seconds", "0", "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is verify's only while it runs
    data = json.loads(js.read_text())
    assert data["complete"] is False and "complete" not in data["meta"]  # one place only (schema_version 1)
    assert data["meta"]["cases_run"] == 0 < data["meta"]["cases"] and data["results"] == []
    assert "--max-seconds" in data["meta"]["stopped"]
    assert f"incomplete: 0 of {data['meta']['cases']} cases run" in md.read_text()
    assert "INCOMPLETE: 0 of" in out


@pytest.fixture
def interrupt_after(monkeypatch):
    """Make the n+1-th case raise KeyboardInterrupt (as Ctrl-C would) and count the cases run."""
    calls = []

    def install(n):
        def run_case(*a, **kw):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(a[:3])
            return REAL_RUN_CASE(*a, **kw)

        monkeypatch.setattr(runner, "run_case", run_case)
        return calls

    return install


def test_keyboard_interrupt_reports_cases_done(interrupt_after, tmp_path, capsys):
    calls = interrupt_after(3)
    js = tmp_path / "r.json"
    rc = main([*QUICK_F32, "--json", str(js)])
    assert rc == 3
    data = json.loads(js.read_text())
    meta = data["meta"]
    assert data["complete"] is False and meta["cases_run"] == 3 and meta["stopped"] == "KeyboardInterrupt"
    assert meta["interrupted_case"]  # the fourth case, which did not finish
    assert {(r["shape"], r["variant"]) for r in data["results"]} == {(s.name, v.label()) for _, s, v in calls}
    # breadth first: the first cases already differ in shape
    assert len({s.name for _, s, _ in calls}) == 3
    assert "INCOMPLETE: 3 of" in capsys.readouterr().out


def test_partial_run_draws_the_same_data_as_a_full_run(interrupt_after, tmp_path):
    """Each case seeds its own data (from --seed and the case), so a partial run's numbers are the
    full run's: recompute the cases that ran, alone and in reverse order, and get the same results."""
    part = tmp_path / "part.json"
    calls = interrupt_after(4)
    assert main([*QUICK_F32, "--seed", "7", "--json", str(part)]) == 3
    results = json.loads(part.read_text())["results"]
    again = []
    for b, s, v in reversed(calls):
        gen = torch.Generator().manual_seed(V.case_seed(7, s, v))
        again = [r.to_dict() for r in REAL_RUN_CASE(b, s, v, torch.device("cpu"), gen)] + again
    assert results and json.loads(json.dumps(again, default=str)) == results


def test_failure_wins_over_incomplete(broken_backend, interrupt_after, tmp_path):
    interrupt_after(2)
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", broken_backend,
               "--no-grad", "--no-upstream", "--no-progress", "--plain", "--progress-every", "0"])
    assert rc == 1


def test_partial_reports_are_written_while_running(monkeypatch, tmp_path):
    """--json is rewritten (marked incomplete) as cases finish, for a run killed without warning."""
    js = tmp_path / "r.json"
    seen = []

    def run_case(*a, **kw):
        if js.exists():
            seen.append(json.loads(js.read_text()))
        if len(seen) == 3:
            raise KeyboardInterrupt
        return REAL_RUN_CASE(*a, **kw)

    monkeypatch.setattr(session, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(runner, "run_case", run_case)
    assert main([*QUICK_F32, "--json", str(js)]) == 3
    assert [(d["complete"], d["meta"]["stopped"], d["meta"]["cases_run"]) for d in seen] == [
        (False, None, 1), (False, None, 2), (False, None, 3)]
    assert "still running" in seen[0]["meta"]["status"]
    assert json.loads(js.read_text())["meta"]["stopped"] == "KeyboardInterrupt"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary files left


def test_breadth_first_order_covers_every_key_early():
    variants = list(V.variants(("float32", "bfloat16", "float16")))
    jobs = V.case_order(["native", "triton"], V.FULL_SHAPES, variants)
    expected = [(b, s, v) for b in ("native", "triton") for s in V.FULL_SHAPES for v in variants
                if V.case_applies(s, v)]
    assert sorted(map(repr, jobs)) == sorted(map(repr, expected))  # same cases, each once
    assert jobs == V.case_order(["native", "triton"], V.FULL_SHAPES, variants)  # deterministic
    first = jobs[:len(V.FULL_SHAPES)]
    assert {s.name for _, s, _ in first} == {s.name for s in V.FULL_SHAPES}
    first = jobs[:6]
    assert {b for b, _, _ in first} == {"native", "triton"}
    assert {v.dtype for _, _, v in first} == {"float32", "bfloat16", "float16"}
    assert {v.gate for _, _, v in first} == set(V.GATES)
    assert {v.is_rms_norm for _, _, v in first} == {False, True}
    # every pair of (dtype, shape) and of (backend, shape) within the first 30 (of 1320)
    assert len({(v.dtype, s.name) for _, s, v in jobs[:30]}) == 3 * len(V.FULL_SHAPES)
    assert len({(b, s.name) for b, s, _ in jobs[:30]}) == 2 * len(V.FULL_SHAPES)


def test_sigterm_writes_partial_report(tmp_path):
    """What `timeout` does: SIGTERM to a running verify leaves the table, the partial JSON and exit 3."""
    js = tmp_path / "r.json"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    # the full matrix: far too long to finish before the signal
    proc = subprocess.Popen([sys.executable, "-m", "gatednorm", "verify", "--device", "cpu", "--dtype", "float32",
                             "--backend", "native", "--no-upstream", "--no-progress", "--plain",
                             "--progress-every", "0.2", "--json", str(js)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        while True:  # wait until a case has finished (the handler is installed before the first case)
            m = re.search(r"(\d+)/(\d+) cases", lines.get(timeout=60))
            if m and int(m.group(1)) >= 1:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    data = json.loads(js.read_text())
    assert data["complete"] is False and data["meta"]["stopped"] == "SIGTERM"
    assert 1 <= data["meta"]["cases_run"] < data["meta"]["cases"] and data["results"]
    assert "INCOMPLETE" in out and "max ulps" in out


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


# --- verify --jobs: worker processes, one merged report ---------------------------------------

def test_shard_jobs_partition_the_cases_and_keep_a_variant_together():
    variants = list(V.variants(("float32", "bfloat16", "float16")))
    jobs = V.case_order(["native", "triton"], V.FULL_SHAPES, variants)
    shards = [V.shard_jobs(jobs, k, 4) for k in range(4)]
    assert sorted(map(repr, (j for s in shards for j in s))) == sorted(map(repr, jobs))  # each case once
    for s in shards:
        assert s == [j for j in jobs if j in s]  # breadth-first order kept within a worker
        assert len(s) > len(jobs) // 8  # none starved
    owner = {(j[1].name, j[2].label()): k for k, s in enumerate(shards) for j in s}
    for k, s in enumerate(shards):  # both backends' cases of one (shape, variant) in one worker
        assert all(owner[(j[1].name, j[2].label())] == k for j in s)
    assert V.shard_jobs(jobs, 0, 1) == jobs
    with pytest.raises(ValueError, match="shard"):
        V.shard_jobs(jobs, 4, 4)


def test_jobs_report_equals_single_process_report(tmp_path, capsys):
    common = ["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native", "--no-upstream",
              "--no-progress", "--plain"]
    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    one_out = capsys.readouterr().out
    assert main([*common, "--jobs", "3", "--json", str(tmp_path / "three.json"),
                 "--markdown", str(tmp_path / "three.md")]) == 0
    three_out = capsys.readouterr().out
    one, three = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "three"))

    def key(r):
        return r["backend"], r["shape"], r["variant"], r["reference"], r["quantity"]

    assert sorted(one["results"], key=key) == sorted(three["results"], key=key)  # same data, same errors
    assert one["summary"] == three["summary"] and three["complete"] is True
    assert three["meta"]["cases_run"] == one["meta"]["cases_run"] == one["meta"]["cases"]

    def table(text):
        return [line for line in text.splitlines() if "cases," not in line]  # drop the timing line

    assert table(one_out) == table(three_out)
    assert "| backend | reference |" in (tmp_path / "three.md").read_text()


def test_jobs_worker_that_dies_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(parallel, "worker_command",
                        lambda *a, **k: [sys.executable, "-c", "print('worker boom'); raise SystemExit(7)"])
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native", "--no-upstream",
               "--no-progress", "--plain", "--jobs", "2"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "exited with code 7 without a report" in captured.err and "worker boom" in captured.err
    assert "INCOMPLETE" in captured.out and "crashed" in captured.out


@pytest.mark.parametrize("bad", ["3/3", "-1/2", "a/b", "1"])
def test_shard_argument_is_checked(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["verify", "--shard", bad])
    assert exc.value.code == 2 and "--shard" in capsys.readouterr().err


def test_jobs_must_be_positive(capsys):
    assert main(["verify", "--quick", "--device", "cpu", "--jobs", "0", "--no-progress"]) == 2
    assert "--jobs" in capsys.readouterr().err
