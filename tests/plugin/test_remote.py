"""Remote disks: the mirror node with NBD destinations and NBD-served disks, over TLS.

The other host is nbdkit's own `file` (or `memory`) plugin on a Unix socket or on TCP 127.0.0.1,
with TLS required and the client's certificate verified (tests/nbdremote.py makes the X.509 PKI
with openssl, and a PSK file). The mirror node gets `tls-certificates=DIR` or `tls-psk-file=FILE`
on its command line and URIs as destinations or disks; everything is driven over the control
protocol as the agent does (test_mirror.py's Flow), under the verifying writer. What is checked:
the guest never sees an error, the destination equals the source at switchover and the writer's
model after it, holes stay holes, a destination that stops answering costs the guest one
deadline and fails the mirror, and TLS refuses clients it must refuse.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import nbdremote
import pytest

from agent.jsonlines import RemoteError
from svlab.writer import file_digest
from nbd_plugin.backend import FileBackend
from nbd_plugin.backend_nbd import Channel, NbdBackend, NbdOptions
from nbd_plugin.digest import chunk_digests
from nbd_plugin.mirror import Mirror
from nbd_plugin.pipeline import Pipeline
from nbd_plugin.stats import DiskStats
from nbd_plugin.copier import WRITE_BEHIND_BYTES
from test_mirror import (MIRRORED_OPS, Flow, assert_clean, disk_status, start_writer, unwritten_cache_bytes,
                         wait_copies, wait_writes)

KiB, MiB = 1 << 10, 1 << 20


# ---- helpers ----------------------------------------------------------------------------------

def tls_args(pki, tls: str | None, client: Path | None = None) -> tuple[str, ...]:
    """The mirror node's TLS parameters for a kind of server (None: plain)."""
    if tls == "x509":
        return (f"tls-certificates={client or pki.client}",)
    if tls == "psk":
        return (f"tls-psk-file={pki.psk}",)
    return ()


def options_for(pki, tls: str | None, **timeouts: float) -> NbdOptions:
    if tls == "x509":
        return NbdOptions(tls_certificates=str(pki.client), **timeouts)
    if tls == "psk":
        return NbdOptions(tls_psk_file=str(pki.psk), **timeouts)
    return NbdOptions(**timeouts)


def sparse_file(path: Path, size: int) -> Path:
    """What DiskCreate makes on the destination host: a sparse file of the disk's size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass
class ToExport:
    """A dense local disk0 served by a mirror node, and a sparse TLS export of its size on "host b"."""

    disks: dict[str, Path]
    dest_file: Path
    server: nbdremote.NbdServer
    node: Any
    ctl: Any


def to_export(tmp_path: Path, testlib, pki, start_nbd_server, start_mirror_node, size: int,
              dest_timeout: float | None = None, filters: tuple[str, ...] = ()) -> ToExport:
    """The set-up of the tests of a destination in trouble (`filters`: nbdkit's, on the export)."""
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size)}
    dest_file = sparse_file(tmp_path / "hostb" / "disk0.raw", size)
    server = start_nbd_server(dest_file, transport="tcp", tls="x509", filters=filters)
    timeout = (f"dest-timeout={dest_timeout}",) if dest_timeout is not None else ()
    node = start_mirror_node(disks, lease=2.0, extra=tls_args(pki, "x509") + timeout)
    return ToExport(disks, dest_file, server, node, node.client())


def remote_dests(start_nbd_server, directory: Path, sources: dict[str, Path], transport: str,
                 tls: str | None) -> tuple[dict[str, str], dict[str, Path]]:
    """One remote export per disk, each a sparse file; (URIs, files behind them)."""
    uris, files = {}, {}
    for name, src in sources.items():
        files[name] = sparse_file(directory / f"{name}.raw", src.stat().st_size)
        uris[name] = start_nbd_server(files[name], transport=transport, tls=tls).uri
    return uris, files


def export_extents(uri: str, pki, tls: str | None) -> list[tuple[int, int, int]]:
    """The whole export's base:allocation map as (offset, length, flags), read by a plain libnbd client."""
    h = nbd.NBD()
    if tls == "x509":
        h.set_tls_certificates(str(pki.client))
    elif tls == "psk":
        h.set_tls_psk_file(str(pki.psk))
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    try:
        size, runs, offset = h.get_size(), [], 0
        while offset < size:
            got: list[int] = []

            def collect(context: str, start: int, entries: list[int], err: object) -> int:
                got.extend(entries)
                return 0

            h.block_status(size - offset, offset, collect)
            for i in range(0, len(got), 2):
                length = min(got[i], size - offset)
                if runs and runs[-1][2] == got[i + 1] and runs[-1][0] + runs[-1][1] == offset:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length, got[i + 1])
                else:
                    runs.append((offset, length, got[i + 1]))
                offset += length
        return runs
    finally:
        h.shutdown()


