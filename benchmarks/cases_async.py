"""The async mirror's cases of issue 12: a slow destination and a destination slower than the guest.

Design notes
- The destination is nbdkit's C `file` plugin on a Unix socket behind a filter, and the mirror
  node gets its NBD URI: `delay` (wdelay=5ms: every write waits 5 ms, as a remote array's
  round trip would) or `rate` (the whole server's bandwidth, reads and writes, held to a
  quarter of the guest's write rate). QEMU's mirror gets the same server as its target node
  (blockdev driver=nbd), so both mirrors meet the same destination.
- The guest is case 1's paced load: 4 KiB random writes, QD 8, open loop, 20 MB/s (about
  4900 writes/s), a busy but realistic VM disk. Latency counts from each write's due time, so a
  guest held behind a slow destination shows its backlog too (loadgen.py).
- One migration per mirror node and destination server: after the switchover the guest is
  served from the slowed destination, which says nothing about the mirror, so the writer stops
  as soon as `finish` returns.
- Convergence against the quarter-rate destination needs the guest throttled: the agent's own
  controller (agent/convergence.py's Governor) decides from the driver's status polls and the
  driver applies it with the plugin's `mirror_set(throttle=...)`, as the phase engine does. Its
  bound is raised from the agent's 5 ms default: at QD 8 a 5 ms delay still lets 6.5 MB/s of
  4 KiB writes through, more than this destination takes.
- The driver follows the agent's async end-game: the mirror turns sync just before flush_dest.
- Repetitions are interleaved (svmotion, then QEMU, per repetition), as in cases.py.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from agent.convergence import Governor, Sample
from agent.jsonlines import RemoteError
from agent.phases import counter_total, pending_bytes, remaining_bytes

from . import images, procs
from .cases import LOAD_RATE, Context, size_label
from .loadgen import LoadGen, Trace
from .qemu_mirror import QemuMirrorRun, mirror_run
from .report import Case
from .stats import ratio, summarize
from .svm import Dest, MirrorNodeDriver, Migration, NotConverged, Poll

MiB = 1 << 20
WRITE_DELAY = "5ms"
STUN_BUDGET = 0.05
CONTROL_TIMEOUT = 30.0
MAX_PASSES = 100_000    # dirty passes end when what remains fits the budget (or at the timeout)


@dataclass(frozen=True)
class AsyncConfig:
    """Sizes, repetitions and time limits of these cases, per harness mode."""

    slow_disk: int
    slow_reps: int
    quarter_disk: int
    quarter_reps: int
    pre_seconds: float
    converge_timeout: float     # svmotion: the copy passes give up after this long (aborted)
    qemu_ready_timeout: float   # QEMU: no READY by then is reported as not converging
    throttle_bound: float       # the governor's bound (the agent's --max-throttle)


CONFIGS = {
    "full": AsyncConfig(slow_disk=256 * MiB, slow_reps=3, quarter_disk=64 * MiB, quarter_reps=3,
                        pre_seconds=3.0, converge_timeout=60.0, qemu_ready_timeout=60.0,
                        throttle_bound=0.1),
    "quick": AsyncConfig(slow_disk=16 * MiB, slow_reps=1, quarter_disk=8 * MiB, quarter_reps=1,
                         pre_seconds=0.5, converge_timeout=10.0, qemu_ready_timeout=5.0,
                         throttle_bound=0.1),
}


def slowed_destination(work: str, name: str, size: int, filters: list[str],
                       params: list[str]) -> tuple[procs.Service, str, str]:
    """A fresh empty destination file served by nbdkit behind `filters` on a Unix socket (not
    started): the server, the file, the socket."""
    path = images.make_empty(os.path.join(work, f"{name}.raw"), size)
    sock = os.path.join(work, f"{name}.nbd")
    return procs.nbdkit_file(path, sock, work, name=name, filters=filters, params=params), path, sock


def migrate_to(ctx: Context, case: Case, work: str, source: str, mode: str,
               filters: list[str], params: list[str], pre_seconds: float,
               rule: Callable[[MirrorNodeDriver], Poll] | None = None,
               converge_timeout: float | None = None,
               copy_rate: float | None = None) -> tuple[Migration | None, Migration | None, Trace]:
    """One svmotion migration of `source` to a slowed destination under the paced load: the
    migration's timings (None when it did not converge in time or its switchover was refused;
    it is then aborted and the case says why), the timings of its copy passes when they did not
    converge, and the guest's trace."""
    server, dest_file, dest_sock = slowed_destination(work, f"dest-{mode}", os.path.getsize(source),
                                                      filters, params)
    m = unconverged = None
    try:
        with server, ctx.mirror_node(work, {"disk0": source},
                                     control_timeout=CONTROL_TIMEOUT) as (node, drv, sock):
            case.command(server.command)
            case.command(node.command)
            lg = LoadGen([procs.nbd_uri(sock, "disk0")], os.path.join(work, "load"), rate=LOAD_RATE)
            case.command(lg.command)
            with lg:
                time.sleep(pre_seconds)
                try:
                    m = drv.migrate(mode=mode, keep_old=True, stun_budget=STUN_BUDGET,
                                    max_dirty_passes=MAX_PASSES, converge_timeout=converge_timeout,
                                    dests={"disk0": Dest(procs.nbd_uri(dest_sock), dest_file)},
                                    on_poll=rule(drv) if rule is not None else None,
                                    copy_rate=copy_rate)
                except NotConverged as err:
                    case.notes.append(f"svmotion {mode}: {err}")
                    unconverged = err.migration
                except RemoteError as err:
                    case.notes.append(f"svmotion {mode}: {err.op} refused: {err.reply.get('error')}")
                    drv.abort()
                except TimeoutError:
                    # The control connection is out of step now: the node goes down with it.
                    unconverged = drv.last if drv.last is not None and drv.last.copy_done else None
                    case.notes.append(f"svmotion {mode}: a control call did not return within "
                                      f"{CONTROL_TIMEOUT:.0f} s; the mirror node was stopped")
                trace = lg.stop()
    finally:
        os.unlink(dest_file)
    return m, unconverged, trace


