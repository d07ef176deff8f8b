"""Destinations a trial migrates to: a plain directory, a small tmpfs, an ext4 whose device fails.

Design notes
- `dest_full`: a tmpfs with room for the whole migration, so the migration would succeed; the
  fault fills it (fallocate of a filler file, as another tenant would) leaving a few KiB, at a
  random moment after DiskSetup checked the free space.
- `dest_eio`: tests/kernel/test_dest_write_back_error.py's stack: ext4 on a loop device over
  nbdfuse over nbdkit's `memory` plugin with the `error` filter, whose writes fail (EIO, at the
  drawn rate) while a trigger file exists. The fault creates the trigger. The failure shows where
  it does on real storage: at write-back, after every write() succeeded. (device-mapper's
  `error`/`flakey` targets would be simpler, but this kernel has no device-mapper:
  /dev/mapper/control is missing.) The attach goes through svmotion's own agent/attach.py
  (nbdfuse method), recorded in a private state directory, and is undone by its `detach`.
- Everything is registered on the trial's Resources as it is made: unmount, detach, stop nbdkit.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent import attach as attach_mod
from faults.resources import Resources, mount_tmpfs, umount, wait_until

MiB = 1 << 20


class NotApplicable(Exception):
    """This host cannot build the fault (missing tool or kernel feature): the message says which."""


@dataclass
class Destination:
    path: Path
    trigger: Path | None = None       # dest_eio: exists = writes fail

    def fill(self, slack: int) -> int:
        """Fill the filesystem but about `slack` bytes; returns the filler's size.

        The copier writes meanwhile, so the free space read a moment ago may be gone: on ENOSPC
        ask for 256 KiB less, until it fits.
        """
        st = os.statvfs(self.path)
        size = max(0, st.f_bavail * st.f_frsize - slack)
        with open(self.path / "filler", "wb") as f:
            while size > 0:
                try:
                    os.posix_fallocate(f.fileno(), 0, size)
                    break
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    size -= 256 * 1024
        return max(0, size)

    def fail_writes(self) -> None:
        assert self.trigger is not None
        self.trigger.touch()


def plain(where: Path) -> Destination:
    where.mkdir(parents=True)
    return Destination(where)


def small_tmpfs(res: Resources, where: Path, size: int) -> Destination:
    return Destination(mount_tmpfs(res, where, size))


def eio_problem() -> str | None:
    """Why a failing ext4 cannot be built here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (modprobe fuse), needed by nbdfuse"
    for tool in ("nbdkit", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if subprocess.run(["losetup", "--find"], capture_output=True).returncode != 0:
        return "no free loop device (modprobe loop)"
    return None


def failing_ext4(res: Resources, where: Path, work: Path, size: int, rate: int) -> Destination:
    """ext4 of `size` bytes mounted at `where`, whose device fails `rate`% of writes once triggered."""
    problem = eio_problem()
    if problem:
        raise NotApplicable(f"dest_eio: {problem}")
    work.mkdir(parents=True)
    sock, trigger = work / "failing.nbd", work / "fail-writes"
    with open(work / "failing-nbdkit.log", "wb") as log:
        res.spawn(["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock), "--filter=error",
                   "memory", f"size={size}", "error-pwrite=EIO", f"error-pwrite-rate={rate}%",
                   f"error-pwrite-file={trigger}"], stdout=log)
    if not wait_until(sock.exists, 10):
        raise RuntimeError(f"nbdkit memory+error did not start: {(work / 'failing-nbdkit.log').read_text()}")
    state = work / "attach"
    res.defer(f"remove {state}", shutil.rmtree, state, True)
    device = attach_mod.attach(attach_mod.Export("faults", "dest", f"nbd+unix:///?socket={sock}"),
                               str(state), method="nbdfuse").device
    res.defer(f"detach {device}", attach_mod.detach, device, str(state))
    subprocess.run(["mkfs.ext4", "-q", "-E", "nodiscard", device], check=True, capture_output=True)
    where.mkdir(parents=True)
    subprocess.run(["mount", device, str(where)], check=True, capture_output=True)
    res.defer(f"umount {where}", umount, where)
    return Destination(where, trigger)
