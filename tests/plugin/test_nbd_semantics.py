"""The mirror node as a plain NBD server, side by side with nbdkit's own `file` plugin.

Each test builds two identical sparse images, serves one with the mirror node (passthrough, no
migration) and the other with `nbdkit file`, applies the same operations through libnbd to
both, and compares what comes back: the bytes, the answers (flags, errnos), the extents, and
how much of each file is allocated (`du`). The file plugin is the reference: what it does on
this filesystem is what a client of an NBD disk expects.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nbd
import pytest

from svlab.writer import BLOCK, VerifyingWriter

MiB = 1024 * 1024
KiB = 1024
SIZE = 16 * MiB
# Data extents of the test image; everything else is a hole.
DATA = [(0, 1 * MiB), (4 * MiB, 192 * KiB), (9 * MiB + 64 * KiB, 64 * KiB), (15 * MiB, 1 * MiB)]


def connect(uri: str, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)        # let the server answer bad requests instead of libnbd
    h.connect_uri(uri)
    return h


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("error", errno) of one client call, for comparing two servers' answers."""
    try:
        return "ok", fn()
    except nbd.Error as err:
        return "error", err.errno


def extents(h: nbd.NBD, size: int) -> list[tuple[int, int, int]]:
    """The whole disk's base:allocation map as (offset, length, flags), adjacent equal runs merged."""
    runs: list[tuple[int, int, int]] = []
    offset = 0
    while offset < size:
        got: list[int] = []

        def collect(context: str, start: int, entries: list[int], err: object) -> int:
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        h.block_status(size - offset, offset, collect)
        assert got, f"block_status at {offset} returned no extent"
        for length, flags in zip(got[::2], got[1::2]):
            length = min(length, size - offset)
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
            else:
                runs.append((offset, length, flags))
            offset += length
    return runs


def allocated(path: Path) -> int:
    """What `du` counts: the bytes the filesystem holds for the file."""
    return os.stat(path).st_blocks * 512


@dataclass
class Pair:
    """The same image behind the mirror node (`ours`) and behind `nbdkit file` (`ref`)."""
    ours_uri: str
    ref_uri: str
    ours_path: Path
    ref_path: Path
    ours: nbd.NBD
    ref: nbd.NBD

    def both(self, op: Callable[[nbd.NBD], Any]) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return outcome(lambda: op(self.ours)), outcome(lambda: op(self.ref))

    def assert_same(self, step: str) -> None:
        """Same bytes through both servers, same extents, same bytes in both files."""
        ours = self.ours.pread(SIZE, 0)
        ref = self.ref.pread(SIZE, 0)
        if ours != ref:
            first = next(i for i in range(0, SIZE, BLOCK) if ours[i:i + BLOCK] != ref[i:i + BLOCK])
            pytest.fail(f"after {step}: content differs from the file plugin's, first at block {first:#x}")
        assert extents(self.ours, SIZE) == extents(self.ref, SIZE), f"after {step}: extents differ"
        assert self.ours_path.read_bytes() == self.ref_path.read_bytes(), f"after {step}: the files differ"


@pytest.fixture
def pair(tmp_path: Path, testlib, start_mirror_node, start_file_server) -> Iterator[Pair]:
    (tmp_path / "ours").mkdir()
    (tmp_path / "ref").mkdir()
    ours_path = testlib.make_sparse_image(tmp_path / "ours" / "disk0.raw", SIZE, DATA)
    ref_path = testlib.make_sparse_image(tmp_path / "ref" / "disk0.raw", SIZE, DATA)
    node = start_mirror_node({"disk0": ours_path})
    ref_uri = start_file_server(ref_path)
    pair = Pair(node.uri("disk0"), ref_uri, ours_path, ref_path, connect(node.uri("disk0")), connect(ref_uri))
    yield pair
    # Disconnect before the servers stop: nbdkit --threads waits for a connected idle client.
    for h in (pair.ours, pair.ref):
        h.shutdown()


