"""Convergence control against a destination four times slower than the guest (issue 12, test 3).

Host a (the VM's agent and mirror node) sends to host b (a datastore agent and its export) over
a link shaped with TBF (svlab/netns.py `Host.shape`) to a quarter of the rate the guest asks for
(GUEST_RATE). Under that guest:
- sync converges: the guest's writes wait for the destination, which throttles it already;
- async with the throttle forbidden (`--max-throttle 0`) does not converge: the migration says
  it is stalled, once (one line from `svmotion migrate`), and goes on; the operator sets a bound
  (`svmotion set --max-throttle 5ms`): the throttle engages and what remains shrinks; the guest
  slows down to a trickle: the throttle lifts to 0 while the disks still mirror; the migration
  ends, byte-identical. The per-request delay never exceeds its bound: the mirror node's
  `throttle_max_seconds`, polled all along, says so.
The guest is one connection with two 4 to 64 KiB writes in flight and no flushes (a guest flush
over a slow link is the destination deadline's business, tests/plugin/test_remote.py). The link
cannot be much slower than this one: the copier keeps up to 4 MiB in flight and every request to
the destination has a 1 s deadline (nbd_plugin/backend_nbd.py), past which the mirror fails.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from remotelib import DatastoreHost
from vmlib import AgentVM

from svlab.netns import Lab

MiB = 1 << 20
KiB = 1 << 10
GUEST_RATE = 128 * MiB  # what the guest asks for; the link gets a quarter
BOUND = 0.005           # the throttle bound the operator sets after the stall (the default)
# Two 4 to 64 KiB writes in flight, no flushes (module notes).
GUEST = dict(rate=GUEST_RATE, connections=1, queue_depth=2, max_write=64 * KiB, fua_ratio=0.0, flush_ratio=0.0)
GOVERNED = ("DiskCopy", "CopyDirtyInfo", "CopyDirtyData")


@dataclass
class Watch:
    """What the test sees of a running migration, polled every 50 ms until stopped."""

    vm: AgentVM
    records: list[dict[str, Any]] = field(default_factory=list)
    throttle_max: float = 0.0          # the mirror node's largest delay applied, over the whole run
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "Watch":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            migration = self.vm.status()["migration"]
            if migration is not None:
                self.records.append(migration)
            disks = self.vm.plugin("status")["disks"].values()
            self.throttle_max = max([self.throttle_max] + [d.get("throttle_max_seconds") or 0.0 for d in disks])

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    def wait(self, what: str, ok, timeout: float = 90.0) -> dict[str, Any]:
        """The first polled record (from now on) for which ok(record)."""
        seen = len(self.records)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records[seen:]:
                if ok(record):
                    return record
            seen = len(self.records)
            time.sleep(0.05)
        last = self.records[-1] if self.records else None
        raise AssertionError(f"never saw {what}; last: {json.dumps(last and last['convergence'])}\n"
                             f"{self.vm.log_text()}")


def remote_dir(host: DatastoreHost, name: str) -> tuple[Path, str]:
    where = host.datastore / name
    where.mkdir()
    return where, f"{host.address}:{host.api_port}:{where}"


@pytest.fixture
def slow_link(lab_vm, lab_ds_host: DatastoreHost, two_hosts: Lab):
    """A VM on a, its guest writing, and a's link to b shaped to a quarter of the guest's rate."""
    vm = lab_vm(n_disks=1, size=64 * MiB, files=False)
    writer = vm.writer(**GUEST)
    # A deep queue rather than drops: a request waits for its turn on the link, not for TCP's
    # retransmission timers. (The copier keeps up to 4 MiB in flight and each destination request
    # has 1 s: a link much slower than this one fails the mirror by that deadline.)
    two_hosts["a"].shape(GUEST_RATE * 8 // 4, latency_s=0.3)
    writer.start()
    try:
        yield vm, writer
    finally:
        two_hosts["a"].unshape()
        writer.stop()


@pytest.mark.parametrize("mirror", ["sync", "async"])
def test_a_destination_four_times_slower_than_the_guest(slow_link, lab_ds_host: DatastoreHost,
                                                        mirror: str) -> None:
    vm, writer = slow_link
    there, dest = remote_dir(lab_ds_host, mirror)
    watch = Watch(vm).start()
    try:
        # The copier at a quarter of the link: the guest's writes are what fills it.
        migrate = vm.cli_background("migrate", vm.name, "--dest", dest, "--mirror", mirror, "--json",
                                    "--rate", str(GUEST_RATE // 16), "--granularity", "4K",
                                    *(["--max-throttle", "0"] if mirror == "async" else []))
        if mirror == "async":
            stalled = watch.wait("a stall", lambda r: r["convergence"]["stalled"])
            assert "svmotion set vm1 --mirror sync" in stalled["convergence"]["stall"]
            assert stalled["convergence"]["predicted_converge_seconds"] is None     # "—": not shrinking
            assert vm.cli("set", vm.name, "--max-throttle", f"{BOUND * 1000:g}ms").returncode == 0
            engaged = watch.wait("the throttle engaged", lambda r: r["convergence"]["throttle_seconds"] > 0)
            assert not engaged["convergence"]["stalled"]
            watch.wait("what remains shrinking under the throttle",
                       lambda r: (r["convergence"]["predicted_converge_seconds"] or 0) > 0
                       and r["convergence"]["throttle_seconds"] > 0)
            # The guest slows down to a trickle; a slower copier keeps a backlog while the throttle
            # lifts (a few steps, MIN_WINDOWS windows each), so that the lift is seen before the end.
            writer.rate = 64 * KiB
            assert vm.cli("set", vm.name, "--rate", "1M").returncode == 0
            watch.wait("the throttle lifted", lambda r: r["phase"] in GOVERNED
                       and r["convergence"]["remaining_bytes"] is not None
                       and r["convergence"]["throttle_seconds"] == 0)
            assert vm.cli("set", vm.name, "--rate", "0").returncode == 0
        stdout, stderr = migrate.communicate(timeout=180)
    finally:
        watch.stop()
        report = writer.stop()
    assert migrate.returncode == 0, stderr + vm.log_text()
    record = json.loads(stdout)
    assert record["state"] == "success", record
    assert not report.errors, report.errors
    bad = writer.verify_image("disk0", there / "disk0.raw")
    assert not bad, f"{len(bad)} bad blocks, first {writer.describe('disk0', bad[0])}"
    events = record["convergence"]["throttle_events"]
    assert watch.throttle_max <= (BOUND if mirror == "async" else record["options"]["max_throttle"]) + 1e-9
    if mirror == "async":
        assert stderr.count("svmotion: warning: vm1: not converging") == 1, stderr
        delays = [e["throttle_seconds"] for e in events]
        top = delays.index(max(delays))
        assert 0 < max(delays) <= BOUND and 0.0 in delays[top:], events
        assert watch.throttle_max > 0
