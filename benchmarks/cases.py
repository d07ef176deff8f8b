"""The eight cases of issue 4, each measured side by side with its reference in the same run.

Design notes
- Every case builds its own images in its own directory (written in 64 KiB chunks, see
  images.py), starts its own servers by PID and removes everything on the way out, so a case
  that fails cannot poison the next; the harness records the error and carries on.
- Repetitions are interleaved (A B A B ...) rather than blocked (A A A B B B) wherever two
  systems are compared, so a noisy neighbour on this shared machine hits both sides alike.
- Stuns are timed three ways (svm.py): the plugin's gate time, the plugin's longest held
  request, and the guest-visible wait from the loadgen trace (the target is held to the last).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from nbd_plugin.backend import write_back_in_slices

from . import images, procs, tools
from .loadgen import LoadGen, Trace
from .qemu_mirror import mirror_run
from .report import Case
from .stats import ratio, summarize
from .svm import MirrorNodeDriver, Migration, NotConverged, Place

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
LOAD_RATE = 20_000_000  # 20 MB/s of 4 KiB random writes, the paced load
SETTLE = 0.25           # pause between migrations so one's tail never lands in the next's window
DRAIN_SETTLE = 1.0      # the same under a paced load: a stall's open-loop backlog takes time to drain


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions; FULL is what `make bench` runs, QUICK is the smoke test's."""

    name: str
    stun_disk: int = 256 * MiB
    stun_migrations: int = 20
    qemu_reps: int = 5
    floor_reps: int = 10
    legacy_disk: int = 4 * MiB
    legacy_reps: int = 8
    legacy_counts: tuple[int, ...] = (1, 4, 16)
    during_disk: int = 1 * GiB
    during_reps: int = 3
    bulk_disk: int = 2 * GiB
    bulk_reps: int = 3
    sparse_virtual: int = 64 * GiB
    sparse_data: int = 1 * GiB
    sparse_reps: int = 3
    fio_image: int = 1 * GiB
    fio_seconds: float = 3.0
    fio_reps: int = 3
    scale_virtual: int = 1 * TiB
    scale_disks: int = 32
    scale_disk_size: int = 64 * GiB
    pre_seconds: float = 1.5
    remote_bulk_disk: int = 1 * GiB
    remote_bulk_reps: int = 3
    remote_migrations: int = 30
    anchor_disk: int = 512 * MiB
    anchor_reps: int = 3
    anchor_ready_timeout: float = 30.0   # QEMU: READY, then the pivot, or the run is reported as stalled
    anchor_pivot_timeout: float = 15.0
    shaped_sizes: tuple[int, ...] = (64 * MiB, 256 * MiB)
    shaped_rates: tuple[int, ...] = (100_000_000, 200_000_000)   # bit/s
    shaped_reps: int = 3


FULL = Config("full")
QUICK = Config("quick", stun_disk=16 * MiB, stun_migrations=2, qemu_reps=1, floor_reps=1,
               legacy_disk=1 * MiB, legacy_reps=1, legacy_counts=(1, 4), during_disk=64 * MiB, during_reps=2,
               bulk_disk=64 * MiB, bulk_reps=1, sparse_virtual=4 * GiB, sparse_data=64 * MiB,
               sparse_reps=1, fio_image=64 * MiB, fio_seconds=1.0, fio_reps=1,
               scale_virtual=64 * GiB, scale_disks=4, scale_disk_size=1 * GiB, pre_seconds=0.5,
               remote_bulk_disk=32 * MiB, remote_bulk_reps=1, remote_migrations=2,
               anchor_disk=32 * MiB, anchor_reps=1, anchor_ready_timeout=10.0, anchor_pivot_timeout=3.0,
               shaped_sizes=(8 * MiB, 16 * MiB), shaped_rates=(200_000_000,), shaped_reps=1)


class Context:
    """Where a case works and what it is configured with."""

    def __init__(self, root: str, cfg: Config):
        self.root = root
        self.cfg = cfg

    @contextlib.contextmanager
    def workdir(self, name: str) -> Iterator[str]:
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def mirror_node(self, work: str, disks: dict[str, str], vm: str = "vm1",
                    files: dict[str, str] | None = None, extra: Sequence[str] = (),
                    control_timeout: float = 120.0
                    ) -> Iterator[tuple[procs.Service, MirrorNodeDriver, str]]:
        """A running mirror node serving `disks` {name: path or URI}, its control driver (each
        call bounded by `control_timeout`), its NBD socket; `files` are the files behind URIs,
        `extra` further plugin parameters."""
        sock, control = os.path.join(work, f"{vm}.nbd"), os.path.join(work, f"{vm}.ctl")
        node = procs.mirror_node(vm, list(disks.items()), sock, control, work, extra=extra)
        with node:
            driver = MirrorNodeDriver(control, disks, files, timeout=control_timeout)
            try:
                yield node, driver, sock
            finally:
                driver.close()


