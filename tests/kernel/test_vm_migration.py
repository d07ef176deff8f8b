"""A QEMU guest whose disk is served by svmotion writes and verifies files while the disk migrates.

Issue 5, item 2. The lab guest (Debian's kernel, TCG) reaches its disk through QEMU's own NBD
client on the agent's Unix socket, mounts the ext4 on it and runs guest/ext4_workload.sh:
create, rewrite in place and delete files with fsync, until the host says "stop". The host
migrates the disk with `svmotion migrate` once the workload runs, lets it go on after the
switchover, then stops it. The guest drops its page cache and checks every file against its own
checksums, unmounts, and looks for IO errors in its kernel log. The host then checks the
destination image: `fsck.ext4 -fn` is clean and the files copied out of it (debugfs) have the
checksums the guest recorded, and no other file is there.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from svlab.lab import NbdDisk

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024
GUEST_DIR = Path(__file__).parent / "guest"


def last_round(lines: list[str]) -> int:
    rounds = [int(m.group(1)) for line in lines if (m := re.match(r"^ROUND (\d+)", line))]
    return max(rounds, default=0)


@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_guest_verifies_its_files_across_a_live_migration(strategy: str, tmp_path: Path, kernel_agent, guests,
                                                          lab_images, klib) -> None:
    source = klib.make_ext4_image(tmp_path / "disk0.raw", 64 * MiB)
    agent = kernel_agent({"disk0": source})
    guest = guests(lab_images, {"run.sh": (GUEST_DIR / "ext4_workload.sh").read_text()},
                   disks=[NbdDisk(str(agent.nbd_socket), "disk0")])
    guest.wait_for(r"^ROUND 3$", timeout=120)

    dest = tmp_path / "dest"
    dest.mkdir()
    record = agent.migrate(dest, "--stun-strategy", strategy, "--rate", "2M")
    at_switchover = last_round(guest.lines)
    print(f"{strategy}: guest rounds before migration 3, at switchover {at_switchover}; "
          f"stuns {[round(s.get('duration_seconds') or 0, 4) for s in record['stuns']]}")
    guest.wait_for(rf"^ROUND {at_switchover + 3}$", timeout=120)     # writes to the destination only
    guest.send("stop")
    exit_code = guest.wait_exit(timeout=180)

    console = "\n".join(guest.lines)
    assert exit_code == 0, f"guest job failed ({exit_code}):\n{guest.console_tail()}"
    assert "WORKLOAD-OK" in console and "GUEST-IO-ERRORS" not in console
    assert at_switchover > 3, "the guest wrote nothing while its disk migrated"
    manifest = {m.group(2): m.group(1) for line in guest.lines
                if (m := re.match(r"^MANIFEST ([0-9a-f]{64})  guest/(\S+)$", line))}
    assert len(manifest) >= at_switchover // 2, console

    target = Path(record["disks"][0]["dest"])
    fsck = klib.fsck_clean(target)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    copied = klib.dump_tree(target, "/guest", tmp_path / "from-dest")
    found = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in copied.iterdir()}
    assert found == manifest
