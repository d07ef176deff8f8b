"""One trial: a VM under fio and the VerifyingWriter, a migration with one fault, the invariants,
then one more migration without a fault, and its invariants.

Design notes
- Real parts only: the agent is a real `svmotion agent` process (tests/agentproc.py's
  AgentProcess: config, start, API, CLI, kill, stop by PID), which starts nbdkit with the real
  plugin; the migration is started with the real CLI (`svmotion migrate ... --json`); fio talks
  NBD to the VM's socket with its own nbd engine; the writer uses libnbd.
- Disk layout: fio owns the first half of every disk, the writer's first run (A, during the faulted
  migration) the third quarter, its second run (B, during the next migration) the last quarter:
  a writer's model stays exact for its region while the other workloads write elsewhere. Disks
  are dense (generation-0 pattern) or sparse (pattern extents and holes; the model starts from a
  pristine copy), so the copier's hole skipping is under test too. Each disk has a sidecar and the
  VM an nvram file, so every kind of object has a partial and a final name.
- Timeline: workload on, 0.5 s, `migrate` with the fault armed, wait for the agent's end record
  (through agent restarts), 0.5 s more of workload (the guest must keep working on the side it was
  left on), workload off, check. Then: an agent that carries an SVMOTION_INJECT is restarted
  without it (shutdown, nbdkit keeps serving, start: the new agent adopts), the next migration
  runs to a fresh plain directory under writer B and fio, and everything is checked again.
- Guest errors: a killed nbdkit drops its clients, so the writer's run A and the fio rounds that
  overlap the kill..restart window may fail: those are expected; any other guest error is a
  violation. The destination causing a guest error is what the summary counts per destination fault.
- Every resource is on the trial's Resources (see resources.py), undone in reverse order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbd

from agent.supervisor import process_start_time
from svlab.writer import PATTERN, VerifyingWriter, WriterReport, file_digest, fill_pattern_image
from faults import checks
from faults.checks import Check, World
from faults.dest import Destination, NotApplicable, failing_ext4, plain, small_tmpfs
from faults.fio import FioWorkload, Verdict
from faults.inject import FaultThread, Fired, record
from faults.params import KINDS, TrialParams, draw, injection
from faults.resources import Resources, tail

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests"))      # tests/agentproc.py: the one harness of a real agent process
from agentproc import NOT_ANSWERING, AgentPool, AgentProcess, cli_argv  # noqa: E402

MiB = 1 << 20
WARMUP_S = 0.5
AFTER_S = 0.5
OUTCOME_TIMEOUT_S = 180.0
LOG_COPY_LIMIT = 256 * 1024


class ProductDown(Exception):
    """The agent or its nbdkit stopped answering: a violation of `invariant`, not a harness error."""

    def __init__(self, invariant: str, message: str):
        super().__init__(message)
        self.invariant = invariant


@dataclass
class TrialResult:
    """One line of the results file."""
    index: int | None
    seed: int
    repro: str
    params: dict[str, Any]
    fault: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    outcome: dict[str, Any] = field(default_factory=dict)
    next_outcome: dict[str, Any] = field(default_factory=dict)
    invariants: dict[str, dict[str, Any]] = field(default_factory=dict)
    guest: dict[str, Any] = field(default_factory=dict)
    lost_blocks: int = 0
    dest_caused_guest_errors: int = 0
    other_guest_errors: int = 0
    not_applicable: str | None = None
    harness_error: str | None = None
    cleanup: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        return [name for name, c in self.invariants.items() if c["ok"] is False]

    @property
    def failed(self) -> bool:
        return bool(self.violations or self.harness_error or self.cleanup)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "violations": self.violations}


# ---- the VM -------------------------------------------------------------------------------------

def make_disk(path: Path, name: str, size: int, layout: str) -> None:
    """Dense: pattern everywhere. Sparse: pattern in three extents, holes elsewhere."""
    if layout == "dense":
        fill_pattern_image(path, name, size)
        return
    step = size // 8
    fill_pattern_image(path, name, size, [(0, step), (3 * step, step // 2), (6 * step + step // 2, step // 4)])


def build_vm(params: TrialParams, root: Path, pool: AgentPool) -> tuple[AgentProcess, dict[str, Any]]:
    """Sources, sidecars, nvram and the agent's config; (agent, initial model per disk)."""
    src = root / "src"
    src.mkdir()
    disks, initial, sidecars = {}, {}, {}
    for i, size in enumerate(params.disk_sizes):
        name = f"disk{i}"
        disks[name] = src / f"{name}.raw"
        make_disk(disks[name], name, size, params.layout)
        if params.layout == "dense":
            initial[name] = PATTERN
        else:
            initial[name] = str(root / f"{name}.pristine")
            subprocess.run(["cp", "--sparse=always", str(disks[name]), initial[name]], check=True)
        sidecars[name] = [src / f"{name}.ctk"]
        sidecars[name][0].write_bytes(os.urandom(4096))
    nvram = src / "vm1.nvram"
    nvram.write_bytes(os.urandom(8192))
    vm = AgentProcess(root=root, state=pool.state_dir("svf-"), disks=disks, sidecars=sidecars, files=[nvram],
                      lease=params.lease, metrics="")
    vm.write_config()
    pool.add(vm)
    return vm, initial


