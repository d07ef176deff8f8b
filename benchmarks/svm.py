"""Drive the svmotion mirror node's control protocol directly, timing every step of a migration.

Design notes
- This walks the same steps as the agent's phase engine (docs/interfaces.md, section 2) but
  without the agent, so what is timed is the data path: prepare_mirror, stun, install_mirror, unstun, the copy
  passes, flush_dest, the switchover stun, finish. Each stun is timed three ways: the plugin's
  StunRecord (duration_seconds: gate closed to gate open; max_wait_seconds: the longest wait
  of a held guest request), and the harness's own window from sending `stun` to the `unstun`
  reply, which the loadgen trace turns into the guest-visible wait.
- Migrations are chained: disk.raw -> disk.m1.raw -> disk.m2.raw ...; after `finish` the
  destination is the disk's path and the previous file (closed by the plugin) is deleted, so
  many migrations run against one nbdkit process and one steady guest load.
- Copy completion is polled through `status` every POLL seconds: cheap enough not to steal
  the plugin's CPU from the guest, fine enough for copy rates measured over seconds.
- Where destinations go: beside each disk's current file by default, or in a `Place`: a
  directory, maybe exported by an NBD server on the other host, so the mirror node is given the
  file's nbds:// URI while the harness creates and deletes the file itself (every host's files
  are on this machine). A disk's location (what the mirror node serves it from: path or URI)
  and its file are therefore kept apart.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.jsonlines import JsonLinesClient
from agent.phases import remaining_bytes

from . import images

POLL = 0.02
LEASE = 2.0

Poll = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Place:
    """Where destination disks are made: a directory, and the URI prefix that reaches its files
    from the mirror node ("" for local files, which it opens by path)."""

    directory: str
    uri_prefix: str = ""

    def dest(self, file: str) -> "Dest":
        return Dest(self.uri_prefix + os.path.basename(file) if self.uri_prefix else file, file)


@dataclass(frozen=True)
class Dest:
    """One disk's destination: what install_mirror is given, and the file behind it."""

    location: str   # a path or an NBD URI
    file: str


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


class NotConverged(RuntimeError):
    """The copy passes did not bring what remains within the stun budget in time (aborted);
    `migration` holds the timings so far (copy_done: when it gave up)."""

    def __init__(self, message: str, migration: "Migration"):
        super().__init__(message)
        self.migration = migration


