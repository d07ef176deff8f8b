"""The configuration of a datastore host: [tls], [[datastore]], listen and nbd_listen, checked at load.

Units of agent/config.py (one line naming the file, the key, the value and the fix; exit 7),
and the real agent refusing at start, before binding anything, a listener on a non-loopback
address without TLS. The addresses 0.0.0.0 and 192.0.2.1 (TEST-NET-1) are only written into
configurations: the refusal comes before any socket, so no traffic goes anywhere.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from agentproc import PYTHON, ROOT, free_tcp_ports
from remotelib import Pki

from agent.config import is_loopback, load_config
from agent.errors import EXIT_CONFIG, ConfigError


def host_config(tmp_path: Path, pki: Pki, *, agent: str = "", tls: str | None = None, datastores: str | None = None,
                vm: str = "") -> str:
    """A datastore host's config file (pieces replaceable), in tmp_path; returns its path."""
    (tmp_path / "ds1").mkdir(exist_ok=True)
    tls = f'[tls]\ndir = "{pki.server}"\n' if tls is None else tls
    datastores = '[[datastore]]\nname = "ds1"\npath = "ds1"\n' if datastores is None else datastores
    agent = agent or 'listen = "127.0.0.1:9816"\nnbd_listen = "127.0.0.1:10810"\n'
    text = (f'[agent]\nsocket = "agent.sock"\nstate_dir = "state"\nmetrics = ""\n{agent}\n{tls}\n'
            f'{datastores}\n{vm}')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_a_datastore_host_needs_no_vm(tmp_path: Path, pki: Pki) -> None:
    cfg = load_config(host_config(tmp_path, pki))
    assert cfg.vms == () and cfg.listen == "127.0.0.1:9816" and cfg.nbd_listen == "127.0.0.1:10810"
    assert [(d.name, d.path) for d in cfg.datastores] == [("ds1", str(tmp_path / "ds1"))]
    assert cfg.tls.dir == str(pki.server) and cfg.tls.cert == str(pki.server / "server-cert.pem")
    explicit = (f'[tls]\nca = "{pki.server}/ca-cert.pem"\ncert = "{pki.server}/server-cert.pem"\n'
                f'key = "{pki.server}/server-key.pem"\n')
    assert load_config(host_config(tmp_path, pki, tls=explicit)).tls.dir is None


VM = '[[vm]]\nname = "vm1"\nsocket = "vm1.nbd"\nlisten = "{listen}"\n[[vm.disk]]\nname = "disk0"\npath = "d.raw"\n'


