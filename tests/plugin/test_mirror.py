"""The mirror node's migration path, driven over the control protocol under a live random writer.

Every test runs a VerifyingWriter (several connections, queue depth > 1, 4 KiB to 256 KiB writes,
some straddling chunk edges, FUA and flushes) while it stuns, installs mirrors, copies and
switches over by talking JSON lines to the control socket itself, exactly as the agent does
(docs/interfaces.md, section 2). What is checked is what the guest and the storage see: the
writer never gets an error, the destination matches the writer's model block for block, the
source equals the destination at switchover and is never written after it, stuns end by
themselves, and bad control input changes nothing.
"""
from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.jsonlines import JsonLinesClient, RemoteError
from svlab.writer import PATTERN, VerifyingWriter, WriterReport, file_digest
from nbd_plugin.copier import WRITE_BEHIND_BYTES

MiB = 1024 * 1024
KiB = 1024
SWITCHOVER_LEASE = 10.0      # long enough to compare both sides under the switchover stun


# ---- helpers ----------------------------------------------------------------------------------

def disk_status(ctl: JsonLinesClient) -> dict[str, dict[str, Any]]:
    return ctl.call("status")["disks"]


def copy_running(disk: dict[str, Any]) -> bool:
    return bool(disk.get("copy") and disk["copy"].get("running"))


