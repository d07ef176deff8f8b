"""The phase engine: one live migration of one VM's disks, walking the seed's phases by name.

Design notes
- Shaped like QEMU's mirror job: one `run()` loop over PHASES with a pause/cancel point before
  every phase and inside every wait, and ONE exit path, `_cleanup()`, shared by success, abort
  and failure. Whatever a phase created is recorded as it is created (dest files, the held stun,
  installed mirrors), so the shared cleanup knows exactly what to undo.
- Lifecycle of a migration:

  | state    | how it ends                                                       | exit code |
  | -------- | ----------------------------------------------------------------- | --------- |
  | running  | walks Null .. Complete, then Cleanup                              |           |
  | success  | switchover done; dest files renamed to DEST/<disk>.raw; finish    | 0         |
  | aborted  | abort() before switchover: plugin `abort`, dest files deleted     | 6         |
  | failed   | any error before switchover: same rollback as aborted             | 5         |
  | failed   | after switchover, `--verify` found a difference (or could not     | 8         |
  |          | compare): nothing is rolled back, the source is kept              |           |

  Before switchover the source is authoritative (invariant 1), so rollback is always possible
  and always the same: drop the mirror, delete what we created; except that when the mirror
  node died, the partial disks stay for the next migration to resume (agent/partial.py). After
  switchover the destination is authoritative and nothing is rolled back: a later error is kept
  as a warning, and a failed verification fails the migration without undoing it.
- DiskCreate / DiskLoad: a disk whose partial an earlier migration left at the destination (with
  a matching identity record) is not created but loaded: its first pass is a `load` pass that
  compares per-chunk digests and copies only the chunks that differ.
- Verify (`--verify`, in Complete): after the switchover each destination is compared with its
  frozen source by digests, skipping what the guest rewrote since (agent/verify.py); the
  result is in the record (`verify`) and the metrics, and the source is deleted only after a
  match.
- The stun is a lease held by the engine's control connection. If this process dies, the plugin
  sees the connection close and rolls back at once; if the engine hangs, the lease expires.
  Nothing proportional to the data runs under a stun: the destination is flushed before the
  switchover stun, and dirty passes run until what remains fits the stun budget.
- Convergence, for every mirror mode: the copy rate is measured (bulk pass, then each dirty
  pass); dirty passes run (and in async mode, queued sends drain) until what remains (dirty
  bytes plus queued async sends) fits rate * stun_budget. Every status poll of the copy phases
  (DiskCopy's pass, CopyDirtyData's passes and waits) feeds the governor (agent/convergence.py),
  which compares what the guest adds to what remains with what drains to the destination: when
  what remains stops shrinking because of the guest it has the mirror node delay each guest
  write (`mirror_set throttle`), rising only as far as needed and never beyond `max_throttle`;
  when the guest slows down it lifts. There is no pass limit: a migration that would need more
  than the bound is *stalled* (`convergence.stall` in the record, a warning in the log, the
  gauge svmotion_migration_stalled, one line from `svmotion migrate` naming the choices) and
  goes on copying at the bound until the operator raises the bound, switches the mirror to sync
  (the guest then waits for the destination itself) or aborts, or until the guest slows down.
- The async end-game: an async mirror turns sync (`mirror_set`, no stun) just before
  `flush_dest`, and back to async if the switchover attempt fails. Otherwise the guest refills
  the send queue while `flush_dest` drains it, and the switchover stun waits for the refill
  (measured on a link at a quarter of the guest's rate: 323 and 365 ms stuns against a 50 ms
  budget). Sync from there on, the guest's writes wait for the destination for the last moments
  only, and whatever is still queued drains before the stun (flush_dest waits for it); a sync
  write to a chunk with a send still queued leaves it dirty, counted in what the stun copies.
- Runtime changes (`set`, svmotion set): the mirror mode and the copy rate go to the mirror node
  (`mirror_set`, no stun: the plugin switches modes while the guest runs), the throttle bound to
  the governor, the stun budget to the convergence target; each is kept in the options (so the
  journal, and a resumed job, have them) and recorded in `changes`. `_mirror_lock` orders them
  with the mirror's install and the switchover: before the install a change only edits the
  options the install reads; after the switchover it is refused.
- Journal and resume: the job describes itself (`journal()`: options, plan, what it created,
  the phase it is in, its stuns and passes so far) to `save_journal` on entering each phase and
  at the switchover; the agent keeps that in state_dir. An agent that died mid-migration builds
  the job again from it (`from_journal`) and resumes at the phase its mirror node's state
  allows (daemon.py `_recover`): a mirror still installed is a checkpoint (its dirty map says
  what is left), a node serving the destination means the switchover happened. Every phase
  from DiskCreate on can therefore run again over its own earlier, interrupted run: DiskCreate
  keeps partial disks it made, DiskCopyDone renames only what is not renamed yet, `finish` and
  the source deletion accept work already done.
- Test-only fault injection (a testing aid, documented in README): env `SVMOTION_INJECT` holds
  comma-separated `hold:POINT=SECONDS` (sleep that long on reaching POINT, keeping whatever is
  held, e.g. the stun at Unstun) and `pause:PHASE` (wait before PHASE until aborted). A POINT is
  a phase (its entry) or one of STEP_POINTS, the steps between the switchover stun and the end of
  Cleanup where a crash must lose nothing.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from agent import metrics, partial
from agent.config import VmConfig
from agent.convergence import MAX_BOUND_S, Decision, Governor, Sample
from agent.destdir import DatastoreDir, DatastoreFiles, DestDir, on_other_host, remove_created
from agent.errors import Refused, SvmotionError
from agent.files import LOCAL_FILES, FileMirror, FileSource, FileSync, FileUnstable
from agent.jsonlines import JsonLinesClient, RemoteError
from agent.plan import (DiskPlan, MigrationOptions, growth_room_needed, human_bytes, parse_destination,
                        partial_name, plan_migration)
from agent.supervisor import process_start_time
from agent.verify import VerifyError, verify_disks
from nbd_plugin.backend import is_nbd_uri
from nbd_plugin.backend_nbd import NbdOptions

log = logging.getLogger("svmotion.phases")

PHASES = ("Null", "DiskSetup", "DiskCreate", "DiskLoad", "FileCreate", "Stun", "Unstun", "DiskCopy",
          "CopyDirtyInfo", "CopyDirtyData", "DiskCopyDone", "Complete", "Cleanup")
SAMPLE_INTERVAL_S = 0.25
POLL_INTERVAL_S = 0.05
MAX_SAMPLES = 20000
SWITCHOVER_ATTEMPTS = 3
# How long a job that lost its mirror node waits for the supervisor's word on why.
NODE_VERDICT_WAIT_S = 3.0
# Named steps where SVMOTION_INJECT can hold the job (see the module notes).
STEP_POINTS = ("CopyDirtyData.stunned", "CopyDirtyData.switched", "CopyDirtyData.released",
               "DiskCopyDone.renamed", "Cleanup.finished", "Cleanup.done")
# Until a pass has been measured, assume this copy rate (bytes/s) for the stun budget.
DEFAULT_RATE_GUESS = 200 * 2**20
# Pass records kept one by one; later dirty passes are summed into the last record (`count`), so
# that a long stalled migration keeps a record (and a journal) of bounded size.
MAX_PASS_RECORDS = 100
MAX_THROTTLE_EVENTS = 200
# Phases whose status polls feed the governor (their mirrors are installed, not switched yet).
GOVERNED_PHASES = ("DiskCopy", "CopyDirtyInfo", "CopyDirtyData")


class Aborted(Exception):
    """The user (or the agent shutting down) asked the migration to stop."""


class MigrationFailed(Exception):
    """A phase could not complete; the message is the one line the user sees."""


class NodeLost(MigrationFailed):
    """The mirror node's control connection broke: nbdkit exited or stopped answering."""


