"""The copier: passes over a disk's dirty map that carry source data to the destination.

Design notes
- A pass walks the dirty map once, forward, in runs: up to 1 MiB of dirty chunks where the source
  has data; where it has a hole, every dirty chunk up to the next data in one run. Chunks dirtied behind the cursor wait for the next
  pass; that is what makes "passes until what remains fits the stun budget" converge. The bulk
  copy (DiskCopy) is simply the first pass: a new mirror starts all dirty.
- One run, under the run's chunk range in ChunkLocks (see chunklock.py for the race it closes):
    1. clear the run's bits (before reading the source: see mirror.py, dirty mode),
    2. walk the source's data and holes (SEEK_DATA/SEEK_HOLE) in the run,
    3. data: copy_file_range into the destination, no user-space buffer;
       hole: the destination must read zeroes there too, so punch where it has data (a fresh
       sparse destination has none: nothing is written and it stays sparse),
    4. on any error, set the bits again: the run is retried by a later pass, never lost.
- A remote side (either is an NBD export): the same runs under the same rules, but several in
  flight at once on libnbd's async API (pipeline.py); holes become zero requests that may punch.
  Local to local stays one copy_file_range at a time: it is as fast as the storage already.
- A destination that stops answering (a request past its deadline, ETIMEDOUT) fails the mirror
  (`Mirror.fail`): the pass stops at once and the migration fails; waiting for it to answer
  again would only hold guest writes in its chunks.
- A pass stops after several consecutive failed runs (a full or broken destination) and reports
  the first error; the agent decides to fail the migration. The guest never sees it.
- A write-back error is worse than a failed run: the kernel reports it once, for whichever range
  failed (maybe an older one), and marks those pages clean, so no later sync of the destination
  sees it again. Data the dirty map calls copied may be lost, so the mirror is marked failed (as
  a failed flush marks it, mirror.py) and the pass stops: the migration must not switch over.
- Rate limit: data bytes (not holes) are paced against the requested bytes per second, counted
  from the last change of the rate (`Pace`: `svmotion set --rate` changes it while a pass runs).
- Write-behind: a background pass starts the write-back of each run it copied and waits for the
  oldest runs once more than WRITE_BEHIND_BYTES are on their way, so the copy runs at the
  destination's speed and leaves at most that much of it in the page cache. Unbounded, a copy at
  page-cache speed left the whole disk dirty: flush_dest then wrote it all back just before the
  switchover stun (a write-back that size stalls guest writes even on nbdkit's C file plugin
  serving another file: benchmark case 1, its floor rows), and a disk bigger than the kernel's
  dirty limit would throttle every writer on the host, the guest's source writes included.
- The switchover's last copy is the same loop run synchronously under the stun, with a deadline
  instead of a rate, so the stun never outlives its lease.
- A load pass (DiskLoad: the destination is a partial disk an earlier migration left) is the
  bulk copy's alternative: the same walk and the same runs under the same chunk locks, but a run
  compares the per-chunk digests of the destination and of the source (nbd_plugin/digest.py)
  and copies only the chunks that differ. Why the destination's old content is what it compares
  against: a new mirror starts all dirty, and the sync mirror writes nothing to the destination
  for a dirty chunk, so until the load pass reaches a chunk only the failed migration wrote it.
  Guest writes to a run wait for it (chunk locks), exactly as for a copied run; a chunk compared
  equal is from then on a copied chunk. The two digest calls stay separate, each asked of its
  backend (`backend.digests`), so that a remote destination can compute its side where its data
  is (today an NBD backend reads the chunks over NBD: the seam is its `digests`). Load runs go
  one at a time, whatever the sides.
"""
from __future__ import annotations

import collections
import errno
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .backend import Backend, copy_range, zero_hole
from .digest import byte_ranges, differing
from .mirror import Mirror
from .pipeline import Pipeline, RunResult, pipelined
from .priority import lower_this_thread
from .stats import DiskStats

DATA_RUN_BYTES = 1 << 20
WRITE_BEHIND_BYTES = 16 << 20
MAX_CONSECUTIVE_ERRORS = 8
COPY_KINDS = ("bulk", "dirty", "load")


class DeadlineExceeded(Exception):
    """A synchronous copy could not finish before its deadline; what it did not copy stays dirty."""


@dataclass
class PassProgress:
    kind: str
    total_bytes: int
    done_bytes: int = 0
    compared_bytes: int = 0          # load passes: bytes whose digests were compared
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None

    def as_dict(self, running: bool) -> dict[str, Any]:
        elapsed = (self.finished or time.monotonic()) - self.started
        return {"running": running, "kind": self.kind, "done_bytes": self.done_bytes,
                "compared_bytes": self.compared_bytes, "total_bytes": self.total_bytes,
                "rate_bps": self.done_bytes / elapsed if elapsed > 0 else 0.0, "error": self.error}