def writer_region(size: int, run: int) -> tuple[int, int]:
    """Run 0 (A): the third quarter of the disk; run 1 (B): the fourth."""
    return size // 2 + run * (size // 4), size // 4


def make_writers(params: TrialParams, vm: AgentProcess, initial: dict[str, Any], run: int
                 ) -> dict[str, VerifyingWriter]:
    wp = params.writer
    return {disk: VerifyingWriter({disk: vm.uri(disk)}, initial={disk: initial[disk]}, connections=wp.connections,
                                  queue_depth=wp.queue_depth, rate=wp.rate,
                                  region=writer_region(size, run), zero_ratio=wp.zero_ratio,
                                  trim_ratio=wp.trim_ratio, seed=wp.seed + 2 * i + run)
            for i, (disk, size) in enumerate(zip(vm.disks, params.disk_sizes))}


def stop_writers(writers: dict[str, VerifyingWriter]) -> dict[str, WriterReport]:
    return {disk: w.stop() for disk, w in writers.items()}


# ---- observing ----------------------------------------------------------------------------------

def observe(vm: AgentProcess) -> World:
    state = vm.status()
    saved = None
    paths_json = vm.state / f"{vm.name}.paths.json"
    if paths_json.exists():
        saved = json.loads(paths_json.read_text()).get("disks")
    hello = vm.plugin("hello")
    status = vm.plugin("status")
    return World(outcome=state["last"], agent_disks={d["name"]: d["path"] for d in state["disks"]},
                 saved_disks=saved, served_disks={d["name"]: d["path"] for d in hello["disks"]},
                 plugin_disks=status["disks"], plugin_stun=status["stun"])


def wait_outcome(vm: AgentProcess, cli: subprocess.Popen, fault: FaultThread) -> tuple[str | None, str | None]:
    """Wait until no migration runs any more (through agent restarts); (its id, what went wrong or None)."""
    deadline = time.monotonic() + OUTCOME_TIMEOUT_S
    mid = None
    while time.monotonic() < deadline:
        try:
            st = vm.status()
        except NOT_ANSWERING:
            st = None           # the agent is down or starting (agent_kill): ask again
        if st is not None:
            if st["migration"]:
                mid = st["migration"]["id"]
            elif (st["last"] is not None or cli.poll() is not None) and not fault.is_alive():
                if st["last"] is None:
                    return mid, "the agent has no record of the migration's end (a restarted agent forgot it)"
                return mid or st["last"].get("id"), None
            if st["migration"] is None and cli.poll() is not None and mid is None:
                fault.cancel.set()      # refused at once: no moment will come
        time.sleep(0.05)
    fault.cancel.set()
    return mid, f"the migration did not end within {OUTCOME_TIMEOUT_S:.0f} s"


# ---- verification -------------------------------------------------------------------------------

