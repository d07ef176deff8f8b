"""One disk of a VM: its state, where its IO goes, and its state changes.

States (DESIGN.md):

    PASSTHROUGH --(stun, install mirror, unstun)--> MIRRORING --(switchover stun)--> SWITCHED
          ^                                              |                             |
          +----------------- abort / rollback -----------+      finish: SWITCHED -> PASSTHROUGH
                                                                 on the destination's path
    CLOSED: legacy stun strategy only, between close (Stun) and reopen with the mirror (Unstun).

Design notes
- `primary` is the authoritative side: the source until switchover, the destination after it.
  Reads and extents come from it alone. `mirror` is set only while MIRRORING.
- `primary`, `mirror` and `state` change only under a drained stun (the VM asserts it), and the
  copier is stopped first; so a data request reads both references once and never sees a half
  state, without a lock on the hot path.
- Errors: an OSError of the source is the guest's error (counted as source:op); destination
  errors are the mirror's business and never reach the guest. That holds whatever the backends
  are (backend.py): a disk served from an NBD export gives the guest that export's errors, and
  ETIMEDOUT (as EIO) when it does not answer within `source-timeout`.
- Where a disk lives: `path` is a file path or an NBD URI; `open_backend` picks the backend,
  with the VM's NbdOptions (TLS material, deadlines) for a URI.
- Rewritten since switchover: from the switchover until the next mirror install, `rewritten`
  (a DirtyMap at the mirror's granularity, all clean at first) records every chunk a guest update
  touched, marked BEFORE the update is issued. A verification (`digests`) reads a chunk and only
  then checks its bit: if what it read holds a guest write, that write was issued after its
  mark, so the chunk is reported skipped; a chunk whose bit is still clear after the read holds
  what the switchover left there. Bits are only ever set, so the check needs no lock.
  Not kept across an nbdkit restart (`tracked: false` then).
"""
from __future__ import annotations

import errno
from time import monotonic
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from .backend import Backend, open_backend
from .copier import CopyJob
from .dirtymap import DirtyMap
from .mirror import Mirror
from .stats import DiskStats

PASSTHROUGH, MIRRORING, SWITCHED, CLOSED = "passthrough", "mirroring", "switched", "closed"

SideOp = Callable[[Backend], None]   # one guest update applied to one side

if TYPE_CHECKING:
    from .backend_nbd import NbdOptions


