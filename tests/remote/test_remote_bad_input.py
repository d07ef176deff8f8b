"""Bad remote destinations: one line, a documented exit code, nothing changed on either host.

A VM agent with the site's credentials asks for a destination that cannot be: a path outside
every datastore of B (exit 3, B's refusal), an unknown host, a port where no agent listens, a
B whose certificate names another host, a VM agent whose certificate comes from
another CA or has expired, and one with no [tls] at all (exit 4: no conversation; exit 3:
refused here). (An agent whose own certificate has expired cannot offer datastores: its export
does not start, see test_datastore_export.py.)
"""
from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import AgentPool, free_tcp_port
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from remotelib import DatastoreHost, Pki, snapshot
from vmlib import AgentVM, make_vm

from agent.certs import cert_pem, key_pem, make_host_cert, parse_host

MiB = 1024 * 1024


@pytest.fixture
def vm_with(tmp_path: Path) -> Iterator[Callable[[str], AgentVM]]:
    """Factory: a 1-disk VM whose agent's config ends with `extra` (its [tls] table, or nothing)."""
    pool = AgentPool()
    try:
        yield lambda extra: make_vm(pool, tmp_path, size=4 * MiB, files=False, extra_config=extra)
    finally:
        pool.close()


def expired_host_dir(site: Path, name: str, out: Path) -> Path:
    """A host directory like `tls init`'s, signed by the site CA, whose certificate expired yesterday."""
    ca_cert = x509.load_pem_x509_certificate((site / "ca-cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((site / "ca-key.pem").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(days=2)
    key, cert = make_host_cert(parse_host(name), ca_key, ca_cert, 1, now)   # type: ignore[arg-type]
    out.mkdir()
    shutil.copy(site / "ca-cert.pem", out / "ca-cert.pem")
    for role in ("server", "client"):
        (out / f"{role}-cert.pem").write_bytes(cert_pem(cert))
        (out / f"{role}-key.pem").write_bytes(key_pem(key))
        (out / f"{role}-key.pem").chmod(0o600)
    return out


def refused(vm: AgentVM, dest: str, code: int, *words: str) -> str:
    """`migrate` to `dest` fails with `code` and one line holding `words`; the VM stays on its source."""
    out = vm.cli("migrate", vm.name, "--dest", dest)
    assert out.returncode == code, out
    assert out.stderr.count("\n") == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr
    assert vm.status()["migration"] is None and vm.status()["last"] is None
    assert vm.plugin("status")["disks"]["disk0"]["path"] == str(vm.disks["disk0"])
    return out.stderr


def test_a_path_outside_every_datastore(vm_with, ds_host: DatastoreHost, pki: Pki) -> None:
    vm = vm_with(f'[tls]\ndir = "{pki.client}"\n')
    before = snapshot(ds_host.datastore)
    refused(vm, f"127.0.0.1:{ds_host.api_port}:/etc/vm1", 3, "outside every datastore", "ds1")
    refused(vm, f"127.0.0.1:{ds_host.api_port}:{ds_host.datastore}/no-such-dir", 3, "does not exist")
    assert snapshot(ds_host.datastore) == before


def test_unreachable_destinations(vm_with, pki: Pki) -> None:
    vm = vm_with(f'[tls]\ndir = "{pki.client}"\n')
    refused(vm, "no-such-host.invalid:/srv/ds1/vm1", 4, "no-such-host.invalid:9816", "unknown host")
    port = free_tcp_port()
    refused(vm, f"127.0.0.1:{port}:/srv/ds1/vm1", 4, f"127.0.0.1:{port}", "Connection refused")


def test_certificates_that_are_not_accepted(vm_with, ds_host: DatastoreHost, pki: Pki) -> None:
    before = snapshot(ds_host.datastore)
    dest = f"127.0.0.1:{ds_host.api_port}:{ds_host.datastore}"
    # Our own certificate is from another CA: B refuses it.
    vm = vm_with(f'[tls]\ndir = "{pki.other / "a.test"}"\n')
    refused(vm, dest, 4, f"127.0.0.1:{ds_host.api_port}")
    # B's certificate does not name the host we dialled (localhost, not 127.0.0.1).
    vm = vm_with(f'[tls]\ndir = "{pki.client}"\n')
    refused(vm, f"localhost:{ds_host.api_port}:{ds_host.datastore}", 4, "certificate is not accepted",
            "mismatch")
    # Without [tls] this agent cannot reach another host at all.
    vm = vm_with("")
    refused(vm, dest, 3, "needs [tls]")
    assert snapshot(ds_host.datastore) == before


def test_an_expired_certificate(vm_with, ds_host: DatastoreHost, pki: Pki, tmp_path: Path) -> None:
    expired = expired_host_dir(pki.site, "a.test", tmp_path / "expired")
    before = snapshot(ds_host.datastore)
    vm = vm_with(f'[tls]\ndir = "{expired}"\n')
    refused(vm, f"127.0.0.1:{ds_host.api_port}:{ds_host.datastore}", 4, f"127.0.0.1:{ds_host.api_port}", "expired")
    assert snapshot(ds_host.datastore) == before
