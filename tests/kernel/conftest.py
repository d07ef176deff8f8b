"""Fixtures for the kernel-path tests: the agent, attach state, mounts, the VM lab.

Design notes
- Every test here is `@pytest.mark.kernel`. A missing kernel or host feature (FUSE, loop
  devices, QEMU, root) is a `pytest.skip` that says what is missing and how to get it; a broken
  build or a wrong result is a failure, never a skip.
- The agent is tests/agentproc.py's (run as `python -m agent.cli agent --config FILE`, stopped
  with its nbdkit by PID), shared with the agent and live metrics tests; `kernel_agent` waits
  until nbdkit serves, because the kernel clients connect at once.
- Attachments made by a test are recorded in the test's own state directory; teardown detaches
  whatever is left there (through the project's own code) and then checks that no loop device,
  nbdfuse process or FUSE mount of the test survived.
- The lab's images are cached across runs (~/.cache/svmotion/lab or SVMOTION_LAB_CACHE) and
  built on first use by the `lab_images` fixture: a fresh CI machine builds them in ~20 s.
- The guest reaches host services over QEMU's user network (host 127.0.0.1 = guest 10.0.2.2):
  `kernel_agent(..., listen=True)` gives the VM a `listen = "127.0.0.1:PORT"`, and the agent's
  nbdkit serves the same exports on that TCP port as on its Unix socket (socket activation).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import PYTHON, ROOT, AgentPool, AgentProcess, free_tcp_port

from agent import attach as attach_mod
from svlab import lab

MiB = 1024 * 1024


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
class KernelAgent(AgentProcess):
    """An agent serving one VM (`vm1`) whose disks are the given images."""

    @property
    def port(self) -> int:
        """The TCP port of the VM's `listen` address (the guest's nbd://10.0.2.2:PORT)."""
        assert self.listen, "this agent was made without listen=True"
        return int(self.listen.rpartition(":")[2])

    def migrate(self, dest: Path, *options: str) -> dict:
        """`svmotion migrate vm1 --dest DEST ... --json`; returns the record (asserts exit 0)."""
        done = self.cli("migrate", self.name, "--dest", str(dest), "--json", *options, timeout=180)
        assert done.returncode == 0, f"migrate exited {done.returncode}: {done.stderr}\n{self.log_text()}"
        record = json.loads(done.stdout)
        assert record["state"] == "success", record
        return record


@pytest.fixture
def kernel_agent(tmp_path: Path) -> Iterator[Callable[..., KernelAgent]]:
    """Factory: `kernel_agent({"disk0": image}, listen=False)` -> a started agent serving vm1; stopped after.

    With `listen=True` the VM also serves NBD on a free loopback TCP port (`agent.port`).
    """
    pool = AgentPool()

    def make(disks: dict[str, Path], *, listen: bool = False) -> KernelAgent:
        agent = KernelAgent(root=tmp_path, state=pool.state_dir("svk-"), disks=dict(disks),
                            config=tmp_path / f"agent{len(pool.agents)}.toml", metrics="",
                            listen=f"127.0.0.1:{free_tcp_port()}" if listen else None)
        agent.write_config()
        pool.add(agent)
        agent.start(wait_nbdkit=True)
        return agent

    try:
        yield make
    finally:
        pool.close()


# ---- attachments and mounts ---------------------------------------------------------------

@dataclass
class AttachState:
    """The test's own attach state directory, and what to check it left nothing behind."""
    path: Path
    fuse: dict[int, str] = field(default_factory=dict)     # an nbdfuse's PID -> its mount point

    def attach_cli(self, vm: str, disk: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "attach", vm, disk, "--state-dir", str(self.path),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)

    def detach_cli(self, device: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "detach", device, "--state-dir", str(self.path),
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)

    def remember(self) -> None:
        self.fuse |= {a.fuse_pid: str(self.path / f"{a.vm}.{a.disk}" / "fuse")
                      for a in attach_mod.attachments(str(self.path)) if a.fuse_pid}

    def sweep(self) -> None:
        """Stop every nbdfuse remembered and clear its mount: a detach that failed half-way (its loop
        outlived the wait) leaves both, and the mount would outlive the test."""
        for pid, mount in self.fuse.items():
            attach_mod.stop_nbdfuse(pid, mount)

    def leftovers(self) -> list[str]:
        """Anything of ours the kernel or the process table still holds."""
        left = [f"loop {dev} on {backing}" for dev, backing in attach_mod.loop_backing_files().items()
                if backing.startswith(str(self.path))]
        left += [f"nbdfuse pid {pid}" for pid in self.fuse if attach_mod.pid_alive(pid)]
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
        state.sweep()
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


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture
def klib():
    """This module, for its helpers (make_ext4_image, fsck_clean, dump_tree, MiB, ...).

    Tests use this instead of `import conftest`: several directories have a conftest.py.
    """
    return _THIS_MODULE
