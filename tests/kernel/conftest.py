"""Fixtures for the kernel-path tests: the agent, attach state, mounts, the VM lab, a TCP relay.

Design notes
- Every test here is `@pytest.mark.kernel`. A missing kernel or host feature (FUSE, loop
  devices, QEMU, root) is a `pytest.skip` that says what is missing and how to get it; a broken
  build or a wrong result is a failure, never a skip.
- The agent runs as `python -m agent.cli agent --config FILE`, exactly as a user runs it; it
  starts nbdkit itself (detached), so teardown asks it to `shutdown` with stop_vms and then stops
  the nbdkit its pid file names, by PID and only if that process's start time still matches.
- Attachments made by a test are recorded in the test's own state directory; teardown detaches
  whatever is left there (through the project's own code) and then checks that no loop device,
  nbdfuse process or FUSE mount of the test survived.
- The lab's images are cached across runs (~/.cache/svmotion/lab or SVMOTION_LAB_CACHE) and
  built on first use by the `lab_images` fixture: a fresh CI machine builds them in ~20 s.
- The guest reaches host services over QEMU's user network (host 127.0.0.1 = guest 10.0.2.2);
  nbdkit cannot listen on a Unix socket and TCP at once, so a small relay forwards a TCP port to
  the VM's Unix socket (the NBD stream passes through untouched).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent import attach as attach_mod  # noqa: E402
from agent import lab  # noqa: E402
from agent.jsonlines import JsonLinesClient, RemoteError  # noqa: E402
from agent.supervisor import process_start_time  # noqa: E402

MiB = 1024 * 1024
PYTHON = sys.executable
READY_S = 20.0


# ---- host features ------------------------------------------------------------------------

def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices, mounts and FUSE mounts of block devices")


def require_fallback_path() -> None:
    """Skip (saying why) unless nbdfuse + loop can work here."""
    require_root()
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: the kernel has no FUSE (modprobe fuse), needed by nbdfuse")
    for tool, pkg in (("nbdfuse", "nbdfuse"), ("fusermount3", "fuse3"), ("losetup", "util-linux"),
                      ("mkfs.ext4", "e2fsprogs"), ("debugfs", "e2fsprogs")):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (apt-get install {pkg})")
    probe = subprocess.run(["losetup", "--find"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no free loop device: {probe.stderr.strip()} (modprobe loop)")


def require_lab() -> None:
    try:
        lab.check_host()
    except lab.LabError as err:
        pytest.skip(f"the VM lab cannot run here: {err}")


# ---- images -------------------------------------------------------------------------------

def make_ext4_image(path: Path, size: int) -> Path:
    """A raw file holding a fresh ext4 (made on the file itself: no loop device needed)."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                    "-L", "svmtest", str(path)], check=True, capture_output=True)
    return path


def fsck_clean(image: Path) -> subprocess.CompletedProcess[str]:
    """fsck.ext4 -fn: forced, read-only. Exit 0 means the filesystem is clean."""
    return subprocess.run(["fsck.ext4", "-fn", str(image)], capture_output=True, text=True)