def data_ranges(extents: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The ranges an extent map says hold data (not reading as zeroes)."""
    return [(off, length) for off, length, flags in extents if not flags & nbd.STATE_ZERO]


def differing_pieces(uri: str, path: Path, piece: int = MiB) -> list[int]:
    """Offsets of the MiB pieces where a plain NBD export and a file differ."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        with open(path, "rb") as f:
            return [off for off in range(0, size, piece)
                    if h.pread(min(piece, size - off), off) != os.pread(f.fileno(), min(piece, size - off), off)]
    finally:
        h.shutdown()


def stop_node(processes, node) -> None:
    for c in node.clients:
        c.close()
    node.clients.clear()
    processes.stop(node.proc)


# ---- the backend itself ----------------------------------------------------------------------------

BACKEND_OPS: list[tuple[str, Any]] = [
    ("unaligned pwrite", lambda b: b.pwrite(b"\x22" * 3000, 1000)),
    ("FUA pwrite across chunks", lambda b: b.pwrite(b"\x33" * 100 * KiB, 4 * MiB + 60 * KiB, True)),
    ("pwrite into a hole", lambda b: b.pwrite(b"\x44" * 4 * KiB, 12 * MiB + 4 * KiB)),
    ("zero that may punch", lambda b: b.zero(128 * KiB, 4 * MiB, True, False)),
    ("zero with no hole", lambda b: b.zero(64 * KiB, 9 * MiB + 64 * KiB, False, False)),
    ("unaligned zero, FUA", lambda b: b.zero(5000, 15 * MiB + 300 * KiB + 10, True, False, True)),
    ("trim", lambda b: b.trim(64 * KiB, 15 * MiB)),
    ("trim of a whole data extent", lambda b: b.trim(1 * MiB, 0)),
    ("flush", lambda b: b.flush()),
]


@pytest.mark.parametrize("transport,tls", [("unix", None), ("tcp", "x509"), ("unix", "psk")])
def test_the_nbd_backend_does_what_the_file_backend_does(tmp_path: Path, testlib, pki, start_nbd_server,
                                                         transport: str, tls: str | None) -> None:
    """Every op of the Backend interface, on an NBD export and on a file: same bytes, same holes."""
    size = 16 * MiB
    data = [(0, 1 * MiB), (4 * MiB, 192 * KiB), (9 * MiB + 64 * KiB, 64 * KiB), (15 * MiB, 1 * MiB)]
    (tmp_path / "remote").mkdir()
    remote_img = testlib.make_sparse_image(tmp_path / "remote" / "disk0.raw", size, data)
    local_img = testlib.make_sparse_image(tmp_path / "disk0.raw", size, data)
    server = start_nbd_server(remote_img, transport=transport, tls=tls)
    ours, ref = NbdBackend(server.uri, options_for(pki, tls)), FileBackend(str(local_img))
    try:
        assert ours.size == ref.size == size and ours.path == server.uri
        for name, op in BACKEND_OPS:
            op(ours), op(ref)
        assert list(ours.segments(0, size)) == list(ref.segments(0, size))
        assert list(ours.segments(4 * MiB + 10, 3 * MiB)) == list(ref.segments(4 * MiB + 10, 3 * MiB))
        for offset in (0, 1 * MiB, 4 * MiB + 200 * KiB, 12 * MiB + 8 * KiB, 15 * MiB + 1):
            assert ours.next_data(offset) == ref.next_data(offset), offset
        got, want = bytearray(40 * MiB // 16), bytearray(40 * MiB // 16)
        for offset in (0, 3 * MiB + 7, 13 * MiB):
            ours.pread(got, offset), ref.pread(want, offset)
            assert got == want, f"pread at {offset}"
        assert ours.digests(0, size, 64 * KiB) == ref.digests(0, size, 64 * KiB) == \
            chunk_digests(ref, 0, size, 64 * KiB)
        with pytest.raises(OSError) as err:
            ours.pread(bytearray(8192), size - 4096)          # past the end: the server's error, an errno
        assert err.value.errno
        ours.write_back_all()
    finally:
        ours.close()
        ref.close()
    assert testlib.same_content(remote_img, local_img) == []
    assert testlib.allocated_bytes(remote_img) <= testlib.allocated_bytes(local_img) + 64 * KiB


def test_concurrent_requests_are_in_flight_together(tmp_path: Path, pki, start_nbd_server) -> None:
    """16 threads write 64 blocks while the server delays every write by 100 ms: in flight
    together on the shared links they take a few delays, one after another on a handle's lock
    they would take 6.4 s. With multi-conn the backend opens more links beside the first."""
    img = sparse_file(tmp_path / "d.raw", 16 * MiB)
    server = start_nbd_server(img, transport="unix", tls="x509", filters=("--filter=delay", "wdelay=100ms"))
    backend = NbdBackend(server.uri, options_for(pki, "x509"))
    try:
        deadline = time.monotonic() + 5
        while len(backend._links) < 4:          # the opener thread adds links beside the first
            assert time.monotonic() < deadline, "no links opened beside the first"
            time.sleep(0.01)
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: backend.pwrite(bytes([i]) * 4096, i * 4096), range(64)))
        elapsed = time.monotonic() - start
    finally:
        backend.close()
    with open(img, "rb") as f:
        assert all(f.read(4096) == bytes([i]) * 4096 for i in range(64))
    assert elapsed < 2.0, f"64 writes of 100 ms each from 16 threads took {elapsed:.2f} s"


# ---- migrations to a remote destination ------------------------------------------------------

