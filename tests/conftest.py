"""Test configuration shared by every test module.

Without a GPU, Triton kernels (ours and the upstream reference) run under Triton's
interpreter on CPU tensors. The variable must be set before anything imports triton.

Every test starts with torch's global generator seeded from the test's id, so data drawn without
an explicit seed (helpers.make_inputs, torch.randn) is fresh per test and the same on a rerun.

``GATEDNORM_TEST_TIMES=PATH``: each test's outcome and duration (setup + call + teardown, seconds) is appended to
PATH as it finishes (``nodeid<TAB>outcome<TAB>seconds``), by the controlling process under pytest-xdist too: a run
killed by a time limit (the GPU tests on a lent machine, benchmarks/gpu_suite.sh) still says where its time went,
which pytest's ``--durations`` prints only at the end.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# pytest-xdist's workers run this hook too, and their controller again for each report they send it: only the
# controller (or a run without workers) writes, so each test is one line.
_TIMES_PATH = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("GATEDNORM_TEST_TIMES")
_running: dict[str, list] = {}  # nodeid -> [seconds so far, outcome so far]


def pytest_runtest_logreport(report):
    """Append a finished test's outcome and duration to GATEDNORM_TEST_TIMES (see the module's docstring): the
    call's outcome, or "skipped" / "error" from its setup, "error" from a failed teardown."""
    if not _TIMES_PATH:
        return
    entry = _running.setdefault(report.nodeid, [0.0, None])
    entry[0] += report.duration
    if report.when == "setup" and not report.passed:
        entry[1] = "skipped" if report.skipped else "error"
    elif report.when == "call" and entry[1] is None:
        entry[1] = report.outcome
    elif report.when == "teardown":
        del _running[report.nodeid]
        outcome = "error" if report.failed else (entry[1] or "passed")
        with open(_TIMES_PATH, "a") as f:
            f.write(f"{report.nodeid}\t{outcome}\t{entry[0]:.2f}\n")
