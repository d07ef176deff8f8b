"""Disk backends: where a disk's bytes live, and the copy between two local files.

A disk lives in a local raw file (`FileBackend`, here) or behind an NBD export on another host
(`NbdBackend`, backend_nbd.py). `Backend` is what both offer: the disk, the mirror, the copier,
digest and the switchover use nothing else. `open_backend` picks one by the location's form: an
NBD URI (`nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`) or a file path.

Design notes (the file backend)
- One open file descriptor per backend, shared by every nbdkit connection and the copier. Only
  positional IO is used (pread/pwrite/copy_file_range with offsets, lseek only for SEEK_DATA /
  SEEK_HOLE whose result is its return value), so threads never race on the file offset.
- Durability: `flush` is fdatasync; FUA is a write followed by fdatasync, as nbdkit's own file
  plugin does. There is no O_DIRECT: the page cache is the workload's cache too.
- Sparseness: trim punches a hole; zero punches (when the client allows trimming) or uses
  ZERO_RANGE; `segments` walks data and holes with SEEK_DATA/SEEK_HOLE so the copier skips holes
  and the destination stays sparse. Python's os module has no fallocate with mode bits, hence
  the one ctypes call.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import TYPE_CHECKING, Iterator, Protocol

from .digest import chunk_digests

if TYPE_CHECKING:
    from .backend_nbd import NbdOptions

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
WRITE_BACK_AND_WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
WRITEBACK_SLICE = 8 << 20

_ZEROES = bytes(1 << 20)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with mode bits; raises OSError like the os module does."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_file_range(fd: int, offset: int, count: int, flags: int) -> None:
    """sync_file_range(2); raises OSError like the os module does."""
    if _libc.sync_file_range(fd, offset, count, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_back_in_slices(fd: int, size: int) -> None:
    """Write a file's dirty pages to storage slice by slice, waiting for each (data only, no flush).

    Done before an fdatasync that may face hundreds of MiB: one fdatasync of all of it stalls
    concurrent writers to the file for its whole duration (measured: 155 ms for ~250 MiB), while
    a slice at a time holds them up for one slice at most, and the fdatasync after is small.
    """
    for offset in range(0, size, WRITEBACK_SLICE):
        sync_file_range(fd, offset, WRITEBACK_SLICE, WRITE_BACK_AND_WAIT)


class Backend(Protocol):
    """What a disk's storage offers, local or remote (FileBackend, NbdBackend).

    `path` is where it lives, as given: a file path or an NBD URI (what the served record and
    `status` name). Offsets and counts are in bytes; every error is an OSError with an errno.
    """

    path: str
    size: int
    guest_wait: float | None     # how long a guest's request may wait for this side (None: as long as it takes)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None: ...

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None: ...

    def flush(self) -> None: ...

    def trim(self, count: int, offset: int, fua: bool = False) -> None: ...

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool = False) -> None: ...

    def next_data(self, offset: int) -> int: ...

    def segments(self, offset: int, count: int) -> Iterator[tuple[int, int, bool]]: ...

    def start_write_back(self, offset: int, count: int) -> None: ...

    def write_back(self, offset: int, count: int) -> None: ...

    def write_back_all(self) -> None: ...

    def digests(self, offset: int, count: int, granularity: int) -> bytes: ...

    def check_renamed(self, location: str) -> str | None:
        """None if `location` names what is open (the agent renamed it), else what is wrong with it."""

    def become_primary(self) -> None:
        """The switchover made this destination the disk the guest is served from."""

    def close(self) -> None: ...


def is_nbd_uri(location: str) -> bool:
    """True for an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://), False for a file path."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme in NBD_SCHEMES


def location_problem(location: str) -> str | None:
    """What is wrong with a disk location (a file path or an NBD URI), or None."""
    scheme, sep, _ = location.partition("://")
    if sep and scheme.isascii() and scheme.replace("+", "").isalpha() and scheme not in NBD_SCHEMES:
        return (f"unsupported URI scheme {scheme!r}; use nbd://HOST:PORT/EXPORT, nbds://... (TLS), "
                "nbd+unix:///EXPORT?socket=PATH, nbds+unix://... or a file path")
    return None


def open_backend(location: str, options: NbdOptions | None = None, *, dest: bool = False) -> Backend:
    """The backend for a location: an NBD URI through libnbd, anything else a local file.

    `dest`: a mirror's destination (its requests get the short destination deadline), else the
    disk the guest is served from. Example: `open_backend("nbds://hostb:10809/disk0", options)`.
    """
    if is_nbd_uri(location):
        from .backend_nbd import NbdBackend, NbdOptions   # libnbd only where a disk is remote
        return NbdBackend(location, options or NbdOptions(), dest=dest)
    return FileBackend(location)