def wait_copies(ctl: JsonLinesClient, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Poll status until no disk is copying; return the last disk status."""
    deadline = time.monotonic() + timeout
    while True:
        disks = disk_status(ctl)
        if not any(copy_running(d) for d in disks.values()):
            return disks
        assert time.monotonic() < deadline, f"copy still running after {timeout} s: {disks}"
        time.sleep(0.02)


def wait_writes(writer: VerifyingWriter, more: int, timeout: float = 30.0) -> None:
    """Let the writer complete `more` further writes (so a phase really ran under load)."""
    target = writer.snapshot().writes + more
    deadline = time.monotonic() + timeout
    while writer.snapshot().writes < target:
        assert time.monotonic() < deadline, f"writer stuck: {writer.snapshot().summary()}"
        time.sleep(0.01)


def make_dests(directory: Path, sources: dict[str, Path]) -> dict[str, Path]:
    """Sparse destination files of the sources' sizes (what DiskCreate makes)."""
    directory.mkdir(exist_ok=True)
    dests = {}
    for name, src in sources.items():
        dest = directory / f"{name}.raw"
        with open(dest, "wb") as f:
            f.truncate(src.stat().st_size)
        dests[name] = dest
    return dests


def evict_from_page_cache(path: Path) -> None:
    """Write back and drop a file's cached pages, so that reading it (the copier) takes longer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def assert_stun_record(record: dict[str, Any], kind: str, outcome: str, lease: float) -> None:
    """The StunRecord fields of docs/interfaces.md, with sane values."""
    for key in ("id", "kind", "started", "duration_seconds", "drain_seconds", "held_requests",
                "max_wait_seconds", "outcome"):
        assert key in record, f"StunRecord lacks {key}: {record}"
    assert record["kind"] == kind and record["outcome"] == outcome, record
    assert isinstance(record["held_requests"], int) and record["held_requests"] >= 0, record
    assert 0 <= record["drain_seconds"] <= record["duration_seconds"] <= lease + 0.5, record
    # A held request waited at most as long as the stun lasted.
    assert 0 <= record["max_wait_seconds"] <= record["duration_seconds"] + 0.05, record
    assert abs(record["started"] - time.time()) < 120, record


def assert_clean(writer: VerifyingWriter, report: WriterReport, images: dict[str, Path]) -> None:
    """The writer saw no error and every image matches its model."""
    assert not report.errors, f"the guest saw errors: {report.errors[:5]}"
    for disk, path in images.items():
        bad = writer.verify_image(disk, path)
        assert not bad, (f"{disk}: {len(bad)} blocks of {path} differ from the writer's model, first: "
                         f"{writer.describe(disk, bad[0], path.read_bytes()[bad[0]:bad[0] + 4096])}")


def start_writer(node, **options: Any) -> VerifyingWriter:
    defaults: dict[str, Any] = dict(connections=2, queue_depth=4, rate=8 * MiB, seed=7)
    defaults.update(options)
    writer = VerifyingWriter(node.uris(), initial={d: PATTERN for d in node.disks}, **defaults)
    writer.start()
    return writer


@dataclass
class Flow:
    """One migration of every disk of a VM, step by step, as the agent drives it."""
    ctl: JsonLinesClient
    sources: dict[str, Path]
    dests: dict[str, Path]
    strategy: str = "optimized"
    mode: str = "sync"
    granularity: int = 64 * KiB
    rate: int = 0

    def install(self) -> dict[str, Any]:
        """Stun, (legacy: close disks,) install the mirror on every disk, unstun; the StunRecord."""
        stun_id = self.ctl.call("stun", kind="mirror_install")["stun_id"]
        if self.strategy == "legacy":
            self.ctl.call("close_disks", stun_id=stun_id)
            assert {d["state"] for d in disk_status(self.ctl).values()} == {"closed"}
        self.ctl.call("install_mirror", stun_id=stun_id, disks={
            name: {"dest": str(path), "mode": self.mode, "granularity": self.granularity}
            for name, path in self.dests.items()})
        return self.ctl.call("unstun", stun_id=stun_id)["stun"]

    def copy(self, kind: str) -> dict[str, dict[str, Any]]:
        self.ctl.call("copy", kind=kind, rate=self.rate)
        disks = wait_copies(self.ctl)
        for name, disk in disks.items():
            assert disk["copy"] and disk["copy"]["error"] is None, f"{name}: {kind} pass failed: {disk['copy']}"
        return disks

    def converge(self, passes: int = 4, small: int = 256 * KiB) -> None:
        """Dirty passes until little is left (the switchover copies the rest)."""
        for _ in range(passes):
            if sum(d["dirty_bytes"] for d in disk_status(self.ctl).values()) <= small:
                return
            self.copy("dirty")

    def switchover(self, under_stun: Callable[[], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        """flush_dest, stun, switchover, `under_stun()`, unstun; (switchover reply, StunRecord)."""
        self.ctl.call("flush_dest")
        stun_id = self.ctl.call("stun", kind="switchover", lease=SWITCHOVER_LEASE)["stun_id"]
        try:
            reply = self.ctl.call("switchover", stun_id=stun_id, reopen=self.strategy == "legacy")
            under_stun()
        except BaseException:
            self.ctl.call_raw(json.dumps({"op": "unstun", "stun_id": stun_id}))   # don't hold the guest
            raise
        return reply, self.ctl.call("unstun", stun_id=stun_id)["stun"]


# The fields of DiskStatus in docs/interfaces.md, section 2.
DISK_STATUS_KEYS = {"name", "state", "path", "size", "dest", "mode", "granularity", "dirty_bytes", "copied_bytes",
                    "dest_written_bytes", "guest_written_bytes", "dirtied_bytes", "copy", "errors", "write_latency",
                    "throttle_seconds", "throttle_max_seconds", "throttled_seconds", "throttled_requests", "async"}


def test_hello_and_status_describe_the_vm(vm2) -> None:
    ctl = vm2.client()
    hello = ctl.call("hello")
    assert (hello["vm"], hello["pid"], hello["lease"]) == ("vm1", vm2.proc.pid, 2.0), hello
    assert isinstance(hello["version"], int), hello
    assert hello["disks"] == [{"name": n, "path": str(p), "size": 16 * MiB} for n, p in vm2.disks.items()]
    status = ctl.call("status")
    assert status["vm"] == "vm1" and status["stun"] is None and status["stuns"] == [], status
    for name, disk in status["disks"].items():
        assert DISK_STATUS_KEYS <= disk.keys(), f"DiskStatus lacks {DISK_STATUS_KEYS - disk.keys()}"
        assert (disk["name"], disk["state"], disk["path"], disk["dest"]) == (name, "passthrough", str(vm2.disks[name]), None)
        latency = disk["write_latency"]
        assert len(latency["le"]) == len(latency["counts"]) and latency["count"] == 0, latency


# ---- full migrations ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_disks", [1, 4])
@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_live_migration_under_a_random_writer(vm_factory, tmp_path: Path, testlib, strategy: str,
                                              mode: str, n_disks: int) -> None:
    size = 16 * MiB if n_disks == 1 else 8 * MiB
    node = vm_factory(n_disks, size=size)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    # The bulk copy is paced to take about half a second, so the writer runs across all of it.
    flow = Flow(ctl, node.disks, dests, strategy, mode, rate=2 * size * n_disks)
    writer = start_writer(node, connections=3 if n_disks == 1 else 1, queue_depth=8 if n_disks == 1 else 4,
                          zero_ratio=0.03, trim_ratio=0.03)
    try:
        wait_writes(writer, 20)
        record = flow.install()
        assert_stun_record(record, "mirror_install", "released", node.lease)
        for name, disk in disk_status(ctl).items():
            assert DISK_STATUS_KEYS <= disk.keys(), f"DiskStatus lacks {DISK_STATUS_KEYS - disk.keys()}"
            assert (disk["state"], disk["mode"], disk["dest"], disk["granularity"]) == \
                ("mirroring", mode, str(dests[name]), 64 * KiB), disk

        after_bulk = flow.copy("bulk")
        assert all(d["copied_bytes"]["bulk"] > 0 for d in after_bulk.values()), after_bulk
        wait_writes(writer, 20)
        flow.converge()

        source_hashes: dict[str, str] = {}

        def at_switchover() -> None:
            # The guest is held: both sides are still, and the destination must equal the source.
            for name in node.disks:
                assert testlib.same_content(node.disks[name], dests[name]) == [], \
                    f"{name}: destination differs from the source at switchover"
                source_hashes[name] = file_digest(node.disks[name])
            time.sleep(0.1)   # let the writer's requests pile up at the gate

        writes_before = writer.snapshot().writes
        reply, record = flow.switchover(at_switchover)
        assert isinstance(reply["final_bytes"], int) and reply["final_bytes"] >= 0, reply
        assert_stun_record(record, "switchover", "released", SWITCHOVER_LEASE)
        assert record["held_requests"] > 0, f"the writer was running but no request was held: {record}"
        for name, disk in disk_status(ctl).items():
            assert disk["state"] == "switched" and disk["path"] == str(dests[name]), disk

        wait_writes(writer, 50)          # new writes after the switchover ...
        ctl.call("finish")
        wait_writes(writer, 10)
    finally:
        report = writer.stop()
    assert report.writes > writes_before + 50, report.summary()
    for name, disk in disk_status(ctl).items():
        assert disk["state"] == "passthrough" and disk["path"] == str(dests[name]), disk
    # ... reached the destination only: it holds everything the writer wrote, the source is as it was.
    assert_clean(writer, report, dests)
    for name, src in node.disks.items():
        assert file_digest(src) == source_hashes[name], f"{name}: the source was written after switchover"


@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
def test_writes_racing_slow_copy_chunks_leave_no_stale_data(vm_factory, tmp_path: Path, mode: str) -> None:
    """A rate-limited copier with small chunks while the writer hammers the region it copies.

    (A stress test: later writes can heal a stale block before the check, so it rarely catches a
    broken chunk lock on its own; test_copy_race.py forces that interleaving deterministically.)"""
    node = vm_factory(1, size=8 * MiB)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    flow = Flow(ctl, node.disks, dests, mode=mode, granularity=16 * KiB, rate=2 * MiB)
    writer = start_writer(node, connections=4, queue_depth=8, rate=None, max_write=64 * KiB,
                          hot_region=(0, 2 * MiB), hot_ratio=0.9, fua_ratio=0.1)
    try:
        flow.install()
        ctl.call("copy", kind="bulk", rate=flow.rate)
        time.sleep(1.0)                  # the copier crawls through the hot region meanwhile
        disk = disk_status(ctl)["disk0"]
        assert copy_running(disk), f"the rate-limited copy should still be running: {disk['copy']}"
        assert disk["guest_written_bytes"] > 0, "the writer did not write during the copy"
        ctl.call("copy_cancel")
        assert not copy_running(disk_status(ctl)["disk0"]), "copy_cancel left the pass running"
        flow.rate = 0
        flow.copy("dirty")
        flow.converge()
        flow.switchover(lambda: None)
    finally:
        report = writer.stop()
    assert_clean(writer, report, dests)


@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
def test_ping_pong_migrations_under_a_hammering_writer(vm_factory, tmp_path: Path, testlib, mode: str) -> None:
    """Migrate back and forth between two directories while the writer hammers the disk.

    Each round's bulk copy races the writes (small chunks, many writes per copied run); every
    switchover compares both sides under the stun, and the last destination is checked against
    the writer's model. A copier that lets a write slip between its read of the source and its
    write of the destination leaves a stale block that one of these checks sees.
    """
    node = vm_factory(1, size=8 * MiB)
    ctl = node.client()
    here = {"disk0": node.disks["disk0"]}
    there = {"disk0": tmp_path / "pong" / "disk0.raw"}
    writer = start_writer(node, connections=4, queue_depth=8, rate=None, max_write=64 * KiB,
                          hot_region=(0, 2 * MiB), hot_ratio=0.8, fua_ratio=0.1)
    try:
        for round_ in range(8):
            dests = make_dests(there["disk0"].parent, here)
            flow = Flow(ctl, here, dests, mode=mode, granularity=16 * KiB)
            flow.install()
            evict_from_page_cache(here["disk0"])    # a cold source makes each copied run slower
            flow.copy("bulk")
            flow.converge()

            def compare() -> None:
                assert testlib.same_content(here["disk0"], dests["disk0"]) == [], \
                    f"round {round_}: destination differs from the source at switchover"

            flow.switchover(compare)
            ctl.call("finish")
            here, there = dests, here
            wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, here)


def test_sparse_source_stays_sparse_on_the_destination(tmp_path: Path, testlib, start_mirror_node) -> None:
    """Holes are skipped by the copier: the destination allocates what the source does, no more."""
    src = tmp_path / "src"
    src.mkdir()
    data = [(0, 256 * KiB), (5 * MiB, 64 * KiB), (20 * MiB + 4 * KiB, 8 * KiB), (63 * MiB, 1 * MiB)]
    disks = {"disk0": testlib.make_sparse_image(src / "disk0.raw", 64 * MiB, data)}
    node = start_mirror_node(disks)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", disks)
    flow = Flow(ctl, disks, dests)
    flow.install()
    flow.copy("bulk")
    flow.switchover(lambda: None)
    assert testlib.same_content(disks["disk0"], dests["disk0"]) == []
    source_use, dest_use = testlib.allocated_bytes(disks["disk0"]), testlib.allocated_bytes(dests["disk0"])
    assert dest_use <= source_use + 64 * KiB, f"du: destination {dest_use} bytes, source {source_use}"


def test_switchover_that_cannot_finish_in_its_lease_changes_nothing(vm_factory, tmp_path: Path) -> None:
    """Dirty mode, the whole disk still dirty, a 40 ms lease: the switchover refuses, the guest goes on."""
    node = vm_factory(1, size=32 * MiB)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    flow = Flow(ctl, node.disks, dests, mode="dirty", granularity=4096)
    writer = start_writer(node)
    try:
        flow.install()
        for _ in range(50):   # under load the drain itself may not fit in 40 ms: try again
            try:
                stun_id = ctl.call("stun", kind="switchover", lease=0.04)["stun_id"]
                break
            except RemoteError as err:
                assert "in flight" in str(err), err
        with pytest.raises(RemoteError, match="switchover"):
            ctl.call("switchover", stun_id=stun_id)
        try:
            ctl.call("unstun", stun_id=stun_id)
        except RemoteError:
            pass                          # the lease may already have ended it
        assert ctl.call("status")["stun"] is None
        assert disk_status(ctl)["disk0"]["state"] == "mirroring"
        wait_writes(writer, 20)
        flow.copy("bulk")
        flow.converge()
        flow.switchover(lambda: None)
        wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, dests)


# ---- stuns that end by themselves ---------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["optimized", "legacy"])
def test_expired_lease_rolls_back_and_releases_the_guest(vm_factory, tmp_path: Path, strategy: str) -> None:
    node = vm_factory(2, size=8 * MiB)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    lease = 0.5
    writer = start_writer(node)
    try:
        wait_writes(writer, 20)
        stun_id = ctl.call("stun", lease=lease, kind="mirror_install")["stun_id"]
        stunned_at = time.monotonic()
        assert ctl.call("status")["stun"]["id"] == stun_id
        if strategy == "legacy":
            ctl.call("close_disks", stun_id=stun_id)
        ctl.call("install_mirror", stun_id=stun_id,
                 disks={n: {"dest": str(p), "mode": "sync", "granularity": 65536} for n, p in dests.items()})
        # No unstun: the agent "hangs". The plugin must end the stun itself.
        writes = writer.snapshot().writes
        wait_writes(writer, 20, timeout=lease + 5)
        resumed_after = time.monotonic() - stunned_at
    finally:
        report = writer.stop()
    status = ctl.call("status")
    assert status["stun"] is None, status["stun"]
    for name, disk in status["disks"].items():
        assert disk["state"] == "passthrough" and disk["path"] == str(node.disks[name]) and disk["dest"] is None, disk
    record = status["stuns"][-1]
    assert record["id"] == stun_id
    assert_stun_record(record, "mirror_install", "expired", lease)
    assert report.longest_stall < lease + 0.5, f"guest held {report.longest_stall:.3f} s, lease {lease} s"
    assert report.longest_stall >= lease * 0.8, "the stun did not hold the writer at all"
    assert resumed_after < lease + 0.5 + 1.0 and report.writes > writes
    with pytest.raises(RemoteError, match="stun"):
        ctl.call("unstun", stun_id=stun_id)        # the expired stun is gone
    assert_clean(writer, report, node.disks)


def test_closing_the_control_connection_rolls_back_at_once(vm_factory, tmp_path: Path) -> None:
    node = vm_factory(2, size=8 * MiB)
    dests = make_dests(tmp_path / "dst", node.disks)
    lease = 5.0
    writer = start_writer(node)
    try:
        wait_writes(writer, 20)
        holder = JsonLinesClient(str(node.control))
        stun_id = holder.call("stun", lease=lease)["stun_id"]
        holder.call("install_mirror", stun_id=stun_id,
                    disks={n: {"dest": str(p), "mode": "sync", "granularity": 65536} for n, p in dests.items()})
        holder.close()                    # the agent vanished (SIGKILL closes its sockets the same way)
        wait_writes(writer, 20, timeout=lease)
    finally:
        report = writer.stop()
    assert report.longest_stall < lease / 2, f"guest held {report.longest_stall:.3f} s: waited for the lease"
    status = node.client().call("status")
    assert status["stun"] is None and status["stuns"][-1]["id"] == stun_id
    assert status["stuns"][-1]["outcome"] == "expired", status["stuns"][-1]
    assert {d["state"] for d in status["disks"].values()} == {"passthrough"}
    assert_clean(writer, report, node.disks)


def test_sigkilled_stun_holder_releases_the_guest_within_a_moment(vm_factory, tmp_path: Path, processes) -> None:
    """A real process holds the stun and is SIGKILLed (the agent dying): no waiting for the lease."""
    node = vm_factory(2, size=8 * MiB)
    dests = make_dests(tmp_path / "dst", node.disks)
    lease = 5.0
    holder_code = (
        "import json, sys, time\n"
        "from agent.jsonlines import JsonLinesClient\n"
        "c = JsonLinesClient(sys.argv[1])\n"
        "sid = c.call('stun', lease=float(sys.argv[2]), kind='mirror_install')['stun_id']\n"
        "c.call('install_mirror', stun_id=sid, disks=json.loads(sys.argv[3]))\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")
    spec = json.dumps({n: {"dest": str(p), "mode": "sync", "granularity": 65536} for n, p in dests.items()})
    writer = start_writer(node)
    try:
        wait_writes(writer, 20)
        log = tmp_path / "holder.log"
        holder = processes.spawn([sys.executable, "-c", holder_code, str(node.control), str(lease), spec],
                                 log=log, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
        deadline = time.monotonic() + 10
        while "held" not in log.read_text():
            assert holder.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        holder.kill()
        holder.wait()
        wait_writes(writer, 20, timeout=lease)
    finally:
        report = writer.stop()
    assert report.longest_stall < 1.0, f"guest held {report.longest_stall:.3f} s after its stun holder died"
    status = node.client().call("status")
    assert status["stun"] is None and status["stuns"][-1]["outcome"] == "expired", status["stuns"][-1:]
    assert {d["state"] for d in status["disks"].values()} == {"passthrough"}
    assert_clean(writer, report, node.disks)


# Unaligned and hole-making updates while mirroring, applied to the VM and to a reference copy.
MIRRORED_OPS: list[tuple[str, Callable[[Any], Any]]] = [
    ("unaligned pwrite", lambda h: h.pwrite(b"\x22" * 3000, 1000)),
    ("pwrite across chunks", lambda h: h.pwrite(b"\x33" * 100 * KiB, 4 * MiB + 60 * KiB)),
    ("pwrite into a hole", lambda h: h.pwrite(b"\x44" * 4 * KiB, 12 * MiB + 4 * KiB)),
    ("trim", lambda h: h.trim(64 * KiB, 15 * MiB)),
    ("unaligned trim", lambda h: h.trim(10000, 200 * KiB + 7)),
    ("zero that may punch", lambda h: h.zero(128 * KiB, 4 * MiB)),
    ("zero with NO_HOLE", lambda h: h.zero(64 * KiB, 9 * MiB + 64 * KiB, 2)),   # 2: CMD_FLAG_NO_HOLE
    ("unaligned zero", lambda h: h.zero(5000, 15 * MiB + 300 * KiB + 10)),
    ("FUA pwrite", lambda h: h.pwrite(b"\x55" * 8 * KiB, 6 * MiB, 1)),       # 1: CMD_FLAG_FUA
    ("flush", lambda h: h.flush()),
]


@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
def test_unaligned_writes_trims_and_zeroes_reach_the_destination(tmp_path: Path, testlib, start_mirror_node,
                                                                  start_file_server, mode: str) -> None:
    """Every update kind, before and after the bulk copy: the destination ends as nbdkit file's copy."""
    import nbd
    size = 16 * MiB
    data = [(0, 1 * MiB), (4 * MiB, 192 * KiB), (9 * MiB + 64 * KiB, 64 * KiB), (15 * MiB, 1 * MiB)]
    (tmp_path / "src").mkdir()
    (tmp_path / "ref").mkdir()
    disks = {"disk0": testlib.make_sparse_image(tmp_path / "src" / "disk0.raw", size, data)}
    ref_path = testlib.make_sparse_image(tmp_path / "ref" / "disk0.raw", size, data)
    node = start_mirror_node(disks)
    ours, ref = nbd.NBD(), nbd.NBD()
    ours.connect_uri(node.uri("disk0"))
    ref.connect_uri(start_file_server(ref_path))
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", disks)
    flow = Flow(ctl, disks, dests, mode=mode, granularity=16 * KiB)
    try:
        flow.install()
        for name, op in MIRRORED_OPS[:5]:           # before the bulk copy: chunks still dirty
            op(ours), op(ref)
        flow.copy("bulk")
        for name, op in MIRRORED_OPS[5:] + MIRRORED_OPS[:5]:   # after it: sync mode mirrors them
            op(ours), op(ref)
        flow.converge()
        flow.switchover(lambda: None)
        ours.flush(), ref.flush()
    finally:
        ours.shutdown(), ref.shutdown()
    assert testlib.same_content(dests["disk0"], ref_path) == [], "destination differs from the reference"
    dest_use, ref_use = testlib.allocated_bytes(dests["disk0"]), testlib.allocated_bytes(ref_path)
    assert dest_use <= ref_use + 256 * KiB, f"du: destination {dest_use} bytes, reference {ref_use}"


# ---- abort ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("under_own_stun", [False, True])
def test_abort_while_mirroring_keeps_the_source(vm_factory, tmp_path: Path, under_own_stun: bool) -> None:
    node = vm_factory(2, size=8 * MiB)
    ctl = node.client()
    dests = make_dests(tmp_path / "dst", node.disks)
    flow = Flow(ctl, node.disks, dests, rate=2 * MiB)
    writer = start_writer(node)
    try:
        flow.install()
        ctl.call("copy", kind="bulk", rate=flow.rate)
        wait_writes(writer, 30)
        assert any(copy_running(d) for d in disk_status(ctl).values())
        if under_own_stun:
            stun_id = ctl.call("stun")["stun_id"]
            ctl.call("abort", stun_id=stun_id)
            record = ctl.call("unstun", stun_id=stun_id)["stun"]
            assert record["outcome"] == "released", record
        else:
            ctl.call("abort")
        for name, disk in disk_status(ctl).items():
            assert disk["state"] == "passthrough" and disk["path"] == str(node.disks[name]), disk
            assert not copy_running(disk), f"{name}: abort left a copy running"
        wait_writes(writer, 30)
    finally:
        report = writer.stop()
    assert_clean(writer, report, node.disks)
    # The VM can be migrated again after an abort.
    flow.dests = make_dests(tmp_path / "dst2", node.disks)
    flow.rate = 0
    flow.install()
    flow.copy("bulk")
    flow.switchover(lambda: None)
    for name in node.disks:
        assert writer.verify_image(name, flow.dests[name]) == []


# ---- bad control input ------------------------------------------------------------------------------

BAD_LINES = [
    ("not JSON", "this is not json", "JSON"),
    ("not an object", "[1, 2, 3]", "object"),
    ("no op", '{"lease": 1}', "op"),
    ("op not a string", '{"op": 7}', "op"),
    ("unknown op", '{"op": "frobnicate"}', "frobnicate"),
    ("lease not a number", '{"op": "stun", "lease": "soon"}', "lease"),
    ("negative lease", '{"op": "stun", "lease": -1}', "lease"),
    ("unknown stun kind", '{"op": "stun", "kind": "nap"}', "nap"),
    ("unstun without a stun", '{"op": "unstun", "stun_id": "x"}', "stun"),
    ("install_mirror without a stun",
     '{"op": "install_mirror", "stun_id": "x", "disks": {"disk0": {"dest": "/tmp/x.raw"}}}', "stun"),
    ("copy while nothing mirrors", '{"op": "copy", "kind": "bulk"}', "mirroring"),
    ("copy of an unknown kind", '{"op": "copy", "kind": "sideways"}', "sideways"),
    ("copy with a bad rate", '{"op": "copy", "kind": "bulk", "rate": "fast"}', "rate"),
    ("switchover without a stun", '{"op": "switchover", "stun_id": "x"}', "stun"),
    ("copy of an unknown disk", '{"op": "copy", "kind": "bulk", "disk": "nodisk"}', "nodisk"),
]


def check_error_reply(reply: dict[str, Any], what: str, mention: str) -> None:
    assert reply.get("ok") is False, f"{what}: accepted: {reply}"
    error = reply.get("error")
    assert isinstance(error, str) and error and "\n" not in error, f"{what}: not one clear line: {reply}"
    assert mention.lower() in error.lower(), f"{what}: the error does not name {mention!r}: {error}"


def test_malformed_control_messages_get_one_line_and_change_nothing(vm_factory, tmp_path: Path) -> None:
    node = vm_factory(2, size=8 * MiB)
    ctl = node.client()
    writer = start_writer(node)
    try:
        for what, line, mention in BAD_LINES:
            check_error_reply(ctl.call_raw(line), what, mention)
            assert ctl.call("status")["stun"] is None, f"{what}: left a stun behind"

        # Bad install_mirror arguments under a real stun; the stun survives them.
        wrong_size = tmp_path / "small.raw"
        wrong_size.write_bytes(b"\0" * 4096)
        good = make_dests(tmp_path / "dst", node.disks)
        stun_id = ctl.call("stun", lease=10)["stun_id"]
        bad_installs = [
            ("wrong stun_id", {"stun_id": "vm1-stun-999", "disks": {"disk0": {"dest": str(good["disk0"])}}}, "stun"),
            ("no disks", {"stun_id": stun_id}, "disks"),
            ("unknown disk", {"stun_id": stun_id, "disks": {"nodisk": {"dest": str(good["disk0"])}}}, "nodisk"),
            ("dest of the wrong size", {"stun_id": stun_id, "disks": {"disk0": {"dest": str(wrong_size)}}}, "4096 bytes"),
            ("second disk's dest of the wrong size", {"stun_id": stun_id, "disks": {
                "disk0": {"dest": str(good["disk0"])}, "disk1": {"dest": str(wrong_size)}}}, "4096 bytes"),
            ("missing dest", {"stun_id": stun_id, "disks": {"disk0": {"dest": str(tmp_path / "none.raw")}}}, "none.raw"),
            ("dest is the source", {"stun_id": stun_id, "disks": {"disk0": {"dest": str(node.disks["disk0"])}}}, "source"),
            ("bad mode", {"stun_id": stun_id, "disks": {"disk0": {"dest": str(good["disk0"]), "mode": "asynch"}}}, "asynch"),
            ("bad granularity", {"stun_id": stun_id,
                                 "disks": {"disk0": {"dest": str(good["disk0"]), "granularity": 1000}}}, "granularity"),
            ("dest not a string", {"stun_id": stun_id, "disks": {"disk0": {"dest": 5}}}, "dest"),
        ]
        for what, args, mention in bad_installs:
            check_error_reply(ctl.call_raw(json.dumps({"op": "install_mirror", **args})), what, mention)
            states = {d["state"] for d in disk_status(ctl).values()}
            assert states == {"passthrough"}, f"{what}: a refused install_mirror changed the disks: {states}"
        check_error_reply(ctl.call_raw(json.dumps({"op": "unstun", "stun_id": "vm1-stun-999"})), "wrong stun_id", "stun")
        check_error_reply(ctl.call_raw(json.dumps({"op": "stun"})), "second stun", "stun")
        assert ctl.call("status")["stun"]["id"] == stun_id, "a refused request ended the stun"
        record = ctl.call("unstun", stun_id=stun_id)["stun"]
        assert record["outcome"] == "released", record
        wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert {d["state"] for d in disk_status(ctl).values()} == {"passthrough"}
    assert_clean(writer, report, node.disks)


def test_refused_install_under_a_legacy_stun_leaves_the_disks_closed(vm_factory, tmp_path: Path) -> None:
    """Legacy: after close_disks, a refused install_mirror changes nothing; a good one then works."""
    node = vm_factory(2, size=8 * MiB)
    ctl = node.client()
    good = make_dests(tmp_path / "dst", node.disks)
    wrong_size = tmp_path / "small.raw"
    wrong_size.write_bytes(b"\0" * 4096)
    writer = start_writer(node)
    try:
        wait_writes(writer, 20)
        stun_id = ctl.call("stun", lease=10)["stun_id"]
        ctl.call("close_disks", stun_id=stun_id)
        reply = ctl.call_raw(json.dumps({"op": "install_mirror", "stun_id": stun_id, "disks": {
            "disk0": {"dest": str(good["disk0"])}, "disk1": {"dest": str(wrong_size)}}}))
        check_error_reply(reply, "second disk's dest of the wrong size", "4096 bytes")
        states = {n: d["state"] for n, d in disk_status(ctl).items()}
        assert states == {"disk0": "closed", "disk1": "closed"}, f"a refused install_mirror changed the disks: {states}"
        ctl.call("install_mirror", stun_id=stun_id, disks={n: {"dest": str(p)} for n, p in good.items()})
        ctl.call("unstun", stun_id=stun_id)
        assert {d["state"] for d in disk_status(ctl).values()} == {"mirroring"}
        ctl.call("abort")
        wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, node.disks)


