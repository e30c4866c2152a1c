"""`gatednorm info | head -1`: a reader that goes away early gets no traceback on stderr.

The reader here closes its end of the pipe before the command writes anything (what ``head -1`` does by
the time a longer output reaches it), so every write meets a closed pipe: deterministic, unlike a real
``head``, which may read everything before it exits.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gatednorm.cli import EXIT_BROKEN_PIPE


def _run_with_closed_stdout(*args: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "gatednorm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before reading anything
    try:
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    return code, err


@pytest.mark.parametrize("args", [["info"], ["info", "--json"]], ids=["text", "json"])
def test_info_into_a_closed_pipe_exits_quietly(args):
    code, err = _run_with_closed_stdout(*args)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == "" and code == EXIT_BROKEN_PIPE == 141, (code, err)


def test_verify_into_a_closed_pipe_keeps_its_verdict_and_files(tmp_path):
    """verify stops printing, but still writes --json and exits with the verdict of its checks (0: passed)."""
    js = tmp_path / "r.json"
    code, err = _run_with_closed_stdout("verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend",
                                        "native", "--no-upstream", "--no-grad", "--no-progress",
                                        "--progress-every", "0", "--json", str(js))
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 0, (code, err)
    report = json.loads(js.read_text())
    assert report["complete"] and report["meta"]["failed"] == 0