@pytest.mark.parametrize("transport,tls,mode,strategy", [
    ("tcp", "x509", "sync", "optimized"),
    ("unix", "x509", "dirty", "optimized"),
    ("unix", "psk", "sync", "legacy"),
    ("tcp", "x509", "dirty", "legacy"),
])
def test_live_migration_to_a_remote_destination(vm_factory, tmp_path: Path, testlib, pki, start_nbd_server,
                                                start_mirror_node, processes, transport: str, tls: str,
                                                mode: str, strategy: str) -> None:
    """Two disks to two TLS exports under the writer; equal at switchover, served from there after,
    the served record names the URIs, and a restarted mirror node serves them from there."""
    size = 8 * MiB
    src = tmp_path / "src"
    src.mkdir()
    disks = {f"disk{i}": testlib.make_dense_image(src / f"disk{i}.raw", size) for i in range(2)}
    state = tmp_path / "vm1.served.json"
    # (Servers before the node: teardown stops the newest first, and a server waits for its clients.)
    uris, files = remote_dests(start_nbd_server, tmp_path / "hostb", disks, transport, tls)
    node = start_mirror_node(disks, extra=tls_args(pki, tls) + (f"state={state}",))
    ctl = node.client()
    flow = Flow(ctl, disks, uris, strategy, mode, rate=4 * size)
    writer = start_writer(node, connections=2, queue_depth=4, zero_ratio=0.03, trim_ratio=0.03)
    try:
        wait_writes(writer, 20)
        flow.install()
        for name, disk in disk_status(ctl).items():
            assert (disk["state"], disk["dest"], disk["mirror_failed"]) == ("mirroring", uris[name], None), disk
        flow.copy("bulk")
        wait_writes(writer, 20)
        flow.converge()
        source_hashes: dict[str, str] = {}

        def at_switchover() -> None:
            for name in disks:
                assert testlib.same_content(disks[name], files[name]) == [], f"{name}: differs at switchover"
                source_hashes[name] = file_digest(disks[name])
            time.sleep(0.05)

        flow.switchover(at_switchover)
        assert json.loads(state.read_text())["disks"] == uris, "the served record must name the exports"
        for name, disk in disk_status(ctl).items():
            assert (disk["state"], disk["path"]) == ("switched", uris[name]), disk
        wait_writes(writer, 40)
        ctl.call("finish")
        wait_writes(writer, 10)
    finally:
        report = writer.stop()
    assert_clean(writer, report, files)
    for name in disks:
        assert file_digest(disks[name]) == source_hashes[name], f"{name}: the source was written after switchover"
    # nbdkit restarted on what the record says: the disks are served from the remote exports.
    stop_node(processes, node)
    served = json.loads(state.read_text())["disks"]
    again = start_mirror_node(served, extra=tls_args(pki, tls))
    assert [d["path"] for d in again.client().call("hello")["disks"]] == [uris["disk0"], uris["disk1"]]
    for name in disks:
        assert writer.verify_nbd(name, again.uri(name)) == []


@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
def test_every_update_kind_reaches_a_remote_destination(tmp_path: Path, testlib, pki, start_mirror_node,
                                                        start_nbd_server, start_file_server, mode: str) -> None:
    """Unaligned writes, FUA, zeroes with and without holes, trims, flushes, before and after the
    bulk copy: the remote destination ends as nbdkit file's copy of the same ops, and as sparse."""
    size = 16 * MiB
    data = [(0, 1 * MiB), (4 * MiB, 192 * KiB), (9 * MiB + 64 * KiB, 64 * KiB), (15 * MiB, 1 * MiB)]
    for d in ("src", "ref"):
        (tmp_path / d).mkdir()
    disks = {"disk0": testlib.make_sparse_image(tmp_path / "src" / "disk0.raw", size, data)}
    ref_path = testlib.make_sparse_image(tmp_path / "ref" / "disk0.raw", size, data)
    uris, files = remote_dests(start_nbd_server, tmp_path / "hostb", disks, "unix", "x509")
    node = start_mirror_node(disks, extra=tls_args(pki, "x509"))
    ours, ref = nbd.NBD(), nbd.NBD()
    ours.connect_uri(node.uri("disk0"))
    ref.connect_uri(start_file_server(ref_path))
    flow = Flow(node.client(), disks, uris, mode=mode, granularity=16 * KiB)
    try:
        flow.install()
        for name, op in MIRRORED_OPS[:5]:
            op(ours), op(ref)
        flow.copy("bulk")
        for name, op in MIRRORED_OPS[5:] + MIRRORED_OPS[:5]:
            op(ours), op(ref)
        flow.converge()
        flow.switchover(lambda: None)
        ours.flush(), ref.flush()
    finally:
        ours.shutdown(), ref.shutdown()
    assert testlib.same_content(files["disk0"], ref_path) == [], "the remote destination differs from the reference"
    assert testlib.allocated_bytes(files["disk0"]) <= testlib.allocated_bytes(ref_path) + 256 * KiB


# ---- a disk served from a remote export ----------------------------------------------------------

@pytest.mark.parametrize("to", ["local", "remote"])
def test_a_disk_served_from_a_remote_export_and_migrated_from_it(tmp_path: Path, testlib, pki, processes,
                                                                 start_nbd_server, start_mirror_node,
                                                                 to: str) -> None:
    """The mirror node started on an nbds:// disk: the guest's IO, extents and digests go there;
    then the disk moves under the writer to a local file (remote -> local) or to another export
    (remote -> remote), and a restarted node serves it from its new place."""
    size = 8 * MiB
    (tmp_path / "hosta").mkdir()
    origin = testlib.make_dense_image(tmp_path / "hosta" / "disk0.raw", size)
    home = start_nbd_server(origin, transport="tcp", tls="x509")
    node = start_mirror_node({"disk0": home.uri}, extra=tls_args(pki, "x509"))
    ctl = node.client()
    assert ctl.call("hello")["disks"] == [{"name": "disk0", "path": home.uri, "size": size}]
    if to == "local":
        dest = sparse_file(tmp_path / "local" / "disk0.raw", size)
        target, dest_file = str(dest), dest
    else:
        target_uris, target_files = remote_dests(start_nbd_server, tmp_path / "hostc", {"disk0": origin},
                                                 "unix", "x509")
        target, dest_file = target_uris["disk0"], target_files["disk0"]
    writer = start_writer(node, connections=2, queue_depth=4, zero_ratio=0.05, trim_ratio=0.05)
    try:
        wait_writes(writer, 30)
        digest = ctl.call("digest", disk="disk0", granularity=1 * MiB, count=1 * MiB)
        assert len(digest["digests"]) == 32
        flow = Flow(ctl, {"disk0": origin}, {"disk0": target}, granularity=32 * KiB, rate=4 * size)
        flow.install()
        flow.copy("bulk")
        flow.converge()

        def equal() -> None:
            assert testlib.same_content(origin, dest_file) == [], "differs at switchover"

        flow.switchover(equal)
        wait_writes(writer, 30)
        ctl.call("finish")
    finally:
        report = writer.stop()
    assert_clean(writer, report, {"disk0": dest_file})
    stop_node(processes, node)
    again = start_mirror_node({"disk0": target}, extra=tls_args(pki, "x509"))
    assert writer.verify_nbd("disk0", again.uri("disk0")) == []


