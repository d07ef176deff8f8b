"""The mirror of one disk: its destination, dirty map and chunk locks, and the active write path.

Design notes
- Two modes. `sync` (the default): a guest update (write, zero, trim) to chunks the destination
  already has goes to both sides before the ack; an update to chunks not yet copied goes to the
  source only and the copier carries it.
- Parallel or inline. A slow update (FUA, which waits for storage, or a large one) is issued to
  both sides at once, so its latency is the larger of the two, not their sum. A small buffered
  write lands in page cache in microseconds, less than handing it to a pool thread costs (a
  futex wake, a GIL hand-over, two context switches): measured under max-rate 4 KiB writes, the
  hand-off cut the guest's rate while mirroring by a third. Those go inline, source first. `dirty` (the older dirty-block-tracking way): updates go to the source only
  and mark their chunks dirty; copy passes carry them.
- The active path (sync mode), step by step, as in QEMU's mirror:
    prepare  take the chunk range in ChunkLocks, so no copier run or other update overlaps it;
             decide: all chunks clean -> mirrored, else -> source only (range marked dirty);
    source   the update on the source: the source is authoritative until switchover, so its
             error is the guest's error;
    target   the same update on the destination, in a pool thread, at the same time;
    settle   a destination error never reaches the guest: the range is marked dirty, the error
             counted, and the copier retries it. A source error marks the range dirty too (the
             two sides may now differ) and is the guest's error.
- Why `dirty` mode needs no chunk locks: the copier clears a chunk's bit *before* it reads the
  source, and an update marks its bit *after* its source write completes. Whatever the
  interleaving, an update the copier may have missed leaves its bit set for the next pass.
- Destination flush: done with every guest flush (invariant 6: data acknowledged on both sides
  is flushed on both). A failed destination flush means writes the destination acknowledged may
  be lost, so the mirror is marked failed and the migration must not switch over.
- A destination that stops answering (a remote one past its request deadline: ETIMEDOUT, see
  backend_nbd.py) fails the mirror too, and a failed mirror drops its destination: updates go
  to the source alone and mark their chunks dirty, as in dirty mode (no copier runs any more,
  so no chunk locks are needed), and flushes flush the source alone. The guest waits at most
  one deadline, once, and sees no error; the migration fails at its next step.
- A guest flush waits for the destination's flush at most the destination's request deadline
  (`Backend.guest_wait`), then fails the mirror: the backend gives its own flushes a longer
  deadline (storage may take a while; the copier's write-behind may wait for it), and a flush
  that is the only request on a dead link would otherwise hold the guest that long.
"""
from __future__ import annotations

import errno
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from .backend import Backend
from .chunklock import ChunkLocks
from .dirtymap import DirtyMap
from .stats import DiskStats

MODES = ("sync", "dirty")
PARALLEL_MIN_BYTES = 256 << 10

Op = Callable[[], None]


class Mirror:
    """Mirror state of one disk; lives from install (under a stun) to switchover or abort."""

    def __init__(self, dest: Backend, mode: str, granularity: int, size: int,
                 pool: ThreadPoolExecutor, stats: DiskStats):
        assert mode in MODES
        self.dest = dest
        self.mode = mode
        self.map = DirtyMap(size, granularity)
        self.locks = ChunkLocks()
        self.failed: str | None = None
        self._pool = pool
        self._stats = stats

    def update(self, op: str, source_op: Op, dest_op: Op, offset: int, count: int, fua: bool) -> None:
        """Apply one guest update (pwrite, zero, trim) through the mirror."""
        if self.mode == "dirty" or self.failed is not None:
            source_op()
            self._mark_dirty(offset, count)
            return
        first, last = self.map.chunk_range(offset, count)
        held = self.locks.acquire(first, last)
        try:
            if self.map.any_dirty(first, last):
                self._mark_dirty(offset, count)
                source_op()
            elif fua or count >= PARALLEL_MIN_BYTES:
                self._both_parallel(op, source_op, dest_op, offset, count)
            else:
                self._both_inline(op, source_op, dest_op, offset, count)
        finally:
            self.locks.release(held)

    def fail(self, reason: str) -> None:
        """The destination is unusable: drop it (see the module notes); the first reason is kept."""
        if self.failed is None:
            self.failed = reason

    def _both_parallel(self, op: str, source_op: Op, dest_op: Op, offset: int, count: int) -> None:
        target = self._pool.submit(dest_op)
        try:
            source_op()
        except BaseException:
            self._settle(op, target, count)
            self._mark_dirty(offset, count)
            raise
        if not self._settle(op, target, count):
            self._mark_dirty(offset, count)

    def _both_inline(self, op: str, source_op: Op, dest_op: Op, offset: int, count: int) -> None:
        try:
            source_op()
        except BaseException:
            self._mark_dirty(offset, count)
            raise
        try:
            dest_op()
        except OSError as err:
            self._dest_failed(op, err)
            self._mark_dirty(offset, count)
            return
        self._stats.dest_written(count)

    def flush(self, source_flush: Op) -> None:
        """Flush both sides in parallel; only the source's error reaches the guest."""
        if self.failed is not None:
            source_flush()
            return
        target = self._pool.submit(self.dest.flush)
        try:
            source_flush()
        finally:
            try:
                target.result(timeout=self.dest.guest_wait)
            except FutureTimeout:
                self._stats.error("dest", "flush")
                self.fail(f"destination flush did not complete within {self.dest.guest_wait:.2f} s")
            except OSError as err:
                self._stats.error("dest", "flush")
                self.fail(f"destination flush failed: {err.strerror}")

    def _settle(self, op: str, target: Future, count: int) -> bool:
        """Wait for the destination's half of an update; count its error instead of raising it."""
        try:
            target.result()
        except OSError as err:
            self._dest_failed(op, err)
            return False
        self._stats.dest_written(count)
        return True

    def _dest_failed(self, op: str, err: OSError) -> None:
        """Count a destination error; one that says the destination stopped answering fails the mirror."""
        self._stats.error("dest", op)
        if err.errno == errno.ETIMEDOUT:
            self.fail(f"destination stopped answering: {err.strerror}")

    def _mark_dirty(self, offset: int, count: int) -> None:
        newly = self.map.mark_range(offset, count)
        if newly:
            self._stats.dirtied(newly * self.map.granularity)

    def close(self) -> None:
        self.dest.close()
