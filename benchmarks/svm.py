"""Drive the svmotion mirror node's control protocol directly, timing every step of a migration.

Design notes
- This walks the same steps as the agent's phase engine (docs/interfaces.md, section 2) but
  without the agent, so what is timed is the data path: stun, install_mirror, unstun, the copy
  passes, flush_dest, the switchover stun, finish. Each stun is timed three ways: the plugin's
  StunRecord (duration_seconds: gate closed to gate open; max_wait_seconds: the longest wait
  of a held guest request), and the harness's own window from sending `stun` to the `unstun`
  reply, which the loadgen trace turns into the guest-visible wait.
- Migrations are chained: disk.raw -> disk.m1.raw -> disk.m2.raw ...; after `finish` the
  destination is the disk's path and the previous file (closed by the plugin) is deleted, so
  many migrations run against one nbdkit process and one steady guest load.
- Copy completion is polled through `status` every POLL seconds: cheap enough not to steal
  the plugin's CPU from the guest, fine enough for copy rates measured over seconds.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.jsonlines import JsonLinesClient

from . import images

POLL = 0.02
LEASE = 2.0


@dataclass
class StunTiming:
    """One stun as the plugin recorded it plus the harness's window around it."""

    record: dict[str, Any]
    window: tuple[float, float]  # monotonic: before `stun` was sent, after `unstun` returned

    @property
    def duration(self) -> float:
        return float(self.record["duration_seconds"])

    @property
    def max_wait(self) -> float:
        return float(self.record["max_wait_seconds"])


@dataclass
class Migration:
    """Timings of one migration of every disk of the VM."""

    strategy: str
    mode: str
    install: StunTiming | None = None
    switchover: StunTiming | None = None
    started: float = 0.0
    copy_started: float = 0.0
    copy_done: float = 0.0
    flush_sent: float = 0.0       # flush_dest sent: the switchover sequence begins
    finish_returned: float = 0.0  # `finish` replied: the end of the switchover as the guest sees it
    finished: float = 0.0
    passes: int = 0
    flush_seconds: float = 0.0
    final_bytes: int = 0
    disks_before_switch: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def copy_seconds(self) -> float:
        return self.copy_done - self.copy_started

    @property
    def total_seconds(self) -> float:
        return self.finished - self.started


