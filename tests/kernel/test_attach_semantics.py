"""`svmotion attach` / `detach` semantics on the host, against the real agent and plugin.

Issue 5: attach and detach are idempotent, leave nothing behind on failure, refuse a disk that
is already attached elsewhere, and say which path (kernel netlink or the nbdfuse + loop
fallback) they took and why. Item 4: nothing survives a test (loop devices, nbdfuse processes,
FUSE mounts, state files).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent import attach as attach_mod

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024


@pytest.fixture
def served(tmp_path: Path, kernel_agent, klib):
    """An agent serving vm1 with one 32 MiB ext4 disk."""
    klib.require_fallback_path()
    return kernel_agent({"disk0": klib.make_ext4_image(tmp_path / "disk0.raw", 32 * MiB)})


def test_attach_is_idempotent_and_says_how(served, attach_state) -> None:
    first = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config), "--json")
    assert first.returncode == 0, first.stderr
    att = json.loads(first.stdout)
    attach_state.remember()
    assert att["created"] and att["size"] == 32 * MiB and att["uri"] == served.uri("disk0")
    assert att["method"] in ("netlink", "nbdfuse") and att["reason"]
    if not os.path.exists("/sys/module/nbd"):
        assert att["method"] == "nbdfuse" and "nbd module" in att["reason"], att
    assert f"via {'nbdfuse + loop' if att['method'] == 'nbdfuse' else 'kernel nbd'}" in first.stderr

    second = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config))
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == att["device"]
    assert "already attached" in second.stderr
    assert len(attach_mod.attachments(str(attach_state.path))) == 1

    # The device is the disk: ext4's superblock magic at 1024 + 56.
    with open(att["device"], "rb") as dev:
        dev.seek(1024 + 56)
        assert dev.read(2) == b"\x53\xef"

    gone = attach_state.detach_cli(att["device"], "--json")
    assert gone.returncode == 0 and json.loads(gone.stdout)["detached"] is True, gone.stderr
    assert attach_state.leftovers() == []
    again = attach_state.detach_cli(att["device"], "--json")
    assert again.returncode in (0, 3), again.stderr      # 3 only if someone else took the loop device
    if again.returncode == 0:
        assert json.loads(again.stdout)["detached"] is False


def test_attach_refuses_a_disk_attached_elsewhere(served, attach_state) -> None:
    first = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config))
    assert first.returncode == 0, first.stderr
    attach_state.remember()
    device = first.stdout.strip()
    other_state = Path(tempfile.mkdtemp(prefix="sva-other-", dir="/tmp"))
    try:
        elsewhere = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config),
                                            "--state-dir", str(other_state))
        assert elsewhere.returncode == 3, elsewhere.stderr
        assert f"already attached elsewhere, at {device}" in elsewhere.stderr
        assert elsewhere.stderr.count("\n") == 1          # one line
        assert list(other_state.glob("vm1.*")) == []
    finally:
        subprocess.run(["rm", "-rf", str(other_state)])
    # The same VM/disk name pointing at another export is refused too, not silently re-attached.
    other_uri = attach_state.attach_cli("vm1", "disk0", "--uri", served.uri("disk0") + "x")
    assert other_uri.returncode == 3 and "detach it first" in other_uri.stderr, other_uri.stderr
    assert [a.device for a in attach_mod.attachments(str(attach_state.path))] == [device]


def test_failed_attach_leaves_nothing_behind(served, attach_state, tmp_path: Path) -> None:
    nowhere = f"nbd+unix:///disk0?socket={tmp_path}/nobody.sock"
    failed = attach_state.attach_cli("vm1", "disk0", "--uri", nowhere, "--method", "nbdfuse")
    assert failed.returncode == 3, failed.stderr
    assert "nbdfuse could not open" in failed.stderr and failed.stderr.count("\n") == 1
    assert attach_state.leftovers() == []
    unknown = attach_state.attach_cli("vm1", "disk9", "--config", str(served.config))
    assert unknown.returncode == 3 and "has no disk 'disk9'" in unknown.stderr, unknown.stderr
    if not os.path.exists("/sys/module/nbd"):
        forced = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config), "--method", "netlink")
        assert forced.returncode == 3 and "use --method nbdfuse" in forced.stderr, forced.stderr
    assert attach_state.leftovers() == []


def test_detach_refuses_a_mounted_device(served, attach_state, mounts, tmp_path: Path) -> None:
    device = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config)).stdout.strip()
    attach_state.remember()
    mnt = mounts(device, tmp_path / "mnt")
    busy = attach_state.detach_cli(device)
    assert busy.returncode == 3 and f"in use by {mnt}" in busy.stderr, busy.stderr
    assert attach_mod.attachments(str(attach_state.path))[0].device == device      # unchanged
    subprocess.run(["umount", str(mnt)], check=True)
    assert attach_state.detach_cli(device).returncode == 0
    assert attach_state.leftovers() == []


def test_attach_recovers_from_a_dead_nbdfuse(served, attach_state) -> None:
    """A crashed nbdfuse leaves a loop device on a dead FUSE mount: attach cleans it up and redoes it."""
    first = json.loads(attach_state.attach_cli("vm1", "disk0", "--config", str(served.config), "--json").stdout)
    if first["method"] != "nbdfuse":
        pytest.skip("this host attached with the kernel client; the nbdfuse crash case does not apply")
    attach_state.remember()
    os.kill(attach_mod.attachments(str(attach_state.path))[0].fuse_pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(attach_mod.is_alive(a) for a in attach_mod.attachments(str(attach_state.path))):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = attach_state.attach_cli("vm1", "disk0", "--config", str(served.config), "--json")
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    attach_state.remember()
    assert second["created"] is True
    with open(second["device"], "rb") as dev:
        dev.seek(1024 + 56)
        assert dev.read(2) == b"\x53\xef"
    assert attach_state.detach_cli(second["device"]).returncode == 0
    assert attach_state.leftovers() == []
