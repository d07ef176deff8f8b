"""DiskLoad: partial destination disks outlive a dead mirror node and are resumed, not copied again.

Issue 10, "What must be shown": an nbdkit SIGKILLed at 50% of the bulk copy, then re-migrated,
copies at most the differing chunks plus 5% of the disk. And a partial disk whose identity does
not match is refused (exit 3) with nothing changed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from svlab.writer import fill_pattern_image

MiB = 1 << 20
SIZE = 64 * MiB
CHUNK = 64 * 1024
PARTIAL = "disk0.raw.svmotion-partial"


def differing_bytes(a: Path, b: Path, chunk: int = CHUNK) -> int:
    """Bytes in the chunks where two files of the same size differ."""
    total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x and not y:
                return total
            if x != y:
                total += max(len(x), len(y))


def wait_restarted(vm, dead_pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = vm.status()
        if st["nbdkit_up"] and st["nbdkit_pid"] not in (None, dead_pid):
            try:
                if vm.plugin("hello")["pid"] == st["nbdkit_pid"]:
                    return
            except OSError:
                pass            # restarting: the control socket is not bound yet
        time.sleep(0.1)
    raise AssertionError(f"nbdkit not restarted: {vm.status()}\n{vm.log_text()}")


def test_nbdkit_killed_mid_copy_then_the_next_migration_copies_only_what_differs(
        agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    vm = agent_vm(n_disks=1, size=SIZE, start=False)
    source = vm.disks["disk0"]
    # Dense: every chunk holds data, so copying it all again would be far above the bound.
    fill_pattern_image(source, "disk0", SIZE)
    shutil.copyfile(source, vm.pristine["disk0"])
    vm.start()

    # 1. The first migration, paced to take 8 s; its nbdkit is SIGKILLed halfway through the copy.
    migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--rate", "8M", "--json")
    try:
        deadline = time.monotonic() + 30
        while True:
            copy = vm.plugin("status")["disks"]["disk0"]["copy"]
            if copy and copy["done_bytes"] >= SIZE // 2:
                break
            assert time.monotonic() < deadline, vm.log_text()
            time.sleep(0.02)
        killed = vm.nbdkit_pid()
        os.kill(killed, signal.SIGKILL)
        out, err = migrate.communicate(timeout=60)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.communicate()
    assert migrate.returncode == 5, out + err
    wait_restarted(vm, killed)
    first = vm.status()["last"]
    assert first["state"] == "failed" and first["kept_partials"] == [str(dest_dir / PARTIAL)], first
    assert sorted(p.name for p in dest_dir.iterdir()) == [PARTIAL, PARTIAL + ".json"]
    identity = json.loads((dest_dir / (PARTIAL + ".json")).read_text())
    assert identity == {"version": 1, "vm": "vm1", "disk": "disk0", "source": os.path.realpath(source),
                        "size": SIZE, "migration": first["id"], "granularity": 65536}
    assert vm.plugin("hello")["disks"][0]["path"] == str(source)     # restarted on the source

    # 2. The guest goes on writing to its source: part of the copied half is stale now.
    writer = vm.writer(rate=4 * MiB, seed=11)
    writer.start()
    try:
        time.sleep(1.0)
    finally:
        report = writer.stop()
    assert report.writes > 0 and not report.errors, report.errors[:3]
    assert not writer.verify_image("disk0", source)
    snapshot = tmp_path / "snapshot.raw"
    shutil.copyfile(source, snapshot)
    differ = differing_bytes(snapshot, dest_dir / PARTIAL)
    assert SIZE // 4 < differ < 3 * SIZE // 4, f"{differ} bytes differ: was about half copied?"

    # 3. Migrate again to the same destination under a verifying writer: DiskLoad resumes.
    writer = vm.writer(initial={"disk0": str(snapshot)}, rate=1 * MiB, seed=12)
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--json")
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert done.returncode == 0, done.stderr + vm.log_text()
    assert report.writes > 0 and not report.errors, report.errors[:3]
    bad = writer.verify_image("disk0", dest_dir / "disk0.raw")
    assert not bad, f"{len(bad)} bad blocks, first {writer.describe('disk0', bad[0])}"
    record = json.loads(done.stdout)
    assert record["disks"][0]["resumed_from"] == first["id"]
    names = [p["name"] for p in record["phases"]]
    assert names.index("DiskCreate") < names.index("DiskLoad") < names.index("DiskCopy")
    load = record["passes"][0]
    assert load["kind"] == "load" and load["compared_bytes"] == SIZE, load
    # The restarted nbdkit has copied for this migration only: load, dirty passes, switchover.
    copied = sum(vm.plugin("status")["disks"]["disk0"]["copied_bytes"].values())
    print(f"DiskLoad after an nbdkit kill: copied {copied / MiB:.1f} MiB where {differ / MiB:.1f} MiB differed "
          f"(bound {(differ + SIZE // 20) / MiB:.1f} MiB; a full copy {SIZE / MiB:.0f} MiB)")
    assert copied <= differ + SIZE // 20, f"copied {copied} bytes, {differ} differed"
    assert copied >= differ * 0.9, f"copied {copied} bytes but {differ} differed: were they all compared?"
    assert sorted(p.name for p in dest_dir.iterdir()) == ["disk0.ctk", "disk0.raw", "vm1.nvram"]


@pytest.mark.parametrize("change", ["vm", "size", "no record"])
def test_a_partial_disk_that_is_not_this_disks_is_refused_and_left_alone(agent_vm, dest_dir: Path,
                                                                        change: str) -> None:
    vm = agent_vm(n_disks=1)
    source = vm.disks["disk0"]
    partial = dest_dir / PARTIAL
    subprocess.run(["truncate", "-s", str(source.stat().st_size), str(partial)], check=True)
    identity = {"version": 1, "vm": "vm1", "disk": "disk0", "source": os.path.realpath(source),
                "size": source.stat().st_size, "migration": "0123456789ab", "granularity": 65536}
    if change == "vm":
        identity["vm"] = "vm2"
    elif change == "size":
        identity["size"] += CHUNK
    if change != "no record":
        (dest_dir / (PARTIAL + ".json")).write_text(json.dumps(identity))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest_dir.iterdir()}
    done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    assert done.returncode == 3, done.stdout + done.stderr
    assert str(partial) in done.stderr and "remove it" in done.stderr, done.stderr
    assert ("identity record" in done.stderr) if change == "no record" else (f"says {change}" in done.stderr)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dest_dir.iterdir()} == before
    assert vm.status()["last"] is None
    disk = vm.plugin("status")["disks"]["disk0"]
    assert (disk["state"], disk["path"]) == ("passthrough", str(source))
