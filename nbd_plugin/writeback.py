"""Destination writeback: keeps what the mirror writes to destinations flowing to storage.

Design notes
- The problem it solves: the copier and the sync mirror write destinations through the page
  cache. Left alone, a destination collects seconds of dirty pages (the kernel writes them back
  after ~30 s), and the `flush_dest` that must run before the switchover stun then fdatasyncs
  hundreds of MiB. Measured: ~0.4 s at 20 MB/s of guest writes on a 256 MiB disk, during which
  mirrored guest writes stall in the file system's journal.
- What it does: every INTERVAL, for each destination being mirrored, sync_file_range(WRITE) on
  the whole file: start writeback of its dirty pages, wait for nothing. The copier and the guest
  keep writing at page-cache speed; the flush before the switchover finds less to do. Measured
  (256 MiB disk, 4 KiB guest writes at 20 MB/s, flush_dest 0.5 s after the previous one):
  63-69 ms with this thread against 128-144 ms without, the guest's worst write during it
  0.5-7 ms against 11-15 ms. Right after a bulk copy faster than the device it cannot keep up;
  backend.write_back_in_slices bounds the guest's wait there.
- Not durability: fdatasync (flush_dest, guest flushes) still decides what is on storage.
  A writeback error is ignored here: it resurfaces in the next fdatasync, which reports it.
- One thread per VM, a daemon; it reads `disk.mirror` once per round, a reference that changes
  only under a stun, so a mirror dropped meanwhile is at worst written back once more.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

from .backend import start_writeback
from .disk import Disk

INTERVAL_S = 0.2


class DestinationWriteback:
    """Background writeback of every mirroring disk's destination.

    Example: `DestinationWriteback(lambda: vm.disks.values()).start()`
    """

    def __init__(self, disks: Callable[[], Iterable[Disk]], interval: float = INTERVAL_S):
        self._disks = disks
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dest-writeback", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for disk in self._disks():
                mirror = disk.mirror
                if mirror is None:
                    continue
                try:
                    start_writeback(mirror.dest.fd)
                except OSError:
                    pass
