"""The remote cases of issue 11: destinations, and disks, behind NBD exports over mutual TLS.

Design notes
- The other host is this machine over TCP 127.0.0.1 (remote.py): its datastore export is the
  command line agent/export.py runs, TLS required and the client's certificate verified. What
  these cases measure is therefore TLS, the NBD protocol and the mirror node's pipelines, with
  the network reduced to loopback; a shaped link between two network namespaces is not here
  (it waits for agent/netns.py).
- Same harness as cases.py: the mirror node is driven over its control socket (svm.py), the
  guest is the open-loop writer (loadgen.py), repetitions are interleaved where two systems
  are compared, every server is started and stopped by PID, every case works in its own
  directory.
- Chained migrations keep one mirror node and one steady guest: the switchover case migrates
  the disk to the other host and back again in turn, so every "to the other host" migration
  starts from a local disk; the remote-disk case migrates between two exports in turn.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import images, procs, tools
from .cases import (DRAIN_SETTLE, LOAD_RATE, SETTLE, Context, install_wait, many_disks_command,
                    quiet_latencies, size_label, stun_window_wait, strategy_runs, switchover_wait)
from .loadgen import LoadGen, Trace
from .qemu_mirror import mirror_run
from .remote import Export, Pki, make_pki, mirror_node_tls, timed_handshake, tls_export, tls_uri
from .report import Case
from .stats import ratio, summarize
from .svm import Dest, Migration, Place

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

def nbdcopy_to_export(source: str, export: Export, pki: Pki) -> tuple[float, str]:
    """nbdcopy from `source` to a fresh file behind `export`, flushed at its end; (seconds, the
    copy). The destination export must exist with the source's size, as DiskCreate makes it."""
    copy = images.make_empty(os.path.join(export.directory, "nbdcopy.raw"), os.path.getsize(source))
    argv = tools.nbdcopy_argv(source, tls_uri(export.uri("nbdcopy.raw"), pki), flush=True)
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
            seconds: dict[str, list[float]] = {"nbdcopy": [], "svmotion": []}
            allocated: dict[str, list[float]] = {"nbdcopy": [], "svmotion": []}
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
            case.command(" ".join(tools.nbdcopy_argv(source, tls_uri(export.uri("nbdcopy.raw"), pki),
                                                     flush=True)))
            data = images.allocated_bytes(source)
            os.unlink(source)
            for tool in seconds:
                case.add(f"{label}: {tool}, seconds until durable", seconds[tool], "s")
                case.add(f"{label}: {tool}, data rate (allocated source bytes / s)",
                         [data / s for s in seconds[tool]], "B/s")
                case.add(f"{label}: {tool}, copy's allocated bytes", allocated[tool], "B")
                case.notes.append(f"{label}: {tool}'s first copy equals the source: {equal.get(tool)}")
            case.verdict(f"{label}: svmotion / nbdcopy rate (medians)",
                         ratio(summarize(seconds["nbdcopy"])["median"], summarize(seconds["svmotion"])["median"]),
                         BULK_TARGET, "higher", "ratio")
    case.notes.append("Both copies are timed until durable on the other host: nbdcopy with --flush "
                      "(an NBD flush on each connection), svmotion until flush_dest has returned "
                      "(the copy, then an NBD flush). Both reach the export over TCP 127.0.0.1 with "
                      "TLS; nbdkit's file plugin advertises multi-conn, so nbdcopy opens 4 connections "
                      "and the mirror node up to 4 links.")
    return case


# --- remote_switchover --------------------------------------------------------------------------