def verify_writers(writers: dict[str, VerifyingWriter], params: TrialParams, run: int,
                   target: dict[str, tuple[str, str]]) -> list[str]:
    """Bad blocks of each writer's region on `target[disk]` ("nbd", uri) or ("file", path)."""
    bad = []
    for (disk, w), size in zip(writers.items(), params.disk_sizes):
        kind, where = target[disk]
        region = writer_region(size, run)
        offsets = w.verify_nbd(disk, where, region) if kind == "nbd" else w.verify_image(disk, where, region)
        bad += [f"writer: {w.describe(disk, o)}" for o in offsets]
    return bad


def data_check(vm: AgentProcess, params: TrialParams, fio: FioWorkload,
               runs: list[tuple[int, dict[str, VerifyingWriter]]]) -> tuple[Check, int]:
    """What the VM reads now (through nbdkit) against fio's replay and the writers' models."""
    nbd_targets = {d: ("nbd", vm.uri(d)) for d in vm.disks}
    bad = []
    try:
        for run, writers in runs:
            bad += verify_writers(writers, params, run, nbd_targets)
    except nbd.Error as err:
        return checks.violated(f"the VM's disks cannot be read through nbdkit: {err}"), 0
    verdict = fio.verify(lambda d: nbd_targets[d])
    bad += [f"fio: {d}@{o:#x}: {why}" for d, o, why in verdict.bad]
    text = f"writer {sum(1 for b in bad if b.startswith('writer'))} bad blocks; fio {verdict.summary()}"
    if bad or verdict.errors:
        return checks.violated(f"{text}; first: {bad[:5]}"), len(bad)
    return checks.held(text), 0


def stale_side_evidence(world: World, vm: AgentProcess, params: TrialParams, fio: FioWorkload,
                        runs: list[tuple[int, dict[str, VerifyingWriter]]]) -> str:
    """When the agent records other files than nbdkit serves: what those files lack."""
    believed = world.agent_disks if world.agent_disks != world.served_disks else world.saved_disks or {}
    other = {d: p for d, p in believed.items() if p != world.served_disks.get(d)}
    if not other or not all(os.path.isfile(p) for p in other.values()):
        return ""
    target = {d: ("file", other[d]) if d in other else ("nbd", vm.uri(d)) for d in vm.disks}
    bad = []
    for run, writers in runs:
        bad += verify_writers(writers, params, run, target)
    verdict: Verdict = fio.verify(lambda d: target[d])
    return (f"; the agent's files {other} lack {len(bad)} writer blocks and {len(verdict.bad)} fio blocks "
            f"(a restart of nbdkit would serve them)")


def guest_errors(reports: dict[str, WriterReport], fio: FioWorkload, first_round: int,
                 window: tuple[float, float] | None, writer_errors_expected: bool) -> tuple[list[str], list[str]]:
    """(unexpected, expected) guest errors; `window` = (kill, back) of a killed nbdkit."""
    unexpected, expected = [], []
    for disk, rep in reports.items():
        (expected if writer_errors_expected else unexpected).extend(f"writer {disk}: {e}" for e in rep.errors[:20])
    for rnd in fio.rounds[first_round:]:
        if not rnd.errors:
            continue
        in_window = window is not None and rnd.started <= window[1] + 0.5 and rnd.ended >= window[0] - 0.1
        (expected if in_window else unexpected).append(f"fio round {rnd.index}: {'; '.join(rnd.errors[:3])}")
    return unexpected, expected


# ---- the trial ----------------------------------------------------------------------------------

def repro_command(seed: int, params: TrialParams) -> str:
    kinds = "" if set(params.kinds) == set(KINDS) else f" --fault {','.join(params.kinds)}"
    return f"python -m faults --trial-seed {seed}{kinds}"


def make_destination(params: TrialParams, root: Path, res: Resources) -> Destination:
    total = sum(params.disk_sizes)
    kind = params.fault.kind
    if kind == "dest_full":
        return small_tmpfs(res, root / "dest", total + 4 * MiB)
    if kind == "dest_eio":
        return failing_ext4(res, root / "dest", root / "failing", 2 * total + 64 * MiB, params.fault.eio_rate)
    return plain(root / "dest")


