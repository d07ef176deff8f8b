"""In-flight operations on chunk ranges: what keeps the copier and mirrored guest writes apart.

Design notes (after QEMU's block/mirror.c, where every copy and every active write is an op record
and an op waits for overlapping ops instead of a global lock)
- The race to prevent: the copier reads chunk C from the source, a guest write then updates C on
  both sides (C looked clean), and the copier writes its older copy of C over the destination.
  The destination would hold stale data while the dirty map says C is clean.
- The rule: a copier run and a mirrored guest write each hold their chunk range for the whole of
  their IO. A range is taken all at once or waited for, never piecewise, so no op holds one range
  while waiting for another and there is no deadlock. Two guest writes that share a chunk are
  serialized too: otherwise their order could differ between source and destination.
- Non-overlapping ops run in parallel: the held ranges are a short list (one entry per op in
  flight), so an overlap test is a scan of at most a few dozen intervals.
- First come, first served among overlapping ops: an op that has to wait takes a place in line,
  and a later op that overlaps it waits behind it even where the range is free now. Without
  that, a copier run (up to 1 MiB of chunks) under a stream of guest writes into its range could
  wait for ever: guest writes to a remote source hold their chunks for a round trip each, and
  some always did. A waiter in line waits only for ops that are held or ahead of it, so the line
  never forms a cycle, provided that no op waits while it holds a range: the pipelined copier
  (pipeline.py) holds runs in flight, so it asks with `try_acquire` and lets its runs go before
  it waits.
- This condition's lock protects `_held` and `_line`.
"""
from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Iterator


class ChunkLocks:
    """Ranges of chunks held by in-flight operations.

    Example: `with locks.hold(first, last): ...copy or mirror chunks first..last...`
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []
        self._line: list[tuple[int, int, int]] = []   # (ticket, first, last) of waiting ops, oldest first
        self._tickets = itertools.count()

    def _blocked(self, first: int, last: int, place: tuple[int, int, int] | None) -> bool:
        """Whether chunks first..last are held, or wanted by an op ahead of `place` (None: last in line)."""
        for f, l in self._held:
            if f <= last and first <= l:
                return True
        for waiting in self._line:
            if waiting is place:
                break
            if waiting[1] <= last and first <= waiting[2]:
                return True
        return False

    def acquire(self, first: int, last: int) -> tuple[int, int]:
        """Wait for chunks first..last (behind overlapping ops that came first), then hold them;
        pass the result to release()."""
        entry = (first, last)
        with self._cond:
            if self._blocked(first, last, None):
                place = (next(self._tickets), first, last)
                self._line.append(place)
                try:
                    while self._blocked(first, last, place):
                        self._cond.wait()
                finally:
                    self._line.remove(place)
            self._held.append(entry)
        return entry

    def try_acquire(self, first: int, last: int) -> tuple[int, int] | None:
        """Hold chunks first..last if that needs no wait (as acquire() would see it), else None."""
        with self._cond:
            if self._blocked(first, last, None):
                return None
            entry = (first, last)
            self._held.append(entry)
            return entry

    def release(self, entry: tuple[int, int]) -> None:
        with self._cond:
            self._held.remove(entry)
            if self._line:
                self._cond.notify_all()

    @contextmanager
    def hold(self, first: int, last: int) -> Iterator[None]:
        """acquire() .. release() around a block (the copier's runs; the guest path calls them directly)."""
        entry = self.acquire(first, last)
        try:
            yield
        finally:
            self.release(entry)

    def in_flight(self) -> int:
        with self._cond:
            return len(self._held)