def test_a_remote_served_disk_reports_the_exports_errors_to_the_guest(tmp_path: Path, pki, start_nbd_server,
                                                                      start_mirror_node) -> None:
    """The source is authoritative: an error of a remote disk reaches the guest, as a file's does."""
    server = start_nbd_server(memory=1 * MiB, transport="unix", tls="x509")
    node = start_mirror_node({"disk0": server.uri}, extra=tls_args(pki, "x509") + ("source-timeout=1",))
    h = nbd.NBD()
    h.connect_uri(node.uri("disk0"))
    try:
        h.pwrite(b"\1" * 4096, 0)
        server.freeze()
        start = time.monotonic()
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"\2" * 4096, 4096)
        waited = time.monotonic() - start
        server.thaw()
        assert err.value.errnum == errno.EIO, err.value
        assert 0.9 < waited < 2.5, f"the guest waited {waited:.2f} s for a 1 s source deadline"
        h.pwrite(b"\3" * 4096, 8192)                  # a new link once the export answers again
        assert h.pread(4096, 8192) == b"\3" * 4096 and h.pread(4096, 0) == b"\1" * 4096
    finally:
        server.thaw()
        h.shutdown()
    assert node.client().call("status")["disks"]["disk0"]["errors"].get("source:pwrite") == 1


# ---- the pipelined copier ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async", "dirty"])
def test_ping_pong_between_a_local_and_a_remote_disk_under_a_hammering_writer(
        tmp_path: Path, testlib, pki, start_nbd_server, start_mirror_node, mode: str) -> None:
    """Back and forth between a local file and a TLS export while the writer hammers a hot region
    with small chunks: every pipelined run (file -> NBD, NBD -> file) races many guest writes, and
    every switchover compares both sides under the stun."""
    size = 8 * MiB
    (tmp_path / "src").mkdir()
    local = testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size)
    remote = sparse_file(tmp_path / "hostb" / "disk0.raw", size)
    server = start_nbd_server(remote, transport="tcp", tls="x509")
    node = start_mirror_node({"disk0": local}, extra=tls_args(pki, "x509"))
    ctl = node.client()
    here, there = (local, str(local)), (remote, server.uri)     # (file, location) of each side
    writer = start_writer(node, connections=4, queue_depth=8, rate=None, max_write=64 * KiB,
                          hot_region=(0, 2 * MiB), hot_ratio=0.8, fua_ratio=0.1)
    try:
        for round_ in range(4):
            if round_:                       # the side we leave gets a fresh sparse destination
                with open(there[0], "r+b") as f:
                    f.truncate(0)
                    f.truncate(size)
            flow = Flow(ctl, {"disk0": here[0]}, {"disk0": there[1]}, mode=mode, granularity=16 * KiB)
            flow.install()
            flow.copy("bulk")
            flow.converge()

            def compare() -> None:
                assert testlib.same_content(here[0], there[0]) == [], f"round {round_}: differs at switchover"

            flow.switchover(compare)
            ctl.call("finish")
            assert disk_status(ctl)["disk0"]["path"] == there[1]
            here, there = there, here
            wait_writes(writer, 20)
    finally:
        report = writer.stop()
    assert_clean(writer, report, {"disk0": here[0]})


@pytest.mark.parametrize("stop_at", ["before the write is issued", "while the write is in flight"])
def test_a_guest_write_into_a_pipelined_run_waits_for_it(tmp_path: Path, pki, start_nbd_server, monkeypatch,
                                                         stop_at: str) -> None:
    """test_copy_race.py's race with an NBD destination: the copier read chunk 0 (old data) and its
    write to the destination is held back (not yet issued; or issued to a frozen server). A guest
    write into chunk 0 must wait for the run; afterwards the destination holds the guest's data."""
    size, granularity = 1 * MiB, 64 * KiB
    src_path = tmp_path / "src.raw"
    src_path.write_bytes(b"\xaa" * size)
    dst_path = sparse_file(tmp_path / "hostb" / "dst.raw", size)
    server = start_nbd_server(dst_path, transport="unix", tls="x509")
    source = FileBackend(str(src_path))
    dest = NbdBackend(server.uri, options_for(pki, "x509", dest_timeout=20.0), dest=True)
    pool = ThreadPoolExecutor(2)
    mirror = Mirror(dest, "sync", granularity, size, pool, DiskStats())
    issued, go = threading.Event(), threading.Event()
    if stop_at == "before the write is issued":
        real_pwrite = Channel.pwrite

        def held_pwrite(self, buf, offset, done, cap=None):
            issued.set()
            go.wait(10)
            return real_pwrite(self, buf, offset, done, cap)

        monkeypatch.setattr(Channel, "pwrite", held_pwrite)
    else:
        server.freeze()
    pipeline = Pipeline(source, mirror)
    results: list = []

    def copier() -> None:
        pipeline.start(0, 0)
        issued.set()
        results.extend(pipeline.drain())

    new = b"\xbb" * (4 * KiB)
    guest_done = threading.Event()

    def guest() -> None:
        mirror.update("pwrite", lambda: source.pwrite(new, 0), lambda: dest.pwrite(new, 0), 0, len(new), False)
        guest_done.set()

    threads = [threading.Thread(target=copier), threading.Thread(target=guest)]
    try:
        threads[0].start()
        assert issued.wait(5), "the copier never reached its write"
        threads[1].start()
        time.sleep(0.3)
        assert os.pread(source.fd, 4, 0) == b"\xaa" * 4, "a guest write went into a chunk the copier held"
        assert not guest_done.is_set()
        go.set()
        server.thaw()
        for t in threads:
            t.join(15)
        assert guest_done.is_set() and results and results[0].error is None, results
        with open(dst_path, "rb") as f:
            assert f.read(len(new)) == new, "the copier's older data overwrote the guest write"
            assert f.read(granularity - len(new)) == b"\xaa" * (granularity - len(new))
    finally:
        go.set()
        server.thaw()
        for t in threads:
            if t.ident is not None:
                t.join(15)
        pool.shutdown()
        source.close()
        dest.close()