def test_handshake_advertises_what_the_file_plugin_does(pair: Pair) -> None:
    for flag in ("get_size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                 "can_multi_conn"):
        ours, ref = getattr(pair.ours, flag)(), getattr(pair.ref, flag)()
        assert ours == ref, f"{flag}: mirror node says {ours}, nbdkit file says {ref}"
    # nbdkit 1.32's file plugin does not advertise fast zero; the mirror node may do better
    # (see test_fast_zero_is_fast_or_refused), but never less.
    assert pair.ours.can_fast_zero() or not pair.ref.can_fast_zero()
    assert pair.ours.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no base:allocation: extents unsupported"


def test_reads_and_extents_of_a_sparse_image(pair: Pair) -> None:
    before = allocated(pair.ours_path)
    pair.assert_same("connect")
    # Holes are reported as holes, data as data, exactly where the image has them.
    runs = extents(pair.ours, SIZE)
    data = [(o, n) for o, n, flags in runs if not flags & nbd.STATE_HOLE]
    assert data == DATA, f"data extents {data}, the image has {DATA}"
    assert allocated(pair.ours_path) == before, "reading allocated blocks: the image is no longer sparse"
    # Odd offsets and lengths read what the file holds.
    with open(pair.ours_path, "rb") as f:
        for offset, length in [(1, 1), (4095, 2), (1 * MiB - 100, 200), (SIZE - 3, 3)]:
            assert pair.ours.pread(length, offset) == os.pread(f.fileno(), length, offset)


# Operations applied in order to both servers; after each: same answer, bytes, extents, files.
STEPS: list[tuple[str, Callable[[nbd.NBD], Any]]] = [
    ("aligned pwrite", lambda h: h.pwrite(b"\x11" * 64 * KiB, 2 * MiB)),
    ("unaligned pwrite", lambda h: h.pwrite(b"\x22" * 3000, 1000)),
    ("pwrite across data and hole", lambda h: h.pwrite(b"\x33" * 128 * KiB, 4 * MiB + 128 * KiB)),
    ("FUA pwrite", lambda h: h.pwrite(b"\x44" * 8 * KiB, 6 * MiB, nbd.CMD_FLAG_FUA)),
    ("flush", lambda h: h.flush()),
    ("aligned trim", lambda h: h.trim(64 * KiB, 15 * MiB)),
    ("unaligned trim", lambda h: h.trim(10000, 15 * MiB + 200 * KiB + 7)),
    ("FUA trim", lambda h: h.trim(128 * KiB, 512 * KiB, nbd.CMD_FLAG_FUA)),
    ("zero that may punch", lambda h: h.zero(256 * KiB, 0)),
    ("zero with NO_HOLE", lambda h: h.zero(64 * KiB, 9 * MiB + 64 * KiB, nbd.CMD_FLAG_NO_HOLE)),
    ("unaligned zero", lambda h: h.zero(5000, 4 * MiB + 10)),
    ("FUA zero", lambda h: h.zero(32 * KiB, 2 * MiB, nbd.CMD_FLAG_FUA)),
    ("zero of a hole", lambda h: h.zero(64 * KiB, 12 * MiB)),
    ("write into a hole", lambda h: h.pwrite(b"\x55" * 4 * KiB, 12 * MiB + 4 * KiB)),
    ("last byte", lambda h: h.pwrite(b"\x66", SIZE - 1)),
    ("flush at the end", lambda h: h.flush()),
]


def test_every_operation_gives_the_file_plugins_answer(pair: Pair) -> None:
    for step, op in STEPS:
        ours, ref = pair.both(op)
        assert ours == ref, f"{step}: mirror node answered {ours}, nbdkit file answered {ref}"
        pair.assert_same(step)
    # Trims and punching zeroes keep the file sparse, block for block like the file plugin's.
    assert allocated(pair.ours_path) == allocated(pair.ref_path), (
        f"du: mirror node's file holds {allocated(pair.ours_path)} bytes, the file plugin's {allocated(pair.ref_path)}")
    assert allocated(pair.ours_path) < SIZE // 2, "the image is no longer sparse"


def fast_zero_or_fallback(h: nbd.NBD, count: int, offset: int) -> str:
    """What a client such as nbdcopy does: try a fast zero, fall back to a plain zero if refused."""
    if h.can_fast_zero():
        try:
            h.zero(count, offset, nbd.CMD_FLAG_FAST_ZERO)
            return "fast"
        except nbd.Error as err:
            assert err.errno == "ENOTSUP", f"fast zero must succeed or fail with ENOTSUP, got {err.errno}"
    h.zero(count, offset)
    return "slow"


def test_fast_zero_is_fast_or_refused(pair: Pair) -> None:
    """A fast zero either zeroes (like a plain zero) or fails with ENOTSUP having changed nothing."""
    for name, count, offset in [("data", 64 * KiB, 15 * MiB + 512 * KiB), ("hole", 64 * KiB, 12 * MiB),
                                ("unaligned", 5000, 4 * MiB + 4097)]:
        before = pair.ours.pread(count, offset)
        if pair.ours.can_fast_zero():
            answer = outcome(lambda: pair.ours.zero(count, offset, nbd.CMD_FLAG_FAST_ZERO))
            assert answer in (("ok", None), ("error", "ENOTSUP")), f"fast zero of {name}: {answer}"
            if answer[0] == "error":
                assert pair.ours.pread(count, offset) == before, f"refused fast zero of {name} changed data"
        assert fast_zero_or_fallback(pair.ours, count, offset) in ("fast", "slow")
        fast_zero_or_fallback(pair.ref, count, offset)
        pair.assert_same(f"fast zero of {name}")


@pytest.mark.parametrize("request_", [
    ("pread past the end", lambda h: h.pread(4096, SIZE - 2048)),
    ("pwrite past the end", lambda h: h.pwrite(b"x" * 4096, SIZE)),
    ("trim past the end", lambda h: h.trim(8192, SIZE - 4096)),
    ("zero past the end", lambda h: h.zero(8192, SIZE - 4096)),
], ids=lambda r: r[0].replace(" ", "-"))
def test_bad_requests_get_the_file_plugins_errno(pair: Pair, request_: tuple[str, Callable]) -> None:
    name, op = request_
    ours, ref = outcome(lambda: op(connect(pair.ours_uri, strict=False))), \
        outcome(lambda: op(connect(pair.ref_uri, strict=False)))
    assert ours == ref, f"{name}: mirror node answered {ours}, nbdkit file answered {ref}"
    assert ours[0] == "error", f"{name} succeeded"
    pair.assert_same(name)


def test_several_connections_see_each_others_flushed_writes(pair: Pair) -> None:
    """multi-conn: a write on one connection, flushed on another, is read by a third."""
    for uri in (pair.ours_uri, pair.ref_uri):
        writer, flusher, reader = connect(uri), connect(uri), connect(uri)
        assert writer.can_multi_conn(), f"{uri}: multi-conn not advertised"
        writer.pwrite(b"\x77" * 4 * KiB, 7 * MiB)
        flusher.flush()
        assert reader.pread(4 * KiB, 7 * MiB) == b"\x77" * 4 * KiB, f"{uri}: write not visible on another connection"


def test_concurrent_connections_write_disjoint_regions(pair: Pair) -> None:
    """Four connections per server write interleaved regions at once; both end up identical."""
    def hammer(uri: str, lane: int) -> None:
        h = connect(uri)
        for i in range(32):
            offset = (i * 4 + lane) * 64 * KiB
            h.pwrite(bytes([lane + 1]) * 32 * KiB, offset, nbd.CMD_FLAG_FUA if i % 8 == 0 else 0)
        h.flush()

    errors: list[BaseException] = []

    def run(uri: str, lane: int) -> None:
        try:
            hammer(uri, lane)
        except BaseException as err:  # collected and re-raised in the test thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(uri, lane), daemon=True)
               for uri in (pair.ours_uri, pair.ref_uri) for lane in range(4)]
    try:
        for t in threads:
            t.start()
    finally:
        for t in threads:
            if t.ident is not None:
                t.join(60)
    assert not any(t.is_alive() for t in threads), "a connection still writing after 60 s"
    assert not errors, errors
    pair.assert_same("concurrent writes")