@dataclass
class Injection:
    """The SVMOTION_INJECT test hooks (see the module notes)."""

    hold: dict[str, float] = field(default_factory=dict)
    pause: set[str] = field(default_factory=set)

    @classmethod
    def from_env(cls, text: str | None = None) -> "Injection":
        text = os.environ.get("SVMOTION_INJECT", "") if text is None else text
        inj = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, rest = item.partition(":")
            phase, _, seconds = rest.partition("=")
            points = PHASES + STEP_POINTS if kind == "hold" else PHASES
            if phase not in points or kind not in ("hold", "pause") or (kind == "hold") != bool(seconds):
                raise ValueError(f"SVMOTION_INJECT item {item!r} is not hold:POINT=SECONDS or pause:PHASE "
                                 f"(POINT: a phase or one of {', '.join(STEP_POINTS)})")
            if kind == "pause" and PHASES.index(phase) >= PHASES.index("DiskCopyDone"):
                # After switchover abort is refused, so such a pause could never end.
                raise ValueError(f"SVMOTION_INJECT item {item!r}: pause only before DiskCopyDone")
            if kind == "hold":
                inj.hold[phase] = float(seconds)
            else:
                inj.pause.add(phase)
        return inj


class Migration:
    """One migration job. `validate()` refuses bad requests synchronously; `start()` runs the phases.

    Example:
        m = Migration(vm, node.client, paths, opts, open_destdir(opts.destination, tls, state_dir), on_done=save)
        m.validate(); m.start(); ...; m.abort(); m.wait()
    """

    def __init__(self, vm: VmConfig, connect: Callable[[], JsonLinesClient], paths: dict[str, Any],
                 options: MigrationOptions, dest: DestDir, on_done: Callable[["Migration"], None] | None = None,
                 injection: Injection | None = None,
                 save_journal: Callable[[dict[str, Any]], None] | None = None, nbd: NbdOptions | None = None,
                 open_place: Callable[[str], DestDir] | None = None):
        self.vm = vm
        self._connect = connect
        self.paths = paths          # current {"disks": {name: path}, "files": [...], "sidecars": {...}}
        self.options = options
        self.dest = dest                                  # where to (agent/destdir.py): here or another host
        self._nbd = nbd                                   # how to read a source on another host (verify)
        self._open_place = open_place                     # another host's datastore, for files there
        self._sources: dict[str, DatastoreDir] = {}       # the hosts source files are read from
        self._on_done = on_done
        self._inject = injection if injection is not None else Injection.from_env()
        self.id = uuid.uuid4().hex[:12]
        self.state = "running"
        self.phase = "Null"
        self.error: str | None = None
        self.warnings: list[str] = []
        self.started = time.time()
        self.ended: float | None = None
        self.phases: list[dict[str, Any]] = []
        self.stuns: list[dict[str, Any]] = []
        self.passes: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []            # flush_dest, file copies: timed, logged
        self.samples: list[dict[str, Any]] = []
        self.copy_rate_bps: float | None = None
        self.predicted_switchover_stun_s: float | None = None
        self.plan: list[DiskPlan] = []
        self.files: list[tuple[str, str]] = []            # per-VM files (source, dest final)
        self.last_status: dict[str, Any] | None = None
        self.new_paths: dict[str, Any] | None = None      # set at success: what the VM uses now
        self._created: list[str] = []                     # dest paths we made, for rollback
        self._files: FileMirror | None = None             # per-VM files and sidecars (agent/files.py)
        self._node: tuple[int, int | None] | None = None  # the mirror node's pid and start time
        self.kept_partials: list[str] = []                # partial disks kept for a resume
        self.left_partials: list[str] = []                # what an unreachable destination still holds
        self.verification: dict[str, Any] | None = None   # `--verify`: agent/verify.py's record
        self._ctl: JsonLinesClient | None = None
        self._stun_id: str | None = None
        self._stun_t0 = 0.0
        self._switched = False
        self._abort = threading.Event()
        self._abort_reason = "aborted by the user"
        self._abort_is_failure = False
        self._copied_base = 0
        self._done = threading.Event()
        self._samples_lock = threading.Lock()             # protects samples and last_status
        self._thread: threading.Thread | None = None
        self._save_journal = save_journal
        self._journal_lock = threading.Lock()             # the engine and `set` both save it
        self._resume_at = "Null"                          # the first phase run() walks
        self.changes: list[dict[str, Any]] = []           # `set` requests applied (module notes)
        self.throttle_events: list[dict[str, Any]] = []   # the governor's changes of the throttle
        self.stall: str | None = None                     # why the migration does not converge, while so
        self._governor = Governor(options.max_throttle)
        self._throttle_applied: float | None = 0.0        # what the mirror node has (None: unknown)
        self._convergence: dict[str, Any] = {}            # the governor's last view, for the record
        self._mirror_lock = threading.Lock()              # orders `set` with install, governor, switchover
        self._mirrors_installed = False

    # ---- public surface (called from the agent's API threads) ----------------------------------

    def validate(self, hello: dict[str, Any]) -> None:
        """DiskSetup's checks, run before the reply to `migrate`: raise Refused, changing nothing."""
        self.plan, self.files = plan_migration(self.vm, self.paths, hello, self.options, self.dest)

    def start(self) -> None:
        self._journal()       # before the reply to `migrate`: the agent may die at any moment now
        self._thread = threading.Thread(target=self.run, name=f"migration-{self.vm.name}", daemon=True)
        self._thread.start()

    def journal(self) -> dict[str, Any]:
        """What a restarted agent needs to resume this job (see the module notes)."""
        return {"id": self.id, "vm": self.vm.name, "options": asdict(self.options), "started": self.started,
                "phase": self.phase, "switched": self._switched, "copied_base": self._copied_base,
                "plan": [asdict(d) for d in self.plan], "files": self.files, "created": self._to_remove(),
                "new_paths": self.planned_paths(), "phases": self.phases, "stuns": self.stuns,
                "passes": self.passes, "steps": self.steps, "warnings": self.warnings,
                "copy_rate_bps": self.copy_rate_bps, "node": self._node, "verify": self.verification,
                "changes": self.changes, "throttle_events": self.throttle_events}

    @classmethod
    def from_journal(cls, vm: VmConfig, connect: Callable[[], JsonLinesClient], journal: dict[str, Any],
                     resume_at: str, dest: DestDir, **kwargs: Any) -> "Migration":
        """The job a dead agent was running, to go on at phase `resume_at`."""
        # Options a newer agent dropped (max_passes, before the governor) are ignored.
        known = {f.name for f in fields(MigrationOptions)}
        options = MigrationOptions(**{k: v for k, v in journal["options"].items() if k in known})
        m = cls(vm, connect, {}, options, dest, **kwargs)
        m.id, m.started, m._copied_base = journal["id"], journal["started"], journal["copied_base"]
        m.plan = [DiskPlan(**{**d, "sidecars": [tuple(s) for s in d["sidecars"]],
                              "resume": partial.Identity(**d["resume"]) if d.get("resume") else None})
                  for d in journal["plan"]]
        m.files = [tuple(f) for f in journal["files"]]
        m._created = list(journal["created"])
        for key in ("phases", "stuns", "passes", "steps", "warnings", "changes", "throttle_events"):
            setattr(m, key, list(journal.get(key) or []))
        m.copy_rate_bps = journal.get("copy_rate_bps")
        m._node = tuple(journal["node"]) if journal.get("node") else None
        m.verification = journal.get("verify")
        m._switched = resume_at in PHASES[PHASES.index("DiskCopyDone"):]
        m._mirrors_installed = resume_at in GOVERNED_PHASES
        m._throttle_applied = None      # the dead agent's governor may have left one: set it again
        m._resume_at = resume_at
        m.warnings.append(f"resumed at {resume_at} by a restarted agent (it stopped in {journal['phase']})")
        return m

    def _to_remove(self) -> list[str]:
        """What a rollback removes: what we made, and what we are about to make (a crash may come
        between an O_EXCL create and the next journal write; DiskSetup saw none of them exist)."""
        planned = [d.partial for d in self.plan] + [partial_name(f) for _, f in self.files] + \
                  [partial_name(f) for d in self.plan for _, f in d.sidecars]
        return self._created + [p for p in planned if p not in self._created]

    def planned_paths(self) -> dict[str, Any]:
        """Where the VM's disks and files live once this migration has succeeded: a remote disk
        at its export's URI, a remote file as HOST:/path (agent/plan.py Destination)."""
        there = self.dest.shown_path
        return {"disks": {d.name: self.served_location(d) for d in self.plan},
                "files": [there(f) for _, f in self.files],
                "sidecars": {d.name: [there(f) for _, f in d.sidecars] for d in self.plan}}

    def served_location(self, disk: DiskPlan) -> str:
        """What the mirror node serves the disk from after the switchover."""
        return disk.target if self.dest.remote else disk.final

    def abort(self, reason: str = "aborted by the user", failed: bool = False) -> None:
        """Ask the job to stop at its next cancel point; refused once the switchover is done.

        `failed`: the stop is a failure (e.g. nbdkit died), not the user's choice: exit 5, not 6.
        """
        if self._switched:
            raise Refused(f"VM {self.vm.name!r} has already switched to its destination; too late to abort")
        self._abort_reason = reason
        self._abort_is_failure = failed
        self._abort.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """The migration record of the API and of reports."""
        with self._samples_lock:
            sample_list = list(self.samples) if samples else None
            status = self.last_status
        out: dict[str, Any] = {
            "id": self.id, "vm": self.vm.name, "state": self.state, "phase": self.phase,
            "error": self.error, "warnings": list(self.warnings),
            "started": self.started, "ended": self.ended,
            "options": asdict(self.options),
            "disks": [{"name": d.name, "source": d.source, "dest": d.final, "size": d.size,
                       "resumed_from": d.resume.migration if d.resume else None} for d in self.plan],
            "phases": list(self.phases), "stuns": list(self.stuns), "passes": list(self.passes),
            "steps": list(self.steps),
            "copy_rate_bps": self.copy_rate_bps,
            "predicted_switchover_stun_seconds": self.predicted_switchover_stun_s,
            "progress": progress_of(status, self.plan, self._copied_base),
            "verify": self.verification, "kept_partials": list(self.kept_partials),
            "left_partials": list(self.left_partials),
            "changes": list(self.changes), "convergence": self.convergence_record(),
        }
        if sample_list is not None:
            out["samples"] = sample_list
        return out

    def convergence_record(self) -> dict[str, Any]:
        """The governor's view for the record: throttle, stall, rates, predictions (module notes)."""
        view = self._convergence
        converge = view.get("predicted_converge_seconds")
        finish = None
        if converge is not None:
            finish = converge + self.options.stun_budget + (self._verify_estimate() if self.options.verify else 0.0)
        return {"throttle_seconds": view.get("throttle_seconds", 0.0), "max_throttle": self.options.max_throttle,
                "stalled": self.stall is not None, "stall": self.stall,
                "dirtying_bps": view.get("dirtying_bps"), "dest_bps": view.get("dest_bps"),
                "remaining_bytes": view.get("remaining_bytes"), "target_bytes": view.get("target_bytes"),
                "predicted_converge_seconds": converge, "predicted_finish_seconds": finish,
                "throttle_events": list(self.throttle_events)}

    def set(self, mirror: str | None = None, rate: int | None = None, max_throttle: float | None = None,
            stun_budget: float | None = None) -> list[dict[str, Any]]:
        """Change the running migration (`svmotion set`); return the changes made (module notes).

        Raise Refused after the switchover or when the mirror node refuses (nothing changed then)."""
        asked = {"mirror": mirror, "rate": rate, "max_throttle": max_throttle, "stun_budget": stun_budget}
        with self._mirror_lock:
            if self.finished:
                raise Refused(f"VM {self.vm.name!r} is no longer migrating; nothing to set")
            if self._switched:
                raise Refused(f"VM {self.vm.name!r} has already switched to its destination; nothing left to set")
            new = {k: v for k, v in asked.items() if v is not None and v != getattr(self.options, k)}
            plugin: dict[str, Any] = {}
            if "mirror" in new:
                plugin["mode"] = new["mirror"]
            if "rate" in new:
                plugin["rate"] = new["rate"]
            if "max_throttle" in new:
                self._governor.set_bound(new["max_throttle"])
                if self._throttle_applied is not None and self._throttle_applied > self._governor.throttle:
                    plugin["throttle"] = self._governor.throttle
            applied = "mirror node" if plugin and self._mirrors_installed else "options"
            if plugin and self._mirrors_installed:
                try:
                    with self._connect() as ctl:
                        ctl.call("mirror_set", **plugin)
                except RemoteError as err:
                    raise Refused(f"the mirror node of VM {self.vm.name!r} refused the change: {err}") from None
                if "throttle" in plugin:
                    self._throttle_applied = plugin["throttle"]
                    self._note_throttle(Decision(plugin["throttle"], "cut to the new bound (svmotion set)"))
            made = [{"t": time.time(), "phase": self.phase, "what": key, "from": getattr(self.options, key),
                     "to": value, "applied": applied if key in ("mirror", "rate") else "agent"}
                    for key, value in new.items()]
            for key, value in new.items():
                setattr(self.options, key, value)
            if "max_throttle" in new and self.stall is not None and not self._governor.stalled:
                self._note_stall(False)
            self.changes += made
        for change in made:
            log.info("vm %s: set %s %s -> %s in %s (%s)", self.vm.name, change["what"], change["from"],
                     change["to"], change["phase"], change["applied"])
        if made:
            self._journal()
        return made

    # ---- the job -------------------------------------------------------------------------------

    def run(self) -> None:
        """Walk the phases; every way out goes through `_cleanup()`."""
        sampler = threading.Thread(target=self._sample_loop, name=f"sampler-{self.vm.name}", daemon=True)
        result, error = "success", None
        try:
            self._ctl = self._connect()
            sampler.start()
            for phase in PHASES[PHASES.index(self._resume_at):-1]:
                self._checkpoint(phase)
                self._run_phase(phase, getattr(self, f"_phase_{phase}"))
        except Aborted:
            result, error = "failed" if self._abort_is_failure else "aborted", self._abort_reason
        except NodeLost as err:
            # The supervisor notices a dead nbdkit within a second and says so (abort): its
            # verdict names the cause, where ours can only name the broken connection.
            told = self._abort.wait(NODE_VERDICT_WAIT_S)
            result, error = "failed", self._abort_reason if told else str(err)
        except (MigrationFailed, SvmotionError) as err:
            result, error = "failed", str(err)
        except RemoteError as err:
            result, error = "failed", f"mirror node refused {err}"
        except (OSError, ValueError) as err:
            result, error = "failed", f"{type(err).__name__}: {err}"
        except Exception as err:      # a bug: still roll back, and say it is one
            log.exception("vm %s: migration crashed", self.vm.name)
            result, error = "failed", f"internal error (a bug): {type(err).__name__}: {err}"
        if self._switched and result != "success":
            # After switchover the destination is authoritative: nothing to roll back.
            self.warnings.append(f"after switchover: {error}")
            result, error = "success", None
        try:
            self._run_phase("Cleanup", lambda: self._cleanup(result, error))
        except Exception as err:
            log.exception("vm %s: cleanup failed", self.vm.name)
            self.warnings.append(f"cleanup: {type(err).__name__}: {err}")
        if self.left_partials and error is not None:
            error = (f"{error}; {self.dest} did not answer the clean-up: its {len(self.left_partials)} partial "
                     f"files stay there until the next migration to it removes them")
        if self.verification is not None and self.verification["result"] != "match":
            result, error = "failed", self.verification["error"]
        for place in [self.dest, *self._sources.values()]:
            place.close()
        self.state, self.error, self.ended = result, error, time.time()
        self._convergence = {}
        metrics.set_phase(self.vm.name, None)
        metrics.set_stalled(self.vm.name, False)
        metrics.count_migration(self.vm.name, result)
        log.info("vm %s: migration %s %s%s", self.vm.name, self.id, result, f": {error}" if error else "")
        if self._ctl is not None:
            self._ctl.close()
        if self._on_done is not None:
            try:
                self._on_done(self)     # before _done: whoever waits sees the agent's state updated
            except Exception:
                log.exception("vm %s: recording the migration's end failed", self.vm.name)
        self._done.set()       # the sampler stops on this

    def _run_phase(self, phase: str, body: Callable[[], None]) -> None:
        self.phase = phase
        metrics.set_phase(self.vm.name, phase)
        self._journal()
        t0, wall = time.monotonic(), time.time()
        try:
            self._inject_at(phase)
            body()
        finally:
            seconds = time.monotonic() - t0
            self.phases.append({"name": phase, "started": wall, "seconds": seconds})
            metrics.observe_phase(self.vm.name, phase, seconds)
            log.info("vm %s: phase %-13s %8.3f s", self.vm.name, phase, seconds)

    def _checkpoint(self, where: str = "") -> None:
        """A cancel point (and, with SVMOTION_INJECT, a pause point)."""
        if self._abort.is_set():
            raise Aborted()
        if where in self._inject.pause:
            log.warning("vm %s: SVMOTION_INJECT pause before %s until aborted", self.vm.name, where)
            self.phase = where
            self._abort.wait()
            raise Aborted()

    def _inject_at(self, point: str) -> None:
        seconds = self._inject.hold.get(point)
        if seconds and point != "Cleanup":
            log.warning("vm %s: SVMOTION_INJECT hold at %s for %.1f s", self.vm.name, point, seconds)
            if self._abort.wait(seconds) and not self._switched:
                raise Aborted()

    def _journal(self) -> None:
        if self._save_journal is not None:
            with self._journal_lock:
                self._save_journal(self.journal())

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self._ctl is not None
        try:
            return self._ctl.call(op, **args)
        except (OSError, ValueError) as err:   # RemoteError is neither: the node answered
            raise NodeLost(f"lost the mirror node of VM {self.vm.name!r} during {self.phase} ({op}): nbdkit "
                           f"exited or closed its control socket ({getattr(err, 'strerror', None) or err})") from None

    def _step(self, name: str, fn: Callable[[], Any]) -> Any:
        """A timed, logged action inside a phase."""
        t0 = time.monotonic()
        result = fn()
        seconds = time.monotonic() - t0
        self.steps.append({"name": name, "phase": self.phase, "seconds": seconds})
        log.info("vm %s: %s: %s %.3f s", self.vm.name, self.phase, name, seconds)
        return result

    # ---- phases --------------------------------------------------------------------------------

    def _phase_Null(self) -> None:
        """Nothing started yet: the record exists, the job is scheduled."""

    def _phase_DiskSetup(self) -> None:
        hello = self._call("hello")
        self.plan, self.files = plan_migration(self.vm, self.paths, hello, self.options, self.dest)
        status = self._call("status")
        # The plugin's counters are cumulative over the disk's life: progress counts from here.
        self._copied_base = copied_total(status)
        busy = {n: d["state"] for n, d in status["disks"].items() if d["state"] != "passthrough"}
        if busy:
            raise MigrationFailed(f"disks not in passthrough state: {busy}; abort the earlier migration first")

    def _phase_DiskCreate(self) -> None:
        # Who serves the disks: if this process dies, the partial disks are worth keeping.
        pid = int(self._call("hello")["pid"])
        self._node = (pid, process_start_time(pid))
        made = self.dest.stat([d.partial for d in self.plan if d.partial in self._created])
        for disk in self.plan:
            if disk.resume is not None:
                continue                        # DiskLoad opens it
            if disk.partial in made and made[disk.partial].size == disk.size:
                disk.target = self.dest.target(disk.partial)
                continue      # made by this very job before its agent died (resume)
            mode = 0o600 if is_nbd_uri(disk.source) else os.stat(disk.source).st_mode & 0o777
            identity = disk.identity(self.vm.name, self.id, self.options.granularity)
            disk.target = self._creating(disk.partial,
                                         lambda d=disk: self.dest.create_disk(d.partial, d.size, mode, identity))

    def _phase_DiskLoad(self) -> None:
        """Take over the partial disks an earlier migration left, after checking them again."""
        for disk in self.plan:
            if disk.resume is None:
                continue
            disk.target = self.dest.reuse_disk(disk.partial, disk.size,
                                               disk.identity(self.vm.name, self.id, self.options.granularity))
            if disk.partial not in self._created:
                self._created.append(disk.partial)
            log.info("vm %s: disk %s resumes from %s of migration %s", self.vm.name, disk.name,
                     disk.partial, disk.resume.migration)

    def _phase_FileCreate(self) -> None:
        self._sync_files("files_copy", [source for source, _ in self.files])

    def _phase_Stun(self) -> None:
        # The destinations are opened first, outside the stun: a remote one is a connection and a
        # TLS handshake per link, which the seed's short stun has no room for.
        self._step("prepare_mirror", lambda: self._call("prepare_mirror", disks={
            d.name: self._mirror_spec(d) for d in self.plan}))
        reply = self._call("stun", lease=self.vm.lease, kind="mirror_install")
        self._stun_id, self._stun_t0 = reply["stun_id"], time.monotonic()
        if self.options.strategy == "legacy":
            self._step("close_disks", lambda: self._call("close_disks", stun_id=self._stun_id))
        # Per-VM files do not depend on disk state, and the VM's writes to them do not pass this
        # stun: the file mirror (copied at FileCreate) re-checks them at the switchover stun.

    def _phase_Unstun(self) -> None:
        with self._mirror_lock:     # a `set` of the mode waits: the install reads it (module notes)
            for disk in self.plan:
                spec = {disk.name: self._mirror_spec(disk)}
                self._step(f"install_mirror {disk.name}",
                           lambda s=spec: self._call("install_mirror", stun_id=self._stun_id, disks=s))
                # Per-disk files open after the mirror of their disk is installed (seed: diskOpen()).
                if disk.sidecars:
                    self._sync_files("files_copy", [source for source, _ in disk.sidecars])
            self._mirrors_installed = True
        self._release_stun("mirror_install")

    def _phase_DiskCopy(self) -> None:
        kinds = {d.name: "load" if d.resume is not None else "bulk" for d in self.plan}
        result = self._copy_pass("load" if "load" in kinds.values() else "bulk", kinds)
        if result["kind"] == "bulk":
            # A load pass mostly reads and compares: its copied bytes per second are no copy rate.
            self._measure_rate(result)

    def _phase_CopyDirtyInfo(self) -> None:
        status = self._status()
        dirty = {n: d["dirty_bytes"] for n, d in status["disks"].items()}
        self.steps.append({"name": "dirty_info", "phase": self.phase, "seconds": 0.0, "dirty_bytes": dirty})
        log.info("vm %s: dirty after bulk copy: %s", self.vm.name,
                 ", ".join(f"{n} {human_bytes(b)}" for n, b in dirty.items()))

    def _phase_CopyDirtyData(self) -> None:
        for attempt in range(1, SWITCHOVER_ATTEMPTS + 1):
            self._converge()
            endgame = self._endgame("sync")
            self._step("flush_dest", lambda: self._call("flush_dest"))
            remaining = remaining_bytes(self._status())
            self.predicted_switchover_stun_s = remaining / self._rate()
            metrics.set_predicted_stun(self.vm.name, self.predicted_switchover_stun_s)
            if self._switchover():
                return
            if endgame:
                self._endgame("async")
            log.warning("vm %s: switchover attempt %d failed (%s); copying more first",
                        self.vm.name, attempt, self.warnings[-1])
        # The last warning is the last attempt's reason: the lease, or a file that kept changing.
        raise MigrationFailed(f"switchover did not succeed in {SWITCHOVER_ATTEMPTS} attempts (last: "
                              f"{self.warnings[-1].removeprefix('switchover: ')}); lower the guest write "
                              f"rate or raise the lease")

    def _endgame(self, mode: str) -> bool:
        """Turn an async mirror sync for the switchover's approach, or back (module notes); whether
        the mode changed. A `set --mirror` since then wins: only an async choice is touched."""
        with self._mirror_lock:
            if self.options.mirror != "async":
                return False
            self._step(f"mirror {mode} (async end-game)", lambda: self._call("mirror_set", mode=mode))
        return True

    def _phase_DiskCopyDone(self) -> None:
        # The destination is authoritative: give every object its final name. The file mirror
        # wrote its copies without fsync (the last ones under the switchover stun): sync them now.
        # A job resumed here copied none of them itself: sync every one not yet renamed.
        resumed = self._resume_at == "DiskCopyDone"
        for copy in self.dest.stat(self._file_mirror().partials(copied=not resumed)):
            self.dest.fsync(copy)
        for disk in self.plan:
            self.dest.rename(disk.partial, disk.final)
        self._inject_at("DiskCopyDone.renamed")
        for source, final in self.files + [s for d in self.plan for s in d.sidecars]:
            self.dest.rename(partial_name(final), final)
        self.dest.fsync_dir()

    def _phase_Complete(self) -> None:
        if self.options.verify:
            self._step("verify", self._verify)
        first = sum(p["bytes"] for p in self.passes if p["kind"] in ("bulk", "load"))
        dirty = sum(p["bytes"] for p in self.passes if p["kind"] == "dirty")
        log.info("vm %s: complete: %s %s, dirty %s in %d passes, stuns %s", self.vm.name,
                 self.passes[0]["kind"] if self.passes else "bulk", human_bytes(first), human_bytes(dirty),
                 len(self.passes) - 1,
                 ", ".join(f"{s['kind']} {s['duration_seconds'] * 1000:.1f} ms" for s in self.stuns))

    def _verify(self) -> None:
        """Each destination against its frozen source, by digests (agent/verify.py); never raises."""
        disks = [(d.name, d.source, d.size) for d in self.plan]
        try:
            record = verify_disks(self._call, disks, self.options.granularity, self._nbd)
        except VerifyError as err:
            record = {"result": "error", "first_mismatch": None, "verified_bytes": 0, "skipped_bytes": 0}
            reason = str(err)
        else:
            bad = record["first_mismatch"]
            reason = None if bad is None else (f"verification failed: disk {bad['disk']} differs from its source "
                                               f"{bad['reference']} at offset {bad['offset']}")
        if reason is not None:
            # After switchover the destination is authoritative: nothing can be rolled back.
            record["error"] = (f"{reason}; the VM runs on its destination since the switchover (not rolled "
                               f"back) and its source is kept")
        self.verification = record
        metrics.count_verification(self.vm.name, record["result"], record["verified_bytes"],
                                   record["skipped_bytes"])
        log.log(logging.INFO if reason is None else logging.ERROR, "vm %s: verify: %s%s", self.vm.name,
                record["result"], f": {reason}" if reason else "")

    # ---- the one exit path ---------------------------------------------------------------------

    def _cleanup(self, result: str, error: str | None) -> None:
        if result == "success":
            self._finish_success()
        else:
            self._roll_back(error)

    def _finish_success(self) -> None:
        # After switchover the plugin's flush_dest has no mirror left to flush: make the
        # destination durable here, outside any stun, before the source may be deleted.
        # Set first: whatever fails below, the destination is where the VM lives now.
        self.new_paths = self.planned_paths()
        # `paths`: the files were renamed at DiskCopyDone; the plugin must reopen (legacy) and
        # report them by their final names. Before the fsyncs: a destination that fails them must
        # not leave the disks switched but unfinished (the next migration would be refused).
        self._call("finish", paths={d.name: self.served_location(d) for d in self.plan})
        self._inject_at("Cleanup.finished")
        for disk in self.plan:
            self.dest.fsync(disk.final)
        # Verification comes first: a source that does not provably match is kept.
        if self.options.verify and self.verification is None:
            self.warnings.append("not verified (an error after the switchover, see above): the source is kept")
        verified = not self.options.verify or (self.verification or {}).get("result") == "match"
        if self.options.delete_source and verified:
            for path in [d.source for d in self.plan] + [s for s, _ in self.files] + \
                        [s for d in self.plan for s, _ in d.sidecars]:
                if is_nbd_uri(path) or on_other_host(path):
                    # A datastore never deletes a finished file for a peer (agent/datastore.py).
                    self.warnings.append(f"delete source {path}: kept, it is on another host; delete it there")
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass      # deleted before a restart of the agent (resume)
                except OSError as err:
                    self.warnings.append(f"delete source {path}: {err.strerror}")
        self._inject_at("Cleanup.done")

    def _roll_back(self, error: str | None) -> None:
        """Back to PASSTHROUGH on the intact source; delete what we created at the destination,
        but for the partial disks of a migration whose mirror node died (agent/partial.py)."""
        try:
            self._plugin_abort()
        except (OSError, ValueError) as err:
            # No node to tell: a dead nbdkit took its mirror with it and restarts on the source.
            self.warnings.append(f"the mirror node did not answer the abort "
                                 f"({getattr(err, 'strerror', None) or err}); its mirror ended with it")
        except RemoteError as err:
            # The stun (if any) ends with the connection or its lease; the mirror may stay
            # installed, writing to an unlinked file, until the agent's next abort.
            self.warnings.append(f"plugin abort failed: {err}")
        removal = remove_created(self.dest, self._created, self._mirror_node_died())
        self.warnings += removal.errors
        self.kept_partials = removal.kept
        self.left_partials = removal.left
        if self.kept_partials:
            log.warning("vm %s: the mirror node died; keeping %s for the next migration to %s to resume",
                        self.vm.name, ", ".join(self.kept_partials), self.options.dest)

    def _mirror_node_died(self) -> bool:
        """Whether the nbdkit that served this migration is gone (the supervisor restarts it after us)."""
        return self._node is not None and process_start_time(self._node[0]) != self._node[1]

    def _plugin_abort(self) -> None:
        """`abort` under our stun if we hold one (it may have expired: then without it)."""
        ctl = self._ctl
        if ctl is not None and self._stun_id is not None:
            try:
                ctl.call("abort", stun_id=self._stun_id)
                self._stun_id = None
                return
            except RemoteError as err:
                log.info("vm %s: abort under stun %s refused (%s); aborting without it",
                         self.vm.name, self._stun_id, err)
            except (OSError, ValueError):
                ctl = None    # the connection is gone, and the stun with it
        self._stun_id = None
        if ctl is None:
            with self._connect() as fresh:
                fresh.call("abort")
        else:
            try:
                ctl.call("abort")
            except (OSError, ValueError):
                with self._connect() as fresh:
                    fresh.call("abort")

    # ---- helpers -------------------------------------------------------------------------------

    def _file_mirror(self) -> FileMirror:
        """The job's file mirror; a job resumed after FileCreate starts one that copies everything again."""
        if self._files is None:
            sidecars = [(s, f, f"sidecar of disk {d.name!r}") for d in self.plan for s, f in d.sidecars]
            self._files = FileMirror([(s, f, "per-VM file") for s, f in self.files] + sidecars,
                                     writer=self.dest.file_writer, source=self._file_source)
        return self._files

    def _mirror_spec(self, disk: DiskPlan) -> dict[str, Any]:
        return {"dest": disk.target, "mode": self.options.mirror, "granularity": self.options.granularity}

    def _file_source(self, path: str) -> FileSource:
        """Where a source file is read: here, or through the agent of the host an earlier migration put it on."""
        if not on_other_host(path):
            return LOCAL_FILES
        where = parse_destination(path)
        key = f"{where.host}:{where.port}"
        if key not in self._sources:
            if self._open_place is None:
                raise MigrationFailed(f"{path!r} is on another host and this job cannot reach it")
            place = self._open_place(path)
            assert isinstance(place, DatastoreDir)
            self._sources[key] = place
        return DatastoreFiles(self._sources[key])

    def _creating(self, path: str, create: Callable[[], str]) -> str:
        """Create a destination object, recorded for the rollback first: a create whose reply was
        lost (the destination host stopped answering) may have happened."""
        recorded = path not in self._created      # a resumed job's journal may list it already
        if recorded:
            self._created.append(path)
        try:
            return create()
        except (FileExistsError, Refused):
            if recorded:
                self._created.remove(path)   # answered, and not made: not ours to remove
            raise

    def _sync_files(self, name: str, sources: list[str] | None = None) -> FileSync:
        """A pass of the file mirror (all files by default), recorded in steps with its wall-clock window."""
        for copy in self._file_mirror().partials(sources):
            if copy not in self._created:
                self._created.append(copy)
        t0, started = time.monotonic(), time.time()
        sync = self._file_mirror().sync(sources)
        seconds, ended = time.monotonic() - t0, time.time()
        step = {"name": name, "phase": self.phase, "seconds": seconds, "started": started, "ended": ended,
                **sync.record()}
        self.steps.append(step)
        log.info("vm %s: %s: %s: %d files checked, %d copied%s in %.3f ms", self.vm.name, self.phase, name,
                 step["checked"], step["copied"], f", unstable: {step['unstable']}" if sync.unstable else "",
                 seconds * 1000)
        return sync

    def _release_stun(self, kind: str) -> dict[str, Any]:
        reply = self._call("unstun", stun_id=self._stun_id)
        agent_seconds = time.monotonic() - self._stun_t0
        self._stun_id = None
        record = dict(reply.get("stun") or {})
        record.setdefault("kind", kind)
        record["kind"] = kind
        record["agent_seconds"] = agent_seconds
        self.stuns.append(record)
        duration = float(record.get("duration_seconds", agent_seconds))
        max_wait = float(record.get("max_wait_seconds", 0.0))
        metrics.observe_stun(self.vm.name, kind, self.options.strategy, duration, max_wait)
        log.info("vm %s: stun %s %.2f ms (guest max wait %.2f ms, %s held requests)", self.vm.name, kind,
                 duration * 1000, max_wait * 1000, record.get("held_requests", "?"))
        return record

    def _status(self) -> dict[str, Any]:
        status = self._call("status")
        self._remember(status)
        if self._mirrors_installed and not self._switched and self.phase in GOVERNED_PHASES:
            self._govern(status)
        return status

    def _govern(self, status: dict[str, Any]) -> None:
        """Feed the governor a status poll; apply its throttle; report a stall (module notes)."""
        remaining = remaining_bytes(status)
        sample = Sample(time.monotonic(), remaining, pending_bytes(status),
                        counter_total(status, "dest_written_bytes"), counter_total(status, "dirtied_bytes"),
                        int(self._budget_bytes()))
        with self._mirror_lock:
            decision = self._governor.observe(sample)
            if decision.throttle != self._throttle_applied:
                self._call("mirror_set", throttle=decision.throttle)
                self._throttle_applied = decision.throttle
                self._note_throttle(decision)
            if decision.stalled != (self.stall is not None):
                self._note_stall(decision.stalled)
        rates = self._governor.average_rates()
        self._convergence = {"throttle_seconds": decision.throttle, "remaining_bytes": remaining,
                             "target_bytes": sample.target, "dirtying_bps": rates.added if rates else None,
                             "dest_bps": rates.dest if rates else None,
                             "predicted_converge_seconds": self._governor.converge_seconds()}

    def _note_throttle(self, decision: Decision) -> None:
        event = {"t": time.time(), "phase": self.phase, "throttle_seconds": decision.throttle,
                 "reason": decision.reason or "resumed"}
        if len(self.throttle_events) < MAX_THROTTLE_EVENTS:
            self.throttle_events.append(event)
        log.info("vm %s: guest throttle %.3f ms (%s)", self.vm.name, decision.throttle * 1000, event["reason"])

    def _note_stall(self, stalled: bool) -> None:
        """Say once that the migration does not converge within the bound, and once that it does again."""
        metrics.set_stalled(self.vm.name, stalled)
        if not stalled:
            self.stall = None
            log.info("vm %s: converging again", self.vm.name)
            return
        rates = self._governor.rates
        added, dest = (rates.added, rates.dest) if rates else (0.0, 0.0)
        bound = self.options.max_throttle
        higher = min(MAX_BOUND_S, max(2 * bound, 0.005))
        self.stall = (f"not converging: the guest adds {human_bytes(added)}/s to what remains, the destination "
                      f"takes {human_bytes(dest)}/s, and the guest throttle is at its bound ({bound * 1000:g} ms); "
                      f"the migration goes on: raise the bound (`svmotion set {self.vm.name} --max-throttle "
                      f"{higher * 1000:g}ms`), switch to a sync mirror (`svmotion set {self.vm.name} --mirror "
                      f"sync`) or abort (`svmotion abort {self.vm.name}`)")
        log.warning("vm %s: %s", self.vm.name, self.stall)
        if len(self.throttle_events) < MAX_THROTTLE_EVENTS:
            self.throttle_events.append({"t": time.time(), "phase": self.phase,
                                         "throttle_seconds": self._governor.throttle, "reason": "stalled"})

    def _copy_pass(self, kind: str, per_disk: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one copier pass over every mirroring disk and wait for it (a cancel point).

        `per_disk` ({disk: kind}): disks whose pass kind differs (DiskCopy loads resumed disks)."""
        before = self._status()
        dirty_before = total_dirty(before)
        t0 = time.monotonic()
        if per_disk and len(set(per_disk.values())) > 1:
            # The rate is for all disks together, as in one `copy`.
            share = max(1, self.options.rate // len(per_disk)) if self.options.rate else 0
            for name, disk_kind in per_disk.items():
                self._call("copy", kind=disk_kind, disk=name, rate=share)
        else:
            self._call("copy", kind=kind, rate=self.options.rate)
        while True:
            if self._abort.is_set():
                self._call("copy_cancel")
                raise Aborted()
            time.sleep(POLL_INTERVAL_S)
            status = self._status()
            if not any(copy_of(d)["running"] for d in status["disks"].values()):
                break
        seconds = time.monotonic() - t0
        done = sum(copy_of(d)["done_bytes"] for d in status["disks"].values())
        compared = sum(copy_of(d).get("compared_bytes") or 0 for d in status["disks"].values())
        errors = sorted({copy_of(d)["error"] for d in status["disks"].values() if copy_of(d).get("error")})
        errors += sorted({f"disk {n}: mirror failed: {d['mirror_failed']}"
                          for n, d in status["disks"].items() if d.get("mirror_failed")})
        result = {"n": len(self.passes), "kind": kind, "bytes": done, "seconds": seconds,
                  "dirty_before": dirty_before, "dirty_after": total_dirty(status), "errors": errors}
        if kind == "load":
            result["compared_bytes"] = compared
        # Passes summed into the last record are logged at debug level: a stall may run many.
        level = logging.INFO if self._record_pass(result) else logging.DEBUG
        log.log(level, "vm %s: %s pass %d: %s in %.3f s, %s dirty remain%s", self.vm.name, kind, result["n"],
                 human_bytes(done), seconds, human_bytes(result["dirty_after"]),
                 f", errors: {'; '.join(errors)}" if errors else "")
        refuse_broken_mirrors(status)
        return result

    def _record_pass(self, result: dict[str, Any]) -> bool:
        """Append a pass record (True); past MAX_PASS_RECORDS, sum a dirty pass into the last one."""
        last = self.passes[-1] if self.passes else None
        if len(self.passes) < MAX_PASS_RECORDS or result["kind"] != "dirty" or last is None \
                or last["kind"] != "dirty":
            self.passes.append(result)
            return True
        last["count"] = last.get("count", 1) + 1
        last["bytes"] += result["bytes"]
        last["seconds"] += result["seconds"]
        last["dirty_after"] = result["dirty_after"]
        last["errors"] = sorted(set(last["errors"]) | set(result["errors"]))
        return False

    def _measure_rate(self, result: dict[str, Any]) -> None:
        # Small passes measure latency, not bandwidth: only trust passes of some size.
        if result["bytes"] >= 1 << 20 and result["seconds"] > 0:
            self.copy_rate_bps = result["bytes"] / result["seconds"]

    def _rate(self) -> float:
        if self.copy_rate_bps:
            return self.copy_rate_bps
        return float(self.options.rate) if self.options.rate else float(DEFAULT_RATE_GUESS)

    def _budget_bytes(self) -> float:
        """What may remain for the switchover stun: the stun budget at the measured copy rate."""
        return self._rate() * self.options.stun_budget

    def _verify_estimate(self) -> float:
        """Seconds `--verify` may take: both sides of every disk read once, at about the copy rate."""
        return sum(d.size for d in self.plan) / self._rate()

    def _converge(self) -> None:
        """Dirty passes (and waits for queued async sends) until what remains fits the stun budget.

        No pass limit: the governor throttles the guest so that it converges, and says when it
        cannot within its bound (module notes); an abort or `set` is the operator's answer."""
        while True:
            self._checkpoint()
            status = self._status()
            refuse_broken_mirrors(status)
            if remaining_bytes(status) <= self._budget_bytes():
                return
            if total_dirty(status) == 0:
                time.sleep(POLL_INTERVAL_S)      # only async sends queued: they drain by themselves
                continue
            result = self._copy_pass("dirty")
            metrics.count_pass(self.vm.name)
            self._measure_rate(result)
            if result["errors"] and result["dirty_after"] >= result["dirty_before"]:
                raise MigrationFailed(f"copy to the destination failed: {result['errors'][0]}; "
                                      f"check the destination's space and health")

    def _switchover(self) -> bool:
        """The switchover stun; False when the plugin could not finish inside the lease or a file kept
        changing under it (nothing changed)."""
        self._checkpoint()
        self._refuse_a_full_destination()
        self._sync_files("files_resync")      # outside the stun, so that the cut has little to copy
        reply = self._call("stun", lease=self.vm.lease, kind="switchover")
        self._stun_id, self._stun_t0 = reply["stun_id"], time.monotonic()
        self._inject_at("CopyDirtyData.stunned")
        try:
            # The cut (agent/files.py): the files equal the source's now, or no switchover. A file
            # that is gone raises FileMirrorError and the rollback aborts under this stun.
            self._sync_files("files_cut").raise_if_unstable()
            with self._mirror_lock:      # no `set` from here on: the mirror is gone
                done = self._call("switchover", stun_id=self._stun_id,
                                  reopen=self.options.strategy == "legacy")
                self._switched = True
                self._convergence = {}       # nothing left to converge: no throttle, no prediction
        except (RemoteError, FileUnstable) as err:
            self.warnings.append(f"switchover: {err}")
            try:
                self._release_stun("switchover")["outcome"] = "retry"
            except RemoteError as unstun_err:
                # The lease ran out first: the plugin already released the guest by itself.
                log.warning("vm %s: unstun after a failed switchover: %s", self.vm.name, unstun_err)
                self._stun_id = None
            return False
        self._inject_at("CopyDirtyData.switched")
        record = self._release_stun("switchover")
        record["final_bytes"] = done.get("final_bytes")
        record["switchover_seconds"] = done.get("seconds")
        self._journal()
        self._inject_at("CopyDirtyData.released")
        return True

    def _refuse_a_full_destination(self) -> None:
        """No switchover onto a destination without room for the disks to grow (plan.py)."""
        facts = self.dest.stat([d.partial for d in self.plan])
        need = growth_room_needed([(facts[d.partial].allocated if d.partial in facts else 0, d.size)
                                   for d in self.plan])
        free = self.dest.free_bytes()
        if free < need:
            raise MigrationFailed(f"destination {self.options.dest!r} has {human_bytes(free)} free, too little "
                                  f"for the disks to grow after the switchover (the guest's next writes into "
                                  f"unallocated space would fail there; {human_bytes(need)} needed); free space "
                                  f"there or choose another --dest")

    def _remember(self, status: dict[str, Any]) -> None:
        with self._samples_lock:
            self.last_status = status

    def _sample_loop(self) -> None:
        """The timeline for reports: one sample every SAMPLE_INTERVAL_S on its own connection."""
        try:
            ctl = self._connect()
        except OSError:
            return
        try:
            t_start = time.monotonic()
            while not self._done.wait(SAMPLE_INTERVAL_S):
                try:
                    status = ctl.call("status")
                except (OSError, ValueError, RemoteError):
                    return
                disks = status["disks"].values()
                sample = {"t": round(time.monotonic() - t_start, 3), "phase": self.phase,
                          "dirty_bytes": sum(d["dirty_bytes"] for d in disks),
                          "copied_bytes": max(0, copied_total(status) - self._copied_base),
                          "guest_written_bytes": sum(d["guest_written_bytes"] for d in disks)}
                with self._samples_lock:
                    self.last_status = status
                    if len(self.samples) < MAX_SAMPLES:
                        self.samples.append(sample)
        finally:
            ctl.close()


def refuse_broken_mirrors(status: dict[str, Any]) -> None:
    """A mirror the node marked failed (a destination flush or write-back error) ends the migration:
    acknowledged data may be missing from that destination, and no copy pass can say which."""
    for name, disk in status["disks"].items():
        if disk.get("mirror_failed"):
            raise MigrationFailed(f"disk {name}: mirror failed: {disk['mirror_failed']}; the destination "
                                  f"lost data it had acknowledged: check its storage")


def total_dirty(status: dict[str, Any]) -> int:
    return sum(int(d["dirty_bytes"]) for d in status["disks"].values())


def remaining_bytes(status: dict[str, Any]) -> int:
    """What the destinations still lack: dirty bytes and async sends still queued (docs/interfaces.md
    section 2, DiskStatus `async`): all of it must be there before or under the switchover stun."""
    return total_dirty(status) + pending_bytes(status)


def pending_bytes(status: dict[str, Any]) -> int:
    return sum(int((d.get("async") or {}).get("pending_bytes") or 0) for d in status["disks"].values())


def counter_total(status: dict[str, Any], key: str) -> int:
    """A cumulative DiskStatus counter summed over the disks."""
    return sum(int(d.get(key) or 0) for d in status["disks"].values())


def copied_total(status: dict[str, Any]) -> int:
    return sum(sum(d["copied_bytes"].values()) for d in status["disks"].values())


def progress_of(status: dict[str, Any] | None, plan: list[DiskPlan], copied_base: int = 0) -> dict[str, Any]:
    """What a progress bar shows: bytes copied out of the disks' size, rate, dirty bytes left."""
    if not status:
        return {"copied_bytes": 0, "total_bytes": sum(d.size for d in plan), "dirty_bytes": 0, "rate_bps": 0,
                "mirroring": False}
    disks = status["disks"].values()
    return {
        "mirroring": any(d["state"] in ("mirroring", "switched") for d in disks),
        "copied_bytes": max(0, copied_total(status) - copied_base),
        "total_bytes": sum(d.size for d in plan),
        "dirty_bytes": sum(d["dirty_bytes"] for d in disks),
        "rate_bps": sum(copy_of(d).get("rate_bps") or 0 for d in disks if copy_of(d).get("running")),
    }


def copy_of(disk_status: dict[str, Any]) -> dict[str, Any]:
    """The disk's copier status; the plugin reports null before the first pass."""
    return disk_status.get("copy") or {"running": False, "done_bytes": 0, "error": None, "rate_bps": 0}
