"""Helpers of the remote-destination tests: the CLI, certificates, a datastore host, snapshots.

A plain module beside conftest.py (pytest keeps one module named conftest): tests import it.
"""
from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentproc import PYTHON, ROOT, AgentPool, AgentProcess, free_tcp_port

from agent.config import TlsConfig
from agent.remote import RemoteAgent


def svmotion(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real CLI, from this worktree."""
    return subprocess.run([PYTHON, "-m", "agent.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def tls_of(host_dir: Path) -> TlsConfig:
    """A host directory of `tls init` as the agent's config reads `[tls] dir`."""
    return TlsConfig(ca=str(host_dir / "ca-cert.pem"), cert=str(host_dir / "server-cert.pem"),
                     key=str(host_dir / "server-key.pem"), dir=str(host_dir))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Pki:
    site: Path         # the site CA: site/ca-cert.pem, site/127.0.0.1/, site/a.test/
    other: Path        # another CA with a certificate for the same names: other/a.test/, other/127.0.0.1/

    @property
    def server(self) -> Path:
        return self.site / "127.0.0.1"

    @property
    def client(self) -> Path:
        return self.site / "a.test"


@dataclass
class DatastoreHost(AgentProcess):
    """An agent offering one datastore, `ds1`, on 127.0.0.1."""

    datastore: Path = Path()
    api_port: int = 0
    nbd_port: int = 0
    pki: Pki | None = None

    def remote(self, host_dir: Path | None = None, host: str = "127.0.0.1", timeout: float = 30) -> RemoteAgent:
        """A TLS client of its API, with the site's client certificate unless another is given."""
        assert self.pki is not None
        return RemoteAgent(host, self.api_port, tls_of(host_dir or self.pki.client), timeout=timeout)

    def ds(self, op: str, **args: Any) -> dict[str, Any]:
        with self.remote() as r:
            return r.call(op, **args)

    @property
    def exports_pid_file(self) -> Path:
        return self.state / "exports.pid"


def make_datastore_host(pool: AgentPool, root: Path, pki: Pki, name: str = "b",
                        tls: str | None = None) -> DatastoreHost:
    """Write the config of a datastore host under `root` and start its agent (`tls`: its [tls] table)."""
    datastore = root / f"{name}-ds1"
    datastore.mkdir()
    api_port, nbd_port = free_tcp_port(), free_tcp_port()
    host = DatastoreHost(root=root, state=pool.state_dir("svr-"), disks={}, config=root / f"{name}.toml",
                         metrics="", datastore=datastore, api_port=api_port, nbd_port=nbd_port, pki=pki,
                         agent_keys={"listen": f"127.0.0.1:{api_port}", "nbd_listen": f"127.0.0.1:{nbd_port}"},
                         extra_config=(tls or f'[tls]\ndir = "{pki.server}"\n') +
                         f'\n[[datastore]]\nname = "ds1"\npath = "{datastore}"\n')
    host.write_config()
    pool.add(host)
    host.start()
    return host


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under `root`: a link's target, a file's bytes, a directory as such."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = ("link", str(path.readlink()))
        elif path.is_file():
            out[key] = ("file", path.read_bytes())
        else:
            out[key] = ("dir",)
    return out
