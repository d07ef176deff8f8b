"""The async mirror's ordering rules (sender.py), forced deterministically against a real NBD server.

The destination is nbdkit's `file` plugin over a Unix socket, so the sender runs several workers,
as it does for a remote destination, and nothing but the per-chunk line orders two sends. The
first send of the guest's older write is held inside its `pwrite` to the destination; then a
newer write to the same chunk arrives by each of the ways that could overtake it: another send
(a free worker), a sync-mode write after a switch, and the copier after the chunk got dirty. Each
test fails on a sender without the per-chunk line or a copier that does not wait for the sends.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from nbd_plugin.backend import FileBackend
from nbd_plugin.backend_nbd import NbdBackend, NbdOptions
from nbd_plugin.copier import copy_run
from nbd_plugin.mirror import Mirror
from nbd_plugin.pipeline import Pipeline
from nbd_plugin.stats import DiskStats

KiB, MiB = 1 << 10, 1 << 20
SIZE, GRANULARITY, WRITE = 1 * MiB, 64 * KiB, 4 * KiB
OLD, NEW = b"\xa1" * WRITE, b"\xb2" * WRITE


class HeldSends:
    """Holds the destination write whose data starts with OLD until `release`; notes when a write
    of NEW starts."""

    def __init__(self, monkeypatch) -> None:
        self.old_started, self.new_started, self._go = threading.Event(), threading.Event(), threading.Event()
        real = NbdBackend.pwrite

        def pwrite(backend, buf, offset, fua=False):
            head = bytes(buf[:1])
            if head == OLD[:1]:
                self.old_started.set()
                self._go.wait(20)
            elif head == NEW[:1]:
                self.new_started.set()
            return real(backend, buf, offset, fua)

        monkeypatch.setattr(NbdBackend, "pwrite", pwrite)

    def release(self) -> None:
        self._go.set()


class Sides:
    """A local source, an NBD destination, and an async mirror on them with every chunk copied."""

    def __init__(self, tmp_path: Path, start_nbd_server, **bounds: int) -> None:
        src = tmp_path / "src.raw"
        src.write_bytes(b"\x11" * SIZE)
        self.dst = tmp_path / "dst.raw"
        self.dst.write_bytes(b"\x00" * SIZE)
        server = start_nbd_server(self.dst, transport="unix")
        self.source = FileBackend(str(src))
        self.dest = NbdBackend(server.uri, NbdOptions(dest_timeout=30.0), dest=True)
        self.pool = ThreadPoolExecutor(2)
        self.stats = DiskStats()
        self.mirror = Mirror(self.dest, "async", GRANULARITY, SIZE, self.pool, self.stats, **bounds)
        for chunk in range(self.mirror.map.chunks):
            copy_run(self.source, self.mirror, chunk, chunk)
        assert self.mirror.map.dirty_count() == 0

    def guest_write(self, data: bytes, offset: int = 0) -> None:
        self.mirror.update("pwrite", lambda: self.source.pwrite(data, offset),
                           lambda: self.dest.pwrite(data, offset), offset, len(data), False, memoryview(data))

    def assert_equal(self) -> None:
        assert self.mirror.drain_sends(time.monotonic() + 20)
        assert self.mirror.map.dirty_count() == 0
        self.dest.flush()
        want = self.source_bytes()
        got = self.dst.read_bytes()
        assert got[:WRITE] == want[:WRITE], f"destination has {got[:1].hex()}.. at 0, the source {want[:1].hex()}.."
        assert got == want

    def source_bytes(self) -> bytes:
        buf = bytearray(SIZE)
        self.source.pread(buf, 0)
        return bytes(buf)

    def close(self) -> None:
        self.mirror.close()
        self.pool.shutdown()
        self.source.close()


@pytest.fixture
def sides(tmp_path: Path, start_nbd_server, monkeypatch) -> Iterator[Callable[..., tuple[Sides, HeldSends]]]:
    made: list[tuple[Sides, HeldSends]] = []

    def make(**bounds: int) -> tuple[Sides, HeldSends]:
        pair = Sides(tmp_path, start_nbd_server, **bounds), HeldSends(monkeypatch)
        made.append(pair)
        return pair

    yield make
    for side, held in made:
        held.release()
        side.close()


def test_a_newer_send_to_a_chunk_waits_for_the_older_one_in_flight(sides) -> None:
    side, held = sides()
    side.guest_write(OLD)
    assert held.old_started.wait(5), "the first send never started"
    side.guest_write(NEW)     # acknowledged: the source has it; its send must queue behind OLD's
    # A free worker would take NEW's send at once; without the line it lands before OLD's.
    overtook = held.new_started.wait(1.0)
    if overtook:
        time.sleep(0.3)       # let the overtaking write land, so that OLD's lands on top of it
    assert side.mirror.sender.status()["pending_requests"] == (1 if overtook else 2)
    held.release()
    side.assert_equal()
    assert not overtook, "a newer send to a chunk started while an older one was in flight"


def test_a_sync_write_after_a_switch_does_not_overtake_a_pending_send(sides) -> None:
    side, held = sides()
    side.guest_write(OLD)
    assert held.old_started.wait(5)
    side.mirror.set_mode("sync")
    side.guest_write(NEW)     # sync would write both sides now: it must leave the chunk to the copier
    assert side.mirror.map.is_dirty(0), "a sync write went to a chunk with a send still pending"
    assert not held.new_started.is_set()
    held.release()
    copy_run(side.source, side.mirror, 0, 0)
    side.assert_equal()


def run_with_copy_run(side: Sides) -> None:
    copy_run(side.source, side.mirror, 0, 0)


def run_with_pipeline(side: Sides) -> None:
    pipeline = Pipeline(side.source, side.mirror)
    pipeline.start(0, 0)
    results = pipeline.drain()
    assert results and results[0].error is None, results


@pytest.mark.parametrize("copier", [run_with_copy_run, run_with_pipeline], ids=["copy_run", "pipeline"])
@pytest.mark.parametrize("dirtied_by", ["dirty mode", "the bound"])
def test_the_copier_waits_for_a_pending_send_to_its_chunks(sides, copier, dirtied_by: str) -> None:
    side, held = sides(async_requests=1) if dirtied_by == "the bound" else sides()
    side.guest_write(OLD)
    assert held.old_started.wait(5)
    if dirtied_by == "dirty mode":
        side.mirror.set_mode("dirty")
    side.guest_write(NEW)     # source only, chunk 0 dirty: the copier will carry NEW
    assert side.mirror.map.is_dirty(0)
    if dirtied_by == "the bound":
        assert side.stats.overflow_bytes == WRITE
    done = threading.Event()
    thread = threading.Thread(target=lambda: (copier(side), done.set()))
    thread.start()
    try:
        # Without the wait the copier copies NEW now and OLD's send lands on top of it later.
        finished_early = done.wait(1.0)
    finally:
        held.release()
        thread.join(20)
    side.assert_equal()
    assert not finished_early, "the copier copied a chunk while an older send to it was in flight"


def test_a_drain_waits_for_the_sends_pending_when_it_began_not_for_later_ones() -> None:
    """flush_dest drains while the guest writes on: it must return once what was pending when it
    began has settled, even though the guest keeps the queue from ever being empty."""
    from nbd_plugin.sender import Send, Sender
    gates = [threading.Event() for _ in range(3)]
    sender = Sender(1, on_sent=lambda n: None, on_failed=lambda send, err: None)
    try:
        for chunk, gate in enumerate(gates[:2]):
            sender.offer(Send(chunk, chunk, chunk * GRANULARITY, WRITE, WRITE, lambda g=gate: g.wait(20) and None))
        drained = threading.Event()
        thread = threading.Thread(target=lambda: sender.drain(time.monotonic() + 20) and drained.set())
        thread.start()
        sender.offer(Send(2, 2, 2 * GRANULARITY, WRITE, WRITE, lambda: gates[2].wait(20) and None))   # later
        assert not drained.wait(0.3), "drained while sends it began with were pending"
        gates[0].set()
        gates[1].set()
        assert drained.wait(5), "the drain waited for a send offered after it began"
        assert sender.status()["pending_requests"] == 1
        thread.join(5)
    finally:
        for gate in gates:
            gate.set()
        sender.stop()
