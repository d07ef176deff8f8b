"""The file mirror: a migration's per-VM files and per-disk sidecars, equal to the source's at the cut.

Design notes
- Why a copy and not a mirror node: the VM writes its per-VM files (nvram, config) and its
  disks' sidecars (change tracking) with ordinary file IO, not through NBD, so no mirror node
  sees those writes. A file's mirror is therefore a copy plus the version of the source it was
  copied from, checked again until the switchover: each file is copied to
  DEST/<name>.svmotion-partial early (per-VM files at FileCreate, a sidecar right after its
  disk's mirror is installed at Unstun), what changed is copied again just before the switchover
  stun (outside it, so the stun has little left to do), and under that stun every file is checked
  once more and what changed is copied: the cut. `sync()` is all three; the engine calls it.
- A version is the source's identity (device, inode, size, mtime_ns, ctime_ns) and the SHA-256 of
  the bytes the partial holds. Identity alone misses changes: a write in the same timestamp tick
  as the copy on a file system with coarse timestamps, a write through a shared mapping (no
  timestamp until writeback), an mtime set back by a tool. So a check of a file of up to
  CONTENT_CHECK_BYTES also reads it and compares digests (8 KiB: ~20 us, 1 MiB: ~0.7 ms on the
  project's machine): these are KB-MB files, and the cut stays short. A larger file is read only
  when its identity changed or it is "racy" (git's word): its mtime or ctime is within
  RACY_MARGIN_NS of the last time its content was read, so a later write could carry the same
  timestamps. Otherwise identity decides. Known limit (XXX): a write through a shared mapping
  to such a large file, into a page still dirty from an earlier write, changes no timestamp and
  is missed.
- A change that races the copy: a copy takes the source's identity (fstat) before and after
  reading it and stats the path again (a file renamed over it); a small file is then read a
  second time and the digests compared (a write after the read that left the identity as it
  was). A copy that is not stable is repeated, at most COPY_ATTEMPTS times. The partial then
  holds what was read last and the version says so; before the cut an unstable file is left
  like that (the cut checks it again), at the cut `FileSync.raise_if_unstable()` raises
  FileUnstable and the engine retries the switchover. A file that vanished, is no longer a
  regular file or cannot be read raises FileMirrorError: the migration fails and rolls back; it
  never switches over with a stale file.
- What "at switchover" means. The switchover stun holds the VM's disk requests, not its file
  writes. The cut is the check under the stun, just before the mirror node's `switchover`: the
  destination holds each file as it was when the cut read it, and the migration record says
  which version that was (the `files_cut` step: each file's sha256, with the wall-clock window
  of the cut). After the switchover the VM's files are the destination's (the migration's new
  paths, which the agent saves in paths.json): a VMM stops writing them when it stuns the VM and
  opens them at their new place afterwards. A writer that goes on writing a source file through
  the stun loses what it writes after the cut, as it would writing a source disk after
  switchover: nothing here can hold it.
- Where copies go: `writer` opens a partial for writing, in this host's file system by default,
  or at another host's datastore (agent/destdir.py). Where sources come from: `source` gives
  each source path's FileSource, this host's by default; a file an earlier migration put on
  another host (HOST:PORT:/path) is read through that host's agent, by the same rules (nothing
  on this host writes it, so its copies are stable).
- Durability: copies are not fsynced here (the cut must stay short); the engine fsyncs the
  partials at DiskCopyDone, outside any stun, before renaming them.
- One migration thread owns a FileMirror; it has no lock.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from agent.destdir import FileWriter, local_file_writer
from agent.errors import EXIT_FAILED, SvmotionError
from agent.plan import partial_name

CONTENT_CHECK_BYTES = 1 << 20     # files up to this size are compared by content at every check
RACY_MARGIN_NS = 2_000_000_000    # the coarsest timestamps (FAT: 2 s), and the coarse clock's lag
COPY_ATTEMPTS = 5
PIECE = 1 << 20

Identity = tuple[int, int, int, int, int]     # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns


class FileMirrorError(SvmotionError):
    """A per-VM file or sidecar can no longer be copied: the migration fails (exit 5)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_FAILED)