def test_control_socket_is_private(vm2, sock_dir: Path) -> None:
    mode = stat.S_IMODE(os.stat(vm2.control).st_mode)
    assert mode == 0o600, f"control socket mode {mode:o}, want 600"
    # Even with the file mode opened up, another uid is refused by the peer check.
    os.chmod(vm2.control, 0o666)
    os.chmod(sock_dir, 0o755)
    # The server answers a refused peer at once and hangs up: read, don't send.
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
             "print(s.makefile().readline().strip())\n")
    result = subprocess.run([sys.executable, "-c", probe, str(vm2.control)], user=65534,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["ok"] is False and "uid" in reply["error"], reply
    assert vm2.client().call("status")["stun"] is None


# ---- a destination that fails --------------------------------------------------------------------

def test_full_destination_never_fails_the_guest_and_retries_cleanly(vm_factory, tmp_path: Path, small_tmpfs) -> None:
    """The bulk copy runs out of space: the guest sees nothing, chunks stay dirty, a retry finishes."""
    node = vm_factory(1, size=8 * MiB)
    ctl = node.client()
    fs = small_tmpfs(10 * MiB)
    filler = fs / "filler"
    filler.write_bytes(b"\1" * 6 * MiB)      # leaves ~4 MiB for an 8 MiB disk
    dests = make_dests(fs, node.disks)
    flow = Flow(ctl, node.disks, dests)
    writer = start_writer(node)
    try:
        flow.install()
        ctl.call("copy", kind="bulk")
        disk = wait_copies(ctl)["disk0"]
        # (A pass reports copy.error only after 8 failed runs in a row; the failures are counted.)
        assert disk["dirty_bytes"] > 0, "chunks that failed to copy must stay dirty"
        assert sum(n for k, n in disk["errors"].items() if k.startswith("dest:")) > 0, disk["errors"]
        assert disk["state"] == "mirroring"
        # The switchover must refuse (it cannot copy the rest) and change nothing.
        stun_id = ctl.call("stun", kind="switchover")["stun_id"]
        with pytest.raises(RemoteError):
            ctl.call("switchover", stun_id=stun_id)
        ctl.call("unstun", stun_id=stun_id)
        assert disk_status(ctl)["disk0"]["state"] == "mirroring"
        wait_writes(writer, 30)
        # Space comes back: the retry carries what is dirty and the migration completes.
        filler.unlink()
        flow.copy("dirty")
        flow.converge()
        flow.switchover(lambda: None)
        wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, dests)


