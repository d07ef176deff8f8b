"""Shared test fixtures: processes by PID, raw images, the mirror node and nbdkit's file plugin.

Design notes
- Other engineers run nbdkit and qemu on this machine at the same time: every process a test
  starts is tracked by the PID we got from Popen and stopped by that PID (SIGTERM, then SIGKILL),
  never by name. nbdkit is also started with --exit-with-parent so that a crashed pytest leaves
  nothing behind.
- Unix socket paths are limited to 107 bytes and pytest's tmp_path can be longer, so sockets live
  in a short private directory under /tmp (`sock_dir`), removed afterwards.
- Images are written in pieces of at most 64 KiB (no large buffers, and a sparse image keeps its
  holes exactly where the test wants them).
- The mirror node is started exactly as docs/interfaces.md section 1 says; the fixture waits until
  both the NBD socket and the control socket answer, and puts nbdkit's log in the error if not.
- A run always ends. A test stops the threads it starts even when it fails (try/finally or a
  fixture). As a safety net, `pytest_unconfigure` (after the summary) waits a few seconds for
  non-daemon threads still running, then names them with their stacks and ends the process with
  `os._exit`, failed: left alone, the interpreter would join them at exit, forever.
  pytest-timeout (pyproject, `signal` method) cannot do this: it fails a test that runs too long
  by raising in the main thread, and the threads that test started live on after it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.jsonlines import JsonLinesClient  # noqa: E402
from svlab.writer import fill_pattern_image  # noqa: E402

import nbdremote  # noqa: E402  (tests/, on sys.path as pytest's rootdir conftest)
from agentproc import free_tcp_port  # noqa: E402

if TYPE_CHECKING:
    from svlab.netns import Lab   # imported where used: pyroute2 costs every test run 0.2 s

MiB = 1024 * 1024
WRITE_PIECE = 64 * 1024
READY_TIMEOUT_S = 20.0


# ---- processes ------------------------------------------------------------------------------

class Processes:
    """Processes a test started, stopped by PID at teardown (newest first)."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], *, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` with stdout+stderr to `log` (or /dev/null); it is stopped at teardown."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env)
        finally:
            if log:
                out.close()
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 3.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status.

        (nbdkit --threads N does not exit on SIGTERM while a client that sent a request stays
        connected: its worker sits in read(). Tests disconnect first; SIGKILL covers the rest.)
        """
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)
        self._procs.clear()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory for Unix sockets (tmp_path may exceed the 107-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="svm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll `condition` every 20 ms; fail naming `what` (and the log tail) on timeout or process exit."""
    deadline = time.monotonic() + timeout
    while not condition():
        exited = proc is not None and proc.poll() is not None
        if exited or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            state = f"process exited with {proc.returncode}" if exited else f"timed out after {timeout} s"
            raise AssertionError(f"waiting for {what}: {state}\n{tail}")
        time.sleep(0.02)


def socket_answers(path: Path | str) -> bool:
    """True when a Unix stream socket accepts a connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def fds_and_threads(pid: int) -> tuple[int, int]:
    """(open fds, threads) of a process, from /proc: what a leak check compares."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def steady_fds_and_threads(pid: int, timeout: float = 10.0) -> tuple[int, int]:
    """fds_and_threads once unchanged for 100 ms: the thread of a connection a client has just
    closed (a readiness probe, say) may not have ended yet, and a baseline must not count it."""
    deadline = time.monotonic() + timeout
    seen = [fds_and_threads(pid)]
    while len(seen) < 5 or len(set(seen[-5:])) > 1:
        assert time.monotonic() < deadline, f"pid {pid}: fds and threads never settle: {seen[-5:]}"
        time.sleep(0.02)
        seen.append(fds_and_threads(pid))
    return seen[-1]


# ---- images ---------------------------------------------------------------------------------

def make_sparse_image(path: Path, size: int, data: list[tuple[int, int]] = (), *,
                      disk: str | None = None) -> Path:
    """A raw image of `size` bytes, all hole except the (offset, length) `data` ranges.

    Data is the writer's generation-0 pattern of `disk` (default: the file's stem), so a
    VerifyingWriter with `initial={disk: <a copy of this file>}` can check it later.
    """
    fill_pattern_image(path, disk or path.stem, size, extents=list(data))
    return path


def make_dense_image(path: Path, size: int, *, disk: str | None = None, random_data: bool = False) -> Path:
    """A fully allocated raw image: the writer's generation-0 pattern (`initial=PATTERN`) or random bytes."""
    if not random_data:
        fill_pattern_image(path, disk or path.stem, size)
        return path
    with open(path, "wb") as f:
        for _ in range(0, size, WRITE_PIECE):
            f.write(os.urandom(WRITE_PIECE))
        f.truncate(size)
    return path


def allocated_bytes(path: Path) -> int:
    """Bytes the filesystem actually holds for a file (st_blocks, what `du` reports)."""
    return os.stat(path).st_blocks * 512


