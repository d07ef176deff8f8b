"""The other host of the remote cases: the site's certificates and TLS NBD exports of a directory.

Design notes
- The other host is this machine reached over TCP 127.0.0.1: its datastore is a directory, its
  export is nbdkit's `file` plugin serving every file there by name, TLS required and the
  client's certificate verified, exactly the command line agent/export.py runs for a host's
  datastores (procs.nbdkit_tls_export). Or it is host "b" of a lab of network namespaces
  (svlab/netns.py), when a case needs a link between the hosts that it can shape; processes
  started while the calling thread is on a lab host (`Host.entered`) run there. The harness creates and deletes the files behind the
  exports directly (DiskCreate and Cleanup of the other host's agent do the same to its
  datastore); only the data goes over NBD.
- Certificates come from agent/certs.py, what `svmotion tls init DIR --host hosta --host
  hostb,127.0.0.1` writes: "hosta" is the mirror node's host (its directory is the client side:
  ca-cert.pem, client-cert.pem, client-key.pem), "hostb" every export's (server side; the names
  127.0.0.1 and the lab's host "b" address are in its certificate because clients check it
  against the address they dial).
  The same directories serve nbdkit, libnbd (the mirror node's tls-certificates=, nbdcopy's URI)
  and QEMU's tls-creds-x509, which all read these file names.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nbd

from agent.certs import init as tls_init, parse_host
from svlab.netns import Host, host_address
from nbd_plugin.backend_nbd import NbdBackend, NbdOptions

from . import procs
from .svm import Place

CLIENT_HOST = "hosta"
SERVER_HOST = f"hostb,127.0.0.1,{host_address(1)}"   # also host "b" of a netns lab (remote_shaped)


@dataclass(frozen=True)
class Pki:
    """Certificate directories of the two hosts, made by agent/certs.py."""

    client: str   # the mirror node's host: what nbds:// clients present
    server: str   # the exports' host: what TLS NBD servers present
    command: str  # the CLI command that writes the same files


def make_pki(root: str) -> Pki:
    """A site CA and certificates for the client host and the server host, under `root`."""
    tls_init(Path(root), [parse_host(CLIENT_HOST), parse_host(SERVER_HOST)])
    return Pki(os.path.join(root, "hosta"), os.path.join(root, "hostb"),
               f"svmotion tls init {root} --host {CLIENT_HOST} --host {SERVER_HOST}")


@dataclass
class Export:
    """A running TLS export of `directory` on `address`:`port`."""

    directory: str
    address: str
    port: int
    service: procs.Service

    def uri(self, name: str) -> str:
        """The nbds:// URI of the file `name` in the exported directory."""
        return f"nbds://{self.address}:{self.port}/{name}"

    @property
    def place(self) -> Place:
        """Destinations made in this export's directory and reached through it."""
        return Place(self.directory, self.uri(""))


@contextlib.contextmanager
def tls_export(work: str, pki: Pki, name: str, host: Host | None = None) -> Iterator[Export]:
    """The other host's datastore `work/name` served over TLS (on 127.0.0.1, or on a lab's
    `host`), stopped on the way out."""
    directory = os.path.join(work, name)
    os.makedirs(directory, exist_ok=True)
    address = host.address if host else procs.LOOPBACK
    with host.entered() if host else contextlib.nullcontext():
        service, port = procs.start_on_free_port(
            lambda p: procs.nbdkit_tls_export(directory, pki.server, p, work, name=f"nbdkit-{name}",
                                              address=address))
    try:
        yield Export(directory, address, port, service)
    finally:
        service.stop()


def mirror_node_tls(pki: Pki) -> list[str]:
    """The mirror node's parameters for nbds:// disks and destinations (docs/interfaces.md, 1)."""
    return [f"tls-certificates={pki.client}"]


def tls_uri(uri: str, pki: Pki) -> str:
    """`uri` with this host's certificates in it, for tools that take only a URI (nbdcopy)."""
    return f"{uri}?tls-certificates={pki.client}"


def timed_handshake(uri: str, pki: Pki) -> float:
    """Seconds for one libnbd client to connect, complete TLS and the NBD handshake, and leave:
    what a reopen of a remote disk costs at least."""
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(pki.client)
    start = time.monotonic()
    h.connect_uri(uri)
    seconds = time.monotonic() - start
    h.shutdown()
    return seconds


def timed_backend(uri: str, pki: Pki, settle: float = 0.2) -> tuple[float, float]:
    """The mirror node's own NBD backend, in this process: seconds to open it on `uri` as
    install_mirror opens a destination under the stun (the first link; with multi-conn the
    others open in the background), and, once those are open, to close it as the switchover
    closes a remote source."""
    start = time.monotonic()
    backend = NbdBackend(uri, NbdOptions(tls_certificates=pki.client), dest=True)
    opened = time.monotonic() - start
    time.sleep(settle)
    start = time.monotonic()
    backend.close()
    return opened, time.monotonic() - start