def test_destination_write_errors_mark_chunks_dirty(vm_factory, tmp_path: Path, small_tmpfs) -> None:
    """Mirrored guest writes that the destination refuses (ENOSPC) are counted, never returned."""
    node = vm_factory(1, size=8 * MiB)
    ctl = node.client()
    fs = small_tmpfs(9 * MiB)
    dests = make_dests(fs, node.disks)
    flow = Flow(ctl, node.disks, dests)
    writer = start_writer(node, region=(0, 2 * MiB), rate=4 * MiB)
    try:
        flow.install()
        flow.copy("bulk")                          # every chunk is clean: writes now go to both sides
        assert disk_status(ctl)["disk0"]["dirty_bytes"] == 0
        # Take the written region's space away from the destination and fill the filesystem.
        subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(2 * MiB), str(dests["disk0"])],
                       check=True)
        with open(fs / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\1" * 64 * KiB):
                    pass
            except OSError:
                pass                                   # ENOSPC: the filesystem is full
        wait_writes(writer, 50)
        disk = disk_status(ctl)["disk0"]
    finally:
        report = writer.stop()
    assert disk["errors"].get("dest:pwrite", 0) + disk["errors"].get("dest:zero", 0) > 0, disk["errors"]
    assert disk["dirty_bytes"] > 0, "a failed mirrored write must leave its chunk dirty"
    assert disk["state"] == "mirroring"
    assert_clean(writer, report, node.disks)         # the source has every write
    ctl.call("abort")
    assert disk_status(ctl)["disk0"]["state"] == "passthrough"
    assert writer.verify_nbd("disk0", node.uri("disk0")) == []


def thread_nice_values(pid: int) -> list[int]:
    """The nice value of every thread of `pid` (field 19 of /proc/PID/task/TID/stat)."""
    values = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        values.append(int(stat.rsplit(")", 1)[1].split()[16]))
    return values


def test_the_copier_runs_below_the_threads_that_serve_the_guest(vm2, tmp_path: Path) -> None:
    ctl = vm2.client()
    flow = Flow(ctl, vm2.disks, make_dests(tmp_path / "dest", vm2.disks), rate=1 * MiB)
    flow.install()
    assert sorted(set(thread_nice_values(vm2.proc.pid))) == [0], "nothing runs in the background yet"
    ctl.call("copy", kind="bulk", rate=flow.rate)  # 16 MiB at 1 MiB/s: still copying below
    nice = thread_nice_values(vm2.proc.pid)
    assert nice.count(19) == len(vm2.disks), f"one copier per disk at nice 19: {nice}"
    assert nice.count(0) >= 2, f"the main and control threads stay at nice 0: {nice}"
    ctl.call("copy_cancel")


def unwritten_cache_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache that are dirty or under write-back (cachestat(2), Linux 6.5)."""
    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in
                    ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]

    libc = ctypes.CDLL(None, use_errno=True)
    cachestat = 451  # x86_64 and the asm-generic table alike
    fd = os.open(path, os.O_RDONLY)
    try:
        result = Stat()
        if libc.syscall(cachestat, fd, ctypes.byref(Range(0, 0)), ctypes.byref(result), 0) != 0:
            pytest.skip(f"cachestat: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return (result.nr_dirty + result.nr_writeback) * os.sysconf("SC_PAGE_SIZE")


def test_the_bulk_copy_leaves_little_of_the_destination_unwritten(tmp_path: Path, testlib,
                                                                   start_mirror_node) -> None:
    """Write-behind (copier.py): the copy waits for its own write-back beyond a window, so what
    flush_dest has to write before the switchover is the window, not the disk."""
    src = tmp_path / "src"
    src.mkdir()
    size = 4 * WRITE_BEHIND_BYTES
    disks = {"disk0": testlib.make_dense_image(src / "disk0.raw", size, random_data=True)}
    node = start_mirror_node(disks)
    dests = make_dests(tmp_path / "dst", disks)
    flow = Flow(node.client(), disks, dests)
    flow.install()
    flow.copy("bulk")
    left = unwritten_cache_bytes(dests["disk0"])
    assert left <= WRITE_BEHIND_BYTES + 1 * MiB, \
        f"{left >> 20} MiB of the {size >> 20} MiB copy not yet written back after the bulk pass"
    flow.switchover(lambda: None)
    assert testlib.same_content(disks["disk0"], dests["disk0"]) == []
