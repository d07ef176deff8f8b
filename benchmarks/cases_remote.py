"""The remote cases of issue 11: destinations, and disks, behind NBD exports over mutual TLS.

Design notes
- The other host is this machine over TCP 127.0.0.1 (remote.py): its datastore export is the
  command line agent/export.py runs, TLS required and the client's certificate verified. What
  these cases measure is therefore TLS, the NBD protocol and the mirror node's pipelines, with
  the network reduced to loopback, except in remote_shaped.
- Same harness as cases.py: the mirror node is driven over its control socket (svm.py), the
  guest is the open-loop writer (loadgen.py), repetitions are interleaved where two systems
  are compared, every server is started and stopped by PID, every case works in its own
  directory.
- remote_shaped puts the two hosts in network namespaces joined by a veth (svlab/netns.py) and
  shapes host a's sending side with TBF: the copy's data flows a -> b, so the shaping limits
  the migration, and the way back (b -> a, untimed) is not shaped.
- Every timed migration starts from the same situation. The switchover case (and the anchor)
  start a fresh mirror node and a fresh guest on the same local disk for each migration: a
  guest that was served from the other host, or by a migration from it, carries a backlog at
  loads near what that path can carry (the ceiling rows measure it), which would land in the
  next migration's figures. The remote-disk case keeps one mirror node per disk count, as case
  2 does, and migrates between two exports in turn (or to local files and back, untimed).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from agent.jsonlines import RemoteError
from svlab.netns import Host, Lab

from . import images, procs, tools
from .cases import (LOAD_RATE, Context, install_wait, many_disks_command, size_label, stun_window_wait,
                    strategy_runs, switchover_wait)
from .loadgen import LoadGen, Trace
from .qemu_mirror import mirror_run
from .remote import (Export, Pki, make_pki, mirror_node_tls, timed_backend, timed_handshake, tls_export,
                     tls_uri)
from .report import Case
from .stats import ratio, summarize
from .svm import Dest, Migration, MirrorNodeDriver, Place

STUN_TARGET = 0.010          # the switchover stun target, seconds
BULK_TARGET = 0.8            # svmotion / nbdcopy
HANDSHAKES = 20              # samples of one client's connect + TLS + NBD handshake
AFTER_SECONDS = 1.0          # the guest on the destination after the move, for its latency
CAPACITY_SECONDS = 2.0       # a max-rate writer through the mirror node, to show its ceiling


@contextlib.contextmanager
def remote_site(ctx: Context, case: Case, name: str) -> Iterator[tuple[str, Pki]]:
    """The case's work directory and the site's certificates, their command stated."""
    with ctx.workdir(name) as work:
        pki = make_pki(os.path.join(work, "pki"))
        case.command(pki.command)
        yield work, pki


# --- remote_bulk --------------------------------------------------------------------------------

# nbdcopy held to the copier's parallelism (nbd_plugin/pipeline.py: one link, 16 requests of
# 256 KiB in flight): what one TLS stream carries here, beside what nbdcopy's 4 connections do.
ONE_STREAM = ("--connections=1", "--requests=16", "--request-size=262144")


def nbdcopy_to_export(source: str, export: Export, pki: Pki, options: tuple[str, ...] = ()) -> tuple[float, str]:
    """nbdcopy from `source` to a fresh file behind `export`, flushed at its end; (seconds, the
    copy). The destination export must exist with the source's size, as DiskCreate makes it."""
    copy = images.make_empty(os.path.join(export.directory, "nbdcopy.raw"), os.path.getsize(source))
    argv = tools.nbdcopy_argv(source, tls_uri(export.uri("nbdcopy.raw"), pki), flush=True)
    argv[1:1] = options
    start = time.monotonic()
    tools.run(argv, timeout=600)
    return time.monotonic() - start, copy