class FileBackend:
    """A raw disk image in a local file.

    Example: `FileBackend("/var/lib/vm1/disk0.raw").pread(buf, 0)`
    """

    guest_wait = None     # local storage has no deadline: its errors come back as errors

    def __init__(self, path: str, create_size: int | None = None, readonly: bool = False):
        self.path = path
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if create_size is not None:
            flags |= os.O_CREAT | os.O_EXCL
        self.fd = os.open(path, flags, 0o600)
        if create_size is not None:
            os.ftruncate(self.fd, create_size)
        self.size = os.fstat(self.fd).st_size

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill buf from offset; reading past the end is an error, as NBD forbids it."""
        view = memoryview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"pread: short read at {offset + done} of {self.path}")
            done += n

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        done = os.pwrite(self.fd, buf, offset)
        if done < len(buf):  # a short write (rare): go on from where it stopped
            view = memoryview(buf)
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def start_write_back(self, offset: int, count: int) -> None:
        """Queue this range's dirty pages for writing to storage; return without waiting."""
        sync_file_range(self.fd, offset, count, SYNC_FILE_RANGE_WRITE)

    def write_back(self, offset: int, count: int) -> None:
        """Write this range's dirty pages to storage and wait for them (data only, no cache flush)."""
        sync_file_range(self.fd, offset, count, WRITE_BACK_AND_WAIT)

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
        if fua:
            os.fdatasync(self.fd)

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool = False) -> None:
        """Make the range read as zeroes; with `fast`, fail with ENOTSUP rather than write zeroes."""
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, count)
                break
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        else:
            if fast:
                raise OSError(errno.ENOTSUP, "zero: no fast zero on this file system")
            self._write_zeroes(count, offset)
        if fua:
            os.fdatasync(self.fd)

    def _write_zeroes(self, count: int, offset: int) -> None:
        while count > 0:
            n = min(count, len(_ZEROES))
            self.pwrite(memoryview(_ZEROES)[:n], offset)
            offset += n
            count -= n

    def write_back_all(self) -> None:
        """Make everything written durable: write back slice by slice, then flush (flush_dest, Cleanup)."""
        write_back_in_slices(self.fd, self.size)
        self.flush()

    def digests(self, offset: int, count: int, granularity: int) -> bytes:
        """Per-chunk digests of a range, computed here where the data is (digest.py)."""
        return chunk_digests(self, offset, count, granularity)

    def become_primary(self) -> None:
        """Nothing changes for a file."""

    def check_renamed(self, location: str) -> str | None:
        """None if `location` is this file after a rename (checked by inode), else what is wrong."""
        try:
            st = os.stat(location)
        except OSError:
            return "is not the file the disk has open"
        own = os.fstat(self.fd)
        if (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino):
            return "is not the file the disk has open"
        return None

    def next_data(self, offset: int) -> int:
        """The first offset at or after `offset` holding data, or the size when only a hole follows."""
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
            return self.size

    def segments(self, offset: int, count: int) -> Iterator[tuple[int, int, bool]]:
        """Yield (offset, length, is_data) runs covering [offset, offset+count) from SEEK_DATA/SEEK_HOLE."""
        end = offset + count
        pos = offset
        while pos < end:
            data = min(self.next_data(pos), end)
            if data > pos:
                yield pos, data - pos, False
                pos = data
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            yield pos, hole - pos, True
            pos = hole

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def zero_hole(dest: Backend, offset: int, count: int) -> None:
    """Make dest read zeroes where the source has a hole, allocating nothing.

    A file is punched where it has data (a fresh sparse destination has none: nothing is written);
    an NBD export is sent zeroes that may punch, which its server does for a range without data.
    """
    if not isinstance(dest, FileBackend):
        dest.zero(count, offset, may_trim=True, fast=False)
        return
    for d_off, d_len, d_data in dest.segments(offset, count):
        if d_data:
            dest.trim(d_len, d_off)


def copy_range(src: Backend, dst: Backend, offset: int, count: int) -> None:
    """Copy bytes at the same offset from src to dst: between two files in the kernel
    (copy_file_range, no user-space buffer), else through a buffer."""
    if not (isinstance(src, FileBackend) and isinstance(dst, FileBackend)):
        copy_buffered(src, dst, offset, count)
        return
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src.fd, dst.fd, count - done, offset + done, offset + done)
        except OSError as err:
            # Linux >= 5.19 refuses copies between different filesystem types (EXDEV), and some
            # filesystems do not implement it: copy through a buffer then.
            if err.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            copy_buffered(src, dst, offset + done, count - done)
            return
        if n == 0:
            raise OSError(errno.EIO, f"copy_file_range: no progress at {offset + done} of {src.path}")
        done += n


def copy_buffered(src: Backend, dst: Backend, offset: int, count: int) -> None:
    """copy_range through a buffer, in pieces of at most 1 MiB, one at a time."""
    buf = memoryview(bytearray(min(1 << 20, count)))
    end = offset + count
    while offset < end:
        piece = buf[:min(len(buf), end - offset)]
        src.pread(piece, offset)
        dst.pwrite(piece, offset)
        offset += len(piece)
