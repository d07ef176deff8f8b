"""Another host's agent, reached over its TCP API with mutual TLS: connect, call `ds_*` ops, one-line errors.

Design notes
- The client side of agent/tls.py: our certificate as the client's, the server's certificate
  checked against the site CA and against the host name (or address) we dialled. A certificate
  for another host, from another CA, or expired fails the handshake, and the error says so.
- Every error is one line naming the host and port: `RemoteUnreachable` (exit 4) when no
  conversation is possible (unknown host, nothing listening, a timeout, the TLS handshake or the
  peer refusing our certificate), else the remote agent's own refusal with its exit code
  (docs/interfaces.md, section 5), prefixed with the host.
- Deadlines: connecting and the handshake have CONNECT_TIMEOUT_S, each call `timeout` (a
  `ds_digests` of 64 MiB reads that much on the far side). A call that times out leaves the
  connection unusable: the caller makes a new one.
- One connection is one JsonLinesClient (agent/jsonlines.py), safe for one thread at a time.
"""
from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.config import TlsConfig
from agent.errors import EXIT_INTERNAL, EXIT_UNREACHABLE, SvmotionError
from agent.jsonlines import JsonLinesClient, RemoteError
from agent.tls import client_context

CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 60.0
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

Name = str | ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_name(text: str) -> Name:
    """A host's DNS name or IP address (IPv6 with or without brackets); raise ValueError saying the rule.

    What a destination names (agent/plan.py) and a certificate certifies (agent/certs.py).
    """
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{text!r} is neither a host name (letters, digits and '-' in dot-separated labels) "
                         "nor an IP address")
    return text.rstrip(".").lower()


class RemoteUnreachable(SvmotionError):
    """No conversation with another host's agent is possible (exit 4); the line names the host and why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"cannot talk to the agent at {where} ({reason}); check that it runs `svmotion agent` "
                         f"with [agent] listen on that address and that both hosts' certificates come from one CA",
                         EXIT_UNREACHABLE)


def host_port(host: str, port: int) -> str:
    """HOST:PORT as written in messages and URIs, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nbd_uri(host: str, port: int, export: str) -> str:
    """The NBD URI of a datastore export on another host, TLS required: nbds://HOST:PORT/EXPORT."""
    return f"nbds://{host_port(host, port)}/{export}"


def _expired(tls: TlsConfig) -> str | None:
    """Why our own certificate cannot be used now, or None: the peer would only close the connection."""
    try:
        cert = x509.load_pem_x509_certificate(Path(tls.cert).read_bytes())
    except (OSError, ValueError):
        return None             # client_context says what is wrong with it
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    if cert.not_valid_after < now:
        return (f"this host's certificate {tls.cert} expired on {cert.not_valid_after:%Y-%m-%d %H:%M} UTC; "
                f"renew it with svmotion tls init DIR --host NAME --force")
    if cert.not_valid_before > now:
        return f"this host's certificate {tls.cert} is not valid before {cert.not_valid_before:%Y-%m-%d %H:%M} UTC"
    return None


def _why(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not accepted: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return f"TLS: {err.reason or err}"
    if isinstance(err, socket.gaierror):
        return f"unknown host: {err.strerror}"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class RemoteAgent:
    """A connection to another host's agent API.

    Example: `with RemoteAgent("hostb", 9816, config.tls) as b: b.call("ds_hello")["datastores"]`
    """

    def __init__(self, host: str, port: int, tls: TlsConfig, timeout: float = CALL_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.host, self.port = host, port
        self.where = host_port(host, port)
        expired = _expired(tls)
        if expired:
            raise RemoteUnreachable(self.where, expired)
        context = client_context(tls)
        try:
            raw = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as err:
            raise RemoteUnreachable(self.where, _why(err)) from None
        try:
            sock = context.wrap_socket(raw, server_hostname=host)
        except OSError as err:
            raw.close()
            raise RemoteUnreachable(self.where, _why(err)) from None
        sock.settimeout(timeout)
        self._client = JsonLinesClient(self.where, sock=sock)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request; the reply, or an SvmotionError naming the host (its exit code from the reply)."""
        try:
            return self._client.call(op, **args)
        except RemoteError as err:
            raise SvmotionError(f"agent at {self.where}: {err.reply.get('error', 'failed')}",
                                int(err.reply.get("exit", EXIT_INTERNAL))) from None
        except (OSError, ValueError) as err:
            # With TLS 1.3 a server that refuses our certificate says so at our first read.
            raise RemoteUnreachable(self.where, f"{op}: {_why(err)}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