def size_label(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"


def switchover_wait(trace: Trace, m: Migration) -> float:
    """Guest-visible wait of the whole switchover sequence: flush_dest, stun, switchover, unstun,
    finish. QEMU flushes its target inside the pivot; the mirror node flushes just before its
    stun, so the flush belongs to "around switchover" on both sides of the comparison."""
    return trace.max_wait(m.flush_sent, m.finish_returned)


def stun_window_wait(trace: Trace, m: Migration) -> float:
    """Guest-visible wait from sending the switchover `stun` until `finish` has answered."""
    assert m.switchover is not None
    return trace.max_wait(m.switchover.window[0], m.finish_returned)


def install_wait(trace: Trace, m: Migration) -> float:
    assert m.install is not None
    return trace.max_wait(*m.install.window)


def quiet_latencies(trace: Trace, migrations: list[Migration]) -> list[float]:
    """Latencies of requests due before the first migration: the machine's noise floor.

    (Not "between migrations": an open-loop backlog from one migration's stall can take a
    second to drain, so the gaps between migrations are not quiet.)"""
    return trace.latencies(trace.meta["start"] + 0.2, migrations[0].started - 0.01)


# --- case 1 -------------------------------------------------------------------------------------

def flush_floor(ctx: Context, work: str, rate: int, case: Case) -> dict[str, list[float]]:
    """This machine's own stalls, with no svmotion code running: the guest-visible wait on
    nbdkit's C file plugin under the same load while the harness
    - "another file": writes a disk-sized file of its own and writes it back in slices, then
      fdatasyncs it (what flush_dest did before the copier wrote behind itself);
    - "the served image": writes back and fdatasyncs the image the guest is writing to (what
      flush_dest does to a destination now, and what an NBD flush costs on this server).
    Each window is timed around the write-back and the fdatasync."""
    cfg = ctx.cfg
    disk = images.make_dense(os.path.join(work, "floor-disk.raw"), cfg.stun_disk)
    sock = os.path.join(work, "floor.nbd")
    windows: dict[str, list[tuple[float, float]]] = {"another file": [], "the served image": []}
    with procs.nbdkit_file(disk, sock, work) as server:
        case.command(server.command)
        lg = LoadGen([procs.nbd_uri(sock)], os.path.join(work, "floor-load"), rate=rate)
        with lg:
            time.sleep(cfg.pre_seconds)
            for _ in range(cfg.floor_reps):
                for what, spans in windows.items():
                    path = disk if what == "the served image" else \
                        images.make_dense(os.path.join(work, "floor-other.raw"), cfg.stun_disk)
                    spans.append(timed_flush(path, cfg.stun_disk))
                    if path != disk:
                        os.unlink(path)
                    time.sleep(DRAIN_SETTLE if rate else SETTLE)
            trace = lg.stop()
    os.unlink(disk)
    case.command(f"(harness) another file: write {size_label(cfg.stun_disk)} in 64 KiB pieces; then "
                 "either file: sync_file_range in 8 MiB slices and fdatasync (the timed window)")
    return {what: [trace.max_wait(*span) for span in spans] for what, spans in windows.items()}


def timed_flush(path: str, size: int) -> tuple[float, float]:
    """Write back and fdatasync `path` as flush_dest does; the (start, end) of that window."""
    fd = os.open(path, os.O_RDWR)
    try:
        start = time.monotonic()
        write_back_in_slices(fd, size)
        os.fdatasync(fd)
        return start, time.monotonic()
    finally:
        os.close(fd)


def case_stun_under_load(ctx: Context) -> Case:
    case = Case("1", "Switchover stun under load",
                "guest-visible wait around switchover p99 <= 5 ms (4 KiB random writes, QD 8, "
                "at 20 MB/s and at max rate, >= 20 migrations each)")
    cfg = ctx.cfg
    loads = [("20 MB/s", LOAD_RATE), ("max rate", 0)]
    ours: dict[str, float] = {}
    with ctx.workdir("case1") as work:
        for label, rate in loads:
            disk = images.make_dense(os.path.join(work, "disk0.raw"), cfg.stun_disk)
            with ctx.mirror_node(work, {"disk0": disk}) as (node, drv, sock):
                case.command(node.command)
                lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=rate)
                case.command(lg.command)
                migrations = []
                with lg:
                    time.sleep(cfg.pre_seconds)
                    for _ in range(cfg.stun_migrations):
                        migrations.append(drv.migrate(keep_old=True))
                        time.sleep(DRAIN_SETTLE if rate else SETTLE)
                    trace = lg.stop()
            case.command("per migration (control socket): stun kind=mirror_install; install_mirror; "
                         "unstun; copy kind=bulk; flush_dest; stun kind=switchover; switchover; "
                         "unstun; finish")
            waits = [switchover_wait(trace, m) for m in migrations]
            ours[label] = case.add(f"svmotion switchover incl. flush_dest, guest-visible wait ({label})",
                                   waits, "s").summary["median"]
            case.add(f"svmotion switchover stun..finish, guest-visible wait ({label})",
                     [stun_window_wait(trace, m) for m in migrations], "s")
            case.add(f"svmotion flush_dest before the stun, duration ({label})",
                     [m.flush_seconds for m in migrations], "s")
            case.add(f"svmotion switchover, longest held request in plugin ({label})",
                     [m.switchover.max_wait for m in migrations], "s")
            case.add(f"svmotion switchover, stun duration in plugin ({label})",
                     [m.switchover.duration for m in migrations], "s")
            case.add(f"svmotion mirror install, guest-visible wait ({label})",
                     [install_wait(trace, m) for m in migrations], "s")
            case.add(f"before the first migration: request latency ({label})",
                     quiet_latencies(trace, migrations), "s")
            if trace.errors or trace.unfinished:
                case.notes.append(f"{label}: the guest saw {trace.errors} errors, "
                                  f"{trace.unfinished} unfinished requests")
            case.verdict(f"svmotion switchover guest-visible wait p99 at {label}",
                         summarize(waits)["p99"], 0.005, "lower", "s")
            for path in os.listdir(work):
                if path.endswith(".raw"):
                    os.unlink(os.path.join(work, path))
            for what, waits in flush_floor(ctx, work, rate, case).items():
                case.add(f"floor: nbdkit file plugin, {what} written back and flushed, "
                         f"guest-visible wait ({label})", waits, "s")
        # QEMU's pivot under the same loads, same disk size, same client.
        source = images.make_dense(os.path.join(work, "qemu-src.raw"), cfg.stun_disk)
        for label, rate in loads:
            pivots: dict[str, list[float]] = {"background": [], "write-blocking": []}
            for _ in range(cfg.qemu_reps):
                for mode in pivots:
                    run = mirror_run(work, source, cfg.stun_disk, mode, rate,
                                     pre_seconds=cfg.pre_seconds)
                    case.command(run.command)
                    if run.converged:
                        pivots[mode].append(run.pivot_wait)
            for mode, samples in pivots.items():
                case.add(f"QEMU {mode} mirror, guest-visible wait at pivot ({label})", samples, "s")
            for mode, samples in pivots.items():
                case.notes.append(f"{label}: QEMU {mode} pivot median / svmotion switchover median = "
                                  f"{ratio(summarize(samples)['median'], ours[label]):.2f}x")
    return case