def case_remote_bulk(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_bulk", "Bulk copy to another host over TLS",
                f"svmotion bulk copy, local file -> nbds:// export, >= {BULK_TARGET}x nbdcopy from the "
                "same file to the same export (dense and sparse)")
    sources: dict[str, Callable[[str], str]] = {
        f"{size_label(cfg.remote_bulk_disk)} dense":
            lambda p: images.make_dense(p, cfg.remote_bulk_disk),
        f"{size_label(cfg.sparse_virtual)} sparse with {size_label(cfg.sparse_data)} data":
            lambda p: images.make_sparse(p, cfg.sparse_virtual, cfg.sparse_data),
    }
    with remote_site(ctx, case, "remote_bulk") as (work, pki), tls_export(work, pki, "datastore-b") as export:
        case.command(export.service.command)
        for label, make in sources.items():
            source = make(os.path.join(work, "disk0.raw"))
            seconds: dict[str, list[float]] = {"nbdcopy": [], "svmotion": [], "nbdcopy, one stream": []}
            allocated: dict[str, list[float]] = {tool: [] for tool in seconds}
            equal: dict[str, bool] = {}

            def keep(tool: str, copy: str) -> None:
                allocated[tool].append(images.allocated_bytes(copy))
                if tool not in equal:  # the first copy of each tool is compared with the source
                    equal[tool] = images.files_equal(source, copy)

            with ctx.mirror_node(work, {"disk0": source}, extra=mirror_node_tls(pki)) as (node, drv, _):
                case.command(node.command + "  # then control: stun; install_mirror dest=nbds://...; "
                             "unstun; copy kind=bulk rate=0; flush_dest (timed until it returns); abort")
                for _ in range(cfg.remote_bulk_reps):
                    took, copy = nbdcopy_to_export(source, export, pki)
                    seconds["nbdcopy"].append(took)
                    keep("nbdcopy", copy)
                    os.unlink(copy)
                    seconds["svmotion"].append(drv.bulk_copy_only(
                        place=export.place, check=lambda dests: keep("svmotion", dests["disk0"].file)))
                    took, copy = nbdcopy_to_export(source, export, pki, ONE_STREAM)
                    seconds["nbdcopy, one stream"].append(took)
                    keep("nbdcopy, one stream", copy)
                    os.unlink(copy)
            argv = tools.nbdcopy_argv(source, tls_uri(export.uri("nbdcopy.raw"), pki), flush=True)
            case.command(" ".join(argv))
            case.command(" ".join(argv[:1] + list(ONE_STREAM) + argv[1:]) + "  # the copier's parallelism")
            data = images.allocated_bytes(source)
            os.unlink(source)
            for tool in seconds:
                case.add(f"{label}: {tool}, seconds until durable", seconds[tool], "s")
                case.add(f"{label}: {tool}, data rate (allocated source bytes / s)",
                         [data / s for s in seconds[tool]], "B/s")
                case.add(f"{label}: {tool}, copy's allocated bytes", allocated[tool], "B")
                case.notes.append(f"{label}: {tool}'s first copy equals the source: {equal.get(tool)}")
            median = {tool: summarize(samples)["median"] for tool, samples in seconds.items()}
            case.verdict(f"{label}: svmotion / nbdcopy rate (medians)", ratio(median["nbdcopy"], median["svmotion"]),
                         BULK_TARGET, "higher", "ratio")
            case.notes.append(f"{label}: svmotion / nbdcopy held to one stream, rate (medians): "
                              f"{ratio(median['nbdcopy, one stream'], median['svmotion']):.3f}x")
    case.notes.append("Every copy is timed until durable on the other host: nbdcopy with --flush "
                      "(an NBD flush on each connection), svmotion until flush_dest has returned "
                      "(the copy, then an NBD flush). All reach the export over TCP 127.0.0.1 with "
                      "TLS; nbdkit's file plugin advertises multi-conn, so nbdcopy opens 4 connections. "
                      "The mirror node's copier keeps its stream on one link (16 requests of 256 KiB "
                      "in flight, nbd_plugin/pipeline.py); 'nbdcopy, one stream' is nbdcopy held to "
                      "the same.")
    return case


# --- remote_switchover --------------------------------------------------------------------------

@contextlib.contextmanager
def export_dest(export: Export, source: str) -> Iterator[Dest]:
    """A fresh destination file of the source's size behind `export`, removed on the way out."""
    target = images.make_empty(os.path.join(export.directory, "disk0.raw"), os.path.getsize(source))
    try:
        yield export.place.dest(target)
    finally:
        os.unlink(target)


Moved = tuple[Migration, Trace | None] | str   # a migration and its guest, or why it failed


