"""svlab/units.py: what the namespace lab's supervisor reads from a unit file, and what it refuses."""
from __future__ import annotations

from pathlib import Path

import pytest

from svlab.units import UnitError, read_unit

UNIT = """# a comment
[Unit]
Description=demo
ExecStart=/not/this/one

[Service]
Environment=PYTHONPATH=/opt/svmotion "GREETING=hello world"
ExecStart=/usr/bin/python3 -m svlab.guest run --socket '/run/a b/guest.nbd'
Restart=on-failure
RestartSec=2
TimeoutStopSec=120
KillMode=mixed
"""


def test_service_section_is_read(tmp_path: Path) -> None:
    path = tmp_path / "demo.service"
    path.write_text(UNIT)
    unit = read_unit(path)
    assert unit.name == "demo.service"
    assert unit.exec_start == ("/usr/bin/python3", "-m", "svlab.guest", "run", "--socket", "/run/a b/guest.nbd")
    assert unit.environment == {"PYTHONPATH": "/opt/svmotion", "GREETING": "hello world"}
    assert unit.restart and unit.restart_sec == 2.0 and unit.timeout_stop_sec == 120.0


def test_defaults_do_not_restart(tmp_path: Path) -> None:
    path = tmp_path / "plain.service"
    path.write_text("[Service]\nExecStart=/bin/true\n")
    unit = read_unit(path)
    assert not unit.restart and unit.environment == {}


@pytest.mark.parametrize("body, problem", [
    ("[Service]\nRestart=on-failure\n", "exactly one ExecStart="),
    ("[Service]\nExecStart=/bin/true\nExecStart=/bin/false\n", "exactly one ExecStart="),
    ("[Service]\nExecStart=/bin/true\nEnvironment=JUSTAWORD\n", "is not KEY=VALUE"),
    ("[Service]\nExecStart=/bin/true\nRestartSec=soon\n", "soon"),
])
def test_unusable_units_are_refused_naming_the_file(tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "bad.service"
    path.write_text(body)
    with pytest.raises(UnitError, match=problem) as err:
        read_unit(path)
    assert str(path) in str(err.value)