class MirrorNodeDriver:
    """A control connection to one VM's mirror node and the migrations run through it."""

    def __init__(self, control: str, disks: dict[str, str], files: dict[str, str] | None = None,
                 timeout: float = 120.0):
        """`disks` {name: path or URI} as the mirror node serves them; `files` the files behind
        URIs (by default the disks are local files); `timeout` bounds every control call."""
        self.client = JsonLinesClient(control, timeout=timeout)
        self.paths = dict(disks)  # disk name -> current location (source of the next migration)
        self.files = dict(files if files is not None else disks)  # disk name -> its file
        self.generation = 0
        self.last: Migration | None = None   # the latest migration begun, even one that failed

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
        """The Stun/Unstun phases: the destinations opened first (prepare_mirror, as the agent does),
        then one stun in which the mirror goes onto every disk."""
        specs = {name: {"dest": dest, "mode": mode, "granularity": granularity} for name, dest in dests.items()}
        self.client.call("prepare_mirror", disks=specs)
        stun_id, t0 = self.stun("mirror_install")
        try:
            if strategy == "legacy":
                self.client.call("close_disks", stun_id=stun_id)
            self.client.call("install_mirror", stun_id=stun_id, disks=specs)
        finally:
            timing = self.unstun(stun_id, t0)
        return timing

    def mirror_set(self, **changes: Any) -> dict[str, Any]:
        """Change the running mirror of every disk (mode, throttle, rate), no stun. The disk is
        left out rather than sent as null: the plugin refuses an explicit null."""
        return self.client.call("mirror_set", **changes)

    def wait_copy(self, timeout: float, on_poll: Poll | None = None) -> dict[str, Any]:
        """Poll until no disk is copying; return the last status. `on_poll` sees every status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if on_poll is not None:
                on_poll(status)
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

    def copy(self, kind: str, rate: int, timeout: float, on_poll: Poll | None = None) -> dict[str, Any]:
        self.client.call("copy", kind=kind, rate=rate)
        return self.wait_copy(timeout, on_poll)

    def next_dests(self, place: Place | None = None) -> dict[str, Dest]:
        """Fresh destinations, created at the right size: in `place`, else beside each disk's file."""
        self.generation += 1
        dests = {}
        for name, file in self.files.items():
            base = file.split(".m")[0].removesuffix(".raw")
            if place is not None:
                base = os.path.join(place.directory, os.path.basename(base))
            # A driver may start on a disk an earlier driver already migrated: skip taken names.
            while os.path.exists(path := f"{base}.m{self.generation}.raw"):
                self.generation += 1
            images.make_empty(path, os.path.getsize(file))
            dests[name] = (place or Place(os.path.dirname(path))).dest(path)
        return dests

    def migrate(self, strategy: str = "optimized", mode: str = "sync", granularity: int = 65536,
                rate: int = 0, stun_budget: float = 0.05, copy_timeout: float = 600.0,
                max_dirty_passes: int = 20, keep_old: bool = False,
                after_install: Callable[[], None] | None = None,
                after_copy: Callable[[], None] | None = None,
                place: Place | None = None, dests: dict[str, Dest] | None = None,
                on_poll: Poll | None = None, converge_timeout: float | None = None,
                copy_rate: float | None = None) -> Migration:
        """One full migration of every disk to fresh files (in `place`, or the given `dests`);
        the old files are deleted afterwards. `mode`: sync, async or dirty (the mirror's mode);
        `on_poll` sees every status polled during the copy passes (a convergence rule there
        may call `mirror_set`); past `converge_timeout` seconds of copying the migration is
        aborted back to the source and NotConverged raised. `copy_rate` turns the stun budget
        into bytes (default: the rate the bulk copy achieved).

        `after_install` runs once the mirror is installed and before the copy (case 8 reads the
        plugin's memory there); `after_copy` once the copy passes are done, before flush_dest
        (case 3 measures the guest on a mirror with no copy running there)."""
        m = self.last = Migration(strategy, mode, started=time.monotonic())
        if dests is None:
            dests = self.next_dests(place)
        m.install = self.install(strategy, mode, granularity, {n: d.location for n, d in dests.items()})
        if after_install is not None:
            after_install()
        m.copy_started = time.monotonic()
        status = self.copy("bulk", rate, copy_timeout, on_poll)
        m.passes = 1
        # Dirty passes (the dirty-tracking mode, async overflow, or chunks a destination error
        # re-dirtied) until what is left would copy inside the stun budget at the rate the bulk
        # copy achieved, or the one given.
        if copy_rate is None:
            copy_rate = max(1.0, sum(d["copy"]["rate_bps"] for d in status["disks"].values() if d.get("copy")))
        give_up = m.copy_started + (converge_timeout or math.inf)
        while True:
            while remaining_bytes(status) / copy_rate > stun_budget and m.passes < max_dirty_passes:
                if time.monotonic() > give_up:
                    m.copy_done = time.monotonic()
                    self.abort()
                    raise NotConverged(f"what the destinations lack ({remaining_bytes(status)} bytes) "
                                       f"did not fit the stun budget within {converge_timeout:.0f} s; "
                                       "aborted", m)
                status = self.copy("dirty", rate, copy_timeout, on_poll)
                m.passes += 1
            m.copy_done = time.monotonic()
            if after_copy is not None and not m.flush_sent:
                after_copy()
            m.flush_sent = time.monotonic()
            m.flush_seconds = self.client.call("flush_dest")["seconds"]
            status = self.status()
            if mode == "async" and remaining_bytes(status) / copy_rate > stun_budget:
                # The agent's async end-game (agent/phases.py): sync when the queue the guest
                # refilled during flush_dest is over the budget, then flush_dest once more.
                self.mirror_set(mode="sync")
                m.flush_seconds += self.client.call("flush_dest")["seconds"]
                status = self.status()
            m.disks_before_switch = status["disks"]
            # An async mirror's flush_dest waits for its sends while the guest goes on: what it
            # left may again exceed the budget, and then more passes come first.
            if remaining_bytes(status) / copy_rate <= stun_budget or m.passes >= max_dirty_passes:
                break
        stun_id, t0 = self.stun("switchover")
        try:
            reply = self.client.call("switchover", stun_id=stun_id, reopen=strategy == "legacy")
            m.final_bytes = int(reply.get("final_bytes", 0))
        finally:
            m.switchover = self.unstun(stun_id, t0)
        self.client.call("finish")
        m.finish_returned = time.monotonic()
        old = self.files
        self.paths = {n: d.location for n, d in dests.items()}
        self.files = {n: d.file for n, d in dests.items()}
        if not keep_old:
            for file in old.values():
                os.unlink(file)
        m.finished = time.monotonic()
        return m

    def bulk_copy_only(self, granularity: int = 65536, place: Place | None = None,
                       check: Callable[[dict[str, Dest]], None] | None = None) -> float:
        """Install the mirror, run the bulk copy and flush_dest, abort back to the source; the
        seconds from the copy's start until the copy is durable. `check` sees the copies
        before they are deleted."""
        dests = self.next_dests(place)
        self.install("optimized", "sync", granularity, {n: d.location for n, d in dests.items()})
        start = time.monotonic()
        self.copy("bulk", 0, timeout=600)
        self.client.call("flush_dest")
        seconds = time.monotonic() - start
        self.abort()
        if check is not None:
            check(dests)
        for dest in dests.values():
            os.unlink(dest.file)
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