class WriteBehind:
    """The destination ranges a pass copied whose write-back it has started but not waited for."""

    def __init__(self, dest: Backend, window: int = WRITE_BEHIND_BYTES):
        self.dest = dest
        self.window = window
        self._started: collections.deque[tuple[int, int]] = collections.deque()
        self._bytes = 0

    def copied(self, offset: int, count: int) -> None:
        """Start writing back a copied range; wait for the oldest while over the window."""
        self.dest.start_write_back(offset, count)
        self._started.append((offset, count))
        self._bytes += count
        while self._bytes > self.window:
            old_offset, old_count = self._started.popleft()
            self._bytes -= old_count
            self.dest.write_back(old_offset, old_count)


def carry(source: Backend, dest: Backend, offset: int, count: int) -> int:
    """Make dest's range equal to source's: data copied, holes zeroed sparsely; return the data bytes copied."""
    copied = 0
    for seg_off, seg_len, is_data in source.segments(offset, count):
        if is_data:
            copy_range(source, dest, seg_off, seg_len)
            copied += seg_len
        else:
            zero_hole(dest, seg_off, seg_len)
    return copied


def copy_run(source: Backend, mirror: Mirror, first: int, last: int) -> int:
    """Copy chunks first..last to the destination; return the data bytes copied."""
    dmap = mirror.map
    with mirror.locks.hold(first, last):
        if mirror.sends_pending(first, last):
            return 0          # left dirty for a later pass (sender.py)
        dmap.clear(first, last)
        try:
            return carry(source, mirror.dest, first << dmap.shift, dmap.chunk_bytes(first, last))
        except BaseException:
            dmap.mark(first, last)
            raise


def load_run(source: Backend, mirror: Mirror, first: int, last: int) -> tuple[int, int]:
    """Compare chunks first..last of both sides by digest, copy those that differ; (compared, copied) bytes."""
    dmap = mirror.map
    offset, count = first << dmap.shift, dmap.chunk_bytes(first, last)
    copied = 0
    with mirror.locks.hold(first, last):
        if mirror.sends_pending(first, last):
            return 0, 0       # left dirty for a later pass (sender.py)
        dmap.clear(first, last)
        try:
            theirs = mirror.dest.digests(offset, count, dmap.granularity)
            ours = source.digests(offset, count, dmap.granularity)
            for d_off, d_len in byte_ranges(differing(ours, theirs), offset, count, dmap.granularity):
                copied += carry(source, mirror.dest, d_off, d_len)
        except BaseException:
            dmap.mark(first, last)
            raise
    return count, copied


def next_run(source: Backend, mirror: Mirror, chunk: int) -> int:
    """The last chunk of the run that starts at dirty chunk `chunk`."""
    dmap = mirror.map
    offset = chunk << dmap.shift
    data_at = source.next_data(offset)
    if data_at >= offset + dmap.granularity:
        limit = min(dmap.chunks - 1, (data_at >> dmap.shift) - 1)
    else:
        limit = min(dmap.chunks - 1, chunk + max(1, DATA_RUN_BYTES >> dmap.shift) - 1)
    return dmap.dirty_run_end(chunk, limit)


class OneAtATime:
    """Runs carried one at a time, each finished before `start` returns: local to local
    (copy_file_range) and load runs. The same calls as a Pipeline."""

    def __init__(self, source: Backend, mirror: Mirror, load: bool):
        self._source, self._mirror, self._load = source, mirror, load
        self._done: list[RunResult] = []

    def start(self, first: int, last: int) -> None:
        try:
            if self._load:
                compared, copied = load_run(self._source, self._mirror, first, last)
            else:
                compared, copied = 0, copy_run(self._source, self._mirror, first, last)
        except OSError as err:
            self._done.append(RunResult(first, last, 0, 0, err))
            return
        self._done.append(RunResult(first, last, copied, compared, None))

    def settled(self) -> list[RunResult]:
        done, self._done = self._done, []
        return done

    drain = settled


class Pace:
    """The copier's rate limit (bytes/s, 0 = none), changeable while a pass runs.

    Example: `pace = Pace(10 << 20); time.sleep(pace.ahead(done_bytes))`"""

    def __init__(self, rate: int = 0):
        self.set(rate)

    def set(self, rate: int) -> None:
        # Measured from now on: the bytes copied before the change were paced at the old rate.
        self.rate, self._since, self._base = rate, time.monotonic(), None

    def ahead(self, done_bytes: int) -> float:
        """Seconds the pass is ahead of the rate (<= 0: not ahead)."""
        rate = self.rate
        if not rate:
            return 0.0
        if self._base is None:
            self._base = done_bytes
        return (done_bytes - self._base) / rate - (time.monotonic() - self._since)