def dump_tree(image: Path, inside: str, out: Path) -> Path:
    """Copy a directory out of an ext4 image without mounting it (debugfs rdump)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump {inside} {out}", str(image)], check=True, capture_output=True)
    return out / Path(inside).name


# ---- the agent ----------------------------------------------------------------------------

@dataclass
class KernelAgent:
    """An agent serving one VM (`vm1`) whose disks are the given images."""
    root: Path
    state: Path
    config: Path
    disks: dict[str, Path]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def socket(self) -> Path:
        return self.state / "agent.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.state / "vm1.nbd"

    def uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"

    def start(self) -> None:
        self.log = self.root / "agent.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "agent.cli", "agent", "--config", str(self.config)],
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError, ValueError, RemoteError):
                if self.call("status")["vms"][0].get("nbdkit_up", True) and self.nbd_socket.exists():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not serve vm1 within {READY_S} s:\n{self.log_text()}")
            time.sleep(0.05)

    def call(self, op: str, **args: object) -> dict:
        with JsonLinesClient(str(self.socket), timeout=60) as c:
            return c.call(op, **args)

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "--agent-socket", str(self.socket), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def migrate(self, dest: Path, *options: str) -> dict:
        """`svmotion migrate vm1 --dest DEST ... --json`; returns the record (asserts exit 0)."""
        done = self.cli("migrate", "vm1", "--dest", str(dest), "--json", *options)
        assert done.returncode == 0, f"migrate exited {done.returncode}: {done.stderr}\n{self.log_text()}"
        record = json.loads(done.stdout)
        assert record["state"] == "success", record
        return record

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.call("shutdown", stop_vms=True)
                self.proc.wait(timeout=20)
            except (OSError, ValueError, RemoteError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        stop_recorded_nbdkit(self.state / "vm1.pid")


def stop_recorded_nbdkit(pid_file: Path) -> None:
    """Stop the nbdkit a pid file names, if that very process (same start time) still runs."""
    try:
        rec = json.loads(pid_file.read_text())
        pid, start = int(rec["pid"]), int(rec["start_time"])
    except (OSError, ValueError, KeyError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process_start_time(pid) != start:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while process_start_time(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def kernel_agent(tmp_path: Path) -> Iterator[Callable[..., KernelAgent]]:
    """Factory: `kernel_agent({"disk0": image})` -> a started agent serving vm1; stopped after."""
    made: list[KernelAgent] = []

    def make(disks: dict[str, Path]) -> KernelAgent:
        state = Path(tempfile.mkdtemp(prefix="svk-", dir="/tmp"))   # Unix socket paths must be short
        config = tmp_path / "agent.toml"
        lines = ["[agent]", f'socket = "{state}/agent.sock"', f'state_dir = "{state}"', 'metrics = ""', "",
                 "[[vm]]", 'name = "vm1"', f'socket = "{state}/vm1.nbd"']
        for name, path in disks.items():
            lines += ["", "  [[vm.disk]]", f'  name = "{name}"', f'  path = "{path}"']
        config.write_text("\n".join(lines) + "\n")
        agent = KernelAgent(tmp_path, state, config, dict(disks))
        made.append(agent)
        agent.start()
        return agent

    try:
        yield make
    finally:
        for agent in reversed(made):
            agent.stop()
            shutil.rmtree(agent.state, ignore_errors=True)


# ---- attachments and mounts ---------------------------------------------------------------

@dataclass
class AttachState:
    """The test's own attach state directory, and what to check it left nothing behind."""
    path: Path
    fuse_pids: set[int] = field(default_factory=set)

    def attach_cli(self, vm: str, disk: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "attach", vm, disk, "--state-dir", str(self.path),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)

    def detach_cli(self, device: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "detach", device, "--state-dir", str(self.path),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)

    def remember(self) -> None:
        self.fuse_pids |= {a.fuse_pid for a in attach_mod.attachments(str(self.path)) if a.fuse_pid}

    def leftovers(self) -> list[str]:
        """Anything of ours the kernel or the process table still holds."""
        left = [f"loop {dev} on {backing}" for dev, backing in attach_mod.loop_backing_files().items()
                if backing.startswith(str(self.path))]
        left += [f"nbdfuse pid {pid}" for pid in self.fuse_pids if attach_mod.pid_alive(pid)]
        with open("/proc/self/mountinfo") as f:
            left += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(str(self.path))]
        left += [f"state {p.name}" for p in self.path.glob("*") if p.name != ".lock"]
        return left


@pytest.fixture
def attach_state() -> Iterator[AttachState]:
    """A private attach state directory; teardown detaches what is left and removes it."""
    state = AttachState(Path(tempfile.mkdtemp(prefix="sva-att-", dir="/tmp")))
    try:
        yield state
    finally:
        state.remember()
        for att in attach_mod.attachments(str(state.path)):
            for where in attach_mod.holders(att.device):
                if where.startswith("/"):
                    subprocess.run(["umount", where], capture_output=True)
            with contextlib.suppress(Exception):
                attach_mod.detach(att.device, str(state.path))
        shutil.rmtree(state.path, ignore_errors=True)


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """Factory: `mount(device, where, *options)`; everything still mounted is unmounted after."""
    made: list[Path] = []

    def mount(device: str, where: Path, *options: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *options, device, str(where)], check=True, capture_output=True)
        made.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(made):
            if attach_mod.is_mounted(str(where)):
                subprocess.run(["umount", str(where)], capture_output=True)


# ---- the VM lab ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def lab_images() -> lab.LabImages:
    """The cached guest kernel + initrd (built on first use)."""
    require_lab()
    return lab.ensure_images()


@pytest.fixture(scope="session")
def lab_images_python() -> lab.LabImages:
    """The lab images plus pyroot.img (Debian's Python with pyroute2 and click)."""
    require_lab()
    return lab.ensure_images(python=True)


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Callable[..., lab.Guest]]:
    """Factory: `guests(images, job_files, **opts)` -> a started Guest; killed (by PID) after."""
    made: list[lab.Guest] = []

    def start(images: lab.LabImages, job: dict[str, str | bytes], **opts: object) -> lab.Guest:
        workdir = tmp_path / f"guest{len(made)}"
        workdir.mkdir()
        guest = lab.Guest(images, job, workdir, **opts)
        made.append(guest)
        return guest.start()

    try:
        yield start
    finally:
        for guest in made:
            guest.stop()


class TcpRelay:
    """Forwards connections on 127.0.0.1:<port> to a Unix socket, byte for byte."""

    def __init__(self, unix_path: str):
        self.unix_path = unix_path
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.unix_path)
            except OSError:
                client.close()
                server.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def tcp_relay() -> Iterator[Callable[[str], TcpRelay]]:
    relays: list[TcpRelay] = []

    def make(unix_path: str) -> TcpRelay:
        relays.append(TcpRelay(unix_path))
        return relays[-1]

    try:
        yield make
    finally:
        for relay in relays:
            relay.close()


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture
def klib():
    """This module, for its helpers (make_ext4_image, fsck_clean, dump_tree, MiB, ...).

    Tests use this instead of `import conftest`: several directories have a conftest.py.
    """
    return _THIS_MODULE
