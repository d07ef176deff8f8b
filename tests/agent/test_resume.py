"""Resume, not restart (issue 10): an agent that dies mid-migration loses neither data nor copying.

- Defect 1: an agent SIGKILLed at any step from the switchover stun to the end of Cleanup, then
  restarted, must finish the migration on the destination, and a later SIGKILL of nbdkit must
  bring the VM back on the destination too (the supervisor restarted it on the stale source,
  losing what the guest had written since the switchover). Each step is reached with an
  SVMOTION_INJECT hold point (agent/phases.py STEP_POINTS), so the kill lands exactly there.
- An agent SIGKILLed halfway through the bulk copy goes on from the mirror node's dirty map:
  the whole migration copies at most 1.1x the disk's data.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from svlab.writer import fill_pattern_image

MiB = 1024 * 1024
# Every step from the switchover stun to the end of Cleanup where the agent can die.
KILL_POINTS = ["CopyDirtyData.stunned", "CopyDirtyData.switched", "CopyDirtyData.released",
               "DiskCopyDone", "DiskCopyDone.renamed", "Complete", "Cleanup.finished", "Cleanup.done"]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_agent_killed_after_the_switchover_step_finishes_on_the_destination(agent_vm, dest_dir: Path,
                                                                            point: str) -> None:
    vm = agent_vm(n_disks=2, size=16 * MiB, inject=f"hold:{point}=60")
    finals = {name: str(dest_dir / f"{name}.raw") for name in vm.disks}
    writer = vm.writer()
    writer.start()
    try:
        vm.migrate_killed_and_resumed(str(dest_dir), point)
        time.sleep(0.2)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert vm.served_paths() == finals, "nbdkit does not serve the final destination names"
    assert {d["name"]: d["path"] for d in vm.status()["disks"]} == finals
    assert sorted(p.name for p in dest_dir.iterdir()) == sorted(
        [f"{n}.raw" for n in vm.disks] + [f"{n}.ctk" for n in vm.disks] + ["vm1.nvram"])
    # The defect: a restart of nbdkit now must come back on the destination, not the source.
    vm.kill_nbdkit_and_wait_restart()
    assert vm.served_paths() == finals
    for name in vm.disks:
        bad = writer.verify_image(name, finals[name])
        assert not bad, f"{name}: {len(bad)} bad blocks, first {writer.describe(name, bad[0])}"


@pytest.mark.slow
def test_served_record_names_the_destination_before_the_guest_is_released(agent_vm, dest_dir: Path) -> None:
    """Under the switchover stun, before unstun, the record nbdkit keeps already names the destination."""
    vm = agent_vm(n_disks=1, size=8 * MiB, inject="hold:CopyDirtyData.switched=60")
    started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait")
    assert started.returncode == 0, started.stderr
    vm.wait_for_log("SVMOTION_INJECT hold at CopyDirtyData.switched")
    assert vm.plugin("status")["stun"] is not None, "the guest should still be held"
    record = json.loads((vm.state / f"{vm.name}.served.json").read_text())
    assert record["disks"] == {"disk0": str(dest_dir / "disk0.raw.svmotion-partial")}
    assert (vm.state / f"{vm.name}.served.json").stat().st_mode & 0o777 == 0o600
    vm.kill_agent()
    vm.start()
    assert vm.wait_done()["state"] == "success"


def copied_bytes(vm) -> int:
    return sum(sum(d["copied_bytes"].values()) for d in vm.plugin("status")["disks"].values())


@pytest.mark.slow
def test_agent_killed_halfway_through_the_bulk_copy_copies_at_most_1_1x(agent_vm, dest_dir: Path, testlib) -> None:
    size = 32 * MiB
    vm = agent_vm(n_disks=1, size=size, start=False)
    fill_pattern_image(vm.disks["disk0"], "disk0", size)      # dense: every byte must be copied
    vm.start()
    # The CLI waits in the foreground and must ride out the agent's restart.
    migrate = vm.cli_background("migrate", vm.name, "--dest", str(dest_dir), "--rate", "8M")
    try:
        deadline = time.monotonic() + 30
        while copied_bytes(vm) < size // 2:
            assert time.monotonic() < deadline, vm.log_text()
            time.sleep(0.05)
        vm.kill_agent()
        at_kill = copied_bytes(vm)
        assert at_kill < size, "the bulk copy finished before the kill; the test proves nothing"
        vm.start()
        out, err = migrate.communicate(timeout=120)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait()
    assert migrate.returncode == 0, out + err
    last = vm.wait_done()
    assert last["state"] == "success", last
    assert any("resumed at DiskCopy" in w for w in last["warnings"]), last["warnings"]
    total = copied_bytes(vm)
    print(f"resume after an agent kill at {at_kill / size:.0%} of the bulk copy: copied {total / size:.3f}x "
          f"the disk in total")
    assert total <= 1.1 * size, f"copied {total} bytes for a {size}-byte disk ({total / size:.2f}x)"
    assert testlib.same_content(vm.disks["disk0"], dest_dir / "disk0.raw") == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["CopyDirtyData.switched", "DiskCopyDone.renamed", "Cleanup.finished"])
def test_agent_and_nbdkit_killed_together_after_the_switchover_come_back_on_the_destination(
        agent_vm, dest_dir: Path, point: str, testlib) -> None:
    """Both processes gone at once (a host crash, short of the page cache): only the record nbdkit
    wrote before serving the destination can say where the disks live."""
    vm = agent_vm(n_disks=2, size=8 * MiB, inject=f"hold:{point}=60")
    finals = {name: str(dest_dir / f"{name}.raw") for name in vm.disks}
    started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--no-wait")
    assert started.returncode == 0, started.stderr
    vm.wait_for_log(f"SVMOTION_INJECT hold at {point}")
    nbdkit = vm.nbdkit_pid()
    vm.kill_agent()
    os.kill(nbdkit, signal.SIGKILL)
    vm.start(wait_nbdkit=True)
    last = vm.wait_done()
    assert last["state"] == "success", last
    assert vm.nbdkit_pid() != nbdkit
    assert vm.served_paths() == finals
    for name in vm.disks:
        assert testlib.same_content(vm.disks[name], Path(finals[name])) == []


@pytest.mark.slow
def test_a_resumed_migration_can_be_aborted(agent_vm, dest_dir: Path, testlib) -> None:
    vm = agent_vm(n_disks=1, size=32 * MiB)
    started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--rate", "1M", "--no-wait")
    assert started.returncode == 0, started.stderr
    vm.wait_phase("DiskCopy")
    vm.kill_agent()
    vm.start()
    assert vm.status()["migration"]["phase"] in ("DiskCopy", "CopyDirtyInfo", "CopyDirtyData")
    aborted = vm.cli("abort", vm.name)
    assert aborted.returncode == 0, aborted.stderr
    last = vm.status()["last"]
    assert last["state"] == "aborted", last
    assert sorted(p.name for p in dest_dir.iterdir()) == []
    plugin = vm.plugin("status")
    assert {d["state"] for d in plugin["disks"].values()} == {"passthrough"}
    assert testlib.same_content(vm.disks["disk0"], vm.pristine["disk0"]) == []


@pytest.mark.slow
def test_agent_and_nbdkit_killed_mid_copy_leave_the_partial_for_the_next_migration(
        agent_vm, dest_dir: Path, testlib) -> None:
    """No mirror state survives, so the migration has failed; its copying survives in the partial disk."""
    size = 32 * MiB
    vm = agent_vm(n_disks=1, size=size, start=False)
    fill_pattern_image(vm.disks["disk0"], "disk0", size)
    vm.start()
    started = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--rate", "8M", "--no-wait")
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 30
    while copied_bytes(vm) < size // 2:
        assert time.monotonic() < deadline, vm.log_text()
        time.sleep(0.05)
    nbdkit = vm.nbdkit_pid()
    vm.kill_agent()
    os.kill(nbdkit, signal.SIGKILL)
    vm.start(wait_nbdkit=True)
    last = vm.status()["last"]
    assert last["state"] == "failed" and "nbdkit stopped too" in last["error"], last
    partial = dest_dir / "disk0.raw.svmotion-partial"
    assert last["kept_partials"] == [str(partial)]
    assert sorted(p.name for p in dest_dir.iterdir()) == [partial.name, partial.name + ".json"]
    assert vm.served_paths() == {"disk0": str(vm.disks["disk0"])}
    again = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--json")
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)
    assert record["disks"][0]["resumed_from"] == last["id"]
    assert record["passes"][0]["kind"] == "load"
    assert copied_bytes(vm) <= size // 2 + size // 20, "the load pass copied more than the missing half"
    assert testlib.same_content(vm.disks["disk0"], dest_dir / "disk0.raw") == []


def test_the_end_of_a_migration_survives_an_agent_restart(agent_vm, dest_dir: Path) -> None:
    """The fault campaign found an agent killed right after a migration ended forgetting how it ended."""
    vm = agent_vm(n_disks=1, size=8 * MiB)
    done = vm.cli("migrate", vm.name, "--dest", str(dest_dir), "--json")
    assert done.returncode == 0, done.stderr
    ended = json.loads(done.stdout)
    vm.kill_agent()
    vm.start()
    last = vm.status()["last"]
    assert last is not None and last["id"] == ended["id"] and last["state"] == "success", last
    assert (vm.state / f"{vm.name}.last.json").stat().st_mode & 0o777 == 0o600
