"""Migrations from host a to a datastore on host b and back: the phases over `ds_*` ops and NBD with TLS.

Two hosts are network namespaces joined by a veth (svlab/netns.py, fixture `two_hosts`): the
VM's agent and its nbdkit run on a (198.18.0.1), the datastore agent and its export on b
(198.18.0.2), each with its own certificate of the site CA. The verifying writer reaches the VM
over its Unix socket. Faults: b's link going down (the veth, no reset) during the bulk copy,
b's agent SIGKILLed during the dirty copy, b's datastore full; each fails the migration
cleanly, the guest sees no error, the source stays intact, and b is cleaned up (at once, or at
the next contact when b did not answer).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from remotelib import DatastoreHost
from vmlib import AgentVM

from svlab.writer import VerifyingWriter, WriterReport, file_digest

MiB = 1024 * 1024


def remote_dir(host: DatastoreHost, name: str) -> tuple[Path, str]:
    """A new directory in the host's datastore, and the --dest that names it."""
    where = host.datastore / name
    where.mkdir()
    return where, f"{host.address}:{host.api_port}:{where}"


def partials(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if ".svmotion-partial" in p.name)


@dataclass
class Faulted:
    """A migration run through a fault, under the writer (stopped now)."""

    writer: VerifyingWriter
    report: WriterReport
    record: dict[str, Any]
    returncode: int
    stderr: str

    def assert_failed_cleanly(self) -> None:
        """Exit 5, one line, and the guest saw nothing of the trouble."""
        assert self.returncode == 5, self.stderr
        assert self.record["state"] == "failed" and "\n" not in self.record["error"], self.record
        assert not self.report.errors, self.report.errors


def migrate_through(vm: AgentVM, dest: str, phase: str, fault: Callable[[], None], *options: str,
                    recover: Callable[[], None] = lambda: None) -> Faulted:
    """`migrate` under the verifying writer; `fault()` once the migration is in `phase`, `recover()`
    once it has ended (also when the test fails)."""
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        out = vm.cli_background("migrate", vm.name, "--dest", dest, "--json", *options)
        vm.wait_phase(phase)
        try:
            fault()
            stdout, stderr = out.communicate(timeout=120)
        finally:
            recover()
        time.sleep(0.3)                # the guest goes on writing, on whichever side it is now
    finally:
        report = writer.stop()
    return Faulted(writer, report, json.loads(stdout), out.returncode, stderr)


def assert_model(writer: VerifyingWriter, images: dict[str, Path], where: str) -> None:
    """Each disk's image equals the stopped writer's model of it."""
    for disk, image in images.items():
        bad = writer.verify_image(disk, image)
        assert not bad, f"{disk} {where}: {len(bad)} bad blocks, first {writer.describe(disk, bad[0])}"


@pytest.mark.parametrize("mirror", ["sync", "async", "dirty"])
@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_there_and_back_under_writer(lab_vm, lab_ds_host: DatastoreHost, tmp_path: Path, strategy: str,
                                     mirror: str) -> None:
    vm = lab_vm(n_disks=1, size=32 * MiB)
    there, dest = remote_dir(lab_ds_host, f"vm-{strategy}-{mirror}")
    back = tmp_path / "back"
    back.mkdir()
    writer = vm.writer(rate=2 * MiB)
    writer.start()
    try:
        time.sleep(0.3)
        out = vm.cli("migrate", vm.name, "--dest", dest, "--stun-strategy", strategy, "--mirror", mirror,
                     "--rate", "24M", "--stun-budget", "10ms", "--json")
        assert out.returncode == 0, out.stderr + vm.log_text()
        record = json.loads(out.stdout)
        assert record["state"] == "success", record
        kinds = [s["kind"] for s in record["stuns"] if s.get("outcome") == "released"]
        assert kinds == ["mirror_install", "switchover"]
        served = vm.plugin("status")["disks"]["disk0"]["path"]
        assert served.startswith(f"nbds://{lab_ds_host.address}:{lab_ds_host.nbd_port}/ds1-"), served
        source_digest = file_digest(vm.disks["disk0"])
        moved = writer.snapshot().writes
        time.sleep(0.5)
        assert file_digest(vm.disks["disk0"]) == source_digest, "source written after the switchover"
        assert partials(there) == []
        # And back to a directory of this host, the source now being B's export.
        out = vm.cli("migrate", vm.name, "--dest", str(back), "--stun-strategy", strategy, "--mirror", mirror,
                     "--json")
        assert out.returncode == 0, out.stderr + vm.log_text()
        assert vm.plugin("status")["disks"]["disk0"]["path"] == str(back / "disk0.raw")
        # The nvram and the sidecar came back from b too, read through b's agent.
        for f in vm.files + vm.sidecars["disk0"]:
            assert (back / f.name).read_bytes() == f.read_bytes() == (there / f.name).read_bytes()
        assert json.loads((vm.state / "vm1.paths.json").read_text())["files"] == [str(back / "vm1.nvram")]
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert report.writes > moved > 0
    assert_model(writer, {"disk0": back / "disk0.raw"}, "back home")