def qemu_to(work: str, case: Case, source: str, mode: str, filters: list[str], params: list[str],
            pre_seconds: float, ready_timeout: float) -> QemuMirrorRun:
    """QEMU's mirror of `source` to the same slowed destination under the same paced load."""
    server, dest_file, dest_sock = slowed_destination(work, "dest-qemu", os.path.getsize(source),
                                                      filters, params)
    with server:
        case.command(server.command)
        run = mirror_run(work, source, os.path.getsize(source), mode, LOAD_RATE,
                         pre_seconds=pre_seconds, ready_timeout=ready_timeout,
                         target_node=procs.qemu_nbd_unix_target(dest_sock))
        case.command(run.command)
    os.unlink(dest_file)
    return run


def add_measured(case: Case, label: str, samples: list[float], unit: str) -> None:
    """A row of the samples, left out when there are none (a run that never got there: the
    case's notes say why)."""
    if samples:
        case.add(label, samples, unit)


def p99(samples: list[float]) -> float:
    return summarize(samples)["p99"]


# --- the bench's convergence rule ------------------------------------------------------------------

class Throttle:
    """The agent's convergence controller (agent/convergence.py's Governor) fed with the driver's
    status polls, its throttle applied with mirror_set as the agent's phase engine does."""

    def __init__(self, drv: MirrorNodeDriver, bound: float, target: int):
        self.drv = drv
        self.governor = Governor(bound)
        self.target = target
        self.applied = 0.0
        self.first_raised: float | None = None
        self.stalled = False

    def __call__(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        decision = self.governor.observe(Sample(
            now, remaining_bytes(status), pending_bytes(status),
            counter_total(status, "dest_written_bytes"), counter_total(status, "dirtied_bytes"),
            self.target))
        self.stalled = self.stalled or decision.stalled
        if decision.throttle != self.applied:
            self.drv.mirror_set(throttle=decision.throttle)
            self.applied = decision.throttle
            if self.first_raised is None:
                self.first_raised = now


def throttled(bound: float, target: int, made: list[Throttle]) -> Callable[[MirrorNodeDriver], Poll]:
    """A maker of the driver's Throttle (bound in seconds, target bytes); each one made goes to `made`."""
    def make(drv: MirrorNodeDriver) -> Poll:
        made.append(Throttle(drv, bound, target))
        return made[-1]
    return make


# --- a destination with 5 ms added per write ------------------------------------------------------

def case_slow_dest(ctx: Context) -> Case:
    acfg = CONFIGS[ctx.cfg.name]
    case = Case("async_slow_dest", f"Guest write latency, destination {WRITE_DELAY} per write",
                f"4 KiB write p99 during an async migration <= 1.5x its p99 before (20 MB/s paced, "
                f"destination nbdkit --filter=delay wdelay={WRITE_DELAY})")
    filters, params = ["delay"], [f"wdelay={WRITE_DELAY}"]
    systems = ("svmotion async", "svmotion sync", "QEMU write-blocking")
    before: dict[str, list[float]] = {k: [] for k in systems}
    during: dict[str, list[float]] = {k: [] for k in systems}
    copying: dict[str, list[float]] = {k: [] for k in systems}
    ratios: dict[str, list[float]] = {k: [] for k in systems}
    seconds: dict[str, list[float]] = {k: [] for k in systems}
    overflow: list[float] = []
    copy_ratios: dict[str, list[float]] = {k: [] for k in systems}
    ours = ("svmotion async", "svmotion sync")
    converged = {k: 0 for k in ours}   # migrations that reached finish
    switch_waits: dict[str, list[float]] = {k: [] for k in ours}
    flushes: dict[str, list[float]] = {k: [] for k in ours}
    stuns: dict[str, list[float]] = {k: [] for k in ours}
    with ctx.workdir("async_slow") as work:
        source = images.make_dense(os.path.join(work, "disk0.raw"), acfg.slow_disk)
        for _ in range(acfg.slow_reps):
            for mode in ("async", "sync"):
                key = f"svmotion {mode}"
                m, unconverged, trace = migrate_to(ctx, case, work, source, mode, filters, params,
                                                   acfg.pre_seconds, converge_timeout=acfg.converge_timeout)
                copied = m or unconverged
                if copied is None:
                    continue
                b = trace.latencies(trace.meta["start"] + 0.3, copied.started - 0.01)
                before[key].append(p99(b))
                copying[key].append(p99(trace.latencies(copied.copy_started, copied.copy_done)))
                copy_ratios[key].append(ratio(copying[key][-1], before[key][-1]))
                if m is None:
                    continue
                converged[key] += 1
                d = trace.latencies(m.started, m.finish_returned)
                during[key].append(p99(d))
                ratios[key].append(ratio(p99(d), p99(b)))
                seconds[key].append(m.finished - m.started)
                switch_waits[key].append(trace.max_wait(m.flush_sent, m.finish_returned))
                flushes[key].append(m.flush_seconds)
                assert m.switchover is not None
                stuns[key].append(m.switchover.duration)
                if mode == "async":
                    overflow.append(m.disks_before_switch["disk0"]["async"]["overflow_bytes"])
            run = qemu_to(work, case, source, "write-blocking", filters, params, acfg.pre_seconds,
                          acfg.qemu_ready_timeout)
            key = "QEMU write-blocking"
            assert run.trace is not None
            b = run.trace.latencies(run.trace.meta["start"] + 0.3, run.started - 0.01)
            end = run.completed if run.converged else run.ready
            d = run.trace.latencies(run.started, end)
            before[key].append(p99(b))
            during[key].append(p99(d))
            copying[key].append(p99(run.trace.latencies(run.started, run.ready)))
            copy_ratios[key].append(ratio(copying[key][-1], before[key][-1]))
            ratios[key].append(ratio(p99(d), p99(b)))
            seconds[key].append(end - run.started)
            if not run.converged:
                case.notes.append(f"QEMU write-blocking: {run.stalled}")
    for key in systems:
        add_measured(case, f"{key}: write p99 before the migration", before[key], "s")
        add_measured(case, f"{key}: write p99 during the migration (install to finish; QEMU: start to pivot)",
                 during[key], "s")
        add_measured(case, f"{key}: write p99 during the copy passes (QEMU: start to READY)", copying[key], "s")
        add_measured(case, f"{key}: p99 during the migration / p99 before", ratios[key], "ratio")
        add_measured(case, f"{key}: p99 during the copy passes / p99 before", copy_ratios[key], "ratio")
        add_measured(case, f"{key}: migration seconds", seconds[key], "s")
    add_measured(case, "svmotion async: bytes overflowed to the copier (async.overflow_bytes)", overflow, "B")
    for key in ours:
        add_measured(case, f"{key}: guest-visible wait flush_dest..finish", switch_waits[key], "s")
        add_measured(case, f"{key}: flush_dest seconds", flushes[key], "s")
        add_measured(case, f"{key}: switchover stun in the plugin", stuns[key], "s")
    case.verdict("svmotion async: write p99 during the migration / before (median of the converged reps)",
                 # none finished: the guest's p99 over a migration that never ends is unbounded
                 summarize(ratios["svmotion async"])["median"] if ratios["svmotion async"] else math.inf,
                 1.5, "lower", "ratio")
    case.verdict("svmotion async: migrations finished (unthrottled)",
                 converged["svmotion async"] / acfg.slow_reps, 1.0, "higher", "%")
    for key in ours:
        case.notes.append(f"{key}: {converged[key]} of {acfg.slow_reps} migrations finished; the copy "
                          "passes' rows include the ones that did not (until they gave up or flush_dest hung).")
    case.notes.append(f"{size_label(acfg.slow_disk)} dense disk; guest 4 KiB random writes, QD 8, "
                      f"{LOAD_RATE / 1e6:g} MB/s open loop; p99 per repetition over every write due in "
                      "the window, latency from its due time. Per repetition: svmotion async, "
                      "svmotion sync, QEMU write-blocking, each with a fresh delayed destination. No throttle: "
                      "what is measured is the async mirror's own cost to the guest; a migration "
                      f"that does not converge within {acfg.converge_timeout:.0f} s is aborted and noted. "
                      "The async mirror turns sync only when what remains after flush_dest is over "
                      "the stun budget (the agent's end-game), and then from there to finish the "
                      "guest waits for the destination as under sync.")
    return case


# --- a destination at a quarter of the guest's write rate -----------------------------------------

def case_quarter_rate(ctx: Context) -> Case:
    acfg = CONFIGS[ctx.cfg.name]
    link = LOAD_RATE // 4
    case = Case("async_quarter", "Destination at a quarter of the guest's write rate",
                f"svmotion async converges (guest throttled through mirror_set) against a destination "
                f"held to {link / 1e6:g} MB/s under a {LOAD_RATE / 1e6:g} MB/s guest; QEMU background beside")
    filters, params = ["rate"], [f"rate={link * 8}"]   # the rate filter counts bits per second
    converge: list[float] = []
    total: list[float] = []
    rate_throttled: list[float] = []
    rate_before: list[float] = []
    throttles: list[float] = []
    qemu_ready: list[float] = []
    qemu_rate: list[float] = []
    qemu_missed = 0
    stalls = 0
    with ctx.workdir("async_quarter") as work:
        source = images.make_dense(os.path.join(work, "disk0.raw"), acfg.quarter_disk)
        for _ in range(acfg.quarter_reps):
            rules: list[Throttle] = []
            m, _, trace = migrate_to(ctx, case, work, source, "async", filters, params, acfg.pre_seconds,
                                  rule=throttled(acfg.throttle_bound, int(STUN_BUDGET * link), rules),
                                  converge_timeout=acfg.converge_timeout, copy_rate=link)
            rate_before.append(trace.throughput(trace.meta["start"] + 0.3, trace.meta["start"] + acfg.pre_seconds))
            if m is not None:
                converge.append(m.copy_done - m.started)
                total.append(m.finished - m.started)
                throttles.append(m.disks_before_switch["disk0"]["throttle_seconds"])
            raised = rules[0].first_raised
            stalls += rules[0].stalled
            if raised is not None:
                rate_throttled.append(trace.throughput(raised, m.copy_done if m else trace.meta["stopped"]))
            run = qemu_to(work, case, source, "background", filters, params, acfg.pre_seconds,
                          acfg.qemu_ready_timeout)
            assert run.trace is not None
            qemu_rate.append(run.trace.throughput(run.started, run.ready))
            if run.converged:
                qemu_ready.append(run.ready - run.started)
            else:
                qemu_missed += 1
                case.notes.append(f"QEMU background: {run.stalled} (did not converge)")
    add_measured(case, "guest write rate before the migration (svmotion runs)", rate_before, "B/s")
    add_measured(case, "svmotion async: install to converged (dirty + pending within the stun budget)", converge, "s")
    add_measured(case, "svmotion async: whole migration (install to finish)", total, "s")
    add_measured(case, "svmotion async: guest write rate while throttled (first raise to converged)",
             rate_throttled, "B/s")
    add_measured(case, "svmotion async: throttle at the switchover (per guest update)", throttles, "s")
    add_measured(case, "svmotion async: stalls the governor reported (runs)", [float(stalls)], "ratio")
    add_measured(case, "QEMU background: start to READY (converged runs)", qemu_ready, "s")
    add_measured(case, "QEMU background: guest write rate from start to READY or the timeout", qemu_rate, "B/s")
    case.verdict("svmotion async: runs converged / runs",
                 len(converge) / acfg.quarter_reps, 1.0, "higher", "%")
    case.notes.append(f"QEMU background: {qemu_missed} of {acfg.quarter_reps} runs reached no READY "
                      f"within {acfg.qemu_ready_timeout:.0f} s.")
    case.notes.append(f"{size_label(acfg.quarter_disk)} dense disk; destination nbdkit --filter=rate "
                      f"rate={link * 8} (bits/s: {link / 1e6:g} MB/s for reads and writes together). "
                      f"Throttle: the agent's Governor (agent/convergence.py), bound "
                      f"{acfg.throttle_bound * 1e3:g} ms, target dirty + pending <= 50 ms of the "
                      "destination's rate; converged = the copy passes ended within that target.")
    return case


CASES: dict[str, Callable[[Context], Case]] = {
    "async_slow_dest": case_slow_dest,
    "async_quarter": case_quarter_rate,
}
