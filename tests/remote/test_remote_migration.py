"""Migrations to another host's datastore and back, on loopback: the phases over `ds_*` ops and NBD with TLS.

Both agents run here on 127.0.0.1 (the two-host tests in network namespaces are
test_two_hosts_migration.py): what this file shows is the phase engine's use of a remote
destination, file by file, under the verifying writer.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from agentproc import AgentPool
from remotelib import DatastoreHost, Pki
from vmlib import AgentVM, make_vm

from agent.writer import file_digest

MiB = 1024 * 1024


@pytest.fixture
def tls_vm(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., AgentVM]]:
    """Factory: a VM whose agent has the site's credentials (a.test), so it can reach datastores."""
    pool = AgentPool()
    try:
        yield lambda **kwargs: make_vm(pool, tmp_path, extra_config=f'[tls]\ndir = "{pki.client}"\n', **kwargs)
    finally:
        pool.close()


def remote_dir(host: DatastoreHost, name: str) -> tuple[Path, str]:
    """A new directory in the host's datastore, and the --dest that names it."""
    where = host.datastore / name
    where.mkdir()
    return where, f"127.0.0.1:{host.api_port}:{where}"


def partials(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if ".svmotion-partial" in p.name)


@pytest.mark.parametrize("mirror", ["sync", "dirty"])
@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_there_and_back_under_writer(tls_vm, ds_host: DatastoreHost, tmp_path: Path, strategy: str,
                                     mirror: str) -> None:
    vm = tls_vm(n_disks=1, size=32 * MiB, files=False)     # files come back from a datastore not yet
    there, dest = remote_dir(ds_host, f"vm-{strategy}-{mirror}")
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
        assert served.startswith(f"nbds://127.0.0.1:{ds_host.nbd_port}/ds1-"), served
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
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert report.writes > moved > 0
    bad = writer.verify_image("disk0", back / "disk0.raw")
    assert not bad, f"{len(bad)} bad blocks back home, first {writer.describe('disk0', bad[0])}"


def test_four_disks_with_files_and_sidecars(tls_vm, ds_host: DatastoreHost) -> None:
    vm = tls_vm(n_disks=4, size=16 * MiB)
    there, dest = remote_dir(ds_host, "vm-four")
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
    for d in vm.disks:
        bad = writer.verify_image(d, there / f"{d}.raw")
        assert not bad, f"{d}: {len(bad)} bad blocks on B, first {writer.describe(d, bad[0])}"
    for f in vm.files + [s for side in vm.sidecars.values() for s in side]:
        assert (there / f.name).read_bytes() == f.read_bytes()
    assert partials(there) == []
    # What the agent remembers: disks at B's exports, files as HOST:PORT:/path.
    paths = json.loads((vm.state / "vm1.paths.json").read_text())
    assert all(u.startswith("nbds://127.0.0.1:") for u in paths["disks"].values()), paths
    assert paths["files"] == [f"127.0.0.1:{ds_host.api_port}:{there}/vm1.nvram"]


@pytest.fixture
def small_datastore(datastore_host) -> Iterator[tuple[DatastoreHost, Path]]:
    """A datastore host whose directory `small` is a 16 MiB tmpfs (unmounted after)."""
    host = datastore_host()
    small = host.datastore / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "svmotion-test", str(small)], check=True)
    try:
        yield host, small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_full_datastore_fails_the_migration_cleanly(tls_vm, small_datastore) -> None:
    host, small = small_datastore
    vm = tls_vm(n_disks=1, size=32 * MiB, inject="hold:DiskCopy=3")
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        out = vm.cli_background("migrate", vm.name, "--dest", f"127.0.0.1:{host.api_port}:{small}", "--json")
        vm.wait_phase("DiskCopy")
        # The partials are made: leave B 1 MiB, less than the 7 MiB the bulk copy writes.
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        subprocess.run(["fallocate", "-l", str(free - MiB), str(small / "filler")], check=True)
        stdout, stderr = out.communicate(timeout=90)
        assert out.returncode == 5, stderr
        record = json.loads(stdout)
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert record["state"] == "failed" and record["phase"] == "Cleanup"
    assert "No space left on device" in record["error"] or "space" in record["error"], record["error"]
    assert not report.errors, report.errors        # the guest never saw the destination's trouble
    bad = writer.verify_image("disk0", vm.disks["disk0"])
    assert not bad, f"source: {len(bad)} bad blocks, first {writer.describe('disk0', bad[0])}"
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
    assert vm.plugin("status")["disks"]["disk0"]["path"] == str(vm.disks["disk0"])


def test_a_killed_destination_agent_fails_the_migration_and_its_partials_go_at_the_next_contact(
        tls_vm, datastore_host) -> None:
    host = datastore_host()
    vm = tls_vm(n_disks=2, size=16 * MiB, inject="hold:CopyDirtyData=3")
    first, dest = remote_dir(host, "first")
    writer = vm.writer(rate=1 * MiB)
    writer.start()
    try:
        out = vm.cli_background("migrate", vm.name, "--dest", dest, "--json")
        vm.wait_phase("CopyDirtyData")
        host.kill_agent()
        stdout, stderr = out.communicate(timeout=90)
        assert out.returncode == 5, stderr
        record = json.loads(stdout)
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    assert record["state"] == "failed"
    assert f"cannot talk to the agent at 127.0.0.1:{host.api_port}" in record["error"], record["error"]
    assert "stay there until the next migration to it removes them" in record["error"], record["error"]
    assert "\n" not in record["error"]
    left = sorted(Path(p).name for p in record["left_partials"])
    assert left == [p for p in partials(first) if not p.endswith(".json")] and len(left) == 5, left
    for d in vm.disks:
        bad = writer.verify_image(d, vm.disks[d])
        assert not bad, f"source of {d}: {len(bad)} bad blocks"
    # B's agent comes back; the next migration to B (another directory) removes what was left first.
    host.start()
    _, dest2 = remote_dir(host, "second")
    out2 = vm.cli("migrate", vm.name, "--dest", dest2, "--json")
    assert out2.returncode == 0, out2.stderr + vm.log_text()
    assert partials(first) == []
    assert not (vm.state / "leftovers.json").exists() or json.loads((vm.state / "leftovers.json").read_text()) == {}


def test_from_one_host_to_another_and_an_abort_there(tls_vm, ds_host: DatastoreHost, datastore_host) -> None:
    """Remote to remote: B's export is the source, C's the destination; then an abort on C's way."""
    other = datastore_host(name="c")
    vm = tls_vm(n_disks=2, size=16 * MiB, files=False, inject="pause:CopyDirtyData")
    on_b, to_b = remote_dir(ds_host, "hop")
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
        for dest, served in ((to_b, ds_host), (to_c, other)):
            done = vm.cli("migrate", vm.name, "--dest", dest, "--json")
            assert done.returncode == 0, done.stderr + vm.log_text()
            assert all(d["path"].startswith(f"nbds://127.0.0.1:{served.nbd_port}/")
                       for d in vm.plugin("status")["disks"].values())
        time.sleep(0.3)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors
    for d in vm.disks:
        bad = writer.verify_image(d, on_c / f"{d}.raw")
        assert not bad, f"{d}: {len(bad)} bad blocks on C, first {writer.describe(d, bad[0])}"
    assert partials(on_b) == [] and partials(on_c) == []