def same_content(a: Path, b: Path, piece: int = MiB) -> list[int]:
    """Offsets of the `piece`-sized ranges where two files differ (empty: identical, sizes included)."""
    diff = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return [-1]
        offset = 0
        while True:
            x, y = fa.read(piece), fb.read(piece)
            if not x and not y:
                return diff
            if x != y:
                diff.append(offset)
            offset += piece


# ---- nbdkit servers -------------------------------------------------------------------------

@dataclass
class MirrorNode:
    """One nbdkit with the real plugin, serving a VM's disks on a Unix socket."""
    vm: str
    proc: subprocess.Popen[bytes]
    socket: Path
    control: Path
    disks: dict[str, Path]            # name -> source image, in disk order
    log: Path
    lease: float
    clients: list[JsonLinesClient] = field(default_factory=list)

    def uri(self, disk: str = "") -> str:
        return f"nbd+unix:///{disk}?socket={self.socket}"

    def uris(self) -> dict[str, str]:
        return {name: self.uri(name) for name in self.disks}

    def client(self, timeout: float | None = 30.0) -> JsonLinesClient:
        """A new control connection, closed at teardown (a stun belongs to its connection)."""
        c = JsonLinesClient(str(self.control), timeout=timeout)
        self.clients.append(c)
        return c

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# Which nbd_plugin/ the mirror node runs: this checkout's, or (to check that the tests catch a
# broken plugin) a modified copy under SVMOTION_PLUGIN_ROOT.
PLUGIN_ROOT = Path(os.environ.get("SVMOTION_PLUGIN_ROOT", ROOT))


def mirror_node_command(vm: str, sock: Path, control: Path, disks: dict[str, Path | str],
                        lease: float | None, extra: tuple[str, ...] = (), threads: int = 16) -> list[str]:
    """The command line of docs/interfaces.md section 1 (plus --exit-with-parent for tests).

    A disk is a file path or an NBD URI; `extra` are further plugin parameters (tls-certificates=...).
    """
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock), "--threads", str(threads),
           "python", str(PLUGIN_ROOT / "nbd_plugin" / "plugin.py"), f"vm={vm}"]
    cmd += [f"disk={name}:{path}" for name, path in disks.items()]
    cmd.append(f"control={control}")
    if lease is not None:
        cmd.append(f"lease={lease}")
    return cmd + list(extra)


@pytest.fixture
def start_mirror_node(tmp_path: Path, sock_dir: Path, processes: Processes) -> Iterator[Callable[..., MirrorNode]]:
    """Factory: start the mirror node for given disks; stops it (by PID) at teardown.

    Example: `node = start_mirror_node({"disk0": img}, lease=0.5); node.client().call("hello")`
    (`threads=1`: nbdkit serves each connection's requests on its connection thread.)
    """
    nodes: list[MirrorNode] = []

    def start(disks: dict[str, Path | str], *, vm: str = "vm1", lease: float | None = None,
              extra: tuple[str, ...] = (), threads: int = 16) -> MirrorNode:
        n = len(nodes)
        sock, control = sock_dir / f"{vm}-{n}.nbd", sock_dir / f"{vm}-{n}.ctl"
        log = tmp_path / f"nbdkit-{vm}-{n}.log"
        env = dict(os.environ, PYTHONPATH=str(PLUGIN_ROOT))
        proc = processes.spawn(mirror_node_command(vm, sock, control, disks, lease, extra, threads),
                               log=log, env=env)
        wait_until(lambda: socket_answers(sock) and socket_answers(control), READY_TIMEOUT_S,
                   f"mirror node {vm} on {sock} and {control}", proc, log)
        node = MirrorNode(vm, proc, sock, control, dict(disks), log, lease if lease is not None else 2.0)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            for c in node.clients:
                try:
                    c.close()
                except OSError:
                    pass


@pytest.fixture
def vm_factory(tmp_path: Path, start_mirror_node: Callable[..., MirrorNode]) -> Callable[..., MirrorNode]:
    """Factory: a VM of N dense pattern disks (`initial=PATTERN` for the writer) under the mirror node.

    Example: `node = vm_factory(4, size=16 * MiB)`; sources in tmp_path/src, named disk0..diskN-1.
    """
    def make(n_disks: int = 2, *, size: int = 16 * MiB, lease: float | None = None, vm: str = "vm1") -> MirrorNode:
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        disks = {f"disk{i}": make_dense_image(src / f"disk{i}.raw", size) for i in range(n_disks)}
        return start_mirror_node(disks, vm=vm, lease=lease)

    return make


@pytest.fixture
def vm2(vm_factory: Callable[..., MirrorNode]) -> MirrorNode:
    """A VM of two 16 MiB disks; `vm2.control` is its control socket."""
    return vm_factory(2)


