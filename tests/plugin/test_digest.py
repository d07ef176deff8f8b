"""Per-chunk digests (nbd_plugin/digest.py), DiskLoad's load run, and the rewritten map of verification.

The races are forced, not hoped for (as in test_copy_race.py): the load run is stopped between its
compare and its write while a guest write arrives, and a guest write is stopped after its data
reached the destination while a verification reads that chunk.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_plugin.backend import FileBackend
from nbd_plugin.copier import PassProgress, copy_pass, load_run
from nbd_plugin.digest import DIGEST_SIZE, chunk_digests, differing
from nbd_plugin.disk import Disk
from nbd_plugin.mirror import Mirror
from nbd_plugin.stats import DiskStats

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def naive_digests(data: bytes, offset: int, count: int, granularity: int) -> bytes:
    return b"".join(hashlib.blake2b(data[pos:min(pos + granularity, offset + count)], digest_size=16).digest()
                    for pos in range(offset, offset + count, granularity))


def write_extents(path: Path, size: int, extents: list[tuple[int, int, int]]) -> bytes:
    """A sparse file of `size` with (offset, length, byte) extents; returns its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, value in extents:
            f.seek(offset)
            f.write(bytes([value]) * length)
            content[offset:offset + length] = bytes([value]) * length
    return bytes(content)


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 64),
       extents=st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8), st.integers(0, 255)), max_size=6),
       shift=st.integers(12, 17), tail=st.sampled_from([0, 512, 4096]))
def test_chunk_digests_equal_hashing_every_chunk(tmp_path_factory, blocks: int, extents, shift: int,
                                                tail: int) -> None:
    """Holes skipped without a read digest exactly as zeroes read would; the short last chunk too."""
    size = blocks * 4 * KiB + tail
    path = tmp_path_factory.mktemp("digest") / "disk.raw"
    content = write_extents(path, size, [(b * 4 * KiB, min(n * 4 * KiB, size - b * 4 * KiB), v)
                                         for b, n, v in extents if b * 4 * KiB < size])
    backend = FileBackend(str(path), readonly=True)
    try:
        granularity = 1 << shift
        for offset in sorted({0, granularity if granularity < size else 0}):
            count = size - offset
            assert chunk_digests(backend, offset, count, granularity) == \
                naive_digests(content, offset, count, granularity)
    finally:
        backend.close()


def test_load_run_copies_only_the_chunks_that_differ(tmp_path: Path) -> None:
    size = 16 * G
    # chunk: 0 same data, 1 differs, 2 source data / dest hole, 3 source hole / dest data,
    # 4..5 same holes, 6 differs in its last byte, 7..15 same data.
    src = write_extents(tmp_path / "src.raw", size, [(0, G, 1), (G, G, 2), (2 * G, G, 3), (6 * G, G, 6),
                                                     (7 * G, 9 * G, 7)])
    write_extents(tmp_path / "dst.raw", size, [(0, G, 1), (G, G, 9), (3 * G, G, 4), (6 * G, G, 6),
                                               (7 * G - 1, 1, 0xEE), (7 * G, 9 * G, 7)])
    source, dest = FileBackend(str(tmp_path / "src.raw")), FileBackend(str(tmp_path / "dst.raw"))
    pool = ThreadPoolExecutor(2)
    mirror = Mirror(dest, "sync", G, size, pool, DiskStats())
    try:
        compared, copied = load_run(source, mirror, 0, 15)
        assert compared == size
        assert copied == 3 * G, "chunks 1, 2 and 6 hold source data that the destination lacks"
        assert (tmp_path / "dst.raw").read_bytes() == src
        assert mirror.map.dirty_count() == 0
    finally:
        pool.shutdown()
        source.close()
        dest.close()


