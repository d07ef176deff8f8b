"""Per-chunk digests of a disk range: what DiskLoad and verification compare instead of the data.

Design notes
- A digest is BLAKE2b with a 16-byte output over one chunk of a range (the last chunk of a disk
  may be short). A range's digests are one bytes object, DIGEST_SIZE bytes per chunk in order:
  compact to keep, to compare and to send (hex in a control reply).
- Computed where the data is: the mirror node digests the files it has open, the agent digests a
  reference file it can read. A compare is always "digests of a destination range" against
  "digests of a source range", never one function reading both files, so that for a remote
  destination its own agent computes its side and only digests cross the network.
- Holes are not read: a chunk that SEEK_DATA/SEEK_HOLE show to be all hole gets the digest of
  zeroes, so a sparse disk is digested at the speed of its data. Whoever digests a range that a
  guest may write meanwhile handles that race, as for any read: chunk locks in DiskLoad, the
  rewritten map in verification (see nbd_plugin/disk.py).
- The digest is not a security boundary (both sides are ours); 128 bits make an accidental
  collision between a stale and a current chunk negligible.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Iterator, Protocol

DIGEST_SIZE = 16


class Readable(Protocol):
    """What a digest needs of a backend (nbd_plugin.backend.FileBackend has it)."""

    def pread(self, buf: memoryview, offset: int) -> None: ...

    def segments(self, offset: int, count: int) -> Iterator[tuple[int, int, bool]]: ...


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """The digest of `length` zero bytes: what a hole reads as."""
    return digest(bytes(length))


def chunk_digests(backend: Readable, offset: int, count: int, granularity: int) -> bytes:
    """The digests of the chunks of [offset, offset + count), DIGEST_SIZE bytes each.

    `offset` is a multiple of `granularity`; the last chunk ends at offset + count.
    Example: `chunk_digests(FileBackend(path), 0, 1 << 20, 65536)` -> 16 digests, 256 bytes.
    """
    assert offset % granularity == 0 and count >= 0
    end = offset + count
    data = [(o, o + n) for o, n, is_data in backend.segments(offset, count) if is_data]
    out = bytearray()
    buf = memoryview(bytearray(min(granularity, count)))
    pos, i = offset, 0
    while pos < end:
        length = min(granularity, end - pos)
        while i < len(data) and data[i][1] <= pos:
            i += 1
        if i < len(data) and data[i][0] < pos + length:
            backend.pread(buf[:length], pos)
            out += digest(buf[:length])
            pos += length
            continue
        # No data before `stop`: every whole chunk up to it is a hole, digested without a read.
        stop = data[i][0] if i < len(data) else end
        whole = (stop - pos) // granularity
        if whole:
            out += zero_digest(granularity) * whole
            pos += whole * granularity
        else:  # the disk's short last chunk, all hole
            out += zero_digest(length)
            pos += length
    return bytes(out)


def differing(ours: bytes, theirs: bytes) -> Iterator[int]:
    """The indexes of the chunks whose digests differ (both cover the same chunks)."""
    if len(ours) != len(theirs):
        raise ValueError(f"digests of {len(ours) // DIGEST_SIZE} and {len(theirs) // DIGEST_SIZE} chunks")
    if ours == theirs:
        return
    for start in range(0, len(ours), DIGEST_SIZE):
        if ours[start:start + DIGEST_SIZE] != theirs[start:start + DIGEST_SIZE]:
            yield start // DIGEST_SIZE


def byte_ranges(chunks: Iterator[int], offset: int, count: int, granularity: int) -> Iterator[tuple[int, int]]:
    """Consecutive chunk indexes (ascending, relative to `offset`) as (offset, length) byte ranges."""
    end = offset + count
    run: list[int] = []
    for index in chunks:
        if run and index != run[-1] + 1:
            yield _span(run, offset, end, granularity)
            run = []
        run.append(index)
    if run:
        yield _span(run, offset, end, granularity)


def _span(run: list[int], offset: int, end: int, granularity: int) -> tuple[int, int]:
    start = offset + run[0] * granularity
    return start, min(offset + (run[-1] + 1) * granularity, end) - start