@pytest.fixture
def start_file_server(sock_dir: Path, tmp_path: Path, processes: Processes) -> Callable[..., str]:
    """Factory: nbdkit's own `file` plugin on an image; returns its NBD URI (the reference server)."""
    count = [0]

    def start(image: Path, *extra: str) -> str:
        count[0] += 1
        sock = sock_dir / f"file-{count[0]}.nbd"
        log = tmp_path / f"nbdkit-file-{count[0]}.log"
        proc = processes.spawn(["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock),
                                "--threads", "16", "file", f"file={image}", *extra], log=log)
        wait_until(lambda: socket_answers(sock), READY_TIMEOUT_S, f"nbdkit file on {sock}", proc, log)
        return f"nbd+unix:///?socket={sock}"

    return start


@pytest.fixture
def two_hosts() -> Iterator[Lab]:
    """Hosts "a" and "b" as network namespaces joined by a veth pair (svlab/netns.py), removed afterwards.

    a is 198.18.0.1, b 198.18.0.2 (`lab["b"].address`). Fixtures that start processes on a host
    depend on this one, so pytest stops them first; a process still running at the end makes
    the teardown fail (LabError names it).
    """
    from svlab.netns import Lab

    lab = Lab("svmt", ("a", "b"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> "nbdremote.Pki":
    """X.509 (a CA, server and client certificates, another CA's client) and a PSK file: tests/nbdremote.py."""
    return nbdremote.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_nbd_server(sock_dir: Path, tmp_path: Path, processes: Processes,
                     pki: "nbdremote.Pki") -> Callable[..., "nbdremote.NbdServer"]:
    """Factory: nbdkit's `file` plugin on an image (or `memory` of a size) as a remote disk.

    `transport` "unix" or "tcp" (127.0.0.1); `tls` None, "x509" (client certificate verified) or
    "psk". Example: `server = start_nbd_server(img, transport="tcp", tls="x509"); server.uri`
    """
    count = [0]

    def start(image: Path | None = None, *, memory: int | None = None, transport: str = "unix",
              tls: str | None = None, filters: tuple[str, ...] = ()) -> nbdremote.NbdServer:
        # `filters`: e.g. ("--filter=delay", "wdelay=100ms"): options before the plugin, parameters after.
        plugin = [f for f in filters if f.startswith("--")]
        plugin += ["file", f"file={image}"] if image is not None else ["memory", f"size={memory}"]
        plugin += [f for f in filters if not f.startswith("--")]
        while True:
            count[0] += 1
            log = tmp_path / f"nbdkit-remote-{count[0]}.log"
            if transport == "unix":
                where: Path | int = sock_dir / f"remote-{count[0]}.nbd"
                listen, ready = ["--unix", str(where)], (lambda w=where: socket_answers(w))
            else:
                where = free_tcp_port()
                listen, ready = ["-i", "127.0.0.1", "-p", str(where)], (lambda w=where: nbdremote.tcp_answers(w))
            proc = processes.spawn(nbdremote.server_command(plugin, listen=listen, tls=tls, pki=pki), log=log)
            if nbdremote.wait_ready(proc, ready, log):
                return nbdremote.NbdServer(proc, nbdremote.uri_for(transport, tls, where), log, image)
            assert transport == "tcp", f"nbdkit exited:\n{log.read_text(errors='replace')[-2000:]}"

    return start


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Factory: mount a tmpfs of `size` bytes (for a destination that runs out of space); unmounted after."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                       check=True, capture_output=True)
        mounts.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounts):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture
def testlib():
    """This module, for its helpers (make_sparse_image, same_content, MiB, ...).

    Tests use this instead of `import conftest`: several directories have a conftest.py and
    pytest keeps only the last one imported under that name.
    """
    return _THIS_MODULE


# ---- threads a test left running ------------------------------------------------------------

LEFTOVER_GRACE_S = 10.0
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process now if a test left a non-daemon thread running (see the design notes)."""
    left = threads_still_running(LEFTOVER_GRACE_S)
    if not left:
        return
    frames = sys._current_frames()
    lines = [f"{len(left)} non-daemon threads still running {LEFTOVER_GRACE_S:.0f} s after the last "
             "test: a test did not stop them. Ending the run here instead of waiting for them."]
    for thread in left:
        stack = frames.get(thread.ident) if thread.ident is not None else None
        lines.append(f"--- {thread.name}:\n" + ("".join(traceback.format_stack(stack)) if stack else "(no stack)"))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("!", "threads left running")
        for line in lines:
            reporter.write_line(line)
        reporter.flush()
    else:
        print("\n".join(lines), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(_EXIT_STATUS, 0) or pytest.ExitCode.TESTS_FAILED)


def threads_still_running(grace: float) -> list[threading.Thread]:
    """Non-daemon threads other than the main one that are alive after waiting up to `grace` s."""
    deadline = time.monotonic() + grace
    left = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread)
    return left
