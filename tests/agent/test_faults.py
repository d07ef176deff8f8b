"""Faults: the agent killed or hung under a stun, abort in every phase, a destination that fills up.

Issue 2, "What must be shown" 3, 4 and 5. Each test runs a verifying writer through the fault and
checks that the guest saw no error and that the source is intact (equal to the writer's model).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.phases import PHASES

MiB = 1024 * 1024
LEASE = 2.0


def assert_on_intact_source(vm, writer, report) -> None:
    """The workload runs on its source, which holds exactly what the writer wrote."""
    assert not report.errors, report.errors
    plugin = vm.plugin("status")
    assert plugin["stun"] is None
    for name, disk in plugin["disks"].items():
        assert disk["state"] == "passthrough" and disk["dest"] is None, disk
        assert disk["path"] == str(vm.disks[name])
    for name, path in vm.disks.items():
        bad = writer.verify_image(name, path)
        assert not bad, f"{name}: {len(bad)} bad blocks, first {writer.describe(name, bad[0])}"


def dest_files(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir())


def wait_plugin_unstunned(vm, timeout: float) -> float:
    start = time.monotonic()
    while vm.plugin("status")["stun"] is not None:
        assert time.monotonic() - start < timeout, "the stun outlived its lease"
        time.sleep(0.01)
    return time.monotonic() - start


def test_agent_sigkilled_while_stun_held(agent_vm, dest_dir: Path) -> None:
    """Item 3: the mirror node releases the guest itself; a restarted agent resumes the migration
    from the stun (issue 10: resume, not restart) and finishes it."""
    vm = agent_vm(n_disks=2, inject="hold:Unstun=30")
    writer = vm.writer()
    writer.start()
    try:
        started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait")
        assert started.returncode == 0, started.stderr
        vm.wait_phase("Unstun")
        assert vm.plugin("status")["stun"] is not None
        time.sleep(0.3)                       # the guest is held now
        vm.kill_agent()
        wait_plugin_unstunned(vm, LEASE + 0.5)
        at_kill = writer.snapshot().writes
        time.sleep(0.5)
    finally:
        report = writer.stop()
    assert report.writes > at_kill
    # What the guest felt: the stun from its start to its release, bounded by the lease + 0.5 s.
    assert report.longest_stall <= LEASE + 0.5, report.summary()
    stun = vm.plugin("status")["stuns"][-1]
    assert stun["kind"] == "mirror_install" and stun["outcome"] == "expired"
    assert stun["duration_seconds"] <= LEASE + 0.5
    assert_on_intact_source(vm, writer, report)
    assert any(name.endswith(".svmotion-partial") for name in dest_files(dest_dir))
    vm.start()                                 # a new agent adopts nbdkit and goes on
    last = vm.wait_done()
    assert last["state"] == "success", last
    assert any("resumed at Stun" in w for w in last["warnings"]), last["warnings"]
    assert not any(name.endswith(".svmotion-partial") for name in dest_files(dest_dir))
    for name in vm.disks:
        bad = writer.verify_image(name, dest_dir / f"{name}.raw")
        assert not bad, f"{name}: {len(bad)} bad blocks on the destination, first {writer.describe(name, bad[0])}"
    assert {d["name"]: d["path"] for d in vm.status()["disks"]} == \
        {name: str(dest_dir / f"{name}.raw") for name in vm.disks}


def test_hung_step_under_stun_lease_expires(agent_vm, dest_dir: Path) -> None:
    """Invariant 4: a step that hangs under the stun does not hold the guest past the lease;
    the migration then fails cleanly (exit 5) and rolls back."""
    vm = agent_vm(n_disks=1, inject="hold:Unstun=3")
    writer = vm.writer()
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(dest_dir))
    finally:
        report = writer.stop()
    assert done.returncode == 5, done.stdout + done.stderr
    assert "needs a held stun" in done.stderr and "intact source" in done.stderr
    assert report.longest_stall <= LEASE + 0.5, report.summary()
    install = [s for s in vm.plugin("status")["stuns"] if s["kind"] == "mirror_install"]
    assert install[-1]["outcome"] == "expired"
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest_dir) == []


ABORTABLE = PHASES[:PHASES.index("DiskCopyDone")]


@pytest.mark.parametrize("phase", ABORTABLE)
def test_abort_in_every_phase(agent_vm, dest_dir: Path, phase: str) -> None:
    """Item 4: abort before any phase up to the switchover (pause:PHASE holds the engine there)."""
    strategy = "legacy" if ABORTABLE.index(phase) % 2 else "optimized"
    vm = agent_vm(n_disks=2, size=16 * MiB, inject=f"pause:{phase}")
    writer = vm.writer()
    writer.start()
    try:
        migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--stun-strategy", strategy)
        vm.wait_phase(phase)
        aborted = vm.cli("abort", vm.name)
        assert aborted.returncode == 0, aborted.stderr
        out, err = migrate.communicate(timeout=60)
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert migrate.returncode == 6, out + err
    assert "aborted by the user" in err and "intact source" in err
    last = vm.status()["last"]
    assert last["state"] == "aborted" and last["warnings"] == [], last["warnings"]
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest_dir) == []


def test_abort_during_bulk_copy(agent_vm, dest_dir: Path) -> None:
    """Abort while the copier is running (a slow copy rate keeps DiskCopy busy)."""
    vm = agent_vm(n_disks=1)
    writer = vm.writer()
    writer.start()
    try:
        started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--rate", "2M", "--no-wait")
        assert started.returncode == 0
        vm.wait_phase("DiskCopy")
        time.sleep(0.5)
        copying = vm.plugin("status")["disks"]["disk0"]["copy"]
        assert copying["running"] and copying["done_bytes"] > 0
        assert vm.cli("abort", vm.name).returncode == 0
    finally:
        report = writer.stop()
    last = vm.status()["last"]
    assert last["state"] == "aborted" and last["warnings"] == [], last["warnings"]
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest_dir) == []


def test_abort_refused_when_not_migrating(agent_vm) -> None:
    vm = agent_vm(n_disks=1)
    done = vm.cli("abort", vm.name)
    assert done.returncode == 3 and "not migrating" in done.stderr


def test_destination_fills_up(agent_vm, small_tmpfs) -> None:
    """Item 5: the destination runs out of space during the bulk copy: the guest sees nothing,
    the migration fails cleanly (exit 5) and the source is intact."""
    vm = agent_vm(n_disks=1, size=32 * MiB, inject="hold:DiskCopy=1")
    dest = small_tmpfs(16 * MiB)
    writer = vm.writer()
    writer.start()
    try:
        migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest))
        vm.wait_phase("DiskCopy")
        # Another tenant fills the filesystem after DiskSetup checked the free space.
        st = os.statvfs(dest)
        with open(dest / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 256 * 1024)
        out, err = migrate.communicate(timeout=90)
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert migrate.returncode == 5, out + err + vm.log_text()
    assert "No space left on device" in err and "intact source" in err
    assert vm.status()["last"]["warnings"] == []
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest) == ["filler"]


def test_no_switchover_onto_a_destination_without_room_to_grow(agent_vm, small_tmpfs) -> None:
    """The fault campaign (seed 237986542): a destination filled up during the migration, the data
    still fit, the switchover went ahead, and the guest's next writes into its sparse disk's holes
    failed there with ENOSPC. Now the migration fails before the switchover, on the intact source."""
    vm = agent_vm(n_disks=1, size=32 * MiB)           # sparse: about 7 MiB of data
    dest = small_tmpfs(12 * MiB)                      # the copy fits; 25 MiB of holes could not grow
    writer = vm.writer()
    writer.start()
    try:
        done = vm.cli("migrate", vm.name, "--dest", str(dest))
    finally:
        report = writer.stop()
    assert done.returncode == 5, done.stdout + done.stderr
    assert "too little for the disks to grow" in done.stderr, done.stderr
    assert_on_intact_source(vm, writer, report)
    assert dest_files(dest) == []
