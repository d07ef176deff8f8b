"""The copier's runs when either side is an NBD export: several in flight on libnbd's async API.

Design notes
- Local to local, a run is one copy_file_range and the pass waits for it (copier.py). With a
  remote side, waiting for each request would leave the link idle for a round trip per request.
  Here a pass keeps runs in flight: at most PIPELINE_REQUESTS requests and PIPELINE_BYTES of
  data buffers at once, a run's data in pieces of at most REQUEST_BYTES. The bytes bound is also
  how long a guest write into a run in flight may wait: the run's pieces are at most that far
  behind on the link (4 MiB: 3 ms at 10 Gbit/s, 34 ms at 1 Gbit/s).
- copy_run's rules hold per run, spread over time: a run takes its chunk range in ChunkLocks
  and clears its bits before its first read; it keeps the range until its last request has
  completed; a failed piece fails the run, whose bits are set again before the range is let go.
  So a guest write never lands between the copier's read of a chunk and its write (chunklock.py).
  A run's range is taken without waiting while other runs are in flight; when it would have to
  wait (guest writes hold it, or wait for it first), the runs in flight are drained first: a
  waiter must hold nothing (chunklock.py, first come first served), and their completions are
  run by this thread, which a wait would stop.
- A piece: read the source (a file: os.preadv, here; NBD: a read in flight), then write the
  destination (NBD: a write in flight; a file: pwrite, here). A hole of the source becomes zero
  requests that may punch on an NBD destination (its server allocates nothing for them, so a
  sparse source stays sparse), or punches where a file destination has data (zero_hole).
- Threads: completions arrive on the links' reactor threads and only queue an event; the copier
  thread runs every event, so the runs, the counts and the buffers belong to it alone. This
  condition's lock protects the event queue.
- Deadlines: every request has its backend's (backend_nbd.py); under the switchover stun the
  pass's deadline caps them (`cap`), so a destination that stops answering there cannot hold the
  stun past its lease.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .backend import Backend, FileBackend, zero_hole
from .backend_nbd import MAX_ZERO_BYTES, Channel, NbdBackend
from .mirror import Mirror

PIPELINE_REQUESTS = 16
PIPELINE_BYTES = 4 << 20
REQUEST_BYTES = 256 << 10

Then = Callable[["OSError | None"], None]


class RunResult(NamedTuple):
    """A settled run: its chunks, the data bytes it copied and compared, its error (None: done)."""
    first: int
    last: int
    copied: int
    compared: int
    error: OSError | None


@dataclass
class Run:
    """A run in flight: its held chunk range and what is still outstanding."""
    first: int
    last: int
    held: tuple[int, int]
    pending: int = 0
    issued: bool = False
    copied: int = 0
    error: OSError | None = None


class Pipeline:
    """Copy runs with their requests in flight; `start` issues a run, `settled`/`drain` collect them.

    Example: `p = Pipeline(source, mirror); p.start(0, 15); ...; results = p.drain()`
    """

    def __init__(self, source: Backend, mirror: Mirror, cap: float | None = None):
        self.source, self.mirror, self.dest = source, mirror, mirror.dest
        self._cap = cap
        self._reads = Channel(source) if isinstance(source, NbdBackend) else None
        self._writes = Channel(self.dest) if isinstance(self.dest, NbdBackend) else None
        assert self._reads or self._writes, "local to local runs copy_file_range (copier.py)"
        self._cond = threading.Condition()
        self._events: deque[tuple[Then, OSError | None]] = deque()
        self._runs: list[Run] = []
        self._settled: list[RunResult] = []
        self._requests = 0
        self._bytes = 0
        self._buffers: list[bytearray] = []

    # --- the copier's side ------------------------------------------------------------------

    def start(self, first: int, last: int) -> None:
        """Take chunks first..last, clear them, and issue their copy; return without waiting for it."""
        dmap = self.mirror.map
        held = self.mirror.locks.try_acquire(first, last)
        if held is None:
            while self._runs:
                self._run_events(wait=True)
            held = self.mirror.locks.acquire(first, last)
        if self.mirror.sends_pending(first, last):
            self.mirror.locks.release(held)     # left dirty for a later pass (sender.py)
            return
        run = Run(first, last, held)
        dmap.clear(first, last)
        self._runs.append(run)
        offset, count = first << dmap.shift, dmap.chunk_bytes(first, last)
        try:
            for seg_off, seg_len, is_data in self.source.segments(offset, count):
                if not is_data:
                    self._hole(run, seg_off, seg_len)
                    continue
                for pos in range(seg_off, seg_off + seg_len, REQUEST_BYTES):
                    self._piece(run, pos, min(REQUEST_BYTES, seg_off + seg_len - pos))
        except OSError as err:
            run.error = run.error or err
        except BaseException:     # a bug: the run must not pass for copied
            run.error = OSError(errno.EIO, "copier failed")
            raise
        finally:
            run.issued = True
            self._maybe_settle(run)
        self._run_events(wait=False)

    def settled(self) -> list[RunResult]:
        """The runs finished since the last call (their chunks are let go already)."""
        self._run_events(wait=False)
        done, self._settled = self._settled, []
        return done

    def drain(self) -> list[RunResult]:
        """Wait for every run in flight; the runs finished since the last call."""
        while self._runs:
            self._run_events(wait=True)
        return self.settled()

    # --- pieces -------------------------------------------------------------------------------

    def _piece(self, run: Run, offset: int, n: int) -> None:
        self._room_for(n)
        buf = self._buffer(n)
        run.pending += 1
        self._requests += 1
        self._bytes += n
        after_read = lambda err: self._read_done(run, buf, offset, err)
        if self._reads is None:
            try:
                self.source.pread(buf, offset)
            except OSError as err:
                after_read(err)
                return
            after_read(None)
        else:
            reads = self._reads
            self._issue(reads, lambda done: reads.pread(buf, offset, done, self._cap), "pread", offset, after_read)

    def _read_done(self, run: Run, buf: memoryview, offset: int, err: OSError | None) -> None:
        if err is not None or run.error is not None:
            self._piece_done(run, buf, err)
            return
        after_write = lambda err: self._piece_done(run, buf, err)
        if self._writes is None:
            try:
                self.dest.pwrite(buf, offset)
            except OSError as err:
                after_write(err)
                return
            after_write(None)
        else:
            writes = self._writes
            self._issue(writes, lambda done: writes.pwrite(buf, offset, done, self._cap), "pwrite", offset,
                        after_write)

    def _hole(self, run: Run, offset: int, count: int) -> None:
        if self._writes is None:
            zero_hole(self.dest, offset, count)
            return
        writes = self._writes
        for pos in range(offset, offset + count, MAX_ZERO_BYTES):
            n = min(MAX_ZERO_BYTES, offset + count - pos)
            self._room_for(0)
            run.pending += 1
            self._requests += 1
            self._issue(writes, lambda done, pos=pos, n=n: writes.zero(n, pos, done, self._cap), "zero", pos,
                        lambda err: self._piece_done(run, None, err))

    def _piece_done(self, run: Run, buf: memoryview | None, err: OSError | None) -> None:
        """One piece is over (buf: its data buffer, None for a zero request)."""
        run.pending -= 1
        self._requests -= 1
        if buf is not None:
            self._bytes -= len(buf)
            self._buffers.append(buf.obj)     # type: ignore[arg-type]
            if err is None:
                run.copied += len(buf)
        if err is not None:
            run.error = run.error or err
        self._maybe_settle(run)

    def _maybe_settle(self, run: Run) -> None:
        """Let a run go once nothing of it is outstanding: failed, its chunks are dirty again first."""
        if not run.issued or run.pending:
            return
        if run.error is not None:
            self.mirror.map.mark(run.first, run.last)
        self.mirror.locks.release(run.held)
        self._runs.remove(run)
        copied = run.copied if run.error is None else 0
        self._settled.append(RunResult(run.first, run.last, copied, 0, run.error))

    def _buffer(self, n: int) -> memoryview:
        raw = self._buffers.pop() if self._buffers else bytearray(REQUEST_BYTES)
        return memoryview(raw)[:n]

    # --- requests in flight -------------------------------------------------------------------

    def _issue(self, channel: Channel, submit: Callable[[Callable[[int], None]], None], op: str, offset: int,
               then: Then) -> None:
        """Issue one request; `then(error or None)` runs on this thread once it completed."""
        def done(err: int) -> None:      # on a reactor thread
            self._post(then, None if not err else _error(channel, op, offset, err))

        try:
            submit(done)
        except OSError as err:
            then(err)

    def _post(self, then: Then, err: OSError | None) -> None:
        with self._cond:
            self._events.append((then, err))
            self._cond.notify()

    def _run_events(self, wait: bool) -> None:
        with self._cond:
            while wait and not self._events:
                self._cond.wait()
            events, self._events = self._events, deque()
        for then, err in events:
            then(err)

    def _room_for(self, n: int) -> None:
        """Wait (running completions) until one more request of n bytes fits the bounds."""
        while self._requests >= PIPELINE_REQUESTS or (self._bytes and self._bytes + n > PIPELINE_BYTES):
            self._run_events(wait=True)


def _error(channel: Channel, op: str, offset: int, err: int) -> OSError:
    if err == errno.ETIMEDOUT:
        return channel.timeout_error(op, offset)
    return OSError(err, f"{op} at {offset} on {channel.backend.path}: {os.strerror(err)}")


def pipelined(source: Backend, dest: Backend) -> bool:
    """Whether a copy between these sides runs here (a remote side) rather than copy_file_range."""
    return not (isinstance(source, FileBackend) and isinstance(dest, FileBackend))
