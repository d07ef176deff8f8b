"""Helpers of the remote-destination tests: the CLI, certificates, a datastore host, snapshots.

A plain module beside conftest.py (pytest keeps one module named conftest): tests import it.
"""
from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

from agentproc import PYTHON, ROOT, AgentPool, AgentProcess, free_tcp_ports

from agent.config import TlsConfig
from svlab.netns import Host, host_address
from agent.remote import RemoteAgent

LAB_ADDRESSES = [host_address(i) for i in range(3)]   # svlab/netns.py: the same in every lab, so one PKI serves all


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


def raw_client_context(trust: Path, cert_dir: Path | None) -> ssl.SSLContext:
    """A TLS client trusting `trust`, presenting `cert_dir`'s client certificate, or none (None)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(trust))
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "client-cert.pem"), str(cert_dir / "client-key.pem"))
    return ctx


@dataclass
class Pki:
    site: Path         # the site CA: site/ca-cert.pem, site/127.0.0.1/, site/a.test/, site/<lab address>/
    other: Path        # another CA with certificates for the same names: other/a.test/, ...

    @property
    def server(self) -> Path:
        return self.site / "127.0.0.1"

    @property
    def client(self) -> Path:
        return self.site / "a.test"

    def lab(self, host: Host) -> Path:
        """The site's directory for a host of a netns lab (its certificate names its address)."""
        return self.site / host.address


@dataclass
class DatastoreHost(AgentProcess):
    """An agent offering one datastore, `ds1`, on 127.0.0.1 or on a host of a netns lab."""

    datastore: Path = Path()
    api_port: int = 0
    nbd_port: int = 0
    pki: Pki | None = None
    address: str = "127.0.0.1"        # where it listens (API and NBD)
    client_host: Host | None = None   # the lab host its test clients connect from (None: this machine)
    client_dir: Path | None = None    # their certificates (default: the site's a.test)

    def client_side(self) -> ContextManager[Any]:
        """Where this test process makes its client sockets: on `client_host` (svlab/netns.py)."""
        return self.client_host.entered() if self.client_host else nullcontext()

    def remote(self, host_dir: Path | None = None, host: str | None = None, timeout: float = 30) -> RemoteAgent:
        """A TLS client of its API, with the site's client certificate unless another is given."""
        assert self.pki is not None
        with self.client_side():
            return RemoteAgent(host or self.address, self.api_port, tls_of(host_dir or self.client_dir or
                                                                            self.pki.client), timeout=timeout)

    def attempt(self, context: ssl.SSLContext | None, request: dict[str, Any]) -> str:
        """Send one request over TLS (plaintext without a context); the reply line, or how it failed."""
        with self.client_side():
            raw = socket.create_connection((self.address, self.api_port), timeout=10)
        try:
            sock = context.wrap_socket(raw, server_hostname=self.address) if context else raw
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = sock.recv(65536)
            return data.decode(errors="replace") if data else "closed"
        except OSError as err:
            return f"error: {err}"
        finally:
            raw.close()

    def ds(self, op: str, **args: Any) -> dict[str, Any]:
        with self.remote() as r:
            return r.call(op, **args)

    @property
    def exports_pid_file(self) -> Path:
        return self.state / "exports.pid"

    def export_pid(self) -> tuple[int, int]:
        """The pid and start time its export nbdkit recorded."""
        rec = json.loads(self.exports_pid_file.read_text())
        return int(rec["pid"]), int(rec["start_time"])


def make_datastore_host(pool: AgentPool, root: Path, pki: Pki, name: str = "b",
                        tls: str | None = None, on: Host | None = None,
                        clients_on: Host | None = None, datastore: Path | None = None) -> DatastoreHost:
    """Write the config of a datastore host under `root` and start its agent (`tls`: its [tls] table).

    `on`: a host of a netns lab to run it in, listening on that host's address with that host's
    certificate; `clients_on`: the lab host its test clients connect from, with that host's certificate.
    `datastore`: an existing directory to offer as ds1 (default: a new root/NAME-ds1). A mount
    there must come first: `ip netns exec` gives the agent a mount namespace of its own, which
    does not see later mounts on a machine whose mounts are private.
    """
    if datastore is None:
        datastore = root / f"{name}-ds1"
        datastore.mkdir()
    api_port, nbd_port = free_tcp_ports(2)    # free here, and surely on a fresh lab host
    address = on.address if on else "127.0.0.1"
    host = DatastoreHost(root=root, state=pool.state_dir("svr-"), disks={}, config=root / f"{name}.toml",
                         metrics="", datastore=datastore, api_port=api_port, nbd_port=nbd_port, pki=pki,
                         address=address, client_host=clients_on,
                         client_dir=pki.lab(clients_on) if clients_on else None,
                         command_prefix=on.argv([]) if on else [],
                         agent_keys={"listen": f"{address}:{api_port}", "nbd_listen": f"{address}:{nbd_port}"},
                         extra_config=(tls or f'[tls]\ndir = "{pki.lab(on) if on else pki.server}"\n') +
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