def migrate_argv(vm: AgentProcess, params: TrialParams, dest: Path, rate: int) -> list[str]:
    argv = cli_argv(vm.socket, "migrate", vm.name, "--dest", str(dest), "--json",
                    "--stun-strategy", params.strategy, "--mirror", params.mirror,
                    "--granularity", str(params.granularity))
    return argv + (["--rate", str(rate)] if rate else [])


def run_trial(seed: int, kinds: tuple[str, ...], workroot: Path, logdir: Path | None = None,
              index: int | None = None) -> TrialResult:
    params = draw(seed, kinds)
    result = TrialResult(index, seed, repro_command(seed, params), params.to_dict())
    root = Path(tempfile.mkdtemp(prefix=f"trial-{seed}-", dir=workroot))
    res = Resources(root)
    res.defer(f"remove {root}", shutil.rmtree, root, True)
    t_start = time.monotonic()
    trial = Trial(params, root, res, result)
    try:
        try:
            trial.run()
        except NotApplicable as err:
            result.not_applicable = str(err)
        except ProductDown as err:
            result.invariants[err.invariant] = checks.violated(str(err)).to_dict()
        if trial.vm is not None and result.not_applicable is None:
            trial.check_nbdkit()
    except KeyboardInterrupt:
        result.harness_error = "interrupted"
        raise
    except Exception as err:  # noqa: BLE001  (a harness failure is a result to show, the campaign goes on)
        result.harness_error = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
    finally:
        vm = trial.vm
        if result.failed and vm is not None:
            collect_logs(result, vm, root, logdir)
        extra = [vm.proc.pid] if vm is not None and vm.proc is not None else []
        res.close()
        result.cleanup = res.errors + res.leftovers(extra)
        result.timing["trial_s"] = round(time.monotonic() - t_start, 2)
    return result


def raced_commit(record: dict[str, Any], fired_wall: float | None) -> bool:
    """Did a destination fault fire after the migration began its commit (the last flush_dest
    before the switchover stun)? Only a successful migration has committed."""
    if record.get("state") != "success" or fired_wall is None:
        return False
    switchovers = [s for s in record.get("stuns", []) if s.get("kind") == "switchover"]
    flushes = [s for s in record.get("steps", []) if s.get("name") == "flush_dest"]
    if not switchovers:
        return False
    commit = switchovers[-1]["started"] - (flushes[-1]["seconds"] if flushes else 0.0) - 0.005
    return fired_wall >= commit


def cli_record(path: Path) -> dict[str, Any] | None:
    """The migration record `svmotion migrate --json` printed (None: it printed none)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") else None


def last_line(path: Path) -> str:
    lines = tail(path, 2000).strip().splitlines()
    return lines[-1] if lines else ""


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def kernel_segfaults(since: float) -> list[str]:
    """The kernel's segfault lines about nbdkit since `since` (seconds of uptime), if dmesg reads."""
    done = subprocess.run(["dmesg"], capture_output=True, text=True)
    found = []
    for line in done.stdout.splitlines():
        m = re.match(r"\[\s*(\d+\.\d+)\] (nbdkit\[\d+\]: segfault.*)", line)
        if m and float(m.group(1)) >= since:
            found.append(f"kernel (any nbdkit on this host): {m.group(2)[:160]}")
    return found[:3]


def collect_logs(result: TrialResult, vm: AgentProcess, root: Path, logdir: Path | None) -> None:
    """Excerpts into the result, whole logs (bounded) into LOGDIR/trial-SEED/."""
    sources = sorted(root.glob("agent-*.log")) + [vm.state / f"{vm.name}.nbdkit.log"] + \
        sorted(root.glob("migrate-*.log")) + sorted(root.glob("migrate-*.json")) + sorted(root.glob("failing/*.log"))
    for path in sources:
        if path.exists():
            result.logs[path.name] = tail(path, 3000)
    if logdir is not None:
        keep = logdir / f"trial-{result.seed}"
        keep.mkdir(parents=True, exist_ok=True)
        for path in sources:
            if path.exists():
                (keep / path.name).write_text(tail(path, LOG_COPY_LIMIT))


