"""A destination whose storage fails at write-back, not at write: the copy fails, the guest never knows.

The copier writes behind itself (nbd_plugin/copier.py): it copies into the destination's page
cache and then waits for that data to reach storage. On a real disk the second step is where a
dying array or a full thin pool shows up, after every write() has succeeded. Here the
destination is a file on ext4 on a loop device over nbdfuse over nbdkit's `memory` plugin with
the `error` filter, which fails every NBD write while a trigger file exists. The mirror node
copies a disk into it under a verifying random writer, the trigger file is present from the
start: the bulk pass must fail with the write-back's error and count it as `dest:write_back`,
the mirror must be marked failed so that no switchover can follow (the fault campaign found a
migration switching over onto such a destination), the writer must see no error, and after the abort the source must hold exactly what the writer
wrote.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import attach as attach_mod
from agent.jsonlines import RemoteError
from svlab.writer import PATTERN, VerifyingWriter

pytestmark = pytest.mark.kernel

MiB = 1024 * 1024
DISK = 64 * MiB


@pytest.fixture
def failing_storage(tmp_path: Path, klib) -> Iterator[tuple[str, Path]]:
    """An NBD export whose writes fail while the returned trigger path exists; (URI, trigger)."""
    klib.require_fallback_path()
    sock, trigger = tmp_path / "failing.nbd", tmp_path / "fail-writes"
    log = open(tmp_path / "failing-nbdkit.log", "ab")
    proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), "--filter=error", "memory",
                             "size=256M", "error-pwrite=EIO", "error-pwrite-rate=100%",
                             f"error-pwrite-file={trigger}"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "nbdkit memory+error did not start"
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}", trigger
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_failing_destination_write_back_fails_the_copy_and_spares_the_guest(
        failing_storage, attach_state, mounts, tmp_path: Path, testlib, start_mirror_node) -> None:
    uri, trigger = failing_storage
    device = attach_mod.attach(attach_mod.Export("wbfail", "disk0", uri), str(attach_state.path),
                               method="nbdfuse").device
    attach_state.remember()
    subprocess.run(["mkfs.ext4", "-q", device], check=True, capture_output=True)
    dest_dir = mounts(device, tmp_path / "dest")
    dest = dest_dir / "disk0.raw"
    with open(dest, "wb") as f:
        f.truncate(DISK)

    src = tmp_path / "src"
    src.mkdir()
    disks = {"disk0": testlib.make_dense_image(src / "disk0.raw", DISK)}
    node = start_mirror_node(disks)
    ctl = node.client()
    # No flush and no FUA from the guest: those sync the destination too (the mirror sends them
    # there), and whichever sync comes first is the one the kernel tells about the failed
    # write-back. Without them only the copier can see it, which is the path under test; the guest
    # flush's path (a failed destination flush breaks the mirror) is mirror.py's own.
    writer = VerifyingWriter(node.uris(), initial={"disk0": PATTERN}, connections=2, queue_depth=4,
                             rate=4 * MiB, seed=11, fua_ratio=0.0, flush_ratio=0.0)
    writer.start()
    try:
        stun_id = ctl.call("stun", kind="mirror_install")["stun_id"]
        ctl.call("install_mirror", stun_id=stun_id,
                 disks={"disk0": {"dest": str(dest), "mode": "sync", "granularity": 64 * 1024}})
        ctl.call("unstun", stun_id=stun_id)
        trigger.touch()
        ctl.call("copy", kind="bulk", rate=0)
        deadline = time.monotonic() + 60
        while (disk := ctl.call("status")["disks"]["disk0"])["copy"]["running"]:
            assert time.monotonic() < deadline, f"the copy neither finished nor failed: {disk['copy']}"
            time.sleep(0.05)
        assert disk["copy"]["error"] and "destination write-back" in disk["copy"]["error"], disk["copy"]
        assert "Input/output error" in disk["copy"]["error"], disk["copy"]
        assert disk["errors"].get("dest:write_back", 0) >= 1, disk["errors"]
        # Data the dirty map calls copied may be lost: the mirror is broken and cannot switch over.
        assert disk["mirror_failed"] and "write-back" in disk["mirror_failed"], disk
        stun_id = ctl.call("stun", kind="switchover")["stun_id"]
        with pytest.raises(RemoteError, match="write-back failed"):
            ctl.call("switchover", stun_id=stun_id)
        ctl.call("unstun", stun_id=stun_id)
        ctl.call("abort")
        assert ctl.call("status")["disks"]["disk0"]["state"] == "passthrough"
        time.sleep(0.2)  # the guest keeps writing on the source alone
    finally:
        report = writer.stop()
        trigger.unlink(missing_ok=True)
    assert not report.errors, f"the guest saw errors: {report.errors[:5]}"
    bad = writer.verify_image("disk0", disks["disk0"])
    assert not bad, f"{len(bad)} blocks of the source differ from what the guest wrote"
