"""`gatednorm verify` and `gatednorm info` name a device the same way (gatednorm._platform.device_name).

Before, verify's report said "x86_64" (platform.machine()) on a CPU whose model info() reported.
"""

from __future__ import annotations

import json

import torch

import gatednorm
from gatednorm import _platform
from gatednorm.cli import main
from gatednorm.verify import report


def test_verify_report_names_the_cpu_as_info_does():
    assert report.device_name(torch.device("cpu")) == gatednorm.info()["devices"][0]["name"] == _platform.cpu_name()


def test_one_cpu_description_reaches_both_reports(monkeypatch, tmp_path, capsys):
    """A (random) CPU name from the shared helper shows up in info(), verify's table title and its JSON."""
    name = "cpu-" + "".join(f"{int(v):x}" for v in torch.randint(0, 16, (12,)))
    monkeypatch.setattr(_platform, "cpu_name", lambda: name)
    assert [d["name"] for d in gatednorm.info()["devices"] if d["device"] == "cpu"] == [name]
    js = tmp_path / "r.json"
    rc = main(["verify", "--quick", "--device", "cpu", "--dtype", "float32", "--backend", "native", "--no-upstream",
               "--no-grad", "--no-progress", "--progress-every", "0", "--plain", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"gatednorm verify on cpu ({name})" in out
    assert json.loads(js.read_text())["meta"]["device_name"] == name


def test_device_name_of_other_devices():
    assert _platform.device_name("cpu") == _platform.device_name(torch.device("cpu")) == _platform.cpu_name()
    assert _platform.device_name("meta") == "meta"  # no name to ask for: the device type, as info() says