def test_a_pipelined_run_that_must_wait_lets_its_runs_in_flight_go_first(tmp_path: Path, pki, start_nbd_server) -> None:
    """The copier has run 1 (chunk 0) in flight to a frozen destination; a guest write straddling
    chunks 0 and 1 waits in line for it; the copier's next run (chunk 1) is behind that write.
    Waiting there while holding run 1, whose completion only the copier runs, would deadlock:
    the pipeline drains run 1 first (chunklock.py, pipeline.py), and all three finish."""
    size, granularity = 1 * MiB, 64 * KiB
    src_path = tmp_path / "src.raw"
    src_path.write_bytes(b"\xaa" * size)
    dst_path = sparse_file(tmp_path / "hostb" / "dst.raw", size)
    server = start_nbd_server(dst_path, transport="unix", tls="x509")
    source = FileBackend(str(src_path))
    dest = NbdBackend(server.uri, options_for(pki, "x509", dest_timeout=20.0), dest=True)
    pool = ThreadPoolExecutor(2)
    mirror = Mirror(dest, "sync", granularity, size, pool, DiskStats())
    pipeline = Pipeline(source, mirror)
    first_issued, guest_in_line, guest_done = threading.Event(), threading.Event(), threading.Event()
    results: list = []
    new, at = b"\xbb" * (4 * KiB), granularity - 2 * KiB

    def copier() -> None:
        pipeline.start(0, 0)
        first_issued.set()
        guest_in_line.wait(10)
        pipeline.start(1, 1)
        results.extend(pipeline.drain())

    def guest() -> None:
        mirror.update("pwrite", lambda: source.pwrite(new, at), lambda: dest.pwrite(new, at), at, len(new), False)
        guest_done.set()

    server.freeze()
    threads = [threading.Thread(target=copier, daemon=True), threading.Thread(target=guest, daemon=True)]
    try:
        threads[0].start()
        assert first_issued.wait(5)
        threads[1].start()
        deadline = time.monotonic() + 5
        while (probe := mirror.locks.try_acquire(1, 1)) is not None:    # until the guest is in line
            mirror.locks.release(probe)
            assert time.monotonic() < deadline, "the guest write never queued for chunks 0..1"
            time.sleep(0.005)
        guest_in_line.set()
        time.sleep(0.3)
        assert not guest_done.is_set()
        server.thaw()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "copier and guest wait for each other"
        assert [r.error for r in results] == [None, None], results
        # The write found chunk 1 not yet copied: source only, both chunks marked; run 2 then
        # copied chunk 1 with it, and chunk 0 waits for the next pass.
        assert mirror.map.is_dirty(0) and not mirror.map.is_dirty(1)
        again = Pipeline(source, mirror)
        again.start(0, 0)
        assert [r.error for r in again.drain()] == [None]
        with open(dst_path, "rb") as f:
            assert f.read(2 * granularity) == b"\xaa" * at + new + b"\xaa" * (2 * granularity - at - len(new))
    finally:
        guest_in_line.set()
        server.thaw()
        for t in threads:
            if t.ident is not None:
                t.join(10)
        pool.shutdown()
        source.close()
        dest.close()


@pytest.mark.parametrize("case", ["fresh file", "file with stale data", "memory"])
def test_a_sparse_source_stays_sparse_on_a_remote_destination(tmp_path: Path, testlib, pki, start_nbd_server,
                                                              start_mirror_node, case: str) -> None:
    """Holes are sent as zero requests that may punch: the destination's block status shows holes
    where the source has them, even where it held stale data, and du agrees for a file."""
    size = 64 * MiB
    data = [(0, 256 * KiB), (5 * MiB, 64 * KiB), (20 * MiB + 4 * KiB, 8 * KiB), (63 * MiB, 1 * MiB)]
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_sparse_image(tmp_path / "src" / "disk0.raw", size, data)}
    if case == "memory":
        server, dest_file = start_nbd_server(memory=size, transport="unix", tls="x509"), None
    else:
        dest_file = sparse_file(tmp_path / "hostb" / "disk0.raw", size)
        if case == "file with stale data":
            testlib.make_dense_image(dest_file, size, random_data=True)
        server = start_nbd_server(dest_file, transport="tcp", tls="x509")
    node = start_mirror_node(disks, extra=tls_args(pki, "x509"))
    flow = Flow(node.client(), disks, {"disk0": server.uri})
    flow.install()
    flow.copy("bulk")
    flow.switchover(lambda: None)
    extents = export_extents(server.uri, pki, "x509")
    covered = sum(length for _, length in data_ranges(extents))
    assert covered <= sum(n for _, n in data) + 4 * 64 * KiB, f"data on the destination: {data_ranges(extents)}"
    if dest_file is not None:
        assert testlib.same_content(disks["disk0"], dest_file) == []
        assert testlib.allocated_bytes(dest_file) <= testlib.allocated_bytes(disks["disk0"]) + 256 * KiB
    else:
        assert differing_pieces(node.uri("disk0"), disks["disk0"]) == [], "the node now serves other bytes"