def case_remote_switchover(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_switchover", "Switchover stun, destination on another host",
                f"switchover stun p99 <= {STUN_TARGET * 1e3:g} ms, local disk -> nbds:// export, idle and "
                f"under 20 MB/s 4 KiB random writes (>= 30 migrations each)")
    with remote_site(ctx, case, "remote_switchover") as (work, pki), \
            tls_export(work, pki, "datastore-b") as export:
        case.command(export.service.command)
        here = Place(work)
        for label, rate in (("idle", None), ("20 MB/s", LOAD_RATE)):
            disk = images.make_dense(os.path.join(work, "disk0.raw"), cfg.stun_disk)
            out: list[Migration] = []
            back: list[Migration] = []
            trace = None
            with ctx.mirror_node(work, {"disk0": disk}, extra=mirror_node_tls(pki)) as (node, drv, sock):
                case.command(node.command)
                lg = None
                if rate is not None:
                    lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=rate).start()
                    case.command(lg.command)
                    time.sleep(cfg.pre_seconds)
                try:
                    for _ in range(cfg.remote_migrations):
                        out.append(drv.migrate(place=export.place))
                        time.sleep(DRAIN_SETTLE if lg else SETTLE)
                        back.append(drv.migrate(place=here))
                        time.sleep(DRAIN_SETTLE if lg else SETTLE)
                    trace = lg.stop() if lg else None
                finally:
                    if lg:
                        lg.kill()
            os.unlink(drv.files["disk0"])
            for direction, ms in (("to the other host", out), ("back from it", back)):
                _switchover_rows(case, f"{direction}, {label}", ms, trace)
            if trace is not None:
                case.add(f"{label}: request latency while the disk is served from the other host",
                         [lat for o, b in zip(out, back) for lat in trace.latencies(o.finish_returned + 0.1,
                                                                                    b.started)], "s")
            judged = summarize([m.switchover.duration for m in out])["p99"]
            case.verdict(f"switchover stun p99 in the plugin, to the other host, {label}", judged,
                         STUN_TARGET, "lower", "s")
            if trace is not None:
                case.verdict(f"switchover guest-visible wait (stun..finish) p99, to the other host, {label}",
                             summarize([stun_window_wait(trace, m) for m in out])["p99"],
                             STUN_TARGET, "lower", "s")
                case.add(f"before the first migration: request latency ({label})",
                         quiet_latencies(trace, out), "s")
                if trace.errors or trace.unfinished:
                    case.notes.append(f"{label}: the guest saw {trace.errors} errors, "
                                      f"{trace.unfinished} unfinished requests")
        _ceiling_rows(ctx, case, work, pki, export)
    case.command("per migration (control socket): stun kind=mirror_install; install_mirror "
                 "dest=nbds://127.0.0.1:PORT/disk0.mN.raw; unstun; copy kind=bulk; flush_dest; "
                 "stun kind=switchover; switchover; unstun; finish; then the same back to a local file")
    case.notes.append(f"{size_label(cfg.stun_disk)} dense disk, optimized strategy, sync mirror. Each "
                      "migration to the other host is followed by one back to a local file, so every "
                      "judged migration starts from a local disk; the way back (a disk served from the "
                      "export, migrated to a local file) is reported beside it.")
    return case


def _ceiling_rows(ctx: Context, case: Case, work: str, pki: Pki, export: Export) -> None:
    """What the guest path through the mirror node can carry at all, the disk here or there:
    max-rate 4 KiB writes, QD 8, for CAPACITY_SECONDS (the paced load is judged against it)."""
    size = ctx.cfg.stun_disk
    for where, file, location in (
            ("a local file", os.path.join(work, "ceiling.raw"), None),
            ("the other host (nbds://)", os.path.join(export.directory, "ceiling.raw"), export.uri("ceiling.raw"))):
        images.make_dense(file, size)
        with ctx.mirror_node(work, {"disk0": location or file}, vm="ceiling", files={"disk0": file},
                             extra=mirror_node_tls(pki)) as (node, _, sock):
            case.command(node.command)
            lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "ceiling"), rate=0).start()
            try:
                time.sleep(CAPACITY_SECONDS)
                trace = lg.stop()
            finally:
                lg.kill()
        os.unlink(file)
        window = (trace.meta["start"] + 0.2, trace.meta["stopped"])
        case.add(f"ceiling: max-rate writes through the mirror node, disk on {where}: rate",
                 [trace.throughput(*window)], "B/s")
        case.add(f"ceiling: max-rate writes through the mirror node, disk on {where}: latency",
                 trace.latencies(*window), "s")


def _switchover_rows(case: Case, label: str, ms: list[Migration], trace: Trace | None) -> None:
    case.add(f"{label}: switchover stun duration in plugin", [m.switchover.duration for m in ms], "s")
    if trace is not None:
        case.add(f"{label}: switchover longest held request in plugin", [m.switchover.max_wait for m in ms], "s")
        case.add(f"{label}: switchover guest-visible wait, stun..finish",
                 [stun_window_wait(trace, m) for m in ms], "s")
        case.add(f"{label}: switchover guest-visible wait incl. flush_dest",
                 [switchover_wait(trace, m) for m in ms], "s")
    case.add(f"{label}: flush_dest before the stun, duration", [m.flush_seconds for m in ms], "s")
    case.add(f"{label}: mirror install stun duration in plugin", [m.install.duration for m in ms], "s")
    if trace is not None:
        case.add(f"{label}: mirror install guest-visible wait", [install_wait(trace, m) for m in ms], "s")
    case.add(f"{label}: whole migration", [m.total_seconds for m in ms], "s")


# --- remote_strategies --------------------------------------------------------------------------

