"""Agent-driven live migration under a concurrent verifying writer (issue 2, "What must be shown" 2).

Real agent process, real nbdkit running the mirror node, real libnbd clients. For both stun
strategies, the three mirror modes (sync, async, dirty), 1 and 4 disks: the destination equals
the writer's model, the writer saw no error, and after switchover new writes reach the
destination only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from svlab.writer import file_digest

MiB = 1024 * 1024


def assert_no_partials(dest: Path) -> None:
    leftovers = sorted(p.name for p in dest.iterdir() if p.name.endswith(".svmotion-partial"))
    assert not leftovers, leftovers


@pytest.mark.parametrize("disks", [1, 4])
@pytest.mark.parametrize("mirror", ["sync", "async", "dirty"])
@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_migration_under_writer(agent_vm, dest_dir: Path, tmp_path: Path, strategy: str, mirror: str,
                                disks: int) -> None:
    vm = agent_vm(n_disks=disks, size=16 * MiB if disks == 4 else 32 * MiB)
    writer = vm.writer(rate=(1 if disks == 4 else 2) * MiB)
    writer.start()
    try:
        time.sleep(0.3)
        report_file = tmp_path / "report.json"
        # A copy rate limit makes the bulk copy last long enough for writes to race it.
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--stun-strategy", strategy,
                      "--mirror", mirror, "--rate", "24M", "--stun-budget", "10ms", "--json", "--report", str(report_file))
        assert done.returncode == 0, done.stderr + vm.log_text()
        record = json.loads(done.stdout)
        assert record["state"] == "success" and record["error"] is None
        # After switchover: more writes, which must land on the destination and not on the source.
        sources = {d: file_digest(p) for d, p in vm.disks.items()}
        moved = writer.snapshot().writes
        time.sleep(0.5)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert report.writes > moved > 0
    for d, path in vm.disks.items():
        assert file_digest(path) == sources[d], f"source of {d} written after switchover"
        bad = writer.verify_image(d, dest_dir / f"{d}.raw")
        assert not bad, f"{d}: {len(bad)} bad blocks, first {writer.describe(d, bad[0])}"
    # The record: every phase of the seed, in order, and both stuns, logged with durations.
    names = [p["name"] for p in record["phases"]]
    assert names == ["Null", "DiskSetup", "DiskCreate", "DiskLoad", "FileCreate", "Stun", "Unstun", "DiskCopy",
                     "CopyDirtyInfo", "CopyDirtyData", "DiskCopyDone", "Complete", "Cleanup"]
    kinds = [s["kind"] for s in record["stuns"] if s.get("outcome") == "released"]
    assert kinds == ["mirror_install", "switchover"]
    endgame = [s["name"] for s in record["steps"] if "end-game" in s["name"]]
    assert endgame == (["mirror sync (async end-game)"] if mirror == "async" else []), record["steps"]
    assert all(s["max_wait_seconds"] <= s["duration_seconds"] + 1e-3 for s in record["stuns"])
    full = json.loads(report_file.read_text())
    assert full["samples"] and {"t", "phase", "dirty_bytes", "copied_bytes", "guest_written_bytes"} <= \
        set(full["samples"][0])
    # Per-VM files and sidecars came along, under their final names.
    for f in vm.files + [s for side in vm.sidecars.values() for s in side]:
        assert (dest_dir / f.name).read_bytes() == f.read_bytes()
    assert_no_partials(dest_dir)
    plugin = vm.plugin("status")
    assert all(d["state"] == "passthrough" and d["path"] == str(dest_dir / f"{n}.raw")
               for n, d in plugin["disks"].items())


def test_restart_serves_destination_and_migrates_again(agent_vm, dest_dir: Path, tmp_path: Path) -> None:
    """After a migration the agent's state says where the disks are: an adopted nbdkit keeps serving
    them, a restarted one opens the destination; a second (legacy) migration works on the moved VM."""
    vm = agent_vm(n_disks=1)
    done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    assert done.returncode == 0, done.stderr
    assert "stun mirror_install" in done.stdout and "stun switchover" in done.stdout
    pid = vm.nbdkit_pid()
    vm.call("shutdown")                       # the agent exits, nbdkit stays
    vm.proc.wait(timeout=20)
    vm.start()
    assert vm.nbdkit_pid() == pid              # adopted, not restarted
    assert vm.status()["disks"] == [{"name": "disk0", "path": str(dest_dir / "disk0.raw")}]
    vm.call("shutdown", stop_vms=True)
    vm.proc.wait(timeout=20)
    vm.start()
    assert vm.nbdkit_pid() != pid
    assert vm.plugin("hello")["disks"][0]["path"] == str(dest_dir / "disk0.raw")
    again = tmp_path / "again"
    again.mkdir()
    initial = tmp_path / "before-second.raw"
    initial.write_bytes((dest_dir / "disk0.raw").read_bytes())
    writer = vm.writer(initial={"disk0": str(initial)})
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(again), "--stun-strategy", "legacy", "--delete-source")
    finally:
        report = writer.stop()
    assert done.returncode == 0, done.stderr + vm.log_text()
    assert not report.errors
    assert not writer.verify_image("disk0", again / "disk0.raw")
    assert not (dest_dir / "disk0.raw").exists() and not (dest_dir / "vm1.nvram").exists()