def test_a_sparse_remote_source_stays_sparse_on_a_local_destination(tmp_path: Path, testlib, pki,
                                                                    start_nbd_server, start_mirror_node) -> None:
    size = 32 * MiB
    data = [(0, 128 * KiB), (7 * MiB, 64 * KiB), (31 * MiB, 1 * MiB)]
    (tmp_path / "hosta").mkdir()
    origin = testlib.make_sparse_image(tmp_path / "hosta" / "disk0.raw", size, data)
    home = start_nbd_server(origin, transport="unix", tls="x509")
    node = start_mirror_node({"disk0": home.uri}, extra=tls_args(pki, "x509"))
    dest = sparse_file(tmp_path / "local" / "disk0.raw", size)
    flow = Flow(node.client(), {"disk0": origin}, {"disk0": dest})
    flow.install()
    flow.copy("bulk")
    flow.switchover(lambda: None)
    assert testlib.same_content(origin, dest) == []
    assert testlib.allocated_bytes(dest) <= testlib.allocated_bytes(origin) + 256 * KiB


def test_a_load_pass_to_a_remote_partial_copies_only_what_differs(tmp_path: Path, testlib, pki,
                                                                  start_nbd_server, start_mirror_node) -> None:
    """DiskLoad with the partial disk on the other host: digests of both sides (the remote's read
    over NBD for now), only the differing chunks copied."""
    size, granularity = 8 * MiB, 64 * KiB
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size)}
    partial = tmp_path / "hostb" / "disk0.raw"
    partial.parent.mkdir()
    partial.write_bytes(disks["disk0"].read_bytes())
    with open(partial, "r+b") as f:                     # what the failed migration left different
        for chunk in (3, 40, 41, 127):
            f.seek(chunk * granularity + 100)
            f.write(b"stale")
    server = start_nbd_server(partial, transport="tcp", tls="x509")
    node = start_mirror_node(disks, extra=tls_args(pki, "x509"))
    flow = Flow(node.client(), disks, {"disk0": server.uri}, granularity=granularity)
    flow.install()
    copy = flow.copy("load")["disk0"]["copy"]
    assert copy["compared_bytes"] == size and copy["done_bytes"] == 4 * granularity, copy
    flow.switchover(lambda: None)
    assert testlib.same_content(disks["disk0"], partial) == []


def test_the_bulk_copy_to_a_remote_destination_leaves_little_unwritten(tmp_path: Path, testlib, pki,
                                                                        start_nbd_server, start_mirror_node) -> None:
    """Write-behind over NBD (backend_nbd.py): flushes in flight beside the copy keep what the
    destination host has not written to storage within the window, as for a local destination."""
    size = 4 * WRITE_BEHIND_BYTES
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size, random_data=True)}
    dest_file = sparse_file(tmp_path / "hostb" / "disk0.raw", size)
    server = start_nbd_server(dest_file, transport="unix", tls="x509")
    node = start_mirror_node(disks, extra=tls_args(pki, "x509"))
    flow = Flow(node.client(), disks, {"disk0": server.uri})
    flow.install()
    flow.copy("bulk")
    left = unwritten_cache_bytes(dest_file)
    assert left <= WRITE_BEHIND_BYTES + 1 * MiB, \
        f"{left >> 20} MiB of the {size >> 20} MiB copy not yet written back on the destination host"
    flow.switchover(lambda: None)
    assert testlib.same_content(disks["disk0"], dest_file) == []