def svmotion_move(ctx: Context, case: Case, work: str, source: str, pki: Pki, rate: float | None,
                  dest: Callable[[], contextlib.AbstractContextManager[Dest]]) -> Moved:
    """One migration of the local disk `source` to the destination `dest()` makes, by a fresh
    mirror node under a fresh guest (None: idle), which goes on for AFTER_SECONDS on the
    destination; the source is kept for the next one. A migration that fails (a destination
    request past its deadline fails the mirror, by design) is returned as its error: the
    mirror node, and with it the failed migration, is discarded."""
    with dest() as target, ctx.mirror_node(work, {"disk0": source}, extra=mirror_node_tls(pki)) as (node, drv, sock):
        case.command(node.command)
        lg = None
        if rate is not None:
            lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=rate).start()
            case.command(lg.command)
        try:
            time.sleep(ctx.cfg.pre_seconds if lg else 0)
            try:
                m = drv.migrate(keep_old=True, dests={"disk0": target})
            except (RuntimeError, RemoteError) as err:
                return f"{type(err).__name__}: {err}"
            if lg is None:
                return m, None
            time.sleep(AFTER_SECONDS)
            return m, lg.stop()
        finally:
            if lg is not None:
                lg.kill()


def successful_moves(case: Case, label: str, count: int, move: Callable[[], Moved]
                     ) -> list[tuple[Migration, Trace | None]]:
    """`count` successful migrations, at most twice as many attempts; failures go to the notes."""
    done: list[tuple[Migration, Trace | None]] = []
    failures: list[str] = []
    while len(done) < count and len(done) + len(failures) < 2 * count:
        result = move()
        if isinstance(result, str):
            failures.append(result)
        else:
            done.append(result)
    if failures:
        case.notes.append(f"{label}: {len(failures)} of {len(done) + len(failures)} migrations failed, "
                          f"first: {failures[0]}")
    return done


def case_remote_switchover(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_switchover", "Switchover stun, destination on another host",
                f"switchover stun p99 <= {STUN_TARGET * 1e3:g} ms, local disk -> nbds:// export, idle and "
                f"under 20 MB/s 4 KiB random writes (>= 30 migrations each)")
    loads = (("idle", None), ("10 MB/s", LOAD_RATE / 2), ("20 MB/s", LOAD_RATE))
    with remote_site(ctx, case, "remote_switchover") as (work, pki), \
            tls_export(work, pki, "datastore-b") as export:
        case.command(export.service.command)
        disk = images.make_dense(os.path.join(work, "disk0.raw"), cfg.stun_disk)
        for label, rate in loads:
            runs = successful_moves(case, label, cfg.remote_migrations,
                                    lambda: svmotion_move(ctx, case, work, disk, pki, rate,
                                                          lambda: export_dest(export, disk)))
            _switchover_rows(case, label, runs)
            case.verdict(f"switchover stun p99 in the plugin, {label}",
                         summarize([m.switchover.duration for m, _ in runs])["p99"], STUN_TARGET, "lower", "s")
            if rate == LOAD_RATE:
                case.verdict(f"switchover guest-visible wait (stun..finish) p99, {label}",
                             summarize([stun_window_wait(t, m) for m, t in runs])["p99"], STUN_TARGET,
                             "lower", "s")
        _ceiling_rows(ctx, case, work, pki, export)
    case.command("per migration (control socket): stun kind=mirror_install; install_mirror "
                 "dest=nbds://127.0.0.1:PORT/disk0.raw; unstun; copy kind=bulk; flush_dest; "
                 "stun kind=switchover; switchover; unstun; finish")
    case.notes.append(f"{size_label(cfg.stun_disk)} dense local disk, optimized strategy, sync mirror. "
                      "Every migration is made by a fresh mirror node from the same local disk, under a "
                      f"fresh guest started {cfg.pre_seconds:g} s before it and kept writing for "
                      f"{AFTER_SECONDS:g} s after it (on the other host by then).")
    return case