class PassTally:
    """What a pass's settled runs add up to, and whether the pass goes on (see copy_pass)."""

    def __init__(self, mirror: Mirror, stats: DiskStats, progress: PassProgress, deadline: float | None):
        self.mirror, self.stats, self.progress = mirror, stats, progress
        self.behind = WriteBehind(mirror.dest) if deadline is None else None
        self.deadline = deadline
        self.failures = 0
        self.first_error: str | None = None
        self.going = True

    def add(self, results: Iterable[RunResult]) -> None:
        shift = self.mirror.map.shift
        for run in results:
            if run.error is not None:
                self._failed(run, run.error)
                continue
            self.failures = 0
            self.progress.compared_bytes += run.compared
            if self.behind is not None and run.copied:
                try:
                    self.behind.copied(run.first << shift, self.mirror.map.chunk_bytes(run.first, run.last))
                except OSError as err:
                    # Copied data may not have reached the destination, and the error names no
                    # range (see the notes): as after a failed flush, the mirror is broken.
                    self.stats.error("dest", "write_back")
                    self.first_error = self.first_error or f"destination write-back: {err.strerror}"
                    self.mirror.fail(f"destination write-back failed: {err.strerror}")
                    self.going = False
            self.progress.done_bytes += run.copied
            self.stats.copied(self.progress.kind, run.copied)

    def _failed(self, run: RunResult, err: OSError) -> None:
        self.stats.error("dest", "copy")
        self.failures += 1
        self.first_error = self.first_error or f"copy at offset {run.first << self.mirror.map.shift}: {err.strerror}"
        if err.errno == errno.ETIMEDOUT and self.deadline is None:
            self.mirror.fail(f"destination stopped answering: {err.strerror}")
        if self.failures >= MAX_CONSECUTIVE_ERRORS or self.deadline is not None or self.mirror.failed:
            self.going = False


def copy_pass(source: Backend, mirror: Mirror, stats: DiskStats, progress: PassProgress,
              should_stop: Callable[[], bool], pace: Pace | None = None, deadline: float | None = None) -> None:
    """Walk the dirty map once.

    A failed run stays dirty for a later pass, and the pass goes on; when MAX_CONSECUTIVE_ERRORS
    runs fail in a row (or any run fails under a deadline, or the mirror has failed) the pass
    stops. Either way the first error is in progress.error. Nothing is raised but
    DeadlineExceeded, and only once no run is in flight.
    """
    tally = PassTally(mirror, stats, progress, deadline)
    runs: Pipeline | OneAtATime
    if progress.kind != "load" and pipelined(source, mirror.dest):
        runs = Pipeline(source, mirror, cap=deadline)
    else:
        runs = OneAtATime(source, mirror, load=progress.kind == "load")
    chunk = mirror.map.next_dirty(0) if mirror.map.dirty_count() else None
    try:
        while chunk is not None and tally.going and not should_stop():
            if mirror.failed:
                tally.first_error = tally.first_error or f"mirror failed: {mirror.failed}"
                break
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"{mirror.map.dirty_bytes()} bytes still dirty at the deadline")
            last = next_run(source, mirror, chunk)
            runs.start(chunk, last)
            tally.add(runs.settled())
            if pace is not None:
                ahead = pace.ahead(progress.done_bytes)
                if ahead > 0:
                    tally.add(runs.drain())   # no run waits in flight, its chunks held, while we sleep
                    time.sleep(min(ahead, 0.5))
            chunk = mirror.map.next_dirty(last + 1)
    finally:
        tally.add(runs.drain())
    progress.error = tally.first_error


class CopyJob:
    """A background copy pass of one disk (thread), cancellable.

    Example: `job = CopyJob(disk.primary, disk.mirror, disk.stats, "bulk", rate=0); job.start()`
    """

    def __init__(self, source: Backend, mirror: Mirror, stats: DiskStats, kind: str, rate: int):
        self.progress = PassProgress(kind, mirror.map.dirty_bytes())
        self._args = (source, mirror, stats)
        self.pace = Pace(rate)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"copy-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        lower_this_thread()  # the guest's requests come first (priority.py)
        try:
            copy_pass(*self._args, self.progress, self._stop.is_set, pace=self.pace)
        except Exception as err:  # a bug must end the pass visibly, not silently
            self.progress.error = f"copier: {type(err).__name__}: {err}"
        finally:
            self.progress.finished = time.monotonic()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def status(self) -> dict[str, Any]:
        return self.progress.as_dict(self.running)