# --- case 2 -------------------------------------------------------------------------------------

def case_strategies(ctx: Context) -> Case:
    case = Case("2", "Optimized vs legacy stun strategy",
                "optimized stun >= 10x shorter than legacy; optimized <= 10 ms p99 with 16 disks")
    cfg = ctx.cfg
    with ctx.workdir("case2") as work:
        for n in cfg.legacy_counts:
            disks = {f"disk{i}": images.make_dense(os.path.join(work, f"disk{i}.raw"), cfg.legacy_disk)
                     for i in range(n)}
            with ctx.mirror_node(work, disks) as (node, drv, sock):
                case.command(many_disks_command(node, n))
                strategy_runs(ctx, case, work, drv, sock, n)
    return case


def many_disks_command(node: procs.Service, n: int) -> str:
    """A mirror node's command line, its disks after the fourth elided."""
    if n <= 4:
        return node.command
    head, _, tail = node.command.partition(" disk=disk4:")
    return head + f" ... (disk=diskI:... for I < {n}) " + tail[tail.index(" control="):].strip()


def strategy_runs(ctx: Context, case: Case, work: str, drv: MirrorNodeDriver, sock: str, n: int,
                  places: Iterator[Place] | None = None, home: Place | None = None,
                  variant: str = "") -> None:
    """Both strategies interleaved, idle then under the paced load (on up to 4 disks), and their
    rows (`variant` added to their labels); each migration's destinations go to the next of
    `places` (default: beside the disks), and with `home` every timed migration is followed by
    an untimed one (optimized) back there, so that each timed one starts from the same place."""
    cfg = ctx.cfg
    for load, rate in (("idle", None), ("20 MB/s", LOAD_RATE)):
        load_label = load + variant
        results: dict[str, list[Migration]] = {"optimized": [], "legacy": []}
        lg = None
        if rate is not None:
            loaded = [procs.nbd_uri(sock, f"disk{i}") for i in range(min(n, 4))]
            lg = LoadGen(loaded, os.path.join(work, "load"), rate=rate,
                         qd=max(2, 8 // len(loaded))).start()
            case.command(lg.command)
            time.sleep(cfg.pre_seconds)
        try:
            for _ in range(cfg.legacy_reps):
                for strategy in results:
                    place = next(places) if places is not None else None
                    results[strategy].append(drv.migrate(strategy=strategy, place=place))
                    time.sleep(SETTLE if lg else 0.02)
                    if home is not None:
                        drv.migrate(place=home)
                        time.sleep(SETTLE if lg else 0.02)
            trace = lg.stop() if lg else None
        finally:
            if lg:
                lg.kill()
        _strategy_rows(case, n, load_label, results, trace)


def _strategy_rows(case: Case, n: int, load: str, results: dict[str, list[Migration]],
                   trace: Trace | None) -> None:
    """Rows per stun kind and strategy. The stun is judged by its duration in the plugin (gate
    closed to gate open); under load the longest held request and the guest-visible wait from
    sending `stun` to the last reply are shown beside it. The latter also holds any backlog the
    writer still carried from the flush_dest before the switchover (case 1 has the details)."""
    for kind in ("install", "switchover"):
        medians = {}
        for strategy, ms in results.items():
            stuns = [getattr(m, kind) for m in ms]
            row = case.add(f"{n} disk(s), {load}, {kind} stun, {strategy}",
                           [s.duration for s in stuns], "s")
            medians[strategy] = row.summary["median"]
            if trace is not None:
                case.add(f"{n} disk(s), {load}, {kind} longest held request, {strategy}",
                         [s.max_wait for s in stuns], "s")
                waits = [install_wait(trace, m) if kind == "install" else stun_window_wait(trace, m)
                         for m in ms]
                case.add(f"{n} disk(s), {load}, {kind} guest-visible wait, {strategy}", waits, "s")
            if n >= 16 and strategy == "optimized":
                case.verdict(f"optimized {kind} stun p99, {n} disks, {load}",
                             row.summary["p99"], 0.010, "lower", "s")
        case.verdict(f"legacy / optimized {kind} stun, {n} disk(s), {load}",
                     ratio(medians["legacy"], medians["optimized"]), 10.0, "higher", "ratio")


# --- cases 3 and 4 ------------------------------------------------------------------------------

MIRROR_HOLD = 1.0
# Copy passes under a max-rate writer give up (abort) after this long; a quick run (a smoke test
# of the harness, figures meaningless) gives up sooner, so that it stays inside its test's timeout.
CONVERGE_TIMEOUT = {"full": 120.0, "quick": 10.0}


def mirror_hold() -> tuple[float, float]:
    """Sleep on a copied mirror (no copy running); the window slept."""
    start = time.monotonic()
    time.sleep(MIRROR_HOLD)
    return start, time.monotonic()


SVM_MODES = ("sync", "async")


def case_during_copy(ctx: Context) -> tuple[Case, Case]:
    """Guest throughput during the bulk copy (case 3) and copy amplification (case 4), one run;
    the mirror node in sync and in async mode, each rep interleaved with QEMU's two modes."""
    c3 = Case("3", "Guest throughput during the bulk copy",
              "max-rate 4 KiB writes during the copy >= 60% of the rate before (sync mirror), "
              ">= 75% (async mirror)")
    c4 = Case("4", "Copy amplification",
              "bytes written to the destination / disk size <= 1.05x under max-rate writes "
              "(sync and async mirror)")
    cfg = ctx.cfg
    size = cfg.during_disk
    ours = [f"svmotion {mode}" for mode in SVM_MODES]
    frac: dict[str, list[float]] = {k: [] for k in (*ours, "QEMU background", "QEMU write-blocking")}
    mirrored: dict[str, list[float]] = {k: [] for k in ours}  # copied mirror, no copy running / before
    before: dict[str, list[float]] = {k: [] for k in frac}
    during: dict[str, list[float]] = {k: [] for k in frac}
    amp: dict[str, list[float]] = {}
    for key in ours:
        for what in ("at switchover", "copier only", "nbdkit wchar cross-check"):
            amp[f"{key}, {what}"] = []
    for what in ("guest writes sent behind the copier (async.sent_bytes)",
                 "overflowed to the copier (async.overflow_bytes)"):
        amp[f"svmotion async, {what}"] = []
    for key in ("QEMU background", "QEMU write-blocking"):
        amp[f"{key}, at READY"], amp[f"{key}, at pivot"] = [], []
    copy_seconds: dict[str, list[float]] = {k: [] for k in ours}
    with ctx.workdir("case3") as work:
        source = images.make_dense(os.path.join(work, "disk0.raw"), size)
        for _ in range(cfg.during_reps):
            for mode in SVM_MODES:
                key = f"svmotion {mode}"
                source = _migrate_under_max_rate(ctx, work, source, mode, c3, c4, size,
                                                 before[key], during[key], frac[key], mirrored[key],
                                                 copy_seconds[key], amp)
            for mode in ("background", "write-blocking"):
                run = mirror_run(work, source, size, mode, 0, pre_seconds=cfg.pre_seconds)
                c3.command(run.command)
                key = f"QEMU {mode}"
                assert run.trace is not None
                b = run.trace.throughput(run.trace.meta["start"] + 0.3, run.started)
                d = run.trace.throughput(run.started, run.ready)
                before[key].append(b)
                during[key].append(d)
                frac[key].append(ratio(d, b))
                if run.converged:
                    amp[f"{key}, at READY"].append(run.target_bytes_ready / size)
                    amp[f"{key}, at pivot"].append(run.target_bytes_done / size)
                else:
                    c4.notes.append(f"{key}: {run.stalled} under max-rate writes")
        c4.command("QEMU: /proc/PID/io wchar of qemu-storage-daemon minus the guest's completed "
                   "bytes (query-blockstats has no per-node write counters)")
    for key in frac:
        c3.add(f"{key}: guest write rate before the migration", before[key], "B/s")
        c3.add(f"{key}: guest write rate during the copy", during[key], "B/s")
        c3.add(f"{key}: during / before", frac[key], "%")
    for key in ours:
        c3.add(f"{key}, copied mirror, no copy running ({MIRROR_HOLD:g} s): rate / before",
               mirrored[key], "%")
        c3.add(f"{key}: bulk copy seconds under max-rate writes", copy_seconds[key], "s")
    c3.verdict("svmotion sync: guest rate during copy / before (median)",
               summarize(frac["svmotion sync"])["median"], 0.60, "higher", "%")
    c3.verdict("svmotion async: guest rate during copy / before (median)",
               summarize(frac["svmotion async"])["median"], 0.75, "higher", "%")
    for key, samples in amp.items():
        c4.add(key, samples, "ratio")
    for key in ours:
        c4.verdict(f"{key}: destination bytes / disk size at switchover (median)",
                   summarize(amp[f"{key}, at switchover"])["median"], 1.05, "lower", "ratio")
    c4.notes.append(_async_excess(amp, during["svmotion async"], copy_seconds["svmotion async"], size))
    c3.notes.append("Each svmotion run migrates twice under the same writer; the second migration "
                    f"waits {MIRROR_HOLD:g} s on the copied mirror before flush_dest, which gives "
                    "the 'no copy running' row (the mirror's own cost, without the copier). "
                    "Per repetition: svmotion sync, svmotion async, QEMU background, QEMU write-blocking.")
    c4.notes.append("'at switchover' counts every byte written to the destination: the copier's "
                    "and the guest's own writes mirrored to already-copied chunks. 'copier only' "
                    "leaves out the mirrored guest writes, which any synchronous mirror must make. "
                    "Async: 'sent behind the copier' are the guest's writes to copied chunks that "
                    "the sender carried; 'overflowed' are writes past the sender's bound, whose "
                    "chunks the copier carried again (counted in 'copier only').")
    return c3, c4


def _async_excess(amp: dict[str, list[float]], during: list[float], copy_seconds: list[float],
                  size: int) -> str:
    """What the async mirror's bytes above one copy are made of (medians), beside what any mirror
    that keeps the guest's rate must send: its writes into chunks already copied, about half of
    what it writes during the copy (on average half the disk is copied); migrations that did not
    converge (copy seconds inf) have no switchover and are left out."""
    def med(key: str) -> float:
        return summarize(amp[f"svmotion async, {key}"])["median"]

    kept = summarize([d * t / 2 / size for d, t in zip(during, copy_seconds) if math.isfinite(t)])["median"]
    return (f"svmotion async, medians: {med('at switchover') - 1:.3f}x above one copy; the guest's "
            f"writes sent behind the copier {med('guest writes sent behind the copier (async.sent_bytes)'):.3f}x, "
            f"the copier's re-copies {med('copier only') - 1:.3f}x (chunks dirtied by "
            f"{med('overflowed to the copier (async.overflow_bytes)'):.3f}x of overflowed writes: a "
            f"4 KiB write past the sender's bound costs its 64 KiB chunk). Guest rate during the copy x "
            f"copy seconds / 2 / disk size = {kept:.3f}x: what reaching copied chunks costs at the "
            "rate the guest kept, whichever mirror carries it.")


def _migrate_under_max_rate(ctx: Context, work: str, source: str, mode: str, c3: Case, c4: Case,
                            size: int, before: list[float], during: list[float], frac: list[float],
                            mirrored: list[float], copy_seconds: list[float],
                            amp: dict[str, list[float]]) -> str:
    """One svmotion repetition of cases 3 and 4 in `mode`: migrate under a max-rate writer, then
    migrate again holding on the copied mirror; the samples go to the lists given. Returns the
    disk's file afterwards (the next repetition's source)."""
    key = f"svmotion {mode}"
    with ctx.mirror_node(work, {"disk0": source}) as (node, drv, sock):
        c3.command(node.command)
        lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=0)
        c3.command(lg.command)
        hold: list[float] = []
        unconverged: Migration | None = None
        with lg:
            time.sleep(ctx.cfg.pre_seconds)
            w0, t0 = procs.written_chars(node.pid), time.monotonic()
            try:
                m = drv.migrate(mode=mode, keep_old=True, converge_timeout=CONVERGE_TIMEOUT[ctx.cfg.name])
                w1, t1 = procs.written_chars(node.pid), time.monotonic()
                # A second migration that waits on the copied mirror: the mirror's own cost.
                drv.migrate(mode=mode, keep_old=True, after_copy=lambda: hold.extend(mirror_hold()),
                            converge_timeout=CONVERGE_TIMEOUT[ctx.cfg.name])
            except NotConverged as err:
                unconverged = err.migration
                c3.notes.append(f"{key}: {err}")
            trace = lg.stop()
    if unconverged is not None:
        # The copy passes' rate still counts for case 3; case 4 has no switchover to count at.
        b = trace.throughput(trace.meta["start"] + 0.3, unconverged.started)
        d = trace.throughput(unconverged.copy_started, unconverged.copy_done)
        before.append(b)
        during.append(d)
        frac.append(ratio(d, b))
        copy_seconds.append(math.inf)
        c4.notes.append(f"{key}: a migration did not converge within {CONVERGE_TIMEOUT[ctx.cfg.name]:.0f} s "
                        "(no switchover, not counted)")
        return _keep_only(work, drv.paths["disk0"])
    c3.command(f"per migration (control socket): install_mirror mode={mode}; copy kind=bulk; "
               "dirty passes while dirty + async pending bytes exceed 50 ms of copying; "
               "flush_dest; switchover; finish")
    b = trace.throughput(trace.meta["start"] + 0.3, m.started)
    d = trace.throughput(m.copy_started, m.copy_done)
    before.append(b)
    during.append(d)
    frac.append(ratio(d, b))
    mirrored.append(ratio(trace.throughput(*hold), b))
    copy_seconds.append(m.copy_seconds)
    disk = m.disks_before_switch["disk0"]
    amp[f"{key}, at switchover"].append((disk["dest_written_bytes"] + m.final_bytes) / size)
    amp[f"{key}, copier only"].append((sum(disk["copied_bytes"].values()) + m.final_bytes) / size)
    if mode == "async":
        sends = disk["async"]
        amp["svmotion async, guest writes sent behind the copier (async.sent_bytes)"].append(
            sends["sent_bytes"] / size)
        amp["svmotion async, overflowed to the copier (async.overflow_bytes)"].append(
            sends["overflow_bytes"] / size)
    # wchar counts the guest's source writes, mirrored writes and copy_file_range alike;
    # take the guest's bytes (until switchover) away. After switchover writes go to the
    # destination only, so they are the guest's own, not amplification.
    guest = trace.completed_bytes(t0, t1)
    amp[f"{key}, nbdkit wchar cross-check"].append((w1 - w0 - guest) / size)
    c4.command("svmotion: DiskStatus.dest_written_bytes before the switchover stun "
               "+ switchover final_bytes (async: its sent_bytes and overflow_bytes beside); "
               "cross-check: /proc/PID/io wchar of nbdkit minus the guest's completed bytes")
    return _keep_only(work, drv.paths["disk0"])


def _keep_only(work: str, current: str) -> str:
    """Delete every image in `work` but `current` (earlier sources, aborted destinations); return it."""
    for path in os.listdir(work):
        full = os.path.join(work, path)
        if path.endswith(".raw") and full != current:
            os.unlink(full)
    return current


# --- case 5 -------------------------------------------------------------------------------------

def case_bulk_rate(ctx: Context) -> Case:
    case = Case("5", "Bulk copy rate, idle guest",
                "svmotion bulk copy >= 0.8x nbdcopy of the same dense file")
    cfg = ctx.cfg
    size = cfg.bulk_disk
    seconds: dict[str, list[float]] = {"nbdcopy file -> file": [], "cp": [],
                                       "svmotion bulk copy": [], "QEMU mirror (to READY)": []}
    with ctx.workdir("case5") as work:
        source = images.make_dense(os.path.join(work, "disk0.raw"), size)
        dest = os.path.join(work, "copy.raw")
        case.command(" ".join(tools.nbdcopy_argv(source, dest)))
        case.command(" ".join(tools.cp_argv(source, dest)))
        with ctx.mirror_node(work, {"disk0": source}) as (node, drv, sock):
            case.command(node.command + "  # then control: stun; install_mirror; unstun; "
                         "copy kind=bulk rate=0; flush_dest (timed until it returns); abort")
            for _ in range(cfg.bulk_reps):
                seconds["nbdcopy file -> file"].append(tools.timed_copy(tools.nbdcopy_argv(source, dest), dest))
                seconds["cp"].append(tools.timed_copy(tools.cp_argv(source, dest), dest))
                seconds["svmotion bulk copy"].append(drv.bulk_copy_only())
                # QEMU runs while the idle mirror node waits: separate processes, one at a time.
                run = mirror_run(work, source, size, "background", None)
                seconds["QEMU mirror (to READY)"].append(run.mirror_seconds)
        case.command(run.command)
    rates = {k: [size / s for s in v] for k, v in seconds.items()}
    for key, samples in rates.items():
        case.add(f"{key}: rate", samples, "B/s")
    nbdcopy = summarize(rates["nbdcopy file -> file"])["median"]
    for key in ("cp", "svmotion bulk copy", "QEMU mirror (to READY)"):
        case.notes.append(f"{key} / nbdcopy (medians): {ratio(summarize(rates[key])['median'], nbdcopy):.2f}x")
    case.verdict("svmotion bulk copy / nbdcopy (medians)",
                 ratio(summarize(rates["svmotion bulk copy"])["median"], nbdcopy), 0.8, "higher", "ratio")
    case.notes.append(f"{size_label(size)} dense image in page cache. Each copy is timed until it is "
                      "durable: nbdcopy and cp, then fdatasync of the copy by the harness; svmotion, "
                      "the bulk copy then flush_dest. QEMU's mirror is timed to READY, its target "
                      "not flushed.")
    return case


# --- case 6 -------------------------------------------------------------------------------------

def case_sparse(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("6", "Sparse disk",
                f"{size_label(cfg.sparse_virtual)} virtual with {size_label(cfg.sparse_data)} data migrates "
                f"in <= 1.5x the time of a {size_label(cfg.sparse_data)} dense disk; destination stays sparse")
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    allocated: list[float] = []
    with ctx.workdir("case6") as work:
        sparse = images.make_sparse(os.path.join(work, "sparse.raw"), cfg.sparse_virtual, cfg.sparse_data)
        dense = images.make_dense(os.path.join(work, "dense.raw"), cfg.sparse_data)
        with ctx.mirror_node(work, {"disk0": sparse}, vm="sparse") as (snode, sdrv, _), \
                ctx.mirror_node(work, {"disk0": dense}, vm="dense") as (dnode, ddrv, _):
            case.command(snode.command + "  # full migration, optimized, sync, idle")
            case.command(dnode.command)
            for _ in range(cfg.sparse_reps):
                m = sdrv.migrate()
                times["sparse"].append(m.total_seconds)
                allocated.append(images.allocated_bytes(sdrv.paths["disk0"]))
                times["dense"].append(ddrv.migrate().total_seconds)
    case.add(f"sparse {size_label(cfg.sparse_virtual)} / {size_label(cfg.sparse_data)} data: migration time",
             times["sparse"], "s")
    case.add(f"dense {size_label(cfg.sparse_data)}: migration time", times["dense"], "s")
    case.add("sparse destination: allocated bytes", allocated, "B")
    case.verdict("sparse / dense migration time (medians)",
                 ratio(summarize(times["sparse"])["median"], summarize(times["dense"])["median"]),
                 1.5, "lower", "ratio")
    case.verdict("sparse destination allocated / data written (max)",
                 max(allocated) / cfg.sparse_data if allocated else float("nan"), 1.05, "lower", "ratio")
    return case


# --- case 7 -------------------------------------------------------------------------------------

def case_passthrough(ctx: Context) -> Case:
    case = Case("7", "Passthrough cost",
                "4 KiB randwrite IOPS through the mirror node >= 0.9x the minimal Python plugin "
                "(benchmarks/floor_plugin.py, the floor of any Python plugin); 1 MiB seq MB/s "
                ">= 0.8x nbdkit's C file plugin")
    cfg = ctx.cfg
    small, large = "4 KiB random write, QD 8", "1 MiB sequential write, QD 8"
    jobs = [(small, "randwrite", "4k", "iops"), (large, "write", "1M", "bytes_per_s")]
    floor, c_file, ours = "minimal Python plugin (floor)", "nbdkit file", "svmotion mirror node"
    # What each job is judged against: 4 KiB costs are per request, where any Python plugin pays
    # nbdkit's embedding first, so the floor is the reference; 1 MiB is memory copies, where C is.
    judged_against = {small: (floor, 0.9), large: (c_file, 0.8)}
    results: dict[tuple[str, str], list[float]] = {}
    with ctx.workdir("case7") as work:
        image = images.make_dense(os.path.join(work, "disk0.raw"), cfg.fio_image)
        sock = os.path.join(work, "nbd.sock")
        control = os.path.join(work, "vm1.ctl")
        servers: list[tuple[str, Callable[[], procs.Service], str]] = [
            (c_file, lambda: procs.nbdkit_file(image, sock, work), ""),
            (ours, lambda: procs.mirror_node("vm1", [("disk0", image)], sock, control, work), "disk0"),
            (floor, lambda: procs.python_floor(image, sock, work), ""),
            # Not judged: the mirror node with one nbdkit thread (no hand-offs between workers).
            ("svmotion mirror node --threads 1", lambda: procs.mirror_node(
                "vm1", [("disk0", image)], sock, control, work, threads=1), "disk0"),
        ]
        for _ in range(cfg.fio_reps):
            for server_label, make, export in servers:
                with make() as server:
                    case.command(server.command)
                    uri = procs.nbd_uri(sock, export)
                    for job_label, rw, bs, field in jobs:
                        case.command(" ".join(tools.fio_argv(uri, rw, bs, 8, cfg.fio_seconds)))
                        value = tools.fio_write(uri, rw, bs, 8, cfg.fio_seconds)[field]
                        results.setdefault((server_label, job_label), []).append(value)
    for job_label, _rw, _bs, field in jobs:
        unit = "iops" if field == "iops" else "B/s"
        medians = {label: case.add(f"{label}: {job_label}", results[(label, job_label)], unit).summary["median"]
                   for label, _make, _export in servers}
        reference, limit = judged_against[job_label]
        case.verdict(f"mirror node / {reference}, {job_label} (medians)",
                     ratio(medians[ours], medians[reference]), limit, "higher", "ratio")
        # Information beside the verdict: every Python server against C, the node against the floor.
        for label, _make, _export in servers[1:]:
            for base in (c_file, floor):
                if label != base and (label, base) != (ours, reference):
                    case.notes.append(f"{label} / {base}, {job_label}: {ratio(medians[label], medians[base]):.2f}x")
    return case


# --- case 8 -------------------------------------------------------------------------------------

def case_scale(ctx: Context) -> Case:
    cfg = ctx.cfg
    case = Case("8", "Scale: memory and dirty map",
                "dirty map <= 4 MiB per TiB at 64 KiB chunks; plugin memory for a 1 TiB disk and 32 disks")
    with ctx.workdir("case8") as work:
        big = images.make_empty(os.path.join(work, "big.raw"), cfg.scale_virtual)
        with ctx.mirror_node(work, {"disk0": big}, vm="big") as (node, drv, _):
            case.command(node.command + "  # sparse, no data")
            rss0 = procs.rss_bytes(node.pid)
            dests = drv.next_dests()
            big_install = drv.install("optimized", "sync", 65536, {n: d.location for n, d in dests.items()})
            rss1 = procs.rss_bytes(node.pid)
            status = drv.status()["disks"]["disk0"]
            start = time.monotonic()
            drv.copy("bulk", 0, timeout=120)
            copy_s = time.monotonic() - start
            rss2 = procs.rss_bytes(node.pid)
            drv.abort()
            dest_alloc = images.allocated_bytes(dests["disk0"].file)
        tib = cfg.scale_virtual / TiB
        map_bytes = status.get("dirty_map_bytes")
        case.add(f"{size_label(cfg.scale_virtual)} sparse disk: nbdkit RSS, passthrough", [rss0], "B")
        case.add("same, mirror installed (dirty map allocated)", [rss1], "B")
        case.add("same, after the bulk copy", [rss2], "B")
        if map_bytes is not None:
            case.add("dirty map bytes (DiskStatus.dirty_map_bytes)", [map_bytes], "B")
        case.add("dirty map bytes per TiB (RSS growth at install / TiB)", [(rss1 - rss0) / tib], "B")
        case.add("mirror install stun (dirty map allocated under it)", [big_install.duration], "s")
        case.add("bulk copy of the empty disk (holes skipped)", [copy_s], "s")
        case.add("destination allocated after the copy", [dest_alloc], "B")
        per_tib = (map_bytes if map_bytes is not None else rss1 - rss0) / tib
        case.verdict("dirty map per TiB at 64 KiB chunks", per_tib, 4 * MiB, "lower", "B")

        disks = {f"disk{i}": images.make_empty(os.path.join(work, f"d{i}.raw"), cfg.scale_disk_size)
                 for i in range(cfg.scale_disks)}
        with ctx.mirror_node(work, disks, vm="wide") as (node, drv, _):
            case.command(node.command.split(" disk=disk1:")[0] +
                         f" ... ({cfg.scale_disks} disks of {size_label(cfg.scale_disk_size)}, sparse)")
            rss = [procs.rss_bytes(node.pid)]
            m = drv.migrate(after_install=lambda: rss.append(procs.rss_bytes(node.pid)))
            rss.append(procs.rss_bytes(node.pid))
        case.add(f"{cfg.scale_disks} disks: nbdkit RSS before a migration", [rss[0]], "B")
        case.add(f"{cfg.scale_disks} disks: nbdkit RSS with every mirror installed", [rss[1]], "B")
        case.add(f"{cfg.scale_disks} disks: nbdkit RSS after the migration", [rss[2]], "B")
        case.add(f"{cfg.scale_disks} disks: mirror install stun", [m.install.duration], "s")
        case.add(f"{cfg.scale_disks} disks: switchover stun", [m.switchover.duration], "s")
        case.add(f"{cfg.scale_disks} disks: whole migration", [m.total_seconds], "s")
    return case


CASES: dict[str, Callable[[Context], Case | tuple[Case, ...]]] = {
    "1": case_stun_under_load,
    "2": case_strategies,
    "3": case_during_copy,   # also yields case 4
    "5": case_bulk_rate,
    "6": case_sparse,
    "7": case_passthrough,
    "8": case_scale,
}
