"""Mutual TLS between agents: the SSL contexts, the TCP listener of the agent API, nbdkit's certificate dir.

Design notes
- Mutual: the server requires a client certificate signed by the site CA (CERT_REQUIRED) and the
  client checks the server's certificate and its name against the host it dialled
  (check_hostname). Any host holding a certificate of the CA is a peer: the CA is the trust
  boundary (agent/certs.py makes it). TLS 1.3 only: both ends are svmotion.
- `TlsListener` is a `Listener` of nbd_plugin/control.py, so the TCP API has the framing, the
  typed arguments and the dispatch of the Unix one. The handshake runs in the connection's own
  thread, with a deadline (HANDSHAKE_TIMEOUT_S) and at most MAX_HANDSHAKES at once: a peer
  that connects and says nothing costs a thread for seconds, not forever, and a crowd of them
  is turned away without a thread. After the handshake the socket blocks, as on the Unix socket.
- A refused peer (no certificate, another CA, plaintext) gets the TLS alert and a closed
  connection, never a request served: nothing it sent reaches a handler.
- nbdkit (`--tls-certificates=DIR`) and libnbd (`set_tls_certificates(DIR)`) read fixed file
  names from one directory (config.TLS_FILES). `[tls] dir` is such a directory; for `[tls] ca,
  cert, key` the agent lays one out in state_dir/tls as symlinks (`certificates_dir`).
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
import threading

from agent.config import TLS_FILES, TlsConfig
from agent.errors import ConfigError
from nbd_plugin.control import Connection, NotAdmitted

log = logging.getLogger("svmotion.tls")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKES = 32


def server_context(tls: TlsConfig, source: str = "") -> ssl.SSLContext:
    """The agent API's server side: our certificate, client certificates of the CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, tls, source)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TlsConfig, source: str = "") -> ssl.SSLContext:
    """Dialling another agent: our certificate as the client's, the server's checked against the CA and its name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED and check_hostname by default
    _load(ctx, tls, source)
    return ctx


def _load(ctx: ssl.SSLContext, tls: TlsConfig, source: str) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=tls.ca)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{source}: [tls] CA {tls.ca!r} is unusable ({_reason(err)}); "
                          "give the CA's certificate (ca-cert.pem)") from None
    try:
        ctx.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    except (ssl.SSLError, OSError) as err:
        raise ConfigError(f"{source}: [tls] certificate {tls.cert!r} with key {tls.key!r} is unusable "
                          f"({_reason(err)}); give a certificate and its own key (svmotion tls init)") from None


def _reason(err: Exception) -> str:
    return getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)


def certificates_dir(tls: TlsConfig, state_dir: str) -> str:
    """A directory in nbdkit's and libnbd's layout for these credentials (module notes)."""
    if tls.dir is not None:
        return tls.dir
    where = os.path.join(state_dir, "tls")
    os.makedirs(where, mode=0o700, exist_ok=True)
    targets = {"ca-cert.pem": tls.ca, "server-cert.pem": tls.cert, "server-key.pem": tls.key,
               "client-cert.pem": tls.cert, "client-key.pem": tls.key}
    assert set(targets) == set(TLS_FILES)
    for name, target in targets.items():
        link = os.path.join(where, name)
        tmp = f"{link}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return where


def split_address(address: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port), brackets removed."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def peer_name(sock: ssl.SSLSocket) -> str:
    """Who a TLS peer is, for logs: its certificate's common name and its address."""
    cert = sock.getpeercert() or {}
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return f"{names[0] if names else '?'} ({_address(sock)})"


class TlsListener:
    """A TCP listener admitting only peers with a certificate of our CA (mutual TLS).

    Example: `ControlServer(TlsListener("192.0.2.2:9816", server_context(tls)), handle).start()`
    """

    def __init__(self, address: str, context: ssl.SSLContext):
        self.name = address
        self.host, self.port = split_address(address)
        self._context = context
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)

    def open(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(socket.SOMAXCONN)
        except OSError:
            listener.close()
            raise
        if self.port == 0:
            self.port = listener.getsockname()[1]
        return listener

    def admit(self, sock: socket.socket) -> Connection:
        if not self._handshakes.acquire(blocking=False):
            sock.close()
            raise NotAdmitted(f"more than {MAX_HANDSHAKES} TLS handshakes at once", tell=False)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            address = _address(sock)     # now: a failed wrap_socket has taken the socket's descriptor away
            try:
                tls_sock = self._context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as err:
                sock.close()
                log.warning("agent API %s: refused %s: TLS handshake failed: %s", self.name, address,
                            _reason(err))
                raise NotAdmitted(f"TLS handshake failed: {_reason(err)}", tell=False) from None
            tls_sock.settimeout(None)
            return Connection(tls_sock, peer=peer_name(tls_sock))
        finally:
            self._handshakes.release()

    def close(self) -> None:
        """Nothing to remove: a TCP port goes with its socket."""