def _ceiling_rows(ctx: Context, case: Case, work: str, pki: Pki, export: Export) -> None:
    """What the guest path can carry at all: max-rate 4 KiB writes, QD 8, for CAPACITY_SECONDS,
    through the mirror node with the disk here or there, and straight to the export (the paced
    load is judged against these)."""
    size = ctx.cfg.stun_disk
    for where, file, location in (
            ("through the mirror node, disk on a local file", os.path.join(work, "ceiling.raw"), None),
            ("through the mirror node, disk on the other host (nbds://)",
             os.path.join(export.directory, "ceiling.raw"), export.uri("ceiling.raw")),
            ("straight to the other host's export (libnbd, no mirror node)",
             os.path.join(export.directory, "ceiling.raw"), export.uri("ceiling.raw"))):
        images.make_dense(file, size)
        with contextlib.ExitStack() as stack:
            if where.startswith("straight"):
                lg = LoadGen([location], os.path.join(work, "ceiling"), rate=0, tls_certificates=pki.client)
            else:
                node, _, sock = stack.enter_context(ctx.mirror_node(
                    work, {"disk0": location or file}, vm="ceiling", files={"disk0": file},
                    extra=mirror_node_tls(pki)))
                case.command(node.command)
                lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "ceiling"), rate=0)
            case.command(lg.command)
            stack.callback(lg.kill)
            lg.start()
            time.sleep(CAPACITY_SECONDS)
            trace = lg.stop()
        os.unlink(file)
        window = (trace.meta["start"] + 0.2, trace.meta["stopped"])
        case.add(f"ceiling: max-rate writes {where}: rate", [trace.throughput(*window)], "B/s")
        case.add(f"ceiling: max-rate writes {where}: latency", trace.latencies(*window), "s")


def _switchover_rows(case: Case, label: str, runs: list[tuple[Migration, Trace | None]]) -> None:
    ms = [m for m, _ in runs]
    loaded = [(m, t) for m, t in runs if t is not None]
    case.add(f"{label}: switchover stun duration in plugin", [m.switchover.duration for m in ms], "s")
    if loaded:
        case.add(f"{label}: switchover longest held request in plugin", [m.switchover.max_wait for m in ms], "s")
        case.add(f"{label}: switchover guest-visible wait, stun..finish",
                 [stun_window_wait(t, m) for m, t in loaded], "s")
        case.add(f"{label}: switchover guest-visible wait incl. flush_dest",
                 [switchover_wait(t, m) for m, t in loaded], "s")
    case.add(f"{label}: flush_dest before the stun, duration", [m.flush_seconds for m in ms], "s")
    case.add(f"{label}: mirror install stun duration in plugin", [m.install.duration for m in ms], "s")
    if loaded:
        case.add(f"{label}: mirror install guest-visible wait", [install_wait(t, m) for m, t in loaded], "s")
        case.add(f"{label}: guest write rate during the copy / before",
                 [ratio(t.throughput(m.copy_started, m.copy_done), t.throughput(t.meta["start"] + 0.3, m.started))
                  for m, t in loaded], "%")
    case.add(f"{label}: whole migration", [m.total_seconds for m in ms], "s")
    if loaded:
        case.add(f"{label}: request latency before the migration",
                 [lat for m, t in loaded for lat in t.latencies(t.meta["start"] + 0.2, m.started - 0.01)], "s")
        # Service times, as in qemu_tls_anchor: a guest held up by the switchover may still be working
        # off its backlog after it, and then no request falls due in the last second at all (a quick
        # run beside a test suite and two CPU hogs: 1.5 s behind, a row of n = 0).
        case.add(f"{label}: request send-to-done time after it, disk on the other host ({AFTER_SECONDS:g} s)",
                 [lat for m, t in loaded for lat in t.service_times(m.finish_returned + 0.1, t.meta["stopped"])],
                 "s")


# --- remote_strategies --------------------------------------------------------------------------