class Disk:
    """A disk served as one named export."""

    def __init__(self, name: str, path: str, remote: NbdOptions | None = None):
        self.name = name
        self.path = path
        self.remote = remote                       # how NBD URIs are reached (None: defaults)
        self.primary: Backend | None = open_backend(path, remote)
        self.size = self.primary.size
        self.state = PASSTHROUGH
        self.mirror: Mirror | None = None
        self.copy_job: CopyJob | None = None
        self.rewritten: DirtyMap | None = None     # chunks the guest updated since the switchover
        self.prepared: tuple[str, Backend] | None = None   # a destination opened ahead of its stun
        self.retired: Backend | None = None        # the source after the switchover, until `finish`
        self.stats = DiskStats()

    # --- data path: one method per NBD op ---------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        self._source("pread", lambda: self._open().pread(buf, offset))

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        start = monotonic()
        primary = self.primary or self._open()
        if self.mirror is None and self.rewritten is None:
            # Passthrough: the source's own pwrite, no routing call and no closure. The guest's
            # hot path (benchmark case 7), where every bytecode counts; _update does the rest.
            try:
                primary.pwrite(buf, offset, fua)
            except OSError:
                self.stats.error("source", "pwrite")
                raise
        else:
            write = lambda side: side.pwrite(buf, offset, fua)
            self._update("pwrite", write, write, offset, len(buf), fua, buf)
        self.stats.guest_write(len(buf), monotonic() - start)

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        # Fast-zero is the guest's question about the source; the destination just has to zero.
        self._update("zero", lambda side: side.zero(count, offset, may_trim, fast, fua),
                     lambda side: side.zero(count, offset, may_trim, False, fua), offset, count, fua)

    def trim(self, count: int, offset: int, fua: bool) -> None:
        punch = lambda side: side.trim(count, offset, fua)
        self._update("trim", punch, punch, offset, count, fua)

    def _update(self, op: str, on_source: SideOp, on_dest: SideOp, offset: int, count: int,
                fua: bool, payload: memoryview | None = None) -> None:
        """Route one guest update: to the source alone, or through the mirror while MIRRORING."""
        primary, mirror, rewritten = self._open(), self.mirror, self.rewritten
        if rewritten is not None:
            _note_rewrite(rewritten, offset, count)
        try:  # passthrough (the common case) calls the source directly, no closure in between
            if mirror is None:
                on_source(primary)
            else:
                mirror.update(op, lambda: on_source(primary), lambda: on_dest(mirror.dest),
                              offset, count, fua, payload)
        except OSError:  # mirror.update raises only the source's errors
            self.stats.error("source", op)
            raise

    def flush(self) -> None:
        primary, mirror = self._open(), self.mirror
        if mirror is None:
            self._source("flush", primary.flush)
        else:
            self._source("flush", lambda: mirror.flush(primary.flush))

    def extents(self, count: int, offset: int) -> list[tuple[int, int, bool]]:
        return list(self._open().segments(offset, count))

    def _open(self) -> Backend:
        primary = self.primary
        if primary is None:  # only reachable if the gate let a request through a legacy close
            raise OSError(errno.ESHUTDOWN, f"disk {self.name} is closed")
        return primary

    def _source(self, op: str, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError:
            self.stats.error("source", op)
            raise

    # --- state changes: called by the VM under a drained stun ---------------------------------

    def close_files(self) -> None:
        """Legacy Stun: flush and close the disk as today's flow does (Disk_CloseAll)."""
        assert self.state == PASSTHROUGH and self.primary is not None
        self.primary.flush()
        self.primary.close()
        self.primary = None
        self.state = CLOSED

    def reopen_source(self) -> None:
        """Undo a legacy close: back to PASSTHROUGH on the source."""
        if self.primary is None:
            self.primary = open_backend(self.path, self.remote)
        self.state = PASSTHROUGH

    def prepare_mirror(self, dest_path: str) -> None:
        """Open a destination before the stun that installs its mirror: for an NBD URI that is a
        connection and a TLS handshake per link, which must not lengthen the stun."""
        dest = self._open_dest(dest_path)
        self.discard_prepared()
        self.prepared = (dest_path, dest)

    def discard_prepared(self) -> None:
        if self.prepared is not None:
            self.prepared[1].close()
            self.prepared = None

    def _open_dest(self, dest_path: str) -> Backend:
        dest = open_backend(dest_path, self.remote, dest=True)
        if dest.size != self.size:
            dest.close()
            raise ValueError(f"destination {dest_path} has {dest.size} bytes, the disk has {self.size}")
        return dest

    def install_mirror(self, dest_path: str, mode: str, granularity: int, pool: ThreadPoolExecutor,
                       **async_bounds: int) -> None:
        """Start mirroring to the destination (a file path or an NBD URI), the one prepared for it
        if any, else opened now; a closed disk is reopened with the mirror on."""
        assert self.state in (PASSTHROUGH, CLOSED) and self.mirror is None
        if self.prepared is not None and self.prepared[0] == dest_path:
            dest, self.prepared = self.prepared[1], None
        else:
            self.discard_prepared()
            dest = self._open_dest(dest_path)
        if self.primary is None:
            try:
                self.primary = open_backend(self.path, self.remote)
            except OSError:
                dest.close()
                raise
        self.mirror = Mirror(dest, mode, granularity, self.size, pool, self.stats, **async_bounds)
        self.rewritten = None
        self.state = MIRRORING

    def drop_mirror(self) -> None:
        """Abort or rollback: stop copying, close the destination, serve the source alone."""
        self.discard_prepared()
        self.stop_copy()
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        self.reopen_source()

    def switch(self, reopen: bool) -> None:
        """Switchover: the destination becomes the disk; the source is closed and never written again."""
        assert self.state == MIRRORING and self.mirror is not None and self.primary is not None
        # Must be zero: the switchover copied every dirty chunk under this drained stun.
        assert self.mirror.map.dirty_count() == 0, "switch with dirty chunks"
        self.mirror.stop_sends()    # none pending: the switchover drained them under this stun
        dest = self.mirror.dest
        if reopen:  # legacy: today's flow closes the source and reopens the disk at switchover
            self.primary.close()
            dest.flush()
            dest.close()
            dest = open_backend(dest.path, self.remote)
        else:
            # Nothing reaches the source any more; closing it (for an NBD source, each link's
            # disconnect) waits for `finish`, after the stun.
            self.retired = self.primary
            dest.become_primary()
        self.rewritten = DirtyMap(self.size, self.mirror.map.granularity, all_dirty=False)
        self.primary = dest
        self.path = dest.path
        self.mirror = None
        self.state = SWITCHED

    def finish(self) -> None:
        """After switchover: an ordinary disk again, on its new path, ready for another migration."""
        assert self.state == SWITCHED
        self._close_retired()
        self.state = PASSTHROUGH

    def _close_retired(self) -> None:
        if self.retired is not None:
            self.retired.close()
            self.retired = None

    def start_copy(self, kind: str, rate: int) -> None:
        assert self.mirror is not None and self.primary is not None
        if self.copy_job is not None and self.copy_job.running:
            raise RuntimeError(f"disk {self.name}: a {self.copy_job.progress.kind} pass is running")
        self.copy_job = CopyJob(self.primary, self.mirror, self.stats, kind, rate)
        self.copy_job.start()

    def set_copy_rate(self, rate: int) -> None:
        """The running pass's rate from now on (later passes get theirs from `copy`)."""
        if self.copy_job is not None and self.copy_job.running:
            self.copy_job.pace.set(rate)

    def stop_copy(self) -> None:
        if self.copy_job is not None:
            self.copy_job.cancel()

    def copying(self) -> bool:
        return self.copy_job is not None and self.copy_job.running

    def digests(self, offset: int, count: int, granularity: int) -> tuple[bytes, list[int], bool]:
        """Digests of the disk as served, the chunks rewritten since the switchover, whether tracked.

        The caller keeps the disk's files from changing (the VM's control lock)."""
        blob = self._open().digests(offset, count, granularity)
        # Only now, after the read, the bits: see the module notes (rewritten since switchover).
        rewritten = self.rewritten
        if rewritten is None or not rewritten.dirty_count():
            return blob, [], rewritten is not None
        skipped = []
        for index, start in enumerate(range(offset, offset + count, granularity)):
            first, last = rewritten.chunk_range(start, min(granularity, offset + count - start))
            if rewritten.any_dirty(first, last):
                skipped.append(index)
        return blob, skipped, True

    def status(self) -> dict[str, Any]:
        mirror = self.mirror
        return {
            "name": self.name, "state": self.state, "path": self.path, "size": self.size,
            "dest": mirror.dest.path if mirror else None,
            "mode": None, "throttle_seconds": 0.0, "throttle_max_seconds": 0.0, "async": None,
            **(mirror.status() if mirror else {}),
            "granularity": mirror.map.granularity if mirror else None,
            "dirty_bytes": mirror.map.dirty_bytes() if mirror else 0,
            "dirty_map_bytes": mirror.map.memory_bytes() if mirror else 0,
            "mirror_failed": mirror.failed if mirror else None,
            "copy": self.copy_job.status() if self.copy_job else None,
            **self.stats.snapshot(),
        }

    def close(self) -> None:
        self.stop_copy()
        self.discard_prepared()
        self._close_retired()
        if self.mirror is not None:
            self.mirror.close()
        if self.primary is not None:
            self.primary.close()


def _note_rewrite(rewritten: DirtyMap, offset: int, count: int) -> None:
    """Mark an update's chunks in the rewritten map (a one-chunk update already marked costs one test)."""
    if count <= 0:
        return
    first, last = rewritten.chunk_range(offset, count)
    if first != last or not rewritten.is_dirty(first):
        rewritten.mark(first, last)