def case_remote_strategies(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("remote_strategies", "Optimized vs legacy stun, disks on another host",
                "disks served from nbds:// exports, migrated to another export: optimized stun >= 10x "
                "shorter than legacy (1, 4, 16 disks, idle and 20 MB/s); optimized <= 10 ms p99 with 16 disks")
    with remote_site(ctx, case, "remote_strategies") as (work, pki), \
            tls_export(work, pki, "datastore-b") as b, tls_export(work, pki, "datastore-c") as c:
        case.command(b.service.command)
        case.command(c.service.command)
        probe = images.make_empty(os.path.join(b.directory, "probe.raw"), cfg.legacy_disk)
        case.add("one libnbd client: TCP connect + TLS + NBD handshake, idle",
                 [timed_handshake(b.uri("probe.raw"), pki) for _ in range(HANDSHAKES)], "s")
        os.unlink(probe)
        for n in cfg.legacy_counts:
            files = {f"disk{i}": images.make_dense(os.path.join(b.directory, f"disk{i}.raw"), cfg.legacy_disk)
                     for i in range(n)}
            disks = {name: b.uri(os.path.basename(file)) for name, file in files.items()}
            with ctx.mirror_node(work, disks, files=files, extra=mirror_node_tls(pki)) as (node, drv, sock):
                case.command(many_disks_command(node, n))
                strategy_runs(ctx, case, work, drv, sock, n, places=itertools.cycle([c.place, b.place]))
            for file in drv.files.values():
                os.unlink(file)
    case.notes.append(f"{size_label(cfg.legacy_disk)} dense disks, each served by the mirror node from "
                      "an nbds:// export and migrated to another export and back in turn (sync mirror). "
                      "Legacy: close_disks under the install stun (an NBD flush and disconnect per disk), "
                      "then install_mirror reopens each source (TCP connect, TLS and NBD handshakes); "
                      "at switchover the destination is flushed, closed and reopened. Both strategies "
                      "connect each destination under the install stun (docs/interfaces.md, install_mirror).")
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


def svmotion_move(ctx: Context, case: Case, work: str, source: str, pki: Pki, rate: float,
                  dest: Callable[[], contextlib.AbstractContextManager[Dest]]) -> MoveRun:
    """One migration of `source` to the destination `dest()` makes, under the load; the source is kept."""
    with dest() as target, ctx.mirror_node(work, {"disk0": source}, extra=mirror_node_tls(pki)) as (node, drv, sock):
        case.command(node.command)
        lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=rate).start()
        case.command(lg.command)
        try:
            time.sleep(ctx.cfg.pre_seconds)
            m = drv.migrate(keep_old=True, dests={"disk0": target})
            time.sleep(AFTER_SECONDS)
            trace = lg.stop()
        finally:
            lg.kill()
    return MoveRun((m.copy_started, m.copy_done), (m.flush_sent, m.finish_returned),
                   m.switchover.duration, trace)


def qemu_move(ctx: Context, case: Case, work: str, source: str, pki: Pki, rate: float,
              mode: str) -> MoveRun:
    """One QEMU mirror of `source` over TLS under the load (cancelled when it does not pivot)."""
    cfg = ctx.cfg
    run = mirror_run(work, source, os.path.getsize(source), mode, rate, pre_seconds=cfg.pre_seconds,
                     tls=pki, ready_timeout=cfg.anchor_ready_timeout, pivot_timeout=cfg.anchor_pivot_timeout,
                     after_seconds=AFTER_SECONDS)
    case.command(run.command)
    assert run.trace is not None
    if not run.converged:
        return MoveRun((run.started, run.ready), None, math.nan, run.trace, run.stalled)
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
                      "their copy rows still count.")
    with remote_site(ctx, case, "qemu_tls_anchor") as (work, pki), tls_export(work, pki, "datastore-b") as export:
        case.command(export.service.command)
        source = images.make_dense(os.path.join(work, "disk0.raw"), cfg.anchor_disk)

        def to_export() -> contextlib.AbstractContextManager[Dest]:
            return _export_dest(export, source)

        systems: dict[str, Callable[[float], MoveRun]] = {
            "svmotion -> nbdkit TLS export": lambda rate: svmotion_move(ctx, case, work, source, pki, rate, to_export),
            "svmotion -> QEMU NBD server": lambda rate: svmotion_move(
                ctx, case, work, source, pki, rate, lambda: qemu_nbd_destination(work, pki, cfg.anchor_disk)),
            "QEMU background -> QEMU NBD server": lambda rate: qemu_move(ctx, case, work, source, pki, rate,
                                                                          "background"),
            "QEMU write-blocking -> QEMU NBD server": lambda rate: qemu_move(ctx, case, work, source, pki, rate,
                                                                              "write-blocking"),
        }
        for load, rate in (("20 MB/s", LOAD_RATE), ("max rate", 0)):
            runs: dict[str, list[MoveRun]] = {name: [] for name in systems}
            for _ in range(cfg.anchor_reps):
                for name, move in systems.items():   # interleaved: a noisy neighbour hits all alike
                    done = move(rate)
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


@contextlib.contextmanager
def _export_dest(export: Export, source: str) -> Iterator[Dest]:
    target = images.make_empty(os.path.join(export.directory, "disk0.raw"), os.path.getsize(source))
    try:
        yield export.place.dest(target)
    finally:
        os.unlink(target)


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
    case.add(f"{label}: copy seconds (svmotion: copy passes; QEMU: to READY)",
             [r.copy_window[1] - r.copy_window[0] for r in runs], "s")
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


CASES: dict[str, Callable[[Context], Case]] = {
    "remote_bulk": case_remote_bulk,
    "remote_switchover": case_remote_switchover,
    "remote_strategies": case_remote_strategies,
    "qemu_tls_anchor": case_qemu_tls_anchor,
}
