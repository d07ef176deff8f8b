"""The mirror of one disk: its destination, dirty map and chunk locks, and the active write path.

Design notes
- Three modes, switchable while the mirror runs (`set_mode`, no stun: see below).
  `sync` (the default): a guest update (write, zero, trim) to chunks the destination already has
  goes to both sides before the ack; an update to chunks not yet copied goes to the source only
  and the copier carries it.
  `async`: the same, except that the destination's half is sent in the background (sender.py)
  and the guest is acknowledged once the source has it. Past the sender's bound, or when a send
  fails, the update's chunks are marked dirty and the copier carries them.
  `dirty` (the older dirty-block-tracking way): updates go to the source only and mark their
  chunks dirty; copy passes carry them.
- Parallel or inline (sync). A slow update (FUA, which waits for storage, or a large one) is issued to
  both sides at once, so its latency is the larger of the two, not their sum. A small buffered
  write lands in page cache in microseconds, less than handing it to a pool thread costs (a
  futex wake, a GIL hand-over, two context switches): measured under max-rate 4 KiB writes, the
  hand-off cut the guest's rate while mirroring by a third. Those go inline, source first.
- The active path (sync and async), step by step, as in QEMU's mirror:
    prepare  take the chunk range in ChunkLocks, so no copier run or other update overlaps it;
             decide: all chunks clean -> mirrored, else -> source only (range marked dirty);
    source   the update on the source: the source is authoritative until switchover, so its
             error is the guest's error;
    target   sync: the same update on the destination, at the same time or right after;
             async: offered to the sender, in order behind older sends to the same chunks;
    settle   a destination error never reaches the guest: the range is marked dirty, the error
             counted, and the copier retries it. A source error marks the range dirty too (the
             two sides may now differ) and is the guest's error.
- Why `dirty` mode needs no chunk locks: the copier clears a chunk's bit *before* it reads the
  source, and an update marks its bit *after* its source write completes. Whatever the
  interleaving, an update the copier may have missed leaves its bit set for the next pass.
- Mode switches need no stun, because every mode keeps one rule per chunk: the destination gets
  a chunk's updates in source order, or the chunk is dirty. An update in flight across a switch
  follows the mode it read: a dirty-mode update marks its chunk after its source write (so a
  sync or async update that found the chunk clean raced only with bytes the guest had not
  ordered); a sync update to a chunk an async send is still pending for would overtake it, so it
  marks the chunk dirty instead; and the copier waits for a chunk's pending sends before it
  copies (sender.py). Sends offered before a switch away from async still drain.
- The throttle (convergence control, set by the agent): a delay before a guest update starts,
  in every mode, while the mirror is installed. It slows the guest's dirtying where the
  destination cannot keep up; the agent bounds it and lifts it.
- Destination flush: done with every guest flush in sync and dirty mode (invariant 6: data acknowledged on both sides
  is flushed on both). In async mode the destination acknowledged nothing the guest waited for, so a guest flush
  flushes the source alone; the switchover flushes the destination after its sends drained. A
  failed destination flush means writes the destination acknowledged may
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
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from .backend import Backend, is_nbd_uri
from .chunklock import ChunkLocks
from .dirtymap import DirtyMap
from .sender import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS, Send, Sender
from .stats import DiskStats

MODES = ("sync", "async", "dirty")
PARALLEL_MIN_BYTES = 256 << 10
# Sender threads for a destination behind NBD: requests in flight at once (each waits a round trip).
NBD_SEND_WORKERS = 8
MAX_THROTTLE_SECONDS = 1.0

Op = Callable[[], None]


class Mirror:
    """Mirror state of one disk; lives from install (under a stun) to switchover or abort."""

    def __init__(self, dest: Backend, mode: str, granularity: int, size: int,
                 pool: ThreadPoolExecutor, stats: DiskStats,
                 async_bytes: int = DEFAULT_MAX_BYTES, async_requests: int = DEFAULT_MAX_REQUESTS):
        assert mode in MODES
        self.dest = dest
        self.mode = mode
        self.map = DirtyMap(size, granularity)
        self.locks = ChunkLocks()
        self.failed: str | None = None
        self.sender: Sender | None = None           # made at the first switch to async, kept until close
        self.throttle = 0.0                         # seconds before each guest update (the agent's)
        self.throttle_max = 0.0                     # the largest delay applied so far
        self._async_bounds = (async_bytes, async_requests)
        self._pool = pool
        self._stats = stats
        if mode == "async":
            self.sender = self._new_sender()

    def update(self, op: str, source_op: Op, dest_op: Op, offset: int, count: int, fua: bool,
               payload: memoryview | None = None) -> None:
        """Apply one guest update (pwrite, zero, trim) through the mirror. `payload`: a write's
        data, which an async send copies (the guest's buffer is valid only during this call)."""
        if self.throttle:
            self._throttle()
        mode = self.mode
        if mode == "dirty" or self.failed is not None:
            source_op()
            self._mark_dirty(offset, count)
            return
        first, last = self.map.chunk_range(offset, count)
        held = self.locks.acquire(first, last)
        try:
            sender = self.sender
            if self.map.any_dirty(first, last) or (
                    mode == "sync" and sender is not None and sender.pending_in(first, last)):
                self._mark_dirty(offset, count)
                source_op()
            elif mode == "async":
                self._send_later(source_op, dest_op, offset, count, first, last, payload)
            elif fua or count >= PARALLEL_MIN_BYTES:
                self._both_parallel(op, source_op, dest_op, offset, count)
            else:
                self._both_inline(op, source_op, dest_op, offset, count)
        finally:
            self.locks.release(held)

    def set_mode(self, mode: str) -> None:
        """Switch modes while the mirror runs (see the module notes for why no stun is needed)."""
        assert mode in MODES
        if mode == "async" and self.sender is None:
            self.sender = self._new_sender()
        self.mode = mode

    def set_throttle(self, seconds: float) -> None:
        self.throttle = min(max(0.0, seconds), MAX_THROTTLE_SECONDS)

    def _throttle(self) -> None:
        delay = self.throttle
        time.sleep(delay)
        if delay > self.throttle_max:
            self.throttle_max = delay
        self._stats.throttled(delay)

    def _new_sender(self) -> Sender:
        workers = NBD_SEND_WORKERS if is_nbd_uri(self.dest.path) else 1
        max_bytes, max_requests = self._async_bounds
        return Sender(workers, self._sent, self._send_failed, max_bytes, max_requests)

    def _send_later(self, source_op: Op, dest_op: Op, offset: int, count: int, first: int, last: int,
                    payload: memoryview | None) -> None:
        """Async: the source now, the destination's copy queued behind older sends to its chunks."""
        try:
            source_op()
        except BaseException:
            self._mark_dirty(offset, count)
            raise
        if payload is None:
            send = Send(first, last, offset, count, 0, dest_op)
        else:
            send = Send(first, last, offset, count, count, _write_later(self.dest, bytes(payload), offset))
        assert self.sender is not None
        if not self.sender.offer(send):
            self._left_to_copier(offset, count)

    def _sent(self, nbytes: int) -> None:
        self._stats.dest_written(nbytes)

    def _send_failed(self, send: Send, err: OSError) -> None:
        if err.errno != errno.ECANCELED:     # cancelled: not sent, because the mirror failed
            self._dest_failed("send", err)
        self._left_to_copier(send.offset, send.count)

    def _left_to_copier(self, offset: int, count: int) -> None:
        self._stats.overflowed(count)
        self._mark_dirty(offset, count)

    def await_sends(self, first: int, last: int) -> None:
        """Wait for the pending sends to chunks first..last (a copier run that holds them, before
        it reads the source: see sender.py)."""
        if self.sender is not None:
            self.sender.wait_idle(first, last)

    def drain_sends(self, deadline: float | None = None) -> bool:
        """Wait for every pending send; False if the deadline came first."""
        return self.sender is None or self.sender.drain(deadline)

    def stop_sends(self) -> None:
        if self.sender is not None:
            self.sender.stop()

    def status(self) -> dict:
        sends = self.sender.status() if self.sender is not None else \
            {"pending_bytes": 0, "pending_requests": 0, "sent_bytes": 0}
        return {"mode": self.mode, "throttle_seconds": self.throttle, "throttle_max_seconds": self.throttle_max,
                "async": dict(sends, overflow_bytes=self._stats.overflow_bytes)}

    def fail(self, reason: str) -> None:
        """The destination is unusable: drop it (see the module notes); the first reason is kept."""
        if self.failed is None:
            self.failed = reason
        if self.sender is not None:
            self.sender.abandon()

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
        """Flush both sides in parallel (async: the source alone); only the source's error reaches the guest."""
        if self.failed is not None or self.mode == "async":
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
        self.stop_sends()   # before the close: a worker's pwrite must not meet a closed descriptor
        self.dest.close()


def _write_later(dest: Backend, data: bytes, offset: int) -> Op:
    return lambda: dest.pwrite(data, offset)
