"""The dirty map: one bit per chunk, set where the destination does not have the source's data yet.

Design notes
- A mirror starts with every chunk dirty (nothing is on the destination), so installing it under
  a stun is one memset and never a walk of the disk; the first copy pass (the bulk copy) clears
  chunks as it copies them and skips holes in large steps.
- Size: one bit per chunk, 2 MiB per TiB at the default 64 KiB granularity.
- `next_dirty` finds the next set bit with a regular-expression scan for a non-zero byte, which
  runs in C; the copier calls it once per run of chunks, not once per chunk.
- This lock protects the bitmap and the count of set bits. Callers that need a bit to stay as it
  is across IO (the copier, mirrored writes) hold the chunk range in ChunkLocks as well.
"""
from __future__ import annotations

import re
import threading

# Chunk sizes a mirror accepts. The chunk is what one dirty byte costs a dirty pass and the
# switchover's last copy under the stun, and what a guest write waits for when a copier run holds
# it (a run is at least one chunk): at 1 TiB one write would re-dirty the whole disk, the passes
# would never converge and the last copy would be the whole disk under the stun. 64 MiB is
# QEMU's drive-mirror limit too. 4 KiB, the page size, is the smallest useful chunk.
MIN_GRANULARITY = 4096
MAX_GRANULARITY = 64 << 20

_NONZERO = re.compile(rb"[^\x00]")
_NOTFULL = re.compile(rb"[^\xff]")


class DirtyMap:
    """Dirty chunks of one disk.

    Example: `m = DirtyMap(1 << 30, 65536); m.mark_range(0, 4096); m.dirty_bytes() == 65536`
    """

    def __init__(self, size: int, granularity: int, all_dirty: bool = True):
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.chunks = (size + granularity - 1) >> self.shift
        self._lock = threading.Lock()
        nbytes = (self.chunks + 7) // 8
        if all_dirty and self.chunks:
            # Built whole rather than through _set: this runs under the mirror-install stun.
            self._bits = bytearray(b"\xff") * nbytes
            if self.chunks & 7:
                self._bits[-1] = (1 << (self.chunks & 7)) - 1
            self._count = self.chunks
        else:
            self._bits = bytearray(nbytes)
            self._count = 0

    def chunk_range(self, offset: int, count: int) -> tuple[int, int]:
        """The first and last chunk touched by a byte range (count > 0)."""
        return offset >> self.shift, (offset + count - 1) >> self.shift

    def mark(self, first: int, last: int) -> int:
        """Set chunks first..last; return how many were newly set."""
        with self._lock:
            return self._set(first, last, True)

    def clear(self, first: int, last: int) -> int:
        """Clear chunks first..last; return how many were set before."""
        with self._lock:
            return -self._set(first, last, False)

    def mark_range(self, offset: int, count: int) -> int:
        return self.mark(*self.chunk_range(offset, count))

    def any_dirty(self, first: int, last: int) -> bool:
        """Whether any of chunks first..last is dirty.

        No map lock: the caller holds first..last in ChunkLocks, under which every change to these
        bits is made, and a change to a neighbour's bit rewrites a shared byte with ours as it was."""
        bits = self._bits
        if first == last:  # most guest writes
            return bool(bits[first >> 3] & (1 << (first & 7)))
        return any(bits[c >> 3] & (1 << (c & 7)) for c in range(first, last + 1))

    def is_dirty(self, chunk: int) -> bool:
        return bool(self._bits[chunk >> 3] & (1 << (chunk & 7)))

    def next_dirty(self, start: int) -> int | None:
        """The first dirty chunk at or after start, or None."""
        with self._lock:
            pos = start
            while pos < self.chunks:
                byte = self._bits[pos >> 3] >> (pos & 7)
                if byte:
                    return pos + ((byte & -byte).bit_length() - 1)
                found = _NONZERO.search(self._bits, (pos >> 3) + 1)
                if found is None:
                    return None
                pos = found.start() << 3
            return None

    def dirty_run_end(self, first: int, limit: int) -> int:
        """The last chunk of the run of dirty chunks starting at first, at most limit."""
        with self._lock:
            pos = first
            while pos <= limit:
                if not self.is_dirty(pos):
                    return pos - 1
                pos += 1
                if pos & 7 == 0:  # byte-aligned: skip whole dirty bytes in C
                    found = _NOTFULL.search(self._bits, pos >> 3, (limit >> 3) + 1)
                    if found is None:
                        return limit
                    pos = max(pos, found.start() << 3)
            return limit

    def dirty_count(self) -> int:
        return self._count

    def dirty_bytes(self) -> int:
        """Bytes in dirty chunks, the last (short) chunk counted at its real size."""
        with self._lock:
            total = self._count << self.shift
            tail = self.size & (self.granularity - 1)
            if tail and self.is_dirty(self.chunks - 1):
                total -= self.granularity - tail
            return total

    def chunk_bytes(self, first: int, last: int) -> int:
        """Bytes of the disk covered by chunks first..last."""
        return min((last + 1) << self.shift, self.size) - (first << self.shift)

    def memory_bytes(self) -> int:
        return len(self._bits)

    def _set(self, first: int, last: int, value: bool) -> int:
        """Set or clear a chunk range under the lock; return the change in the set-bit count."""
        before = self._popcount(first, last)
        lo_byte, hi_byte = first >> 3, last >> 3
        for c in list(range(first, min(last + 1, (lo_byte + 1) << 3))) + \
                list(range(max(first, hi_byte << 3), last + 1)):
            if value:
                self._bits[c >> 3] |= 1 << (c & 7)
            else:
                self._bits[c >> 3] &= ~(1 << (c & 7)) & 0xFF
        if hi_byte - lo_byte > 1:
            fill = 0xFF if value else 0
            self._bits[lo_byte + 1:hi_byte] = bytes([fill]) * (hi_byte - lo_byte - 1)
        after = self._popcount(first, last)
        self._count += after - before
        return after - before

    def _popcount(self, first: int, last: int) -> int:
        lo_byte, hi_byte = first >> 3, last >> 3
        whole = int.from_bytes(self._bits[lo_byte:hi_byte + 1], "little")
        whole >>= first & 7
        return (whole & ((1 << (last - first + 1)) - 1)).bit_count()