def test_a_load_pass_reports_what_it_compared_and_copied(tmp_path: Path) -> None:
    size = 32 * G
    src = write_extents(tmp_path / "src.raw", size, [(0, 32 * G, 5)])
    write_extents(tmp_path / "dst.raw", size, [(0, 16 * G, 5)])    # the first half was copied before
    source, dest = FileBackend(str(tmp_path / "src.raw")), FileBackend(str(tmp_path / "dst.raw"))
    pool = ThreadPoolExecutor(2)
    stats = DiskStats()
    mirror = Mirror(dest, "sync", G, size, pool, stats)
    progress = PassProgress("load", mirror.map.dirty_bytes())
    try:
        copy_pass(source, mirror, stats, progress, lambda: False)
        assert progress.error is None
        assert (progress.compared_bytes, progress.done_bytes) == (size, 16 * G)
        assert stats.snapshot()["copied_bytes"] == {"bulk": 0, "dirty": 0, "load": 16 * G}
        assert (tmp_path / "dst.raw").read_bytes() == src
    finally:
        pool.shutdown()
        source.close()
        dest.close()


def switched_disk(tmp_path: Path, pool: ThreadPoolExecutor) -> Disk:
    """A disk migrated to tmp_path/dst.raw: copied, switched over."""
    write_extents(tmp_path / "src.raw", 16 * G, [(0, 16 * G, 3)])
    write_extents(tmp_path / "dst.raw", 16 * G, [])
    disk = Disk("disk0", str(tmp_path / "src.raw"))
    disk.install_mirror(str(tmp_path / "dst.raw"), "sync", G, pool)
    copy_pass(disk.primary, disk.mirror, disk.stats, PassProgress("bulk", 16 * G), lambda: False)
    disk.switch(reopen=False)
    return disk


def test_digests_skip_chunks_rewritten_since_the_switchover(tmp_path: Path, monkeypatch) -> None:
    """A guest write whose data is on the destination but whose call has not returned yet: its
    chunk is already marked, so a verification that reads the new data skips the chunk."""
    pool = ThreadPoolExecutor(2)
    disk = switched_disk(tmp_path, pool)
    source = FileBackend(str(tmp_path / "src.raw"), readonly=True)
    writer_thread: list[int] = []
    written, go = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite_then_pause(fd: int, data, offset: int) -> int:
        done = real_pwrite(fd, data, offset)
        if threading.get_ident() in writer_thread:
            written.set()
            go.wait(5)
        return done

    monkeypatch.setattr(os, "pwrite", pwrite_then_pause)

    def guest() -> None:
        writer_thread.append(threading.get_ident())
        disk.pwrite(memoryview(b"\x77" * 4096), 5 * G + 8192, False)

    thread = threading.Thread(target=guest)
    try:
        blob, skipped, tracked = disk.digests(0, 16 * G, G)
        assert tracked and skipped == [] and blob == chunk_digests(source, 0, 16 * G, G)
        thread.start()
        assert written.wait(5), "the guest write never reached the destination"
        blob, skipped, tracked = disk.digests(0, 16 * G, G)
        ours = chunk_digests(source, 0, 16 * G, G)
        assert list(differing(ours, blob)) == [5], "the verification should see the new data"
        assert skipped == [5], "a chunk holding a guest write since switchover was not skipped"
        # A finer digest granularity maps onto the map's chunks (64 KiB here): all of chunk 5.
        _, fine, _ = disk.digests(4 * G, 2 * G, 4096)
        assert fine == list(range(16, 32))
    finally:
        go.set()
        thread.join(5)
        disk.close()
        source.close()
        pool.shutdown()


def test_a_new_mirror_stops_tracking_rewrites(tmp_path: Path) -> None:
    pool = ThreadPoolExecutor(2)
    disk = switched_disk(tmp_path, pool)
    try:
        disk.pwrite(memoryview(b"\x01" * 4096), 0, False)
        disk.finish()
        assert disk.digests(0, G, G)[1:] == ([0], True)
        write_extents(tmp_path / "again.raw", 16 * G, [])
        disk.install_mirror(str(tmp_path / "again.raw"), "sync", G, pool)
        assert disk.rewritten is None
        assert len(disk.digests(0, 2 * G, G)[0]) == 2 * DIGEST_SIZE
    finally:
        disk.close()
        pool.shutdown()