def test_verifying_writer_over_several_connections(pair: Pair, tmp_path: Path) -> None:
    """Random writes, zeroes and trims, 4 connections x queue depth 8: nothing lost or misplaced."""
    initial = tmp_path / "initial.raw"
    shutil.copyfile(pair.ref_path, initial)     # the content the disk starts with
    writer = VerifyingWriter({"disk0": pair.ours_uri}, initial={"disk0": initial}, connections=4,
                             queue_depth=8, zero_ratio=0.05, trim_ratio=0.05, fua_ratio=0.1, seed=2)
    writer.start()
    try:
        threading.Event().wait(1.5)
    finally:
        report = writer.stop()
    assert not report.errors, report.errors[:5]
    assert report.writes > 100 and report.flushes > 0 and report.fua_writes > 0, report.summary()
    assert writer.verify_nbd("disk0", pair.ours_uri) == []
    assert writer.verify_image("disk0", pair.ours_path) == []


def test_named_exports_serve_each_disk(tmp_path: Path, testlib, start_mirror_node) -> None:
    disks = {name: testlib.make_dense_image(tmp_path / f"{name}.raw", 1 * MiB) for name in ("disk0", "disk1")}
    node = start_mirror_node(disks)
    for export, disk in (("", "disk0"), ("disk0", "disk0"), ("disk1", "disk1")):
        h = connect(node.uri(export))
        assert h.pread(64 * KiB, 0) == disks[disk].read_bytes()[:64 * KiB], f"export {export!r} is not {disk}"
    with pytest.raises(nbd.Error):
        connect(node.uri("nosuchdisk"))
    # The export list names every disk, in disk order.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(node.uri())
    names: list[str] = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    assert names == ["disk0", "disk1"]
