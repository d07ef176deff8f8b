"""ext4 on a disk attached with `svmotion attach`, migrated live under a checksummed file workload.

Issue 5, item 1. The disk is served by the agent's nbdkit (the real plugin), attached on the
host (here: nbdfuse + loop, since this kernel has no nbd module; the kernel client where it
has), formatted ext4 and mounted with `discard`. A workload creates, rewrites in place and
deletes files, each write followed by fsync, while `svmotion migrate` moves the disk, and goes
on after the switchover so that writes land on the destination only. Then: the workload saw no
error, every file reads back as written, unmount + detach leave nothing behind, `fsck.ext4 -fn`
of the destination image is clean, and the files copied out of the destination image (debugfs,
no mount) are exactly the workload's files with exactly its content.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024
SIZES = (4096, 12288, 65536, 200_000, MiB)


class FileWorkload(threading.Thread):
    """Creates, rewrites in place and deletes files under `root`, fsync after each change.

    `content` is the model: what every live file must hold. Errors are collected, not raised,
    so the test can report them with everything else it saw.
    """

    def __init__(self, root: Path, seed: int, budget: int = 20 * MiB, rate_bps: int = 3 * MiB):
        super().__init__(daemon=True)
        self.root, self.budget, self.rate_bps = root, budget, rate_bps
        self.rng = random.Random(seed)
        self.content: dict[str, bytearray] = {}
        self.errors: list[str] = []
        self.ops = 0
        self._halt = threading.Event()
        self._serial = 0

    def run(self) -> None:
        started, written = time.monotonic(), 0
        try:
            while not self._halt.is_set():
                written += self.step()
                self.ops += 1
                ahead = written / self.rate_bps - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        except OSError as err:
            self.errors.append(f"op {self.ops}: {err}")

    def step(self) -> int:
        roll = self.rng.random()
        total = sum(map(len, self.content.values()))
        if self.content and (total > self.budget or roll > 0.9):
            return self.delete(self.rng.choice(sorted(self.content)))
        if self.content and roll > 0.6:
            return self.rewrite(self.rng.choice(sorted(self.content)))
        return self.create()

    def create(self) -> int:
        self._serial += 1
        name = f"f{self._serial:05d}"
        data = bytearray(self.rng.randbytes(self.rng.choice(SIZES)))
        with open(self.root / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        self.content[name] = data
        return len(data)

    def rewrite(self, name: str) -> int:
        """Overwrite a piece in place (possibly extending the file): chunks already copied get dirty."""
        data = self.content[name]
        offset = self.rng.randrange(0, len(data))
        piece = self.rng.randbytes(self.rng.choice((512, 4096, 30000)))
        with open(self.root / name, "r+b") as f:
            f.seek(offset)
            f.write(piece)
            os.fsync(f.fileno())
        data[offset:offset + len(piece)] = piece
        return len(piece)

    def delete(self, name: str) -> int:
        os.unlink(self.root / name)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        del self.content[name]
        return 0

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def wait_ops(workload: FileWorkload, ops: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while workload.ops < ops and not workload.errors and workload.is_alive():
        assert time.monotonic() < deadline, f"workload stuck at {workload.ops} ops (wanted {ops})"
        time.sleep(0.05)


def mismatches(root: Path, model: dict[str, bytearray]) -> list[str]:
    """Files that differ from the model, are missing, or should not exist."""
    present = {p.name for p in root.iterdir()}
    wrong = [f"missing {n}" for n in sorted(set(model) - present)]
    wrong += [f"unexpected {n}" for n in sorted(present - set(model))]
    for name in sorted(set(model) & present):
        got = hashlib.sha256((root / name).read_bytes()).hexdigest()
        if got != hashlib.sha256(model[name]).hexdigest():
            wrong.append(f"content of {name}")
    return wrong


@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_ext4_workload_survives_live_migration(strategy: str, tmp_path: Path, kernel_agent, attach_state,
                                               mounts, klib) -> None:
    klib.require_fallback_path()
    source = klib.make_ext4_image(tmp_path / "disk0.raw", 64 * MiB)
    agent = kernel_agent({"disk0": source})

    attached = attach_state.attach_cli("vm1", "disk0", "--config", str(agent.config), "--json")
    assert attached.returncode == 0, attached.stderr
    att = json.loads(attached.stdout)
    attach_state.remember()
    if att["method"] == "nbdfuse":       # this machine: said in the output, with the reason
        assert "nbdfuse + loop" in attached.stderr and att["reason"], attached.stderr
    device = att["device"]
    mnt = mounts(device, tmp_path / "mnt", "-o", "discard")
    (mnt / "work").mkdir()

    workload = FileWorkload(mnt / "work", seed=hash(strategy) & 0xFFFF)
    workload.start()
    try:   # stopped even on failure: it holds files open on the mount the fixtures unmount
        wait_ops(workload, 40)
        ops_before = workload.ops
        dest = tmp_path / "dest"
        dest.mkdir()
        record = agent.migrate(dest, "--stun-strategy", strategy, "--rate", "4M")
        ops_at_switchover = workload.ops
        print(f"{strategy}: ops before {ops_before}, at switchover {ops_at_switchover}; "
              f"phases {[(p.get('name'), round(p.get('seconds') or 0, 2)) for p in record['phases']]}; "
              f"stuns {[round(s.get('duration_seconds') or 0, 4) for s in record['stuns']]}")
        wait_ops(workload, ops_at_switchover + 40)      # these writes reach the destination only
    finally:
        workload.stop()

    assert not workload.errors, workload.errors
    assert ops_at_switchover > ops_before, "the workload made no progress while the disk migrated"
    assert record["options"]["strategy"] == strategy
    target = Path(record["disks"][0]["dest"])
    assert mismatches(mnt / "work", workload.content) == []

    umount = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert umount.returncode == 0, umount.stderr
    detached = attach_state.detach_cli(device)
    assert detached.returncode == 0, detached.stderr
    again = attach_state.detach_cli(device)
    assert again.returncode in (0, 3), again.stderr   # 3 only if another user took the freed loop
    assert attach_state.leftovers() == []

    fsck = klib.fsck_clean(target)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copied = klib.dump_tree(target, "/work", tmp_path / "from-dest")
    assert mismatches(copied, workload.content) == []
