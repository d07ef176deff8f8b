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
- This condition's lock protects `_held`.
"""
from __future__ import annotations

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
        self._waiting = 0  # threads in wait(): release() wakes them only if there are any

    def _overlaps(self, first: int, last: int) -> bool:
        for f, l in self._held:
            if f <= last and first <= l:
                return True
        return False

    def acquire(self, first: int, last: int) -> tuple[int, int]:
        """Wait until no op holds any of chunks first..last, then hold them; pass the result to release()."""
        entry = (first, last)
        with self._cond:
            while self._overlaps(first, last):
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            self._held.append(entry)
        return entry

    def release(self, entry: tuple[int, int]) -> None:
        with self._cond:
            self._held.remove(entry)
            if self._waiting:
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