def case_remote_strategies(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_strategies", "Optimized vs legacy stun, disks on another host",
                "disks served from nbds:// exports, migrated to another export (and to local files): "
                "optimized stun >= 10x shorter than legacy (1, 4, 16 disks, idle and 20 MB/s); "
                "optimized <= 10 ms p99 with 16 disks")
    with remote_site(ctx, case, "remote_strategies") as (work, pki), \
            tls_export(work, pki, "datastore-b") as b, tls_export(work, pki, "datastore-c") as c:
        case.command(b.service.command)
        case.command(c.service.command)
        probe = images.make_empty(os.path.join(b.directory, "probe.raw"), cfg.legacy_disk)
        case.add("one libnbd client: TCP connect + TLS + NBD handshake, idle",
                 [timed_handshake(b.uri("probe.raw"), pki) for _ in range(HANDSHAKES)], "s")
        backends = [timed_backend(b.uri("probe.raw"), pki) for _ in range(HANDSHAKES)]
        case.add("the mirror node's NBD backend (in the harness): open, idle", [o for o, _ in backends], "s")
        case.add("the mirror node's NBD backend (in the harness): close with its links open, idle",
                 [c for _, c in backends], "s")
        os.unlink(probe)
        here = os.path.join(work, "local")
        os.makedirs(here)
        for n in cfg.legacy_counts:
            files = {f"disk{i}": images.make_dense(os.path.join(b.directory, f"disk{i}.raw"), cfg.legacy_disk)
                     for i in range(n)}
            disks = {name: b.uri(os.path.basename(file)) for name, file in files.items()}
            with ctx.mirror_node(work, disks, files=files, extra=mirror_node_tls(pki)) as (node, drv, sock):
                case.command(many_disks_command(node, n))
                strategy_runs(ctx, case, work, drv, sock, n, places=itertools.cycle([c.place, b.place]),
                              variant=", to another export")
                strategy_runs(ctx, case, work, drv, sock, n, places=itertools.repeat(Place(here)),
                              home=b.place, variant=", to local files")
            for file in drv.files.values():
                os.unlink(file)
    case.notes.append(f"{size_label(cfg.legacy_disk)} dense disks, each served by the mirror node from "
                      "an nbds:// export (sync mirror). 'To another export': migrated to a second TLS "
                      "export and back in turn, every migration timed. 'To local files': each timed "
                      "migration goes from the export to local files and an untimed one (optimized) "
                      "brings the disks back. Legacy: close_disks under the install stun (an NBD flush "
                      "and disconnect per disk), then install_mirror reopens each source (TCP connect, "
                      "TLS and NBD handshakes); at switchover the destination is flushed, closed and "
                      "reopened. Both strategies connect each remote destination under the install "
                      "stun (docs/interfaces.md, install_mirror), and close each remote source under "
                      "the switchover stun.")
    return case


# --- qemu_tls_anchor ----------------------------------------------------------------------------

@dataclass
class MoveRun:
    """One move of the disk under load, by either system, in the terms both share."""

    copy_window: tuple[float, float]    # the copy: svmotion's bulk copy and passes; QEMU to READY
    switch_window: tuple[float, float] | None  # svmotion flush_dest..finish; QEMU job-complete..
    switch_seconds: float               # COMPLETED (None: no pivot); svmotion: switchover stun in
    trace: Trace                        # the plugin, QEMU: that window
    stalled: str = ""                   # QEMU: why it did not reach READY or pivot
    copied: bool = True                 # QEMU: READY reached (else the copy window is a timeout)


@contextlib.contextmanager
def qemu_nbd_destination(work: str, pki: Pki, size: int) -> Iterator[Dest]:
    """QEMU's TLS NBD server on a fresh target file, as a destination for the mirror node."""
    target = images.make_empty(os.path.join(work, "svm-qemu-target.raw"), size)
    server, port = procs.start_on_free_port(lambda p: procs.qemu_tls_nbd_server(target, p, pki.server, work))
    try:
        yield Dest(f"nbds://{procs.LOOPBACK}:{port}/disk0", target)
    finally:
        server.stop()
        os.unlink(target)


def svmotion_anchor_move(ctx: Context, case: Case, work: str, source: str, pki: Pki, rate: float,
                         dest: Callable[[], contextlib.AbstractContextManager[Dest]]) -> MoveRun | str:
    """svmotion_move in the anchor's terms (or why it failed)."""
    moved = svmotion_move(ctx, case, work, source, pki, rate, dest)
    if isinstance(moved, str):
        return moved
    m, trace = moved
    assert trace is not None
    return MoveRun((m.copy_started, m.copy_done), (m.flush_sent, m.finish_returned),
                   m.switchover.duration, trace)


def qemu_move(ctx: Context, case: Case, work: str, source: str, pki: Pki, rate: float,
              mode: str, export: Export | None = None) -> MoveRun:
    """One QEMU mirror of `source` over TLS under the load, to QEMU's NBD server or to a file
    behind `export` (cancelled when it does not pivot)."""
    cfg = ctx.cfg
    run = mirror_run(work, source, os.path.getsize(source), mode, rate, pre_seconds=cfg.pre_seconds,
                     tls=pki, export=export, ready_timeout=cfg.anchor_ready_timeout,
                     pivot_timeout=cfg.anchor_pivot_timeout, after_seconds=AFTER_SECONDS)
    case.command(run.command)
    assert run.trace is not None
    if not run.converged:
        return MoveRun((run.started, run.ready), None, math.nan, run.trace, run.stalled,
                       copied=not run.stalled.startswith("no READY"))
    return MoveRun((run.started, run.ready), (run.complete_sent, run.completed),
                   run.completed - run.complete_sent, run.trace)


