"""The datastores' NBD export: nbdkit with TLS required and client certificates verified, read-write,
supervised by the agent (restarted when killed, adopted by a restarted agent).

Real libnbd clients (`nbd.NBD`, the mirror node's future client) over TLS to the agent's nbdkit on
127.0.0.1; its disks made through the agent API (`ds_create`), as a migration will.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import nbd
import pytest
from remotelib import DatastoreHost

from agent.remote import nbd_uri
from agent.supervisor import process_start_time

SUFFIX = ".svmotion-partial"
MiB = 1 << 20


def connect(host: DatastoreHost, export: str, certificates: Path | None, *, tls: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    if tls:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_verify_peer(True)
        if certificates is not None:
            h.set_tls_certificates(str(certificates))
    h.connect_uri(nbd_uri("127.0.0.1", host.nbd_port, export).replace("nbds://", "nbds://" if tls else "nbd://"))
    return h


def make_disk(host: DatastoreHost, name: str, size: int = 4 * MiB) -> tuple[Path, str]:
    directory = host.datastore / "vm1"
    directory.mkdir(exist_ok=True)
    partial = directory / f"{name}{SUFFIX}"
    return partial, host.ds("ds_create", path=str(partial), size=size)["export"]


def test_an_export_is_read_write_over_tls_and_flush_reaches_the_file(ds_host: DatastoreHost) -> None:
    partial, export = make_disk(ds_host, "rw.raw")
    h = connect(ds_host, export, ds_host.pki.client)
    try:
        assert h.get_size() == 4 * MiB and not h.is_read_only() and h.can_flush() and h.can_fua()
        data = os.urandom(256 << 10)
        h.pwrite(data, MiB)
        h.pwrite(data[:4096], 3 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        with open(partial, "rb") as f:
            f.seek(MiB)
            assert f.read(len(data)) == data
        assert h.pread(len(data), MiB) == data and h.pread(4096, 0) == bytes(4096)
    finally:
        h.shutdown()
    # After DiskCopyDone the same export name serves the final file.
    ds_host.ds("ds_rename", path=str(partial))
    h = connect(ds_host, export, ds_host.pki.client)
    try:
        assert h.pread(4096, 3 * MiB) == data[:4096]
    finally:
        h.shutdown()


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "certificate of another CA"])
def test_clients_without_a_site_certificate_are_refused(ds_host: DatastoreHost, tmp_path: Path, who: str) -> None:
    partial, export = make_disk(ds_host, f"refuse-{who.replace(' ', '-')}.raw")
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca-cert.pem").write_bytes((ds_host.pki.site / "ca-cert.pem").read_bytes())
    mixed = tmp_path / "mixed"      # trusts the site's CA, but its own certificate is the other CA's
    mixed.mkdir()
    (mixed / "ca-cert.pem").write_bytes((ds_host.pki.site / "ca-cert.pem").read_bytes())
    for name in ("client-cert.pem", "client-key.pem"):
        (mixed / name).write_bytes((ds_host.pki.other / "a.test" / name).read_bytes())
        os.chmod(mixed / name, 0o600)
    certificates = {"plaintext": None, "no client certificate": only_ca, "certificate of another CA": mixed}[who]
    with pytest.raises(nbd.Error):
        connect(ds_host, export, certificates, tls=who != "plaintext")
    assert partial.read_bytes() == bytes(4 * MiB)


def test_a_default_or_unknown_export_serves_nothing(ds_host: DatastoreHost) -> None:
    for export in ("", "ds1-" + "0" * 32, "../etc/passwd"):
        with pytest.raises(nbd.Error):
            connect(ds_host, export, ds_host.pki.client)


def test_the_agent_restarts_a_killed_export_and_a_restarted_agent_adopts_it(datastore_host) -> None:
    host = datastore_host()
    partial, export = make_disk(host, "disk0.raw", size=MiB)
    pid, start = host.export_pid()
    assert process_start_time(pid) == start
    os.kill(pid, signal.SIGKILL)                   # our agent's nbdkit, by the pid it recorded
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            new_pid, new_start = host.export_pid()
        except (OSError, ValueError, KeyError):
            new_pid = pid
        if new_pid != pid and process_start_time(new_pid) == new_start:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the export was not restarted:\n{host.log_text()}")
    assert "datastore export: nbdkit pid" in host.log_text() and "exited" in host.log_text()
    h = connect(host, export, host.pki.client)
    try:
        h.pwrite(b"after restart", 0)
        h.flush()
    finally:
        h.shutdown()
    assert partial.read_bytes()[:13] == b"after restart"

    # An agent that dies and comes back takes the running export over: its clients stay connected.
    h = connect(host, export, host.pki.client)
    try:
        host.kill_agent()
        host.start()
        assert host.export_pid() == (new_pid, new_start)
        assert "adopted running nbdkit pid" in host.log_text()
        h.pwrite(b"still connected", 0)
        h.flush()
    finally:
        h.shutdown()
    assert partial.read_bytes()[:15] == b"still connected"



def test_credentials_given_as_ca_cert_and_key_files_serve_too(datastore_host, pki, tmp_path: Path) -> None:
    """[tls] ca, cert, key: the agent lays out nbdkit's directory itself (state_dir/tls, symlinks)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for src, dst in (("ca-cert.pem", "site-ca.pem"), ("server-cert.pem", "b.pem"), ("server-key.pem", "b-key.pem")):
        (creds / dst).write_bytes((pki.server / src).read_bytes())
        os.chmod(creds / dst, 0o600)
    host = datastore_host(tls=f'[tls]\nca = "{creds}/site-ca.pem"\ncert = "{creds}/b.pem"\n'
                              f'key = "{creds}/b-key.pem"\n')
    assert sorted(p.name for p in (host.state / "tls").iterdir()) == \
        ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem"]
    partial, export = make_disk(host, "disk0.raw", size=MiB)
    h = connect(host, export, host.pki.client)
    try:
        h.pwrite(b"explicit files", 0)
        h.flush()
    finally:
        h.shutdown()
    assert partial.read_bytes()[:14] == b"explicit files"
