"""The copier/guest race of chunklock.py, forced deterministically on real files.

The race: the copier reads chunk C from the source, a guest write then updates C on both sides
(the chunk looked clean, since the copier clears its bits before reading), and the copier writes
its older copy over the destination. Stress tests under a random writer rarely catch it: the
kernel's copy_file_range splices page references (a racing write lands in the page being copied),
and later writes heal a stale block before anything compares. Here the copier is stopped between
its read and its write, and the guest write is issued into exactly that gap.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nbd_plugin.backend import FileBackend
from nbd_plugin.copier import copy_run, load_run
from nbd_plugin.mirror import Mirror
from nbd_plugin.stats import DiskStats

KiB, MiB = 1 << 10, 1 << 20
SIZE, GRANULARITY = 1 * MiB, 64 * KiB


# The bulk copy's run, and DiskLoad's (it compared chunk 0, found it differs, and is writing it).
RUNS = {"copy": copy_run, "load": load_run}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_guest_write_into_a_chunk_being_copied_waits_and_is_not_overwritten(
        tmp_path: Path, small_tmpfs, monkeypatch, run: str) -> None:
    src_path = tmp_path / "src.raw"
    src_path.write_bytes(b"\xaa" * SIZE)
    # A destination on another file system: copy_file_range says EXDEV and the copier reads into
    # a buffer and writes it out, which is the gap this test stops it in.
    dst_path = small_tmpfs(8 * MiB) / "dst.raw"
    dst_path.write_bytes(b"\x55" * SIZE)   # older content: a load run finds chunk 0 differs
    source, dest = FileBackend(str(src_path)), FileBackend(str(dst_path))
    pool = ThreadPoolExecutor(2)
    mirror = Mirror(dest, "sync", GRANULARITY, SIZE, pool, DiskStats())
    copier_thread: list[int] = []
    paused, go = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite_pausing_the_copier(fd: int, data, offset: int) -> int:
        if fd == dest.fd and threading.get_ident() in copier_thread and not paused.is_set():
            paused.set()   # the copier has read chunk 0 (old data) and not yet written it
            go.wait(5)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_pausing_the_copier)

    def copier() -> None:
        copier_thread.append(threading.get_ident())
        RUNS[run](source, mirror, 0, 0)

    new = b"\xbb" * (4 * KiB)
    guest_done = threading.Event()

    def guest() -> None:
        mirror.update("pwrite", lambda: source.pwrite(new, 0), lambda: dest.pwrite(new, 0), 0, len(new), False)
        guest_done.set()

    threads = [threading.Thread(target=copier), threading.Thread(target=guest)]
    try:
        threads[0].start()
        assert paused.wait(5), "the copier never reached its write"
        threads[1].start()
        assert not guest_done.wait(0.3), "a guest write went into a chunk while the copier held it"
        go.set()
        for t in threads:
            t.join(5)
        assert guest_done.is_set()
        assert os.pread(dest.fd, len(new), 0) == new, "the copier's older data overwrote the guest write"
        assert os.pread(dest.fd, GRANULARITY - len(new), len(new)) == b"\xaa" * (GRANULARITY - len(new))
    finally:
        go.set()
        for t in threads:
            if t.ident is not None:
                t.join(5)
        pool.shutdown()
        source.close()
        dest.close()


def test_a_copier_run_waiting_for_its_chunks_is_not_overtaken_by_later_guest_writes() -> None:
    """First come, first served among overlapping ops (chunklock.py): while a copier run waits for a
    guest write inside its range, a later guest write into another chunk of that range waits behind
    the run, although its own chunk is free. Else a stream of guest writes starves the copier."""
    from nbd_plugin.chunklock import ChunkLocks

    locks = ChunkLocks()
    first_write = locks.acquire(1, 1)                   # a guest write in flight in chunk 1
    order: list[str] = []
    run_waiting = threading.Event()

    def copier() -> None:
        run_waiting.set()
        held = locks.acquire(0, 3)                      # a run over chunks 0..3: waits for chunk 1
        order.append("run")
        locks.release(held)

    def later_write() -> None:
        held = locks.acquire(2, 2)                      # free now, but the run came first
        order.append("write")
        locks.release(held)

    threads = [threading.Thread(target=copier), threading.Thread(target=later_write)]
    try:
        threads[0].start()
        assert run_waiting.wait(5)
        deadline = time.monotonic() + 5
        while (probe := locks.try_acquire(2, 2)) is not None:   # until the run has its place in line
            locks.release(probe)
            assert time.monotonic() < deadline, "chunk 2 is still handed out while a run waits for it"
            time.sleep(0.005)
        assert locks.try_acquire(5, 5) is not None      # chunks nobody waits for are not held back
        threads[1].start()
        threads[1].join(0.3)
        assert order == [], f"{order}: a later write went ahead of the waiting run"
        locks.release(first_write)
        for t in threads:
            t.join(5)
        assert order == ["run", "write"], order
    finally:
        for t in threads:
            if t.ident is not None:
                t.join(5)