class FileUnstable(FileMirrorError):
    """A file kept changing while it was copied at the cut: this switchover attempt is off."""


@dataclass
class Version:
    """What a partial holds: the source version it was copied from."""

    identity: Identity
    length: int
    sha256: bytes
    read_ns: int          # wall clock when the source was last read and found to be this version


@dataclass
class _Read:
    """One read of a source, with its identity before and after and the path's identity after."""

    before: Identity
    after: Identity
    path_after: Identity
    mode: int
    length: int           # bytes read
    sha256: bytes
    started_ns: int

    @property
    def stable(self) -> bool:
        return self.before == self.after == self.path_after


@dataclass
class MirroredFile:
    source: str
    final: str
    what: str                        # "per-VM file", "sidecar of disk 'disk0'": for messages
    version: Version | None = None

    @property
    def partial(self) -> str:
        return partial_name(self.final)


@dataclass
class FileSync:
    """The outcome of one `sync()`: per file its digest now, and how many copies it took (0: unchanged)."""

    files: list[dict[str, Any]] = field(default_factory=list)
    unstable: list[MirroredFile] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The fields of the migration record's step (docs/interfaces.md, section 4)."""
        return {"checked": len(self.files), "copied": sum(1 for f in self.files if f["copies"]),
                "unstable": [f.source for f in self.unstable], "files": self.files}

    def raise_if_unstable(self) -> None:
        if self.unstable:
            f = self.unstable[0]
            raise FileUnstable(f"{f.what} {f.source!r} kept changing while it was copied at the switchover "
                               f"stun ({COPY_ATTEMPTS} copies); the VM must not write it during the stun")


class FileSource(Protocol):
    """Where sources are read: this host's files (LocalFiles), or another host's datastore
    (agent/destdir.py DatastoreFiles). The calls of the os module, by path and by handle."""

    def stat(self, path: str) -> Any: ...

    def open(self, path: str) -> Any: ...

    def fstat(self, handle: Any) -> Any: ...

    def read(self, handle: Any, n: int) -> bytes: ...

    def close(self, handle: Any) -> None: ...


class LocalFiles:
    """This host's files."""

    stat = staticmethod(os.stat)
    fstat = staticmethod(os.fstat)
    read = staticmethod(os.read)
    close = staticmethod(os.close)

    @staticmethod
    def open(path: str) -> int:
        # O_NONBLOCK: a FIFO put in the file's place must not hang the migration.
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


LOCAL_FILES = LocalFiles()


