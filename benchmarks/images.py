"""Test disk images: dense and sparse raw files, always first written in 64 KiB chunks.

Design notes
- On this kernel the way a file was first written changes how fast it is written later (by up
  to 2.5x): a file laid down with 1 MiB writes and one laid down with 4 KiB writes behave
  differently under the same benchmark. Every image here is therefore written sequentially in
  chunks of exactly CHUNK bytes, so all sides of a comparison start from the same layout.
- The data is incompressible and differs per chunk (a random pool with the offset stamped into
  each chunk), so neither zero detection nor any dedup can shortcut a copy.
- Sparse images: the virtual size comes from truncate (a hole), the data lies in evenly spaced
  extents, so SEEK_DATA/SEEK_HOLE sees many extents rather than one.
"""
from __future__ import annotations

import os
import struct

CHUNK = 64 * 1024
_POOL = os.urandom(1024 * 1024)


def _chunk_at(offset: int) -> bytes:
    """CHUNK bytes of incompressible data, unique to this offset."""
    start = (offset // CHUNK * 7919 * 64) % (len(_POOL) - CHUNK)
    body = bytearray(_POOL[start:start + CHUNK])
    body[:8] = struct.pack("<Q", offset)
    return bytes(body)


def write_data(fd: int, offset: int, length: int) -> None:
    """Write `length` bytes of data at `offset` in CHUNK-sized pwrites (offset, length CHUNK-aligned)."""
    if offset % CHUNK or length % CHUNK:
        raise ValueError(f"image extent {offset}+{length} is not {CHUNK}-aligned; "
                         f"use multiples of {CHUNK}")
    for pos in range(offset, offset + length, CHUNK):
        os.pwrite(fd, _chunk_at(pos), pos)


def make_dense(path: str, size: int) -> str:
    """A fully allocated raw image of `size` bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_data(fd, 0, size)
    finally:
        os.close(fd)
    return path


def make_sparse(path: str, virtual_size: int, data_bytes: int, extents: int = 64) -> str:
    """A raw image of `virtual_size` bytes holding `data_bytes` of data in `extents` spread extents."""
    extent = data_bytes // extents // CHUNK * CHUNK
    if extent <= 0 or extent * extents > virtual_size:
        raise ValueError(f"cannot place {data_bytes} bytes in {extents} extents on a "
                         f"{virtual_size}-byte disk; use fewer extents or more data")
    stride = virtual_size // extents // CHUNK * CHUNK
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, virtual_size)
        for i in range(extents):
            write_data(fd, i * stride, extent)
    finally:
        os.close(fd)
    return path


def make_empty(path: str, size: int) -> str:
    """A sparse raw file of `size` bytes with no data (a destination disk, or a huge idle one)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def allocated_bytes(path: str) -> int:
    """Bytes the filesystem has allocated for the file (what 'stays sparse' is judged by)."""
    return os.stat(path).st_blocks * 512


def files_equal(a: str, b: str, block: int = 4 * 1024 * 1024) -> bool:
    """True when both files have the same size and content."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(block), fb.read(block)
            if x != y:
                return False
            if not x:
                return True
