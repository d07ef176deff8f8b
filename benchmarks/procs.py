"""Servers the benchmarks start: nbdkit (C `file` plugin, its TLS export of a directory, or the
svmotion mirror node) and qemu-storage-daemon, each a child process stopped by its own PID.

Design notes
- The machine is shared: other people run nbdkit and QEMU here too. A Service only ever signals
  the PID it started (SIGTERM, then SIGKILL after a grace period), never a process name, and
  `--exit-with-parent` makes nbdkit go away even if this harness is killed.
- Readiness is "the Unix socket (or the TCP port) accepts a connection", polled with a deadline;
  a server that dies first is reported with the tail of its stderr, which is kept in a file in
  the work dir.
- The other host of the remote cases listens on TCP 127.0.0.1, on a port found free by binding
  port 0; if another process takes it before the server binds it, the server exits and
  `start_on_free_port` tries again with another port.
- Counters read from /proc: VmRSS (the mirror node's memory, case 8) and `wchar` of
  /proc/PID/io, the bytes the process passed to write/pwrite(v) system calls. Socket replies go
  through sendmsg and are not counted, so for a storage daemon wchar is the bytes it wrote to
  its files; that is how the QEMU target's writes are counted (copy amplification).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import nbd_plugin
from agent.export import export_command

NBDKIT_THREADS = 16
LOOPBACK = "127.0.0.1"
PORT_ATTEMPTS = 5

Address = str | tuple[str, int]   # a Unix socket path, or a TCP (host, port)


class ServiceError(RuntimeError):
    """A server did not start, or died."""


class Service:
    """One child server process with a readiness socket; use as a context manager."""

    def __init__(self, name: str, argv: Sequence[str], ready_socket: Address, log_dir: str,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.ready_socket = ready_socket
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> str:
        """The command line as a shell would show it (for the summary)."""
        prefix = ""
        if self.env and "PYTHONPATH" in self.env:
            prefix = f"PYTHONPATH={shlex.quote(self.env['PYTHONPATH'])} "
        return prefix + shlex.join(self.argv)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "service not started"
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> "Service":
        env = dict(os.environ, **self.env) if self.env else None
        # A socket left by an earlier run in our own work dir would pass the readiness probe.
        if isinstance(self.ready_socket, str) and os.path.exists(self.ready_socket):
            os.unlink(self.ready_socket)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, env=env)
        wait_for_socket(self.ready_socket, timeout, self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM our own child, SIGKILL it after `grace` seconds; always reaps it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerExited(ServiceError):
    """A server exited before it served (on a TCP port: maybe another process took the port)."""


def wait_for_socket(path: Address, timeout: float, service: Service | None = None) -> None:
    """Return once a Unix socket at `path` (or a TCP (host, port)) accepts a connection; raise if
    `service` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise ServerExited(f"{service.name} exited before serving {path}:\n{service.log_tail()}")
        if _accepts(path):
            return
        time.sleep(0.02)
    detail = service.log_tail() if service is not None else ""
    raise ServiceError(f"nothing served {path} within {timeout:.0f}s; see {detail}")


def _accepts(address: Address) -> bool:
    if isinstance(address, tuple):
        try:
            socket.create_connection(address, timeout=1).close()
            return True
        except OSError:
            return False
    if not os.path.exists(address):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def free_port() -> int:
    """A TCP port on the loopback address that nobody listens on right now (in the calling
    thread's network namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_on_free_port(make: Callable[[int], Service]) -> tuple[Service, int]:
    """Start the server `make(port)` builds on a free loopback port; another port if it was taken."""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        service = make(port)
        try:
            service.start()
            return service, port
        except ServerExited:
            service.stop()
            if attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def nbd_uri(socket_path: str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket."""
    return f"nbd+unix:///{export}?socket={socket_path}"


def nbdkit_file(image: str, sock: str, log_dir: str, name: str = "nbdkit-file",
                filters: Sequence[str] = (), params: Sequence[str] = ()) -> Service:
    """nbdkit's own C `file` plugin serving `image`: the passthrough baseline; with `filters`
    and their `params` (KEY=VALUE), a slowed destination (delay, rate)."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(NBDKIT_THREADS), *(f"--filter={f}" for f in filters),
            "file", image, *params]
    return Service(name, argv, sock, log_dir)


def python_floor(image: str, sock: str, log_dir: str, threads: int = NBDKIT_THREADS) -> Service:
    """The smallest nbdkit Python plugin (benchmarks/floor_plugin.py): the embedding's own cost."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_plugin.py")
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(threads), "python", script, f"file={image}"]
    return Service("python-floor", argv, sock, log_dir,
                   env={"PYTHONPATH": str(nbd_plugin.plugin_pythonpath())})