# ---- a destination that stops answering -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("during", ["mirrored writes", "the bulk copy"])
def test_a_destination_that_stops_answering_fails_the_mirror_not_the_guest(
        tmp_path: Path, testlib, pki, start_nbd_server, start_mirror_node, during: str, mode: str) -> None:
    """A frozen destination (SIGSTOP: its connections stay open, nothing answers), as on a dead
    link: guest writes complete within the destination deadline plus a margin, without error;
    the mirror is failed, the switchover refused, and the abort brings back the plain source."""
    dest_timeout = 0.5
    site = to_export(tmp_path, testlib, pki, start_nbd_server, start_mirror_node, 16 * MiB, dest_timeout)
    disks, server, node, ctl = site.disks, site.server, site.node, site.ctl
    flow = Flow(ctl, disks, {"disk0": server.uri}, mode=mode, rate=4 * MiB)
    writer = start_writer(node, connections=2, queue_depth=4, rate=4 * MiB, fua_ratio=0.1, flush_ratio=0.05)
    try:
        flow.install()
        if during == "mirrored writes":
            flow.rate = 0
            flow.copy("bulk")            # every chunk clean: the guest's writes go to both sides
        else:
            ctl.call("copy", kind="bulk", rate=flow.rate)   # 4 s at 4 MiB/s: still copying below
        wait_writes(writer, 30)
        before = writer.snapshot()
        server.freeze()
        frozen_at = time.monotonic()
        wait_writes(writer, 100, timeout=10)
        disk = wait_copies(ctl, timeout=10)["disk0"]
        assert disk["mirror_failed"] and "stopped answering" in disk["mirror_failed"], disk["mirror_failed"]
        if during == "the bulk copy":
            assert disk["copy"]["error"], disk["copy"]
        assert time.monotonic() - frozen_at < 10
        stun_id = ctl.call("stun", kind="switchover")["stun_id"]
        with pytest.raises(RemoteError, match="stopped answering"):
            ctl.call("switchover", stun_id=stun_id)
        ctl.call("abort", stun_id=stun_id)
        record = ctl.call("unstun", stun_id=stun_id)["stun"]
        assert record["duration_seconds"] < 1.0, f"the abort held the guest {record['duration_seconds']:.2f} s"
        assert disk_status(ctl)["disk0"]["state"] == "passthrough"
        wait_writes(writer, 30)
    finally:
        server.thaw()
        report = writer.stop()
    assert not report.errors, f"the guest saw errors: {report.errors[:3]}"
    assert report.writes > before.writes + 100
    assert report.longest_stall < dest_timeout + 0.75, \
        f"the guest stalled {report.longest_stall:.2f} s with a {dest_timeout} s destination deadline"
    assert_clean(writer, report, disks)


def test_a_guest_flush_alone_on_a_dead_link_waits_one_deadline(tmp_path: Path, testlib, pki, start_nbd_server,
                                                                start_mirror_node) -> None:
    """Nothing but the guest's flush is in flight when the destination freezes: the flush returns
    within the destination deadline (not the backend's longer flush deadline), the mirror failed."""
    dest_timeout = 0.5
    site = to_export(tmp_path, testlib, pki, start_nbd_server, start_mirror_node, 4 * MiB, dest_timeout)
    server, node, ctl = site.server, site.node, site.ctl
    flow = Flow(ctl, site.disks, {"disk0": server.uri})
    flow.install()
    flow.copy("bulk")                    # all clean: nothing of the copier's is in flight below
    guest = nbd.NBD()
    guest.connect_uri(node.uri("disk0"))
    try:
        guest.pwrite(b"x" * 4096, 0)     # reaches both sides
        server.freeze()
        t0 = time.monotonic()
        guest.flush()
        waited = time.monotonic() - t0
    finally:
        server.thaw()
        guest.shutdown()
    assert waited < dest_timeout + 0.75, f"the guest's flush waited {waited:.2f} s"
    assert "flush did not complete" in disk_status(ctl)["disk0"]["mirror_failed"]
    ctl.call("abort")


# ---- TLS: who is refused --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["no client certificate", "a certificate from another CA", "a plaintext client"])
def test_tls_refuses_a_client_it_must_refuse(tmp_path: Path, testlib, pki, start_nbd_server, start_mirror_node,
                                             case: str) -> None:
    """install_mirror to a TLS export with verified client certificates: refused with one line naming
    the export, nothing written there, the disk still served from its source."""
    size = 4 * MiB
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size)}
    extra = {"no client certificate": (), "a certificate from another CA": tls_args(pki, "x509", pki.other_client),
             "a plaintext client": tls_args(pki, "x509")}[case]
    dest_file = sparse_file(tmp_path / "hostb" / "disk0.raw", size)
    server = start_nbd_server(dest_file, transport="tcp", tls="x509")
    node = start_mirror_node(disks, extra=extra)
    ctl = node.client()
    uri = server.uri.replace("nbds://", "nbd://") if case == "a plaintext client" else server.uri
    stun_id = ctl.call("stun")["stun_id"]
    with pytest.raises(RemoteError) as refused:
        ctl.call("install_mirror", stun_id=stun_id, disks={"disk0": {"dest": uri}})
    ctl.call("unstun", stun_id=stun_id)
    error = refused.value.reply["error"]
    assert "\n" not in error and uri in error, error
    assert disk_status(ctl)["disk0"]["state"] == "passthrough"
    assert testlib.allocated_bytes(dest_file) == 0, "something was written to the refused export"