class Trial:
    """The steps of one trial; `run()` fills the result (see the module notes)."""

    def __init__(self, params: TrialParams, root: Path, res: Resources, result: TrialResult):
        self.p, self.root, self.res, self.result = params, root, res, result
        self.vm: AgentProcess | None = None
        self.fio: FioWorkload | None = None
        self.first_outcome: dict[str, Any] | None = None
        self.reports_a: dict[str, WriterReport] = {}
        self.t0 = 0.0
        self.killed: set[int] = set()           # nbdkit pids the harness killed (the fault)
        self.unended: str | None = None         # why the faulted migration has no end record
        self.uptime0 = uptime()
        self.writers: list[tuple[int, dict[str, VerifyingWriter]]] = []

    def check(self, name: str, c: Check) -> None:
        assert name in checks.INVARIANTS, name
        self.result.invariants[name] = c.to_dict()

    def run(self) -> None:
        p, res = self.p, self.res
        dest = make_destination(p, self.root, res)
        pool = AgentPool()
        res.defer("stop the agent and its nbdkit", pool.close)
        vm, initial = build_vm(p, self.root, pool)
        self.vm = vm
        inject = injection(p.fault)
        vm.start(inject, wait_nbdkit=True)
        sizes = dict(zip(vm.disks, p.disk_sizes))
        self.fio = fio = FioWorkload(sizes, vm.nbd_socket, p.fio, p.seed, self.root / "fio", res)
        res.defer("stop fio", fio.stop)
        fired, mid, cli_code = self.faulted_migration(dest, initial, inject)
        self.after_faulted(dest, fired, mid, cli_code)
        killed_agent = p.fault.kind == "agent_kill" and fired.fired
        if inject and not killed_agent:
            self.restart_agent_plainly()
        self.next_migration(initial)

    # ---- the faulted migration ---------------------------------------------------------------

    def faulted_migration(self, dest: Destination, initial: dict[str, Any], inject: str | None
                          ) -> tuple[Fired, str | None, int | None]:
        p, vm, fio = self.p, self.vm, self.fio
        writers = make_writers(p, vm, initial, 0)
        self.writers.append((0, writers))
        self.res.defer("stop writer A", stop_writers, writers)
        fio.start()
        for w in writers.values():
            w.start()
        time.sleep(WARMUP_S)
        finals = {d: str(dest.path / f"{d}.raw") for d in vm.disks}
        with open(self.root / "migrate-1.json", "wb") as out, open(self.root / "migrate-1.log", "wb") as err:
            self.t0 = t0 = time.monotonic()
            cli = self.res.spawn(migrate_argv(vm, p, dest.path, p.rate), stdout=out, stderr=err, cwd=ROOT)
        fault = FaultThread(p.fault, vm, dest, finals, t0)
        self.res.defer("cancel the fault", fault.cancel.set)
        fault.start()
        mid, unended = wait_outcome(vm, cli, fault)
        fault.join(60)
        self.result.timing["migration_s"] = round(time.monotonic() - t0, 2)
        try:
            cli_code = cli.wait(30)
        except subprocess.TimeoutExpired:
            cli_code = None
        time.sleep(AFTER_S)
        reports = stop_writers(writers)
        fio.stop()
        self.result.fault = record(p.fault, fault.fired)
        if fault.fired.error:
            raise RuntimeError(f"firing {p.fault.kind}: {fault.fired.error}")
        self.unended = unended
        if fault.fired.killed_pid:
            self.killed.add(fault.fired.killed_pid)
        self.reports_a = reports
        return fault.fired, mid, cli_code

    def after_faulted(self, dest: Destination, fired: Fired, mid: str | None, cli_code: int | None) -> None:
        p, vm, fio = self.p, self.vm, self.fio
        try:
            world = observe(vm)
        except NOT_ANSWERING as err:
            raise ProductDown("one_intact_side", f"after the faulted migration the agent or nbdkit does not "
                                                 f"answer: {type(err).__name__}: {err}") from None
        if self.unended and world.outcome is None:
            # The CLI may have printed the record before the agent that kept it died.
            world.outcome = cli_record(self.root / "migrate-1.json")
            self.check("outcome_recorded", checks.violated(self.unended) if world.outcome is None else checks.held(
                f"{world.outcome['state']} (only in the CLI's output: the restarted agent has no record)"))
        elif self.unended:
            self.check("outcome_recorded", checks.violated(self.unended))
        else:
            self.check("outcome_recorded", checks.outcome_recorded(world, mid))
        rec = world.outcome or {}
        self.result.outcome = {"id": rec.get("id"), "state": rec.get("state"), "error": rec.get("error"),
                               "warnings": rec.get("warnings"), "cli_exit": cli_code}
        if p.fault.kind.startswith("dest_") and fired.fired and raced_commit(rec, fired.wall):
            raise NotApplicable(f"{p.fault.kind}: the destination broke while the migration committed (after its "
                                f"last flush before the switchover): the new storage failing, not a migration fault")
        killed_nbdkit = p.fault.kind == "nbdkit_kill" and fired.fired
        window = None
        if killed_nbdkit:
            kill = self.t0 + (fired.at_s or 0.0)
            window = (kill, kill + (fired.recovered_s if fired.recovered_s is not None else 1e9))
        unexpected, expected = guest_errors(self.reports_a, fio, 0, window, killed_nbdkit)
        self.count_guest_errors(unexpected, expected)
        self.check("guest_saw_no_error", checks.violated("; ".join(unexpected[:5])) if unexpected
                   else checks.held(f"{len(expected)} expected errors of the killed nbdkit" if expected else ""))
        stall = max((r.longest_stall for r in self.reports_a.values()), default=0.0)
        self.check("stun_within_lease", checks.stun_within_lease(stall, p.lease, not killed_nbdkit))
        sources = {d: str(path) for d, path in vm.disks.items()}
        finals = {d: str(dest.path / f"{d}.raw") for d in vm.disks}
        data, lost = data_check(vm, p, fio, self.writers)
        self.result.lost_blocks = max(self.result.lost_blocks, lost)   # phase 2 re-checks the same blocks
        self.check("acked_writes_kept", data)
        self.check("one_intact_side", checks.one_intact_side(world, sources, finals))
        state = checks.effective_state(world, finals)
        agrees = checks.agent_agrees(world)
        if agrees.ok is False:
            agrees.detail += stale_side_evidence(world, vm, p, fio, self.writers)
        self.check("agent_agrees_with_nbdkit", agrees)
        names = checks.final_names(list(vm.disks), vm.files, [s for ss in vm.sidecars.values() for s in ss])
        self.check("no_complete_looking_partial", checks.no_complete_looking_partial(world, dest.path, names, state))
        self.check("cli_exit_matches", checks.cli_exit_matches(world.outcome, cli_code,
                                                               p.fault.kind == "agent_kill" and fired.fired))
        self.first_outcome = world.outcome

    def check_nbdkit(self) -> None:
        """nbdkit_never_crashed: the agent saw no nbdkit exit the harness did not cause, the last
        one still runs, its log has no fatal error. (The kernel's segfault lines are evidence only:
        other nbdkits run on this machine.)"""
        vm = self.vm
        logs = "".join(tail(p, 1 << 20) for p in sorted(self.root.glob("agent-*.log")))
        exits = [int(pid) for pid in re.findall(r"nbdkit pid (\d+) exited", logs)]
        problems = [f"nbdkit pid {pid} exited by itself" for pid in exits if pid not in self.killed]
        pid = vm.nbdkit_pid()
        if pid is None or process_start_time(pid) is None:
            problems.append(f"the VM's nbdkit (pid {pid}) is not running")
        nbdkit_log = tail(vm.state / f"{vm.name}.nbdkit.log", 1 << 20)
        fatal = [line for line in nbdkit_log.splitlines() if "Fatal Python error" in line or "Segmentation" in line]
        problems += fatal[:3]
        if problems:
            problems += kernel_segfaults(self.uptime0)
        self.check("nbdkit_never_crashed", checks.violated("; ".join(problems)) if problems else checks.held())

    def count_guest_errors(self, unexpected: list[str], expected: list[str]) -> None:
        g = self.result.guest
        g.setdefault("unexpected", []).extend(unexpected[:10])
        g.setdefault("expected", []).extend(expected[:5])
        if self.p.fault.kind.startswith("dest_"):
            self.result.dest_caused_guest_errors += len(unexpected)
        else:
            self.result.other_guest_errors += len(unexpected)

    def restart_agent_plainly(self) -> None:
        """The agent keeps SVMOTION_INJECT for its life: restart it without (nbdkit keeps serving)."""
        vm = self.vm
        try:
            vm.call("shutdown", stop_vms=False)
            vm.proc.wait(20)
        except (*NOT_ANSWERING, subprocess.TimeoutExpired):
            vm.kill_agent()
        vm.start(None, wait_nbdkit=True)

    # ---- the next migration --------------------------------------------------------------------

    def next_migration(self, initial: dict[str, Any]) -> None:
        p, vm, fio = self.p, self.vm, self.fio
        first = self.first_outcome or {}
        frozen = {}
        if first.get("state") == "success":
            frozen = {d: file_digest(path) for d, path in vm.disks.items()}
        dest2 = plain(self.root / "dest2")
        writers = make_writers(p, vm, initial, 1)
        self.writers.append((1, writers))
        self.res.defer("stop writer B", stop_writers, writers)
        first_round = len(fio.rounds)
        try:
            for w in writers.values():
                w.start()
        except nbd.Error as err:
            raise ProductDown("next_migration_succeeds", f"the VM's disks do not answer before the next "
                                                         f"migration: {err}") from None
        fio.start()
        time.sleep(WARMUP_S)
        t = time.monotonic()
        try:
            with open(self.root / "migrate-2.log", "wb") as out:
                done = subprocess.run(migrate_argv(vm, p, dest2.path, 0), stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT, timeout=OUTCOME_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ProductDown("next_migration_succeeds", f"`svmotion migrate` did not end within "
                                                         f"{OUTCOME_TIMEOUT_S:.0f} s") from None
        self.result.timing["next_migration_s"] = round(time.monotonic() - t, 2)
        time.sleep(AFTER_S)
        reports = stop_writers(writers)
        fio.stop()
        try:
            world = observe(vm)
        except NOT_ANSWERING as err:
            raise ProductDown("next_migration_succeeds", f"after the next migration the agent or nbdkit does "
                                                         f"not answer: {type(err).__name__}: {err}") from None
        rec = world.outcome or {}
        self.result.next_outcome = {"id": rec.get("id"), "state": rec.get("state"), "error": rec.get("error"),
                                    "cli_exit": done.returncode}
        ok = done.returncode == 0 and rec.get("state") == "success" and rec.get("id") != first.get("id")
        self.check("next_migration_succeeds", checks.held() if ok else checks.violated(
            f"exit {done.returncode}, record {rec.get('state')}: {rec.get('error')}; "
            f"{last_line(self.root / 'migrate-2.log')}"))
        unexpected, _ = guest_errors(reports, fio, first_round, None, False)
        self.count_guest_errors(unexpected, [])
        self.check("next_guest_saw_no_error", checks.violated("; ".join(unexpected[:5])) if unexpected
                   else checks.held())
        finals = {d: str(dest2.path / f"{d}.raw") for d in vm.disks}
        data, lost = data_check(vm, p, fio, self.writers)
        self.result.lost_blocks = max(self.result.lost_blocks, lost)   # phase 2 re-checks the same blocks
        side = checks.one_intact_side(world, {d: str(s) for d, s in vm.disks.items()}, finals) if ok else \
            checks.not_applicable("the next migration failed")
        agrees = checks.agent_agrees(world)
        problems = [c.detail for c in (data, side, agrees) if c.ok is False]
        self.check("next_data_intact", checks.violated("; ".join(problems)) if problems else checks.held(data.detail))
        if frozen:
            changed = [d for d, digest in frozen.items() if file_digest(vm.disks[d]) != digest]
            self.check("source_frozen_after_switchover", checks.violated(f"sources written after the switchover: "
                                                                         f"{changed}") if changed else checks.held())
        else:
            self.check("source_frozen_after_switchover", checks.not_applicable("the faulted migration did not "
                                                                                "succeed"))
