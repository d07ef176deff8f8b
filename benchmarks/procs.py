"""Servers the benchmarks start: nbdkit (C `file` plugin or the svmotion mirror node) and
qemu-storage-daemon, each a child process stopped by its own PID.

Design notes
- The machine is shared: other people run nbdkit and QEMU here too. A Service only ever signals
  the PID it started (SIGTERM, then SIGKILL after a grace period), never a process name, and
  `--exit-with-parent` makes nbdkit go away even if this harness is killed.
- Readiness is "the Unix socket accepts a connection", polled with a deadline; a server that
  dies first is reported with the tail of its stderr, which is kept in a file in the work dir.
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
from typing import Sequence

import nbd_plugin

NBDKIT_THREADS = 16


class ServiceError(RuntimeError):
    """A server did not start, or died."""


class Service:
    """One child server process with a readiness socket; use as a context manager."""

    def __init__(self, name: str, argv: Sequence[str], ready_socket: str, log_dir: str,
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
        if os.path.exists(self.ready_socket):
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


def wait_for_socket(path: str, timeout: float, service: Service | None = None) -> None:
    """Return once a Unix socket at `path` accepts a connection; raise if `service` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise ServiceError(f"{service.name} exited before serving {path}:\n{service.log_tail()}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)
    detail = service.log_tail() if service is not None else ""
    raise ServiceError(f"nothing served {path} within {timeout:.0f}s; see {detail}")


def nbd_uri(socket_path: str, export: str = "") -> str:
    """The NBD URI of an export on a Unix socket."""
    return f"nbd+unix:///{export}?socket={socket_path}"


def nbdkit_file(image: str, sock: str, log_dir: str, name: str = "nbdkit-file") -> Service:
    """nbdkit's own C `file` plugin serving `image`: the passthrough baseline."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(NBDKIT_THREADS), "file", image]
    return Service(name, argv, sock, log_dir)


def python_floor(image: str, sock: str, log_dir: str, threads: int = NBDKIT_THREADS) -> Service:
    """The smallest nbdkit Python plugin (benchmarks/floor_plugin.py): the embedding's own cost."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_plugin.py")
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(threads), "python", script, f"file={image}"]
    return Service("python-floor", argv, sock, log_dir,
                   env={"PYTHONPATH": str(nbd_plugin.plugin_pythonpath())})


def mirror_node(vm: str, disks: Sequence[tuple[str, str]], sock: str, control: str,
                log_dir: str, lease: float = 2.0, name: str = "mirror-node",
                threads: int = NBDKIT_THREADS) -> Service:
    """The svmotion mirror node (docs/interfaces.md, section 1) serving `disks` [(name, path)]."""
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock,
            "--threads", str(threads), "python", str(nbd_plugin.plugin_script()),
            f"vm={vm}"]
    argv += [f"disk={disk}:{path}" for disk, path in disks]
    argv += [f"control={control}", f"lease={lease}"]
    env = {"PYTHONPATH": str(nbd_plugin.plugin_pythonpath())}

    class _MirrorNode(Service):
        def start(self, timeout: float = 20.0) -> "Service":
            super().start(timeout)
            # The control socket comes up beside the NBD socket; both must be ready.
            wait_for_socket(control, timeout, self)
            return self

    return _MirrorNode(name, argv, sock, log_dir, env=env)


def qemu_storage_daemon(source: str, target: str, sock: str, qmp: str, log_dir: str,
                        export: str = "disk0") -> Service:
    """qemu-storage-daemon exporting `source` over NBD with `target` attached for blockdev-mirror.

    Both nodes are plain `file` nodes (raw), host page cache on, aio=threads: the same I/O path
    the mirror node uses (buffered pread/pwrite), so the comparison is of the mirrors only.
    """
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=src,filename={source},aio=threads",
            "--blockdev", f"driver=file,node-name=tgt,filename={target},aio=threads",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", f"type=nbd,id=exp0,node-name=src,name={export},writable=on",
            "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0"]
    return Service("qemu-storage-daemon", argv, sock, log_dir)


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
