"""Fixtures for remote destinations: a site PKI from `svmotion tls init`, and agents offering datastores.

Design notes
- Both "hosts" are this machine on 127.0.0.1: the datastore host's certificate is for
  127.0.0.1 (an IP SAN), the client's for "a.test". A second CA ("other") issues a certificate
  for the same names, which the site must refuse.
- Helpers (the CLI, a datastore host, snapshots) are in remotelib.py. The PKI is made once per
  session by the real CLI (test_tls_init.py checks its output with openssl); agents are real
  `svmotion agent` processes (tests/agentproc.py) whose config has [tls], [[datastore]], listen
  and nbd_listen and no VM. Their export nbdkit is stopped by PID from its pid file
  (AgentProcess.stop).
- `ds_host` is one agent per test module (starting one costs a second): tests that share it work
  in their own directory of the datastore.
- Two hosts for real: `two_hosts` (tests/conftest.py) is a lab of network namespaces
  (svlab/netns.py) whose addresses are the same in every lab, so the session's PKI certifies
  them too (site/<address>/, other/<address>/). `lab_ds_host` runs the datastore agent on host b,
  listening on b's address, and its test clients (`ds`, `remote`, `attempt`) connect from host a
  with a's certificate. It is stopped before the lab is removed (it depends on `two_hosts`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from agentproc import AgentPool
from remotelib import LAB_ADDRESSES, DatastoreHost, Pki, make_datastore_host, svmotion
from vmlib import AgentVM, make_vm

from svlab.netns import Lab


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    hosts = [arg for name in ("127.0.0.1", "a.test", *LAB_ADDRESSES) for arg in ("--host", name)]
    for name in ("site", "other"):
        done = svmotion("tls", "init", str(root / name), *hosts)
        assert done.returncode == 0, done.stderr
    return Pki(site=root / "site", other=root / "other")


@pytest.fixture(scope="module")
def ds_host(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatastoreHost]:
    """One datastore host for the module's tests; each test works in its own directory of ds1."""
    pool = AgentPool()
    try:
        yield make_datastore_host(pool, tmp_path_factory.mktemp("dshost"), pki)
    finally:
        pool.close()


@pytest.fixture
def datastore_host(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., DatastoreHost]]:
    """Factory: a datastore host of the test's own (for tests that kill or restart things)."""
    pool = AgentPool()
    try:
        yield lambda **kwargs: make_datastore_host(pool, tmp_path, pki, **kwargs)
    finally:
        pool.close()


@pytest.fixture
def lab_ds_host(two_hosts: Lab, pki: Pki, tmp_path: Path) -> Iterator[DatastoreHost]:
    """A datastore agent on host b of `two_hosts` (API and NBD on b's address, TLS); its test clients on host a."""
    pool = AgentPool()
    try:
        yield make_datastore_host(pool, tmp_path, pki, on=two_hosts["b"], clients_on=two_hosts["a"])
    finally:
        pool.close()


@pytest.fixture
def lab_vm(two_hosts: Lab, pki: Pki, tmp_path: Path) -> Iterator[Callable[..., AgentVM]]:
    """Factory: a VM whose agent (and nbdkit) run on host a of `two_hosts`, with a's credentials.

    `tls`: its [tls] table instead (e.g. "" for none, or another CA's directory)."""
    pool = AgentPool()

    def make(tls: str | None = None, **kwargs: Any) -> AgentVM:
        table = f'[tls]\ndir = "{pki.lab(two_hosts["a"])}"\n' if tls is None else tls
        return make_vm(pool, tmp_path, extra_config=table, command_prefix=two_hosts["a"].argv([]), **kwargs)

    try:
        yield make
    finally:
        pool.close()


@pytest.fixture
def lab_ds_hosts(two_hosts: Lab, pki: Pki, tmp_path: Path) -> Iterator[Callable[..., DatastoreHost]]:
    """Factory: more datastore agents on host b (name="c", ... or a `tls` table of their own)."""
    pool = AgentPool()
    try:
        yield lambda **kwargs: make_datastore_host(pool, tmp_path, pki, on=two_hosts["b"],
                                                   clients_on=two_hosts["a"], **kwargs)
    finally:
        pool.close()
