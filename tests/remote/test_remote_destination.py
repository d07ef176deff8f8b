"""`--dest HOST:/path`: the scp-like destination syntax, and `migrate` refusing what cannot be.

Units of agent/plan.py `parse_destination`, and a real agent with a VM: a remote destination
without [tls] is refused (exit 3, one line, nothing changed); a malformed one is a usage
error (exit 2) from the CLI or the API alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from agentproc import ROOT, AgentPool, AgentProcess

from agent.errors import SvmotionError
from agent.jsonlines import RemoteError
from agent.plan import Destination, MigrationOptions, parse_destination


@pytest.mark.parametrize("text, host, port, path", [
    ("/srv/ds2/vm1", None, 9816, "/srv/ds2/vm1"),
    ("/mnt/a:b", None, 9816, "/mnt/a:b"),
    ("hostb:/srv/ds2/vm1", "hostb", 9816, "/srv/ds2/vm1"),
    ("HostB.example:10999:/srv/ds2", "hostb.example", 10999, "/srv/ds2"),
    ("192.0.2.2:/srv/x", "192.0.2.2", 9816, "/srv/x"),
    ("[2001:db8::2]:/srv/x", "2001:db8::2", 9816, "/srv/x"),
    ("[::1]:9000:/srv/x:y", "::1", 9000, "/srv/x:y"),
])
def test_destinations_parse(text: str, host: str | None, port: int, path: str) -> None:
    dest = parse_destination(text)
    assert (dest.host, dest.port, dest.path, dest.remote) == (host, port, path, host is not None)
    assert parse_destination(str(dest)) == dest, "str() writes it back in the same syntax"


@pytest.mark.parametrize("text, words", [
    ("", ["give the destination directory"]),
    ("new/vm1", ["absolute path"]),
    ("hostb:srv/x", ["absolute path or PORT:/path"]),
    ("hostb:0:/x", ["port 1 to 65535"]),
    ("hostb:70000:/x", ["port 1 to 65535"]),
    ("host_b:/x", ["'host_b'", "neither a host name"]),
    ("::1:/x", ["brackets", "[::1]:/path"]),
    ("2001:db8::2:/x", ["brackets"]),
    ("[hostb]:/x", ["'[hostb]'"]),
    ("[10.0.0.1]:/x", ["only one"]),
    ("[::1]/x", ["followed by ':'"]),
])
def test_bad_destinations_say_the_syntax(text: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        parse_destination(text)
    for word in words:
        assert word in str(err.value), str(err.value)
    with pytest.raises(SvmotionError) as err:
        MigrationOptions.from_request({"dest": text})
    assert err.value.exit_code == 2


def test_a_destination_value() -> None:
    assert Destination("/x").remote is False
    assert str(Destination("/x", "2001:db8::2", 9000)) == "[2001:db8::2]:9000:/x"


@pytest.fixture
def vm_agent(tmp_path: Path) -> Iterator[AgentProcess]:
    pool = AgentPool()
    disk = tmp_path / "disk0.raw"
    disk.write_bytes(os.urandom(1 << 20))
    agent = AgentProcess(root=tmp_path, state=pool.state_dir(), disks={"disk0": disk}, metrics="")
    agent.write_config()
    pool.add(agent)
    try:
        agent.start(wait_nbdkit=True)
        yield agent
    finally:
        pool.close()


def test_migrate_to_another_host_needs_tls_and_a_well_formed_destination(vm_agent: AgentProcess,
                                                                         tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    done = vm_agent.cli("migrate", "vm1", "--dest", "hostb:/srv/ds2/vm1")
    assert done.returncode == 3, done
    assert done.stderr.count("\n") == 1 and "on another host" in done.stderr and "needs [tls]" in done.stderr
    bad = vm_agent.cli("migrate", "vm1", "--dest", "::1:/srv/x")
    assert bad.returncode == 2 and "brackets" in bad.stderr, bad
    with pytest.raises(RemoteError) as err:
        vm_agent.call("migrate", vm="vm1", dest="hostb:srv")
    assert err.value.reply["exit"] == 2 and "PORT:/path" in err.value.reply["error"]
    assert vm_agent.status()["last"] is None and vm_agent.status()["migration"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # A relative local directory (a slash before any colon) is still local, made absolute by the CLI.
    local = vm_agent.cli("migrate", "vm1", "--dest", "./nope:dir")
    assert local.returncode == 3 and f"{ROOT}/nope:dir" in local.stderr and "not a directory" in local.stderr, local
