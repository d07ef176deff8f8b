"""Unit tests of the agent's pure parts: config validation, option parsing, fault-injection syntax."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from agent.cli import parse_duration, parse_size
from agent.config import load_config
from agent.errors import EXIT_CONFIG, ConfigError
from agent.phases import Injection
from agent.plan import MigrationOptions
from agent.progress import Progress, phase_table, render_line
from agent.errors import SvmotionError

GOOD = """
[agent]
socket = "agent.sock"
state_dir = "state"
metrics = "127.0.0.1:9815"

[[vm]]
name = "vm1"
socket = "vm1.nbd"
listen = "127.0.0.1:10809"
files = ["vm1.nvram"]

  [[vm.disk]]
  name = "disk0"
  path = "disk0.raw"
  sidecars = ["disk0.ctk"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_good_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    vm = cfg.vm("vm1")
    assert vm is not None and cfg.vm("vm2") is None
    assert vm.disks[0].path == str(tmp_path / "disk0.raw")
    assert vm.disks[0].sidecars == (str(tmp_path / "disk0.ctk"),)
    assert vm.files == (str(tmp_path / "vm1.nvram"),)
    assert cfg.state_dir == str(tmp_path / "state") and vm.listen == "127.0.0.1:10809"
    assert vm.lease == 2.0


@pytest.mark.parametrize("bad, words", [
    (GOOD.replace('name = "vm1"', 'name = "vm 1"'), ["'vm 1'", "letters"]),
    (GOOD.replace("sidecars", "sidecar"), ["unknown key 'sidecar'", "allowed keys"]),
    (GOOD.replace('listen = "127.0.0.1:10809"', 'listen = "10809"'), ["'10809'", "host:port"]),
    (GOOD.replace('path = "disk0.raw"', ""), ["missing 'path'"]),
    (GOOD.replace('[[vm]]', '[[vmx]]'), ["unknown key 'vmx'"]),
    (GOOD + '\n  [[vm.disk]]\n  name = "disk1"\n  path = "disk0.raw"\n', ["'", "disk0.raw", "used by"]),
    (GOOD + "\n[[vm]]\nname = \"vm1\"\nsocket = \"x.nbd\"\n[[vm.disk]]\nname = \"d\"\npath = \"d.raw\"\n",
     ["VM name 'vm1'", "used by"]),
    ("[agent\n", ["not valid TOML"]),
    ("[agent]\n", ["no [[vm]] table"]),
    (GOOD.replace('files = ["vm1.nvram"]', 'files = "vm1.nvram"'), ["not a list of paths"]),
])
def test_bad_config_is_one_line_naming_the_value(tmp_path: Path, bad: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad))
    text = str(err.value)
    assert err.value.exit_code == EXIT_CONFIG
    assert "\n" not in text and str(tmp_path / "agent.toml") in text
    for word in words:
        assert word in text, text


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("text, value", [("50M", 50 * 2**20), ("64K", 65536), ("1048576", 1048576),
                                         ("2MiB", 2 * 2**20), ("1.5G", 3 * 2**29), ("0", 0)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "5Q", "-1", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text, value", [("50ms", 0.05), ("0.2s", 0.2), ("1", 1.0), ("500us", 0.0005)])
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == pytest.approx(value)


def test_injection_syntax() -> None:
    inj = Injection.from_env("hold:Unstun=30, pause:DiskCopy")
    assert inj.hold == {"Unstun": 30.0} and inj.pause == {"DiskCopy"}
    assert Injection.from_env("") == Injection()
    for bad in ("hold:Unstun", "pause:Nope", "sleep:Stun=1", "pause:Stun=3", "pause:DiskCopyDone"):
        with pytest.raises(ValueError):
            Injection.from_env(bad)


def test_migration_options_from_request() -> None:
    opts = MigrationOptions.from_request({"dest": "/d", "strategy": "legacy", "rate": 5, "mirror": "dirty",
                                          "granularity": 4096, "stun_budget": 0.1})
    assert (opts.strategy, opts.rate, opts.mirror, opts.granularity, opts.stun_budget) == \
        ("legacy", 5, "dirty", 4096, 0.1)
    for bad in ({"dest": ""}, {"dest": "/d", "strategy": "fast"}, {"dest": "/d", "granularity": 5000},
                {"dest": "/d", "rate": -1}, {"dest": "/d", "stun_budget": 0}):
        with pytest.raises(SvmotionError) as err:
            MigrationOptions.from_request(bad)
        assert err.value.exit_code == 2


@pytest.mark.parametrize("bad, words", [
    ({"delete_source": "false"}, ["delete_source 'false'", "true or false, not a string"]),
    ({"delete_source": 0}, ["delete_source 0", "not an integer"]),
    ({"rate": 5.5}, ["rate 5.5", "an integer"]),
    ({"rate": True}, ["rate True", "not a boolean"]),
    ({"max_throttle": None}, ["max_throttle None", "not null"]),
    ({"max_throttle": 1.5}, ["max_throttle 1.5", "from 0 to 1"]),
    ({"mirror": "later"}, ["mirror 'later'", "sync, async, dirty"]),
    ({"stun_budget": float("inf")}, ["stun_budget inf", "non-finite"]),
    ({"granularity": 1 << 40}, ["granularity 1099511627776", "67108864"]),
    ({"dest": "   "}, ["dest '   '", "--dest /mnt/new"]),
    ({"dest": "new/vm1"}, ["dest 'new/vm1'", "absolute path"]),
    ({"dest": "/mnt/a\0b"}, ["dest", "NUL"]),
    ({"delete_sources": True}, ["unknown argument 'delete_sources'", "delete_source"]),
])
def test_migration_options_are_typed(bad: dict, words: list[str]) -> None:
    """"false" is not false: a wrong JSON type or an unknown key is a usage error naming the value."""
    with pytest.raises(SvmotionError) as err:
        MigrationOptions.from_request({"vm": "vm1", "dest": "/d", **bad})
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert MigrationOptions.from_request({"dest": "/d", "delete_source": True, "stun_budget": 1}).stun_budget == 1.0


def test_progress_rendering() -> None:
    rec = {"vm": "vm1", "phase": "DiskCopy", "progress": {"copied_bytes": 2**20, "total_bytes": 4 * 2**20,
                                                          "dirty_bytes": 3 * 2**20, "rate_bps": 2**20}}
    assert render_line(rec, tty=True).startswith("[#######.....................]  25.0%")
    assert render_line(rec, tty=False).startswith("vm1:  25.0% 1.0 MiB/4.0 MiB 1.0 MiB/s dirty 3.0 MiB")
    assert render_line({**rec, "phase": "Stun"}, tty=False).startswith("vm1:   0.0%")
    assert render_line({**rec, "phase": "Complete"}, tty=False).startswith("vm1: 100.0%")
    table = phase_table({"phases": [{"name": "Null", "seconds": 0.001}],
                         "stuns": [{"kind": "switchover", "duration_seconds": 0.002, "max_wait_seconds": 0.001,
                                    "held_requests": 3, "outcome": "released"}],
                         "passes": [{"kind": "bulk", "bytes": 2**20}, {"kind": "dirty", "bytes": 1024}]})
    assert "stun switchover" in table and "2.00 ms" in table and "1 dirty passes" in table


def test_progress_shows_the_throttle_the_predictions_and_one_stall_line() -> None:
    view = {"throttle_seconds": 0.0016, "remaining_bytes": 2**30, "predicted_converge_seconds": 185.2,
            "predicted_finish_seconds": 187.0, "stall": None}
    rec = {"vm": "vm1", "phase": "CopyDirtyData", "state": "running", "convergence": view,
           "progress": {"copied_bytes": 2**20, "total_bytes": 4 * 2**20, "dirty_bytes": 2**20, "rate_bps": 0}}
    assert "throttle 1.6 ms, converge in 3m05s, finish in 3m07s  CopyDirtyData" in render_line(rec, tty=False)
    unknown = {**rec, "convergence": {**view, "throttle_seconds": 0.0, "predicted_converge_seconds": None,
                                      "predicted_finish_seconds": None}}
    assert "dirty 1.0 MiB converge in —, finish in —  CopyDirtyData" in render_line(unknown, tty=False)
    assert "converge" not in render_line({**rec, "phase": "DiskSetup", "convergence": {}}, tty=False)
    out = io.StringIO()
    progress = Progress(out, tty=False)
    stalled = {**rec, "convergence": {**view, "stall": "not converging: ...; `svmotion abort vm1`"}}
    for record in (rec, stalled, stalled, stalled, rec, stalled):
        progress.update(record)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("svmotion: warning")]
    assert lines == ["svmotion: warning: vm1: not converging: ...; `svmotion abort vm1`"] * 2   # once per stall


def test_changes_and_the_throttle_in_the_tables() -> None:
    record = {"passes": [{"kind": "bulk", "bytes": 2**20}, {"kind": "dirty", "bytes": 1024, "count": 40}],
              "changes": [{"what": "mirror", "from": "async", "to": "sync", "phase": "CopyDirtyData",
                           "applied": "mirror node"},
                          {"what": "max_throttle", "from": 0.005, "to": 0.02, "phase": "CopyDirtyData",
                           "applied": "agent"},
                          {"what": "rate", "from": 0, "to": 2**20, "phase": "DiskCopy", "applied": "mirror node"}],
              "convergence": {"throttle_events": [{"throttle_seconds": 0.0001, "reason": "x"},
                                                  {"throttle_seconds": 0.005, "reason": "stalled"},
                                                  {"throttle_seconds": 0.0, "reason": "y"}]}}
    table = phase_table(record)
    assert "in 40 dirty passes" in table
    assert "set mirror async -> sync in CopyDirtyData (by the mirror node, no stun)" in table
    assert "set max_throttle 5 ms -> 20 ms in CopyDirtyData (by the agent)" in table
    assert "set rate unlimited -> 1.0 MiB/s in DiskCopy" in table
    assert "guest throttle: up to 5.00 ms per write, 2 changes, stalled 1 times" in table