def case_qemu_tls_anchor(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("qemu_tls_anchor", "QEMU's mirror over TLS beside svmotion",
                "reported, no target: QEMU blockdev-mirror to a TLS NBD server (libvirt's "
                "--copy-storage-all --tls) beside svmotion, same 4 KiB random writes: pivot, "
                "guest rate kept during the copy")
    case.notes.append(f"{size_label(cfg.anchor_disk)} dense disk; the guest writes 4 KiB at random offsets, "
                      "QD 8, through a Unix socket to the mirror node or to the source qemu-storage-daemon. "
                      "Switch wait: svmotion from flush_dest to finish (its flush comes before the stun), "
                      "QEMU from job-complete to BLOCK_JOB_COMPLETED (its target flush is inside the pivot). "
                      f"QEMU runs that reach no READY in {cfg.anchor_ready_timeout:g} s or no pivot in "
                      f"{cfg.anchor_pivot_timeout:g} s after job-complete are cancelled and listed below; "
                      "their guest rates still count (over the whole wait when there was no READY). "
                      "QEMU's NBD server (7.2) leaves Nagle on for its TCP clients, nbdkit does not: "
                      "QEMU's write-blocking mirror also runs to the nbdkit export, the mirror node "
                      "also to QEMU's server.")
    with remote_site(ctx, case, "qemu_tls_anchor") as (work, pki), tls_export(work, pki, "datastore-b") as export:
        case.command(export.service.command)
        source = images.make_dense(os.path.join(work, "disk0.raw"), cfg.anchor_disk)
        systems: dict[str, Callable[[float], MoveRun | str]] = {
            "svmotion -> nbdkit TLS export": lambda rate: svmotion_anchor_move(
                ctx, case, work, source, pki, rate, lambda: export_dest(export, source)),
            "svmotion -> QEMU NBD server": lambda rate: svmotion_anchor_move(
                ctx, case, work, source, pki, rate, lambda: qemu_nbd_destination(work, pki, cfg.anchor_disk)),
            "QEMU background -> QEMU NBD server": lambda rate: qemu_move(
                ctx, case, work, source, pki, rate, "background"),
            "QEMU write-blocking -> QEMU NBD server": lambda rate: qemu_move(
                ctx, case, work, source, pki, rate, "write-blocking"),
            "QEMU write-blocking -> nbdkit TLS export": lambda rate: qemu_move(
                ctx, case, work, source, pki, rate, "write-blocking", export),
        }
        for load, rate in (("20 MB/s", LOAD_RATE), ("max rate", 0)):
            runs: dict[str, list[MoveRun]] = {name: [] for name in systems}
            for _ in range(cfg.anchor_reps):
                for name, move in systems.items():   # interleaved: a noisy neighbour hits all alike
                    done = move(rate)
                    if isinstance(done, str):
                        case.notes.append(f"{name}, {load}: migration failed: {done}")
                        continue
                    runs[name].append(done)
                    if done.stalled:
                        case.notes.append(f"{name}, {load}: {done.stalled}")
            for name, done in runs.items():
                _anchor_rows(case, f"{name}, {load}", done)
            svm = summarize(_switch_waits(runs["svmotion -> QEMU NBD server"]))["median"]
            for name in ("QEMU background -> QEMU NBD server", "QEMU write-blocking -> QEMU NBD server"):
                pivots = _switch_waits(runs[name])
                case.notes.append(f"{load}: {name.split(' ->')[0]} pivot wait / svmotion switchover wait, "
                                  "same destination (medians): " +
                                  (f"{ratio(summarize(pivots)['median'], svm):.2f}x" if pivots else "no pivot"))
    return case


def _switch_waits(runs: list[MoveRun]) -> list[float]:
    """The guest-visible wait of each run's switch (runs that never switched have none)."""
    return [r.trace.max_wait(*r.switch_window) for r in runs if r.switch_window is not None]


def _anchor_rows(case: Case, label: str, runs: list[MoveRun]) -> None:
    before = [r.trace.throughput(r.trace.meta["start"] + 0.3, r.copy_window[0]) for r in runs]
    during = [r.trace.throughput(*r.copy_window) for r in runs]
    switched = [r for r in runs if r.switch_window is not None]
    case.add(f"{label}: guest write rate before", before, "B/s")
    case.add(f"{label}: guest write rate during the copy", during, "B/s")
    case.add(f"{label}: during / before", [ratio(d, b) for d, b in zip(during, before)], "%")
    copied = [r.copy_window[1] - r.copy_window[0] for r in runs if r.copied]
    if copied:
        case.add(f"{label}: copy seconds (svmotion: copy passes; QEMU: to READY)", copied, "s")
    if not switched:
        return   # the notes say why
    case.add(f"{label}: switch, guest-visible wait", _switch_waits(switched), "s")
    case.add(f"{label}: switch, stun in plugin (svmotion) / pivot window (QEMU)",
             [r.switch_seconds for r in switched], "s")
    # Service times, not latencies from the due time: a guest slowed during the copy may still be
    # working off its backlog, and then no request falls due in the last second at all.
    after = [t for r in switched for t in r.trace.service_times(r.switch_window[1] + 0.1, r.trace.meta["stopped"])]
    case.add(f"{label}: on the destination afterwards ({AFTER_SECONDS:g} s), request send-to-done time",
             after, "s")


# --- remote_shaped ------------------------------------------------------------------------------

def case_remote_shaped(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_shaped", "Migration over a shaped link",
                "reported, no target: migration time against disk size / link rate, host a -> host b "
                "(network namespaces, TBF on a's veth), beside nbdcopy over the same link")
    with remote_site(ctx, case, "remote_shaped") as (work, pki), Lab("svmbench") as lab, \
            tls_export(work, pki, "datastore-b", host=lab["b"]) as export:
        a = lab["a"]
        case.command(f"(svlab/netns.py) Lab('svmbench', ('a', 'b')): hosts a {a.address}, "
                     f"b {lab['b'].address}, one veth; host b: " + export.service.command)
        for size in cfg.shaped_sizes:
            disk = images.make_dense(os.path.join(work, "disk0.raw"), size)
            with contextlib.ExitStack() as stack:
                with a.entered():   # the mirror node runs on host a
                    node, drv, _ = stack.enter_context(ctx.mirror_node(work, {"disk0": disk},
                                                                       extra=mirror_node_tls(pki)))
                case.command(f"host a: {node.command}")
                for rate in cfg.shaped_rates:
                    a.shape(rate)
                    case.command(f"host a: tc qdisc replace dev eth0 root tbf rate {rate}bit "
                                 "burst 65536 latency 50ms (Host.shape)")
                    try:
                        _shaped_rows(case, a, drv, export, pki, rate, Place(work), cfg.shaped_reps)
                    finally:
                        a.unshape()
            for name in os.listdir(work):
                if name.startswith("disk0") and name.endswith(".raw"):
                    os.unlink(os.path.join(work, name))
    case.notes.append("Idle guest, optimized strategy, sync mirror; each timed migration (a -> b) is "
                      "followed by an untimed one back to a local file on host a. Link time = disk size "
                      "/ TBF rate, the least any copy over the link can take.")
    return case


def _shaped_rows(case: Case, host: Host, drv: MirrorNodeDriver, export: Export, pki: Pki,
                 rate: int, home: Place, reps: int) -> None:
    """`reps` migrations of the (local) disk to `export` and back, and as many nbdcopy runs."""
    size = os.path.getsize(drv.files["disk0"])
    label = f"{size_label(size)} at {rate / 1e6:g} Mbit/s"
    migrations, copies = [], []
    for _ in range(reps):
        migrations.append(drv.migrate(place=export.place))
        drv.migrate(place=home)
        with host.entered():   # nbdcopy runs on host a too, over the same link
            took, copy = nbdcopy_to_export(drv.files["disk0"], export, pki)
        os.unlink(copy)
        copies.append(took)
    link = size * 8 / rate
    case.add(f"{label}: svmotion whole migration", [m.total_seconds for m in migrations], "s")
    case.add(f"{label}: svmotion bulk copy and passes", [m.copy_seconds for m in migrations], "s")
    case.add(f"{label}: nbdcopy --flush, same file, same link", copies, "s")
    case.add(f"{label}: svmotion migration / link time ({link:.2f} s)",
             [m.total_seconds / link for m in migrations], "ratio")
    case.add(f"{label}: nbdcopy / link time", [c / link for c in copies], "ratio")


CASES: dict[str, Callable[[Context], Case]] = {
    "remote_bulk": case_remote_bulk,
    "remote_switchover": case_remote_switchover,
    "remote_strategies": case_remote_strategies,
    "qemu_tls_anchor": case_qemu_tls_anchor,
    "remote_shaped": case_remote_shaped,
}