def identity(st: Any) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileMirror:
    """The per-VM files and sidecars of one migration.

    Example:
        mirror = FileMirror([("/src/vm1.nvram", "/dst/vm1.nvram", "per-VM file")])
        mirror.sync()                          # copy; later: copy again what changed
        mirror.sync().raise_if_unstable()      # the cut, under the switchover stun

    `after_read` is a test seam: called with the source path after a read of its content and
    before its identity is taken again, it lets a test change the file exactly there.
    """

    def __init__(self, files: Iterable[tuple[str, str, str]],
                 after_read: Callable[[str], None] | None = None,
                 writer: Callable[[str], FileWriter] = local_file_writer,
                 source: Callable[[str], FileSource] = lambda path: LOCAL_FILES):
        self._files = {source: MirroredFile(source, final, what) for source, final, what in files}
        self._after_read = after_read
        self._writer = writer
        self._source = source

    def partials(self, sources: Iterable[str] | None = None, copied: bool = False) -> list[str]:
        """The partial destination paths of `sources` (default: all); `copied`: only those copied."""
        return [f.partial for f in self._select(sources) if f.version is not None or not copied]

    def sync(self, sources: Iterable[str] | None = None) -> FileSync:
        """Copy each file of `sources` (default: all) that was never copied or has changed since."""
        out = FileSync()
        for f in self._select(sources):
            copies = 0
            if f.version is None or self._changed(f):
                copies, stable = self._copy(f)
                if not stable:
                    out.unstable.append(f)
            assert f.version is not None
            out.files.append({"path": f.source, "sha256": f.version.sha256.hex(), "bytes": f.version.length,
                              "copies": copies})
        return out

    # ---- one file --------------------------------------------------------------------------

    def _select(self, sources: Iterable[str] | None) -> list[MirroredFile]:
        return list(self._files.values()) if sources is None else [self._files[s] for s in sources]

    def _changed(self, f: MirroredFile) -> bool:
        """Does the source differ from what the partial holds? Cheap unless small or racy."""
        v = f.version
        assert v is not None
        st = self._on_source(f, self._source(f.source).stat, f.source)
        if identity(st) != v.identity:
            return True
        if st.st_size > CONTENT_CHECK_BYTES and max(st.st_mtime_ns, st.st_ctime_ns) < v.read_ns - RACY_MARGIN_NS:
            return False     # any write since the last read would carry a later timestamp
        read = self._read(f)
        if not self._same(f, read):
            return True
        v.read_ns = read.started_ns
        return False

    def _copy(self, f: MirroredFile) -> tuple[int, bool]:
        """Copy until a copy is stable, at most COPY_ATTEMPTS times: (copies made, stable)."""
        for attempt in range(1, COPY_ATTEMPTS + 1):
            sink = self._writer(f.partial)
            try:
                read = self._read(f, sink)
            except BaseException:
                sink.abandon()
                raise
            sink.finish(read.length, stat.S_IMODE(read.mode))
            f.version = Version(read.before, read.length, read.sha256, read.started_ns)
            if read.stable and (read.before[2] > CONTENT_CHECK_BYTES or self._same(f, self._read(f))):
                return attempt, True
        return COPY_ATTEMPTS, False

    @staticmethod
    def _same(f: MirroredFile, read: _Read) -> bool:
        """Did this read see, from start to end, the version the partial holds?"""
        assert f.version is not None
        return read.stable and read.before == f.version.identity and read.sha256 == f.version.sha256

    def _read(self, f: MirroredFile, sink: FileWriter | None = None) -> _Read:
        """Read the source (into `sink` if given), digesting it; identities around the read."""
        started = time.time_ns()
        source = self._source(f.source)
        fd = self._on_source(f, source.open, f.source)
        try:
            before = self._on_source(f, source.fstat, fd)
            if not stat.S_ISREG(before.st_mode):
                raise FileMirrorError(f"{f.what} {f.source!r} is no longer a regular file; put the file back "
                                      f"and migrate again")
            digest, length = hashlib.sha256(), 0
            while data := self._on_source(f, source.read, fd, PIECE):
                digest.update(data)
                length += len(data)
                if sink is not None:
                    sink.write(data)             # a destination error propagates as it is
            if self._after_read is not None:
                self._after_read(f.source)
            after = self._on_source(f, source.fstat, fd)
        finally:
            source.close(fd)
        path_after = self._on_source(f, source.stat, f.source)
        return _Read(identity(before), identity(after), identity(path_after), before.st_mode, length,
                     digest.digest(), started)

    def _on_source(self, f: MirroredFile, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` on the source; its failure means the file is lost to the migration."""
        try:
            return call(*args)
        except (OSError, SvmotionError) as err:      # SvmotionError: the source's host (FileSource)
            raise self._lost(f, err) from None

    @staticmethod
    def _lost(f: MirroredFile, err: Exception) -> FileMirrorError:
        why = getattr(err, "strerror", None) or err
        return FileMirrorError(f"{f.what} {f.source!r} can no longer be read ({why}); it must "
                               f"stay in place until the migration ends: restore it and migrate again")
