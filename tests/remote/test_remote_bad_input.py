"""Bad remote destinations: one line, a documented exit code, nothing changed on either host.

Two hosts as network namespaces (fixture `two_hosts`): the VM's agent on a, datastore agents on
b. A VM agent with the site's credentials asks for a destination that cannot be: a path outside
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
from typing import Callable

import pytest
from agentproc import free_tcp_port
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from remotelib import DatastoreHost, Pki, snapshot
from vmlib import AgentVM

from agent.certs import cert_pem, key_pem, make_host_cert, parse_host

MiB = 1024 * 1024


@pytest.fixture
def vm_with(lab_vm) -> Callable[..., AgentVM]:
    """Factory: a 1-disk VM on host a; `tls`: its [tls] table instead of a's (or "" for none)."""
    return lambda tls=None: lab_vm(tls=tls, size=4 * MiB, files=False)


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


def test_a_path_outside_every_datastore(vm_with, lab_ds_host: DatastoreHost) -> None:
    b = lab_ds_host
    vm = vm_with()
    before = snapshot(b.datastore)
    refused(vm, f"{b.address}:{b.api_port}:/etc/vm1", 3, "outside every datastore", "ds1")
    refused(vm, f"{b.address}:{b.api_port}:{b.datastore}/no-such-dir", 3, "does not exist")
    assert snapshot(b.datastore) == before


def test_unreachable_destinations(vm_with, two_hosts) -> None:
    vm = vm_with()
    refused(vm, "no-such-host.invalid:/srv/ds1/vm1", 4, "no-such-host.invalid:9816", "unknown host")
    b, port = two_hosts["b"].address, free_tcp_port()
    refused(vm, f"{b}:{port}:/srv/ds1/vm1", 4, f"{b}:{port}", "Connection refused")


def test_certificates_that_are_not_accepted(vm_with, lab_ds_host: DatastoreHost, lab_ds_hosts, pki: Pki,
                                            two_hosts) -> None:
    b = lab_ds_host
    before = snapshot(b.datastore)
    dest = f"{b.address}:{b.api_port}:{b.datastore}"
    # Our own certificate is from another CA: b refuses it.
    refused(vm_with(f'[tls]\ndir = "{pki.other / two_hosts["a"].address}"\n'), dest, 4, f"{b.address}:{b.api_port}")
    # Without [tls] this agent cannot reach another host at all.
    refused(vm_with(""), dest, 3, "needs [tls]")
    assert snapshot(b.datastore) == before
    # c, on b's address, has a certificate that names another host (127.0.0.1).
    c = lab_ds_hosts(name="c", tls=f'[tls]\ndir = "{pki.server}"\n')
    before = snapshot(c.datastore)
    refused(vm_with(), f"{c.address}:{c.api_port}:{c.datastore}", 4, "certificate is not accepted", "mismatch")
    assert snapshot(c.datastore) == before


def test_an_expired_certificate(vm_with, lab_ds_host: DatastoreHost, pki: Pki, two_hosts, tmp_path: Path) -> None:
    b = lab_ds_host
    expired = expired_host_dir(pki.site, two_hosts["a"].address, tmp_path / "expired")
    before = snapshot(b.datastore)
    refused(vm_with(f'[tls]\ndir = "{expired}"\n'), f"{b.address}:{b.api_port}:{b.datastore}", 4,
            f"{b.address}:{b.api_port}", "expired")
    assert snapshot(b.datastore) == before