def test_four_disks_with_files_and_sidecars(lab_vm, lab_ds_host: DatastoreHost) -> None:
    vm = lab_vm(n_disks=4, size=16 * MiB)
    vm.files[0].chmod(0o640)
    (vm.sidecars["disk1"][0]).write_bytes(os.urandom(700 * 1024))     # more than one ds_write_file piece
    (vm.sidecars["disk1"][0]).chmod(0o604)
    there, dest = remote_dir(lab_ds_host, "vm-four")
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        time.sleep(0.3)
        out = vm.cli("migrate", vm.name, "--dest", dest, "--rate", "24M", "--json")
        assert out.returncode == 0, out.stderr + vm.log_text()
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert_model(writer, {d: there / f"{d}.raw" for d in vm.disks}, "on b")
    for f in vm.files + [s for side in vm.sidecars.values() for s in side]:
        assert (there / f.name).read_bytes() == f.read_bytes()
        assert (there / f.name).stat().st_mode == f.stat().st_mode, f.name
    assert partials(there) == []
    # What the agent remembers: disks at B's exports, files as HOST:PORT:/path.
    paths = json.loads((vm.state / "vm1.paths.json").read_text())
    assert all(u.startswith(f"nbds://{lab_ds_host.address}:") for u in paths["disks"].values()), paths
    assert paths["files"] == [f"{lab_ds_host.address}:{lab_ds_host.api_port}:{there}/vm1.nvram"]


@pytest.fixture
def small_datastore(lab_ds_hosts, tmp_path: Path) -> Iterator[tuple[DatastoreHost, Path]]:
    """A datastore host on b whose datastore is a 16 MiB tmpfs (unmounted after)."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "svmotion-test", str(small)], check=True)
    try:
        yield lab_ds_hosts(datastore=small), small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_full_datastore_fails_the_migration_cleanly(lab_vm, small_datastore) -> None:
    host, small = small_datastore
    vm = lab_vm(n_disks=1, size=32 * MiB, inject="hold:DiskCopy=3")

    def fill() -> None:
        # The partials are made: leave b 1 MiB, less than the 7 MiB the bulk copy writes.
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        subprocess.run(["fallocate", "-l", str(free - MiB), str(small / "filler")], check=True)

    run = migrate_through(vm, f"{host.address}:{host.api_port}:{small}", "DiskCopy", fill)
    run.assert_failed_cleanly()
    assert run.record["phase"] == "Cleanup"
    assert "No space left on device" in run.record["error"] or "space" in run.record["error"], run.record["error"]
    assert_model(run.writer, vm.disks, "at the source")
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
    assert vm.served_paths() == {"disk0": str(vm.disks["disk0"])}


def test_a_killed_destination_agent_fails_the_migration_and_its_partials_go_at_the_next_contact(
        lab_vm, lab_ds_hosts) -> None:
    host = lab_ds_hosts()
    vm = lab_vm(n_disks=2, size=16 * MiB, inject="hold:CopyDirtyData=3")
    first, dest = remote_dir(host, "first")
    run = migrate_through(vm, dest, "CopyDirtyData", host.kill_agent)
    run.assert_failed_cleanly()
    error = run.record["error"]
    assert f"cannot talk to the agent at {host.address}:{host.api_port}" in error, error
    assert "stay there until the next migration to it removes them" in error, error
    left = sorted(Path(p).name for p in run.record["left_partials"])
    assert left == [p for p in partials(first) if not p.endswith(".json")] and len(left) == 5, left
    assert_model(run.writer, vm.disks, "at the source")
    # b's agent comes back; the next migration to b (another directory) removes what was left first.
    host.start()
    _, dest2 = remote_dir(host, "second")
    out2 = vm.cli("migrate", vm.name, "--dest", dest2, "--json")
    assert out2.returncode == 0, out2.stderr + vm.log_text()
    assert partials(first) == []
    assert not (vm.state / "leftovers.json").exists() or json.loads((vm.state / "leftovers.json").read_text()) == {}


def test_from_one_host_to_another_and_an_abort_there(lab_vm, lab_ds_host: DatastoreHost, lab_ds_hosts) -> None:
    """Remote to remote: B's export is the source, C's the destination; then an abort on C's way."""
    other = lab_ds_hosts(name="c")
    vm = lab_vm(n_disks=2, size=16 * MiB, files=False, inject="pause:CopyDirtyData")
    on_b, to_b = remote_dir(lab_ds_host, "hop")
    on_c, to_c = remote_dir(other, "hop")
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        out = vm.cli_background("migrate", vm.name, "--dest", to_c, "--json")
        vm.wait_phase("CopyDirtyData")
        assert partials(on_c), "the partials exist on C while the migration runs"
        aborted = vm.cli("abort", vm.name)
        assert aborted.returncode == 0, aborted
        _, stderr = out.communicate(timeout=60)
        assert out.returncode == 6, stderr
        assert partials(on_c) == []
        vm.kill_agent()                  # the agent goes, nbdkit and the writer stay
        vm.start()                       # without the pause
        for dest, served in ((to_b, lab_ds_host), (to_c, other)):
            done = vm.cli("migrate", vm.name, "--dest", dest, "--json")
            assert done.returncode == 0, done.stderr + vm.log_text()
            assert all(d["path"].startswith(f"nbds://{served.address}:{served.nbd_port}/")
                       for d in vm.plugin("status")["disks"].values())
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert_model(writer, {d: on_c / f"{d}.raw" for d in vm.disks}, "on c")
    assert partials(on_b) == [] and partials(on_c) == []