def test_bad_remote_locations_are_refused(tmp_path: Path, testlib, pki, start_mirror_node, sock_dir,
                                          processes) -> None:
    size = 4 * MiB
    (tmp_path / "src").mkdir()
    disks = {"disk0": testlib.make_dense_image(tmp_path / "src" / "disk0.raw", size)}
    node = start_mirror_node(disks, extra=tls_args(pki, "x509"))
    ctl = node.client()
    stun_id = ctl.call("stun")["stun_id"]
    for dest, says in [("http://hostb/disk0", "unsupported URI scheme 'http'"),
                       (f"nbds+unix:///?socket={sock_dir}/nobody.sock", "cannot connect")]:
        with pytest.raises(RemoteError, match=says):
            ctl.call("install_mirror", stun_id=stun_id, disks={"disk0": {"dest": dest}})
    ctl.call("unstun", stun_id=stun_id)
    assert disk_status(ctl)["disk0"]["state"] == "passthrough"
    # On the command line: nbdkit refuses to start, with one line saying why.
    for disk, extra, says in [
            ("ftp://hostb/disk0", (), "unsupported URI scheme 'ftp'"),
            (f"nbds+unix:///?socket={sock_dir}/nobody.sock", tls_args(pki, "x509"), "cannot connect"),
            (str(disks["disk0"]), (f"tls-certificates={tmp_path}",), "cannot read ca-cert.pem"),
            (str(disks["disk0"]), ("dest-timeout=5", "lease=2"), "well under the stun lease")]:
        log = tmp_path / "refused.log"
        log.unlink(missing_ok=True)
        cmd = testlib.mirror_node_command("vm2", sock_dir / "vm2.nbd", sock_dir / "vm2.ctl", {"disk0": disk}, None, extra)
        proc = processes.spawn(cmd, log=log, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
        assert proc.wait(20) != 0
        assert says in log.read_text(), log.read_text()[-1500:]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_destination_that_returns_eio_fails_the_mirror_not_the_guest(
        tmp_path: Path, testlib, pki, start_nbd_server, start_mirror_node, mode: str) -> None:
    """A destination whose writes start failing with EIO (nbdkit's error filter, switched on by a
    file) during the bulk copy: the guest sees no error, the mirror is failed, the abort brings
    back the plain source with everything the guest wrote."""
    trigger = tmp_path / "eio-now"
    site = to_export(tmp_path, testlib, pki, start_nbd_server, start_mirror_node, 16 * MiB,
                     filters=("--filter=error", "error-pwrite=EIO", "error-pwrite-rate=100%",
                              f"error-pwrite-file={trigger}"))
    disks, server, node, ctl = site.disks, site.server, site.node, site.ctl
    flow = Flow(ctl, disks, {"disk0": server.uri}, mode=mode, rate=4 * MiB)
    writer = start_writer(node, connections=2, queue_depth=4, rate=4 * MiB, fua_ratio=0.1, flush_ratio=0.05)
    try:
        flow.install()
        ctl.call("copy", kind="bulk", rate=flow.rate)   # 4 s at 4 MiB/s: still copying below
        wait_writes(writer, 30)
        trigger.touch()
        disk = wait_copies(ctl, timeout=10)["disk0"]
        assert disk["mirror_failed"] or disk["copy"]["error"], disk
        assert "Input/output error" in str(disk["mirror_failed"] or disk["copy"]["error"]), disk
        ctl.call("abort")
        assert disk_status(ctl)["disk0"]["state"] == "passthrough"
        wait_writes(writer, 30)
    finally:
        report = writer.stop()
    assert not report.errors, f"the guest saw errors: {report.errors[:3]}"
    assert_clean(writer, report, disks)


def test_a_prepared_destination_is_connected_before_the_stun(tmp_path: Path, testlib, pki, start_nbd_server,
                                                            start_mirror_node) -> None:
    """prepare_mirror opens the export outside the stun; install_mirror under the stun then needs no
    new connection: it succeeds while the export is frozen (a new TLS handshake could not). An
    install to another destination, or an abort, closes what was prepared."""
    site = to_export(tmp_path, testlib, pki, start_nbd_server, start_mirror_node, 4 * MiB, 0.5)
    server, ctl = site.server, site.ctl
    spec = {"disk0": {"dest": server.uri}}
    ctl.call("prepare_mirror", disks=spec)
    server.freeze()
    try:
        stun_id = ctl.call("stun")["stun_id"]
        ctl.call("install_mirror", stun_id=stun_id, disks=spec)
        ctl.call("unstun", stun_id=stun_id)
        assert disk_status(ctl)["disk0"]["state"] == "mirroring"
        ctl.call("abort")
        # Nothing prepared now: the same install must connect, and a frozen export cannot answer.
        stun_id = ctl.call("stun")["stun_id"]
        with pytest.raises(RemoteError, match=server.uri):
            ctl.call("install_mirror", stun_id=stun_id, disks=spec)
        ctl.call("unstun", stun_id=stun_id)
    finally:
        server.thaw()
    assert disk_status(ctl)["disk0"]["state"] == "passthrough"
    stun_id = ctl.call("stun")["stun_id"]
    ctl.call("install_mirror", stun_id=stun_id, disks=spec)
    ctl.call("unstun", stun_id=stun_id)
    with pytest.raises(RemoteError, match="not passthrough"):
        ctl.call("prepare_mirror", disks=spec)      # a mirror is installed already
    ctl.call("abort")


def test_a_slow_destination_whose_queue_outlasts_the_deadline_is_not_dead(tmp_path: Path, start_nbd_server) -> None:
    """A server rate-limited to 1 MiB/s, 4 MiB of writes queued at once on a 0.5 s destination
    deadline: the last answer comes seconds after it was asked for, but answers keep coming, so
    no request is late (backend_nbd.py, deadlines); the same server frozen is found dead."""
    dst = sparse_file(tmp_path / "hostb" / "dst.raw", 8 * MiB)
    server = start_nbd_server(dst, transport="unix", filters=("--filter=rate", "rate=8M"))
    dest = NbdBackend(server.uri, NbdOptions(dest_timeout=0.5), dest=True)
    errors: list[OSError] = []

    def write(i: int) -> None:
        try:
            dest.pwrite(bytes([i + 1]) * (256 * KiB), i * 256 * KiB)
        except OSError as err:
            errors.append(err)

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(write, range(16)))
        took = time.monotonic() - t0
        assert not errors, f"a slow but answering destination was taken for dead: {errors[0]}"
        assert took > 2.0, f"the rate filter did not slow the writes ({took:.2f} s): the test proves nothing"
        with open(dst, "rb") as f:
            assert all(f.read(256 * KiB) == bytes([i + 1]) * (256 * KiB) for i in range(16))
        server.freeze()
        t0 = time.monotonic()
        with pytest.raises(OSError) as dead:
            dest.pwrite(b"\xee" * 4096, 0)
        assert dead.value.errno == errno.ETIMEDOUT and time.monotonic() - t0 < 0.5 + 1.0
    finally:
        server.thaw()
        dest.close()