@pytest.mark.parametrize("change, words", [
    ({"tls": ""}, ["[agent]", "listen = '127.0.0.1:9816' without [tls]", "mutual TLS", "svmotion tls init"]),
    ({"tls": "", "agent": 'listen = "0.0.0.0:9816"\nnbd_listen = "127.0.0.1:10810"\n'},
     ["'0.0.0.0:9816' without [tls]", "on the network needs TLS"]),
    ({"tls": "", "agent": 'nbd_listen = "192.0.2.1:10810"\n'},
     ["nbd_listen = '192.0.2.1:10810' without [tls]", "on the network needs TLS"]),
    ({"datastores": "", "vm": VM.format(listen="127.0.0.1:10809")},
     ["listen = '127.0.0.1:9816'", "no [[datastore]]"]),
    ({"agent": 'listen = "127.0.0.1:9816"\n'}, ["nbd_listen is not", "add nbd_listen"]),
    ({"agent": 'listen = "127.0.0.1:9816"\nnbd_listen = "127.0.0.1:9816"\n'}, ["'127.0.0.1:9816'", "used by"]),
    ({"agent": 'listen = "9816"\nnbd_listen = "127.0.0.1:10810"\n'}, ["'9816'", "host:port"]),
    ({"datastores": '[[datastore]]\nname = "ds 1"\npath = "ds1"\n'}, ["'ds 1'", "letters"]),
    ({"datastores": '[[datastore]]\nname = "ds1"\npath = "nope"\n'}, ["nope", "not a directory", "mkdir -p"]),
    ({"datastores": '[[datastore]]\nname = "ds1"\npath = "agent.toml"\n'}, ["agent.toml", "not a directory"]),
    ({"datastores": '[[datastore]]\nname = "ds1"\npath = "ds1"\n[[datastore]]\nname = "ds1"\npath = "."\n'},
     ["'ds1'", "used twice"]),
    ({"datastores": '[[datastore]]\nname = "ds1"\npath = "ds1"\n[[datastore]]\nname = "ds2"\npath = "."\n'},
     ["overlap", "do not contain each other"]),
    ({"datastores": '[[datastore]]\nname = "ds1"\npath = "ds1"\nsize = 5\n'}, ["unknown key 'size'"]),
    ({"tls": '[tls]\ndir = "nope"\n'}, ["[tls]", "not a directory", "svmotion tls init"]),
    ({"tls": '[tls]\nca = "x.pem"\n'}, ["[tls]", "missing 'cert'"]),
    ({"tls": '[tls]\ndir = "{server}"\nca = "x.pem"\n'}, ["both dir and ca/cert/key"]),
    ({"tls": '[tls]\ndir = "{empty}"\n'}, ["ca-cert.pem", "does not exist"]),
    ({"vm": VM.format(listen="0.0.0.0:10809")}, ["listen = '0.0.0.0:10809'", "plain NBD", "loopback"]),
    ({"vm": VM.format(listen="[2001:db8::1]:10809")}, ["plain NBD"]),
    ({"datastores": "", "agent": "\n", "tls": ""}, ["no [[vm]] table and no [[datastore]] table"]),
])
def test_bad_datastore_config_is_one_line_naming_the_value(tmp_path: Path, pki: Pki, change: dict,
                                                          words: list[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    change = {k: v.replace("{server}", str(pki.server)).replace("{empty}", str(empty)) for k, v in change.items()}
    with pytest.raises(ConfigError) as err:
        load_config(host_config(tmp_path, pki, **change))
    text = str(err.value)
    assert err.value.exit_code == EXIT_CONFIG and "\n" not in text and str(tmp_path / "agent.toml") in text
    for word in words:
        assert word in text, text


def test_a_private_key_readable_by_others_is_refused(tmp_path: Path, pki: Pki) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in pki.server.iterdir():
        (loose / f.name).write_bytes(f.read_bytes())
        os.chmod(loose / f.name, 0o600)
    os.chmod(loose / "client-key.pem", 0o644)
    with pytest.raises(ConfigError) as err:
        load_config(host_config(tmp_path, pki, tls=f'[tls]\ndir = "{loose}"\n'))
    assert "client-key.pem" in str(err.value) and "0644" in str(err.value) and "chmod 600" in str(err.value)


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:1", True), ("127.9.9.9:1", True), ("[::1]:1", True),
                                               ("localhost:1", True), ("0.0.0.0:1", False), ("[::]:1", False),
                                               ("192.0.2.1:1", False), ("hostb:1", False)])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("listener", ["agent", "nbd", "vm"])
def test_the_agent_refuses_a_network_listener_without_tls_at_start(tmp_path: Path, pki: Pki, listener: str) -> None:
    """Exit 7 with one line, before anything listens: the port stays free and no state is made."""
    port, other = free_tcp_ports(2)
    agent = {"agent": f'listen = "0.0.0.0:{port}"\nnbd_listen = "127.0.0.1:{other}"\n',
             "nbd": f'nbd_listen = "0.0.0.0:{port}"\n',
             "vm": "\n"}[listener]
    vm = VM.format(listen=f"0.0.0.0:{port}") if listener == "vm" else ""
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    config = host_config(tmp_path, pki, agent=agent, tls="" if listener != "vm" else None,
                         datastores="" if listener == "vm" else None, vm=vm)
    done = subprocess.run([PYTHON, "-m", "agent.cli", "agent", "--config", config], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG, done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("svmotion: error: "), done.stderr
    assert f"0.0.0.0:{port}" in done.stderr
    assert not (tmp_path / "state").exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "nothing listens"


def test_a_key_that_is_not_the_certificates_is_refused_at_start(tmp_path: Path, pki: Pki) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in pki.server.iterdir():
        source = pki.client / f.name if f.name == "server-key.pem" else f   # another host's key
        (mixed / f.name).write_bytes(source.read_bytes())
        os.chmod(mixed / f.name, 0o600)
    api, nbd = free_tcp_ports(2)
    agent = f'listen = "127.0.0.1:{api}"\nnbd_listen = "127.0.0.1:{nbd}"\n'
    config = host_config(tmp_path, pki, agent=agent, tls=f'[tls]\ndir = "{mixed}"\n')
    done = subprocess.run([PYTHON, "-m", "agent.cli", "agent", "--config", config], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG, done
    assert done.stderr.count("\n") == 1 and "server-key.pem" in done.stderr and "unusable" in done.stderr
    assert not (tmp_path / "state" / "exports.pid").exists(), "refused before anything started"