def test_a_dead_link_during_the_bulk_copy(lab_vm, lab_ds_host: DatastoreHost, two_hosts) -> None:
    """b's end of the veth goes down (no reset: a pulled cable) while the bulk copy runs."""
    vm = lab_vm(n_disks=1, size=32 * MiB)
    first, dest = remote_dir(lab_ds_host, "first")
    # 7 MiB of data at 2 MiB/s: the bulk copy lasts seconds.
    run = migrate_through(vm, dest, "DiskCopy", two_hosts["b"].link_down, "--rate", "2M",
                          recover=two_hosts["b"].link_up)
    run.assert_failed_cleanly()
    assert run.report.max_latency < 2.0, run.report.max_latency     # no stall past the lease (default 2 s)
    assert lab_ds_host.address in run.record["error"], run.record["error"]
    assert "stay there until the next migration to it removes them" in run.record["error"], run.record["error"]
    assert_model(run.writer, vm.disks, "at the source")
    assert vm.served_paths() == {"disk0": str(vm.disks["disk0"])}
    assert partials(first), "b did not answer: its partials are still there"
    # The link is back: the next migration to b removes them first.
    _, dest2 = remote_dir(lab_ds_host, "second")
    done = vm.cli("migrate", vm.name, "--dest", dest2, "--json")
    assert done.returncode == 0, done.stderr + vm.log_text()
    assert partials(first) == []


@pytest.mark.parametrize("point", ["DiskCopy", "CopyDirtyData.switched", "DiskCopyDone.renamed", "Cleanup.finished"])
def test_the_agent_killed_on_the_way_to_b_resumes_and_b_serves_the_disks_after_a_restart(
        lab_vm, lab_ds_host: DatastoreHost, point: str) -> None:
    vm = lab_vm(n_disks=2, size=16 * MiB, inject=f"hold:{point}=60")
    there, dest = remote_dir(lab_ds_host, "resumed")
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        vm.migrate_killed_and_resumed(dest, point)
        served = vm.served_paths()
        assert all(u.startswith(f"nbds://{lab_ds_host.address}:{lab_ds_host.nbd_port}/") for u in served.values())
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert sorted(p.name for p in there.iterdir()) == sorted(
        [f"{n}.raw" for n in vm.disks] + [f"{n}.ctk" for n in vm.disks] + ["vm1.nvram"])
    assert_model(writer, {d: there / f"{d}.raw" for d in vm.disks}, "on b")
    # nbdkit dies: the supervisor starts it again on b's exports, over TLS, and serves their data.
    vm.kill_nbdkit_and_wait_restart()
    assert vm.served_paths() == served
    for d in vm.disks:
        bad = writer.verify_nbd(d, vm.uri(d))
        assert not bad, f"{d} served again: {len(bad)} bad blocks, first {writer.describe(d, bad[0])}"


def test_b_export_nbdkit_killed_during_the_bulk_copy(lab_vm, lab_ds_host: DatastoreHost) -> None:
    """b's NBD export dies under the mirror and b's agent starts it again. A request in flight at
    the death fails the mirror: the migration fails, the guest goes on without error on its
    source, and b's agent removes the partials. With none in flight the mirror node's next
    request opens a new link to the restarted export and the migration succeeds. Both happen
    (it is a race with the copier's and the guest's requests); each must lose nothing."""
    vm = lab_vm(n_disks=1, size=32 * MiB)
    there, dest = remote_dir(lab_ds_host, "vm-export-dies")
    run = migrate_through(vm, dest, "DiskCopy", lambda: os.kill(lab_ds_host.export_pid()[0], signal.SIGKILL),
                          "--rate", "2M")
    if run.record["state"] == "success":
        assert run.returncode == 0 and not run.report.errors, run.report.errors
        assert_model(run.writer, {"disk0": there / "disk0.raw"}, "on b")
        return
    run.assert_failed_cleanly()
    assert run.record["left_partials"] == [] and partials(there) == []
    assert_model(run.writer, vm.disks, "at the source")
    assert vm.served_paths() == {"disk0": str(vm.disks["disk0"])}