class MirrorNodeDriver:
    """A control connection to one VM's mirror node and the migrations run through it."""

    def __init__(self, control: str, disks: dict[str, str]):
        self.client = JsonLinesClient(control, timeout=120.0)
        self.paths = dict(disks)  # disk name -> current path (source of the next migration)
        self.generation = 0

    def status(self) -> dict[str, Any]:
        return self.client.call("status")

    def stun(self, kind: str, lease: float = LEASE) -> tuple[str, float]:
        t0 = time.monotonic()
        return self.client.call("stun", kind=kind, lease=lease)["stun_id"], t0

    def unstun(self, stun_id: str, t0: float) -> StunTiming:
        record = self.client.call("unstun", stun_id=stun_id)["stun"]
        return StunTiming(record, (t0, time.monotonic()))

    def install(self, strategy: str, mode: str, granularity: int,
                dests: dict[str, str]) -> StunTiming:
        """The Stun/Unstun phases: one stun in which the mirror goes onto every disk."""
        stun_id, t0 = self.stun("mirror_install")
        try:
            if strategy == "legacy":
                self.client.call("close_disks", stun_id=stun_id)
            self.client.call("install_mirror", stun_id=stun_id, disks={
                name: {"dest": dest, "mode": mode, "granularity": granularity}
                for name, dest in dests.items()})
        finally:
            timing = self.unstun(stun_id, t0)
        return timing

    def wait_copy(self, timeout: float) -> dict[str, Any]:
        """Poll until no disk is copying; return the last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            jobs = [d["copy"] for d in status["disks"].values() if d.get("copy")]
            errors = [j["error"] for j in jobs if j.get("error")]
            if errors:
                raise RuntimeError(f"copy failed: {errors[0]}")
            if not any(j["running"] for j in jobs):
                return status
            if time.monotonic() > deadline:
                self.client.call("copy_cancel")
                raise RuntimeError(f"copy did not finish within {timeout:.0f}s")
            time.sleep(POLL)

    def copy(self, kind: str, rate: int, timeout: float) -> dict[str, Any]:
        self.client.call("copy", kind=kind, rate=rate)
        return self.wait_copy(timeout)

    def next_dests(self, make_files: bool = True) -> dict[str, str]:
        """Fresh destination paths beside each disk's current file, created at the right size."""
        self.generation += 1
        dests = {}
        for name, path in self.paths.items():
            base = path.split(".m")[0].removesuffix(".raw")
            # A driver may start on a disk an earlier driver already migrated: skip taken names.
            while os.path.exists(dest := f"{base}.m{self.generation}.raw"):
                self.generation += 1
            if make_files:
                images.make_empty(dest, os.path.getsize(path))
            dests[name] = dest
        return dests

    def migrate(self, strategy: str = "optimized", mode: str = "sync", granularity: int = 65536,
                rate: int = 0, stun_budget: float = 0.05, copy_timeout: float = 600.0,
                max_dirty_passes: int = 20, keep_old: bool = False,
                after_install: Callable[[], None] | None = None,
                after_copy: Callable[[], None] | None = None) -> Migration:
        """One full migration of every disk to fresh files; the old files are deleted afterwards.

        `after_install` runs once the mirror is installed and before the copy (case 8 reads the
        plugin's memory there); `after_copy` once the copy passes are done, before flush_dest
        (case 3 measures the guest on a mirror with no copy running there)."""
        m = Migration(strategy, mode, started=time.monotonic())
        dests = self.next_dests()
        m.install = self.install(strategy, mode, granularity, dests)
        if after_install is not None:
            after_install()
        m.copy_started = time.monotonic()
        status = self.copy("bulk", rate, copy_timeout)
        m.passes = 1
        # Dirty passes (the dirty-tracking mode, or chunks a destination error re-dirtied) until
        # what is left would copy inside the stun budget at the rate the bulk copy achieved.
        copy_rate = max(1.0, sum(d["copy"]["rate_bps"] for d in status["disks"].values() if d.get("copy")))
        while (sum(d["dirty_bytes"] for d in status["disks"].values()) / copy_rate > stun_budget
               and m.passes < max_dirty_passes):
            status = self.copy("dirty", rate, copy_timeout)
            m.passes += 1
        m.copy_done = time.monotonic()
        if after_copy is not None:
            after_copy()
        m.flush_sent = time.monotonic()
        m.flush_seconds = self.client.call("flush_dest")["seconds"]
        m.disks_before_switch = self.status()["disks"]
        stun_id, t0 = self.stun("switchover")
        try:
            reply = self.client.call("switchover", stun_id=stun_id, reopen=strategy == "legacy")
            m.final_bytes = int(reply.get("final_bytes", 0))
        finally:
            m.switchover = self.unstun(stun_id, t0)
        self.client.call("finish")
        m.finish_returned = time.monotonic()
        old = self.paths
        self.paths = dests
        if not keep_old:
            for path in old.values():
                os.unlink(path)
        m.finished = time.monotonic()
        return m

    def bulk_copy_only(self, granularity: int = 65536) -> float:
        """Install the mirror, run the bulk copy and flush_dest, abort back to the source; the
        seconds from the copy's start until the copy is durable."""
        dests = self.next_dests()
        self.install("optimized", "sync", granularity, dests)
        start = time.monotonic()
        self.copy("bulk", 0, timeout=600)
        self.client.call("flush_dest")
        seconds = time.monotonic() - start
        self.abort()
        for dest in dests.values():
            os.unlink(dest)
        return seconds

    def abort(self) -> None:
        """Back to the source on every disk, under a stun of our own (so it is timed like the others)."""
        stun_id, t0 = self.stun("abort")
        try:
            self.client.call("abort", stun_id=stun_id)
        finally:
            self.unstun(stun_id, t0)

    def close(self) -> None:
        self.client.close()
