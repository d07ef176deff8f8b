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
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import AgentPool
from remotelib import DatastoreHost, Pki, make_datastore_host, svmotion


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    for name in ("site", "other"):
        done = svmotion("tls", "init", str(root / name), "--host", "127.0.0.1", "--host", "a.test")
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
