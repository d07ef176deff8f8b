"""Remote disks for tests: nbdkit's own plugins as the other host's NBD server, and TLS made here.

Design notes
- The remote server is nbdkit's `file` plugin (its image is a file the test can read, compare and
  `du`) or its `memory` plugin, on a Unix socket or on TCP 127.0.0.1, plain or with TLS required
  and the client's certificate verified (`--tls=require --tls-verify-peer`), as issue 11's
  destination hosts run it. Processes are started and stopped by PID (conftest.Processes).
- The PKI is real X.509 made with Debian's openssl: one CA, a server certificate for localhost
  and 127.0.0.1, a client certificate; and a second CA with a client certificate of its own (the
  "certificate from another CA" that must be refused). Directories use the names nbdkit and
  libnbd expect: server/{ca-cert,server-cert,server-key}.pem, client/{ca-cert,client-cert,
  client-key}.pem. A PSK file (`username:hexkey`) serves the PSK case.
- A free TCP port is found by binding port 0 and handing the number to nbdkit; if another
  process takes it meanwhile, nbdkit exits and the start is tried again with a new port.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PSK_USER = "svmotion"


@dataclass
class Pki:
    server: Path          # the server's directory (ca-cert, server-cert, server-key)
    client: Path          # our client's directory (ca-cert, client-cert, client-key)
    other_client: Path    # a client certificate signed by another CA
    psk: Path             # PSK keys file, one user: PSK_USER


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key_and_request(key: Path, csr: Path, subject: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", subject)


def _sign(csr: Path, ca: Path, cert: Path, extensions: str) -> None:
    ext = csr.with_suffix(".ext")
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca / "ca-cert.pem"), "-CAkey", str(ca / "ca-key.pem"),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))


def _ca(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(directory / "ca-key.pem"), "-out", str(directory / "ca-cert.pem"), "-days", "2",
             "-subj", f"/CN={name}")
    return directory


def _party(root: Path, ca: Path, role: str, subject: str, extensions: str) -> Path:
    """A directory holding the CA's certificate and a key and certificate for `role` (server, client)."""
    out = root / f"{role}-{ca.name}"
    out.mkdir()
    (out / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    _key_and_request(out / f"{role}-key.pem", root / f"{out.name}.csr", subject)
    _sign(root / f"{out.name}.csr", ca, out / f"{role}-cert.pem", extensions)
    os.chmod(out / f"{role}-key.pem", 0o600)
    return out


def make_pki(root: Path) -> Pki:
    """A CA with a server (localhost, 127.0.0.1) and a client certificate; another CA's client; a PSK."""
    ca, other = _ca(root / "ca", "svmotion test CA"), _ca(root / "other-ca", "another CA")
    server = _party(root, ca, "server", "/CN=localhost",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client = _party(root, ca, "client", "/CN=svmotion-client", "extendedKeyUsage=clientAuth\n")
    other_client = _party(root, other, "client", "/CN=intruder", "extendedKeyUsage=clientAuth\n")
    psk = root / "keys.psk"
    psk.write_text(f"{PSK_USER}:{os.urandom(32).hex()}\n")
    os.chmod(psk, 0o600)
    return Pki(server, client, other_client, psk)


@dataclass
class NbdServer:
    """One nbdkit serving one export; `uri` is how a client reaches it (the scheme says TLS or not)."""
    proc: subprocess.Popen[bytes]
    uri: str
    log: Path
    image: Path | None     # the file behind the export (None for memory)

    def freeze(self) -> None:
        """SIGSTOP: the connections stay open and nothing answers, as on a dead link.

        Returns once every thread of the server is stopped: the signal is delivered asynchronously,
        and on a busy machine a request sent right after kill() could otherwise still be served."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not all_threads_stopped(self.proc.pid):
            assert time.monotonic() < deadline, f"nbdkit pid {self.proc.pid} did not stop"
            time.sleep(0.001)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is in the stopped state (T) as /proc reports it."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue                      # a thread that exited meanwhile
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


def tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def server_command(plugin: list[str], *, listen: list[str], tls: str | None, pki: Pki | None) -> list[str]:
    """nbdkit's command line: `tls` is None (plain), "x509" (certificates, client verified) or "psk"."""
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", *listen, "--threads", "16"]
    if tls == "x509":
        cmd += ["--tls=require", f"--tls-certificates={pki.server}", "--tls-verify-peer"]
    elif tls == "psk":
        cmd += ["--tls=require", f"--tls-psk={pki.psk}"]
    return cmd + plugin


def uri_for(transport: str, tls: str | None, where: str | int) -> str:
    scheme = "nbds" if tls else "nbd"
    user = f"{PSK_USER}@" if tls == "psk" else ""
    if transport == "unix":
        return f"{scheme}+unix://{user}/?socket={where}"
    return f"{scheme}://{user}127.0.0.1:{where}/"


def wait_ready(proc: subprocess.Popen[bytes], ready, log: Path, timeout: float = 20.0) -> bool:
    """True once `ready()`; False if the process exited first (a taken port); fails on timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError(f"nbdkit did not come up in {timeout} s:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)
    return True