def nbdkit_tls_export(exports_dir: str, certificates: str, port: int, log_dir: str,
                      name: str = "nbdkit-tls-export", address: str = LOOPBACK) -> Service:
    """The other host's datastore export: nbdkit's `file` plugin serving every file of
    `exports_dir` by name on `address`:`port`, TLS required and the client's certificate
    verified, the command line agent/export.py runs (there the port comes by socket activation)."""
    argv = export_command(certificates, exports_dir)
    argv[1:1] = ["--exit-with-parent", "--ipaddr", address, "--port", str(port)]
    return Service(name, argv, (address, port), log_dir)


def mirror_node(vm: str, disks: Sequence[tuple[str, str]], sock: str, control: str,
                log_dir: str, lease: float = 2.0, name: str = "mirror-node",
                threads: int = NBDKIT_THREADS, extra: Sequence[str] = ()) -> Service:
    """The svmotion mirror node (docs/interfaces.md, section 1) serving `disks` [(name, path or
    URI)]; `extra` are further plugin parameters (tls-certificates=DIR for nbds:// disks)."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(threads), "python", str(nbd_plugin.plugin_script()),
            f"vm={vm}"]
    argv += [f"disk={disk}:{path}" for disk, path in disks]
    argv += [f"control={control}", f"lease={lease}", *extra]
    env = {"PYTHONPATH": str(nbd_plugin.plugin_pythonpath())}

    class _MirrorNode(Service):
        def start(self, timeout: float = 20.0) -> "Service":
            super().start(timeout)
            # The control socket comes up beside the NBD socket; both must be ready.
            wait_for_socket(control, timeout, self)
            return self

    return _MirrorNode(name, argv, sock, log_dir, env=env)


def qemu_storage_daemon(source: str, target: Sequence[str], sock: str, qmp: str, log_dir: str,
                        export: str = "disk0") -> Service:
    """qemu-storage-daemon exporting `source` over NBD with the node `tgt` attached for
    blockdev-mirror; `target` is that node's options (qemu_file_target, qemu_nbd_tls_target).

    The source is a plain `file` node (raw), host page cache on, aio=threads: the same I/O path
    the mirror node uses (buffered pread/pwrite), so the comparison is of the mirrors only.
    """
    # The daemon takes its options in order: the monitor first, so that QMP listens by the time
    # the NBD socket (the readiness probe) does.
    argv = ["qemu-storage-daemon",
            "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
            "--blockdev", f"driver=file,node-name=src,filename={source},aio=threads",
            *target,
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=exp0,node-name=src,name={export},writable=on"]
    return Service("qemu-storage-daemon", argv, sock, log_dir)


def qemu_file_target(path: str) -> list[str]:
    """The mirror's target node on a local raw file, opened as the source is."""
    return ["--blockdev", f"driver=file,node-name=tgt,filename={path},aio=threads"]


def qemu_nbd_unix_target(sock: str) -> list[str]:
    """The mirror's target node on an NBD export on a Unix socket (its default export)."""
    return ["--blockdev", f"driver=nbd,node-name=tgt,server.type=unix,server.path={sock}"]


def qemu_nbd_tls_target(port: int, export: str, certificates: str) -> list[str]:
    """The mirror's target node on another host's NBD export over TLS, with this host's client
    certificate (the tls-creds-x509 files are those of agent/certs.py's host directory), as
    libvirt's --copy-storage-all --tls attaches the destination's disk."""
    return ["--object", f"tls-creds-x509,id=tls-client,dir={certificates},endpoint=client",
            "--blockdev", f"driver=nbd,node-name=tgt,server.type=inet,server.host={LOOPBACK},"
                          f"server.port={port},export={export},tls-creds=tls-client"]


def qemu_tls_nbd_server(image: str, port: int, certificates: str, log_dir: str,
                        export: str = "disk0") -> Service:
    """The destination host as libvirt makes it for --copy-storage-all --tls: QEMU's NBD server
    (nbd-server-start with tls-creds, here on the storage daemon's command line) on TCP, TLS
    required, the client's certificate verified, exporting `image` writable."""
    argv = ["qemu-storage-daemon",
            "--object", f"tls-creds-x509,id=tls-server,dir={certificates},endpoint=server,verify-peer=on",
            "--blockdev", f"driver=file,node-name=disk,filename={image},aio=threads",
            "--nbd-server", f"addr.type=inet,addr.host={LOOPBACK},addr.port={port},tls-creds=tls-server",
            "--export", f"type=nbd,id=exp0,node-name=disk,name={export},writable=on"]
    return Service("qemu-nbd-tls-server", argv, (LOOPBACK, port), log_dir)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServiceError(f"/proc/{pid}/status has no VmRSS line")


def written_chars(pid: int) -> int:
    """Bytes the process passed to write-family system calls (`wchar` of /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise ServiceError(f"/proc/{pid}/io has no wchar line")
