"""`svmotion agent`: supervises one nbdkit per VM, runs migrations, serves the API and /metrics.

Design notes
- The API (docs/interfaces.md, section 4) is a `ControlServer` on `[agent] socket`: ops
  migrate, status, abort, set (change a running migration: agent/phases.py `Migration.set`),
  verify, shutdown. A refusal is a `RequestError` carrying `exit`
  (section 5), so the CLI prints the agent's one line and exits with the agent's code. Each op
  declares its arguments with `@takes` (nbd_plugin/control.py); `handle` checks them before the
  op runs, and an unknown key or a wrong type is a usage error (exit 2) that changes nothing.
  `verify` runs in the API thread (the CLI waits); a VM being verified cannot start a
  migration, nor the reverse.
- State in state_dir, so the agent can die at any moment (even SIGKILL) and come back:
  `<vm>.pid` (the supervisor's), `<vm>.served.json` (where each disk lives, written by nbdkit
  itself before it serves a new place: nbd_plugin/served.py), `<vm>.paths.json` (where the
  VM's per-VM files and sidecars live: written after a successful migration), and
  `<vm>.migration.json` (the running migration's journal, phases.py `journal()`).
- Where a disk lives is what nbdkit serves, never what a journal or paths.json says: the served
  record is the only place the disks' paths are read from once it exists, at start and at every
  restart of nbdkit, so no crash can bring a VM back on a stale source.
- Resume, not restart: a journal found at start means the agent died mid-migration. If the
  mirror node that ran it still lives, the migration goes on from the phase the node's state
  allows (`_resume_point`): the node serves the destination -> the switchover happened, finish
  it; mirrors installed -> their dirty maps are the checkpoint, go on copying; disks on the
  source -> the stun was rolled back, go on from DiskCreate or Stun. If nbdkit died too, the
  migration has failed (its mirror state is gone) and is rolled back as any failure is.
- Supervision: a thread checks every nbdkit once a second. A dead one fails the VM's running
  migration (the source was authoritative until switchover, so nothing is lost) and is
  restarted on the disks of its served record.
- Datastores (an agent with `[[datastore]]`): the TCP API for other hosts' agents on `[agent]
  listen`, mutual TLS, serving only the `ds_*` ops of agent/datastore.py (never the VM ops
  above), and one nbdkit exporting the datastores over NBD with TLS on `nbd_listen`
  (agent/export.py), supervised like the mirror nodes: adopted after an agent restart,
  restarted when it dies, stopped only by `shutdown` with stop_vms. The TLS credentials are
  loaded before anything starts, so a bad certificate is a configuration error (exit 7).
- Threads: API connection threads (both listeners), one thread per running migration, the
  supervision thread, the metrics server. `_lock` protects the migrations/last/paths maps; no
  call to nbdkit is made while holding it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent import __version__, metrics
from agent.config import AgentConfig, VmConfig
from agent.datastore import DatastoreService
from agent.destdir import DestDir, open_destdir, remove_created
from agent.export import DatastoreExport
from agent.errors import EXIT_INTERNAL, EXIT_USAGE, ConfigError, Refused, SvmotionError
from agent.jsonlines import JsonLinesClient, RemoteError
from agent.phases import PHASES, Injection, Migration
from agent.plan import OPTION_ARGS, PARTIAL_SUFFIX, SET_ARGS, MigrationOptions, parse_destination
from agent.statefiles import private_dir
from agent.supervisor import Nbdkit
from agent.tls import TlsListener, certificates_dir, server_context, split_address
from agent.verify import VerifyError, verify_disks
from nbd_plugin.backend import is_nbd_uri
from nbd_plugin.backend_nbd import NbdOptions
from nbd_plugin.control import (Arg, ArgumentError, Connection, ControlServer, RequestError, arguments,
                                declared, file_path, power_of_two, shown, takes)
from nbd_plugin.dirtymap import MAX_GRANULARITY, MIN_GRANULARITY
from nbd_plugin.durable import replace_json
from nbd_plugin.served import read_record, resolve_renamed

log = logging.getLogger("svmotion.agent")

SUPERVISE_INTERVAL_S = 1.0
ABORT_WAIT_S = 15.0


def write_json(path: str, data: Any) -> None:
    """Atomically and durably replace a small JSON state file, mode 0600 (nbd_plugin/durable.py)."""
    replace_json(path, data)


def read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        log.warning("%s: unreadable (%s); ignoring it", path, err)
        return None


class Agent:
    """The daemon. Example: `Agent(load_config("agent.toml")).run()` blocks until shutdown."""

    def __init__(self, config: AgentConfig):
        self.config = config
        tls_dir = certificates_dir(config.tls, config.state_dir) if config.tls is not None else None
        self.nodes = {vm.name: Nbdkit(vm, config.state_dir, tls_dir) for vm in config.vms}
        self._nbd = NbdOptions(tls_certificates=tls_dir)      # the agent's own reads of remote disks
        # This lock protects migrations, last, paths and verifying.
        self._lock = threading.Lock()
        self.migrations: dict[str, Migration] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.paths: dict[str, dict[str, Any]] = {}
        self.verifying: set[str] = set()          # VMs an on-demand verification is reading
        self._stop = threading.Event()
        self._stop_vms = False
        self._server: ControlServer | None = None
        self._tcp_server: ControlServer | None = None       # the datastores' API for other hosts
        self.export: DatastoreExport | None = None
        self._metrics_server: Any = None
        try:
            self._injection = Injection.from_env()
        except ValueError as err:
            raise SvmotionError(f"{err}; fix SVMOTION_INJECT (a testing aid, see README) or unset it",
                                EXIT_USAGE) from None

    # ---- life cycle ----------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until `shutdown` or SIGTERM/SIGINT; nbdkit keeps running after."""
        self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            self.supervise()
        self.stop()
        return 0

    def start(self) -> None:
        private_dir(self.config.state_dir)
        self._refuse_second_agent()
        # Credentials first: a bad certificate must stop the start before anything runs.
        context = server_context(self.config.tls, self.config.source) if self.config.datastores else None
        for vm in self.config.vms:
            self.paths[vm.name] = self._current_paths(vm)
            last = read_json(self._state(vm.name, "last.json"))
            if isinstance(last, dict):
                self.last[vm.name] = last
        for vm in self.config.vms:
            self._bring_up(vm)
            self._recover(vm)
        if context is not None:
            self._offer_datastores(context)
        Path(self.config.socket).parent.mkdir(parents=True, exist_ok=True)
        self._server = ControlServer(self.config.socket, self.handle, malformed={"exit": EXIT_USAGE})
        self._server.start()
        if self.config.metrics:
            metrics.register_plugin_collector(self.plugin_statuses)
            try:
                self._metrics_server = metrics.serve(self.config.metrics)
            except OSError as err:
                raise ConfigError(f"{self.config.source}: [agent] metrics = {self.config.metrics!r}: cannot "
                                  f"listen ({err.strerror}); choose a free port or set metrics = \"\"") from None
        log.info("agent %s: serving %s for VMs %s", __version__, self.config.socket,
                 ", ".join(self.nodes))

    def _offer_datastores(self, context: Any) -> None:
        """The datastores' NBD export (adopted or started) and the TCP API for other hosts' agents."""
        config = self.config
        assert config.tls is not None and config.listen and config.nbd_listen
        exports = os.path.join(config.state_dir, "exports")
        service = DatastoreService(config.datastores, exports, split_address(config.nbd_listen)[1])
        self.export = DatastoreExport(config.nbd_listen, certificates_dir(config.tls, config.state_dir), exports,
                                      config.state_dir, config.source)
        if not self.export.adopt():
            self.export.start()
        self._tcp_server = ControlServer(TlsListener(config.listen, context), service.handle,
                                         malformed={"exit": EXIT_USAGE})
        try:
            self._tcp_server.start()
        except OSError as err:
            raise ConfigError(f"{config.source}: [agent] listen = {config.listen!r}: cannot listen "
                              f"({err.strerror}); choose a free address") from None
        log.info("agent API for other hosts on %s (mutual TLS); datastores %s exported on %s", config.listen,
                 ", ".join(d.name for d in config.datastores), config.nbd_listen)

    def stop(self) -> None:
        """Stop serving; abort running migrations; stop nbdkit only if `shutdown` asked for it."""
        for server in (self._server, self._tcp_server):
            if server is not None:
                server.stop()
        with self._lock:
            running = [m for m in self.migrations.values() if not m.finished]
        for m in running:
            try:
                m.abort("the agent is shutting down")
            except Refused:
                pass        # already switched: let it finish
        for m in running:
            m.wait(ABORT_WAIT_S)
        if self._stop_vms:
            for name, node in self.nodes.items():
                node.stop()
                metrics.set_nbdkit_up(name, False)
            if self.export is not None:
                self.export.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("agent stopped%s", " with its VMs" if self._stop_vms else "; nbdkit processes keep running")

    def _refuse_second_agent(self) -> None:
        if not os.path.exists(self.config.socket):
            return
        try:
            with JsonLinesClient(self.config.socket, timeout=2.0) as c:
                c.call("status")
        except (OSError, ValueError, RemoteError):
            return      # a stale socket of a dead agent: ControlServer replaces it
        raise SvmotionError(f"another agent already serves {self.config.socket!r}; stop it first "
                            f"(svmotion --agent-socket {self.config.socket} ... or its pid)", 3)

    def _current_paths(self, vm: VmConfig) -> dict[str, Any]:
        """Where the VM lives now: the last migration's destination, else the configuration."""
        configured = {"disks": {d.name: d.path for d in vm.disks}, "files": list(vm.files),
                      "sidecars": {d.name: list(d.sidecars) for d in vm.disks}}
        saved = read_json(self._state(vm.name, "paths.json"))
        if saved and set(saved.get("disks", {})) == set(configured["disks"]):
            paths = saved
        else:
            paths = configured
        served = self._served_disks(vm)
        if served is not None:
            paths = {**paths, "disks": served}
        for name, path in paths["disks"].items():
            if not is_nbd_uri(path) and not os.path.isfile(path):
                raise ConfigError(f"{self.config.source}: disk {name!r} of VM {vm.name!r}: {path!r} does not "
                                  f"exist; create the raw image (truncate -s SIZE FILE) or fix its path")
        return paths

    def _served_disks(self, vm: VmConfig) -> dict[str, str] | None:
        """The disks' paths as nbdkit last recorded serving them (None: no usable record)."""
        record = read_record(self.nodes[vm.name].served_file)
        if record is None or record.get("vm") != vm.name or set(record["disks"]) != {d.name for d in vm.disks}:
            return None
        return {name: path if is_nbd_uri(path) else resolve_renamed(path) for name, path in record["disks"].items()}

    def _state(self, vm: str, suffix: str) -> str:
        return os.path.join(self.config.state_dir, f"{vm}.{suffix}")

    def _bring_up(self, vm: VmConfig) -> None:
        node = self.nodes[vm.name]
        if not node.adopt():
            node.start(self.paths[vm.name]["disks"])
        metrics.set_nbdkit_up(vm.name, True)
        metrics.set_phase(vm.name, None)

    def _recover(self, vm: VmConfig) -> None:
        """Go on with a migration the previous agent did not live to end, or end it as failed."""
        journal = read_json(self._state(vm.name, "migration.json"))
        if not journal:
            return
        node_died = self._node_of(journal) is None
        try:
            resume_at = self._resume_point(vm, journal)
        except (OSError, ValueError, RemoteError, KeyError) as err:
            resume_at, why = None, f"its mirror node did not answer ({err})"
        else:
            why = "nbdkit stopped too, and the mirror state with it"
        if resume_at is None:
            self._fail_interrupted(vm, journal, why, node_died)
            return
        log.warning("vm %s: resuming migration %s at %s (the agent stopped in %s)", vm.name,
                    journal["id"], resume_at, journal["phase"])
        migration = Migration.from_journal(vm, lambda: self.nodes[vm.name].client(timeout=60.0), journal,
                                           resume_at, self._destdir(journal["options"]["dest"]), **self._job_args(vm))
        with self._lock:
            self.migrations[vm.name] = migration
        migration.start()

    def _resume_point(self, vm: VmConfig, journal: dict[str, Any]) -> str | None:
        """The phase an interrupted migration can go on from, judged by what its nbdkit serves now."""
        sources = {d["name"]: d["source"] for d in journal["plan"]}
        served = self._served_disks(vm) or {}
        if any(served.get(name, source) != source for name, source in sources.items()):
            return "DiskCopyDone"        # nbdkit serves the destination: the switchover is done
        node = self._node_of(journal)
        if node is None:
            return None
        with node.client(timeout=10.0) as c:
            status = self._unstunned_status(c)
            states = {d["state"] for d in status["disks"].values()}
            phase = PHASES.index(journal["phase"])
            if states == {"mirroring"}:
                # The dirty maps are the checkpoint. A pass the dead agent started is stopped, so
                # that the resumed job measures and paces its own passes.
                c.call("copy_cancel")
                return PHASES[min(max(phase, PHASES.index("DiskCopy")), PHASES.index("CopyDirtyData"))]
            if states == {"passthrough"}:
                return "DiskCreate" if phase <= PHASES.index("FileCreate") else "Stun"
        raise ValueError(f"disk states {sorted(states)}")

    def _node_of(self, journal: dict[str, Any]) -> Nbdkit | None:
        """The VM's nbdkit if it is the very process that ran the journal's migration."""
        node = self.nodes[journal["vm"]]
        return node if node.alive() and journal.get("nbdkit") == node.identity() else None

    @staticmethod
    def _unstunned_status(c: JsonLinesClient) -> dict[str, Any]:
        """The node's status once no stun is held: a stun of the dead agent ends with its connection."""
        deadline = time.monotonic() + 10.0
        while True:
            status = c.call("status")
            if status["stun"] is None or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def _fail_interrupted(self, vm: VmConfig, journal: dict[str, Any], why: str, node_died: bool) -> None:
        """Roll an interrupted migration back to the source, as any failure before switchover is."""
        log.warning("vm %s: migration %s cannot go on (%s); rolling it back", vm.name, journal.get("id"), why)
        try:
            with self.nodes[vm.name].client() as c:
                if {d["state"] for d in c.call("status")["disks"].values()} != {"passthrough"}:
                    c.call("abort")
        except (OSError, ValueError, RemoteError) as err:
            log.error("vm %s: cannot roll back the interrupted migration: %s", vm.name, err)
        created = [p for p in journal.get("created", []) if p.endswith(PARTIAL_SUFFIX)]
        # As the job's own rollback decides (phases.py _roll_back): a dead node's partial disks
        # stay for the next migration's DiskLoad; everything else goes.
        dest = self._destdir(journal["options"]["dest"])
        try:
            removal = remove_created(dest, created, mirror_node_died=node_died)
        finally:
            dest.close()
        record = {"id": journal.get("id"), "vm": vm.name, "state": "failed", "phase": "Cleanup",
                  "error": f"interrupted: the agent stopped during the migration and {why}",
                  "warnings": ["recovered by a restarted agent", *removal.errors],
                  "kept_partials": sorted(removal.kept), "left_partials": sorted(removal.left)}
        self._remember_last(vm.name, record)
        os.unlink(self._state(vm.name, "migration.json"))

    def _remember_last(self, vm: str, record: dict[str, Any]) -> None:
        """The VM's last migration record, kept in state_dir before the journal goes, so that an
        agent restarted right after a migration still knows how it ended (and the CLI too)."""
        write_json(self._state(vm, "last.json"), record)
        with self._lock:
            self.last[vm] = record

    def _journal_writer(self, vm: VmConfig) -> Any:
        """Where a migration of `vm` keeps its journal, stamped with the nbdkit that runs it."""
        node = self.nodes[vm.name]
        path = self._state(vm.name, "migration.json")
        return lambda journal: write_json(path, {**journal, "nbdkit": node.identity()})

    def _save_paths(self, vm: str, paths: dict[str, Any]) -> None:
        write_json(self._state(vm, "paths.json"), paths)
        with self._lock:
            self.paths[vm] = paths

    # ---- supervision ---------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart a dead nbdkit on the VM's current paths (a running migration of it fails), or the export."""
        if self.export is not None and not self.export.alive():
            log.error("datastore export: nbdkit pid %s exited: %s", self.export.pid, self.export.log_tail())
            try:
                self.export.start()
            except SvmotionError as err:
                log.error("datastore export: restart failed: %s", err)
        for vm in self.config.vms:
            node = self.nodes[vm.name]
            if node.alive():
                continue
            metrics.set_nbdkit_up(vm.name, False)
            log.error("vm %s: nbdkit pid %s exited: %s", vm.name, node.pid, node.log_tail())
            with self._lock:
                migration = self.migrations.get(vm.name)
            if migration is not None and not migration.finished:
                try:
                    migration.abort(f"nbdkit exited during the migration (pid {node.pid}; its log: "
                                    f"{node.log_file})", failed=True)
                except Refused:
                    pass
                migration.wait(ABORT_WAIT_S)
            try:
                with self._lock:
                    disks = self.paths[vm.name]["disks"]
                node.start(self._served_disks(vm) or disks)
                metrics.set_nbdkit_up(vm.name, True)
            except SvmotionError as err:
                log.error("vm %s: restart failed: %s", vm.name, err)

    def plugin_statuses(self) -> dict[str, dict[str, Any]]:
        """Every VM's plugin `status` (the metrics collector's source); unreachable VMs are left out."""
        out = {}
        for name, node in self.nodes.items():
            try:
                with node.client(timeout=2.0) as c:
                    out[name] = c.call("status")
            except (OSError, ValueError, RemoteError):
                continue
        return out

    # ---- API -----------------------------------------------------------------------------------

    def handle(self, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
        op = request["op"]
        handler = {"migrate": self.op_migrate, "status": self.op_status, "abort": self.op_abort,
                   "set": self.op_set, "verify": self.op_verify, "shutdown": self.op_shutdown}.get(op)
        if handler is None:
            raise RequestError(f"unknown op {shown(op)}: use migrate, status, abort, set, verify or shutdown",
                               exit=EXIT_USAGE)
        try:
            return handler(arguments(request, declared(handler), op))
        except ArgumentError as err:
            raise RequestError(str(err), exit=EXIT_USAGE) from None
        except SvmotionError as err:
            raise RequestError(str(err), exit=err.exit_code) from None
        except RemoteError as err:
            raise RequestError(f"mirror node: {err}", exit=EXIT_INTERNAL) from None
        except OSError as err:
            raise RequestError(f"{type(err).__name__}: {err}", exit=EXIT_INTERNAL) from None

    def _vm(self, request: dict[str, Any]) -> VmConfig:
        name = request["vm"]
        vm = self.config.vm(name)
        if vm is None:
            raise Refused(f"unknown VM {shown(name)}: this agent serves {', '.join(self.nodes)}")
        return vm

    @takes(vm=Arg(str), **OPTION_ARGS)
    def op_migrate(self, request: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(request)
        options = MigrationOptions.from_request(request)
        node = self.nodes[vm.name]
        with self._lock:
            current = self.migrations.get(vm.name)
            if current is not None and not current.finished:
                raise Refused(f"VM {vm.name!r} is already migrating (migration {current.id}, phase "
                              f"{current.phase}); wait for it or run `svmotion abort {vm.name}`")
            paths = json.loads(json.dumps(self.paths[vm.name]))
        if not node.alive():
            raise Refused(f"the mirror node of VM {vm.name!r} is not running; see {node.log_file}")
        with node.client(timeout=10.0) as c:
            hello = c.call("hello")
        migration = Migration(vm, lambda: node.client(timeout=60.0), paths, options, self._destdir(options.dest),
                              **self._job_args(vm))
        try:
            migration.validate(hello)
        except BaseException:
            migration.dest.close()
            raise
        with self._lock:
            current = self.migrations.get(vm.name)
            if current is not None and not current.finished:
                raise Refused(f"VM {vm.name!r} is already migrating (migration {current.id}); "
                              f"wait for it or run `svmotion abort {vm.name}`")
            if vm.name in self.verifying:
                raise Refused(f"VM {vm.name!r} is being verified (svmotion verify); migrate when it ends")
            self.migrations[vm.name] = migration
        migration.start()
        log.info("vm %s: migration %s to %s started (%s, mirror %s)", vm.name, migration.id,
                 options.dest, options.strategy, options.mirror)
        return {"migration": migration.to_dict(samples=False)}

    def _job_args(self, vm: VmConfig) -> dict[str, Any]:
        """What every migration job of `vm` gets besides its request (agent/phases.py Migration)."""
        return {"on_done": self._migration_done, "injection": self._injection,
                "save_journal": self._journal_writer(vm), "nbd": self._nbd, "open_place": self._destdir}

    def _destdir(self, dest: str) -> DestDir:
        """A migration's destination directory, here or at another host (agent/destdir.py)."""
        return open_destdir(parse_destination(dest), self.config.tls, self.config.state_dir)

    def _migration_done(self, migration: Migration) -> None:
        name = migration.vm.name
        # new_paths is set once the switchover is done: also when a verification failed after it.
        if migration.new_paths is not None:
            self._save_paths(name, migration.new_paths)
        self._remember_last(name, migration.to_dict(samples=True))
        try:
            os.unlink(self._state(name, "migration.json"))
        except FileNotFoundError:
            pass

    @takes(vm=Arg(str, None), samples=Arg(bool, False))
    def op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        names = [self._vm(request).name] if request["vm"] is not None else list(self.nodes)
        samples = request["samples"]
        vms = []
        for name in names:
            node = self.nodes[name]
            with self._lock:
                migration = self.migrations.get(name)
                last = self.last.get(name)
                paths = self.paths[name]
            running = migration is not None and not migration.finished
            vms.append({
                "name": name, "nbdkit_pid": node.pid, "nbdkit_up": node.alive(),
                "disks": [{"name": d, "path": p} for d, p in paths["disks"].items()],
                "migration": migration.to_dict(samples=samples) if running else None,
                "last": strip_samples(last) if last and not samples else last,
            })
        return {"vms": vms}

    @takes(vm=Arg(str))
    def op_abort(self, request: dict[str, Any]) -> dict[str, Any]:
        vm = self._vm(request)
        with self._lock:
            migration = self.migrations.get(vm.name)
        if migration is None or migration.finished:
            raise Refused(f"VM {vm.name!r} is not migrating; nothing to abort")
        migration.abort("aborted by the user")
        if not migration.wait(ABORT_WAIT_S):
            raise SvmotionError(f"migration {migration.id} of VM {vm.name!r} did not stop within "
                                f"{ABORT_WAIT_S:.0f} s (phase {migration.phase}); see the agent's log")
        return {"migration": migration.to_dict(samples=False)}

    @takes(vm=Arg(str), **SET_ARGS)
    def op_set(self, request: dict[str, Any]) -> dict[str, Any]:
        """Change the VM's running migration: mirror mode, copy rate, throttle bound, stun budget."""
        vm = self._vm(request)
        wanted = {key: request[key] for key in SET_ARGS}
        if all(v is None for v in wanted.values()):
            raise SvmotionError(f"set: nothing to change; give one or more of {', '.join(SET_ARGS)}", EXIT_USAGE)
        with self._lock:
            migration = self.migrations.get(vm.name)
        if migration is None or migration.finished:
            raise Refused(f"VM {vm.name!r} is not migrating; nothing to set")
        changes = migration.set(**wanted)
        return {"migration": migration.to_dict(samples=False), "changes": changes}

    @takes(vm=Arg(str), against=Arg(str, check=file_path),
           granularity=Arg(int, 64 * 1024, power_of_two(MIN_GRANULARITY, MAX_GRANULARITY)))
    def op_verify(self, request: dict[str, Any]) -> dict[str, Any]:
        """Compare the VM's disks as served with AGAINST/<disk>.raw by digests (agent/verify.py)."""
        vm = self._vm(request)
        against, granularity = request["against"], request["granularity"]
        if not os.path.isdir(against):
            raise Refused(f"--against {against!r} is not a directory; give the directory holding the "
                          f"reference disks as <disk>.raw")
        node = self.nodes[vm.name]
        if not node.alive():
            raise Refused(f"the mirror node of VM {vm.name!r} is not running; see {node.log_file}")
        with self._lock:
            migration = self.migrations.get(vm.name)
            if migration is not None and not migration.finished:
                raise Refused(f"VM {vm.name!r} is migrating (migration {migration.id}, phase {migration.phase}); "
                              f"verify after it ends")
            if vm.name in self.verifying:
                raise Refused(f"VM {vm.name!r} is already being verified; wait for it")
            self.verifying.add(vm.name)
        try:
            with node.client(timeout=60.0) as c:
                disks = [(d["name"], reference_of(against, d), int(d["size"])) for d in c.call("hello")["disks"]]
                try:
                    record = verify_disks(c.call, disks, granularity)
                except VerifyError:
                    metrics.count_verification(vm.name, "error")
                    raise
        finally:
            with self._lock:
                self.verifying.discard(vm.name)
        metrics.count_verification(vm.name, record["result"], record["verified_bytes"], record["skipped_bytes"])
        log.info("vm %s: verify against %s: %s", vm.name, against, record["result"])
        return {"verification": {"vm": vm.name, "against": against, **record}}

    @takes(stop_vms=Arg(bool, False))
    def op_shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        # The reply goes out before the agent stops: run() does the stopping.
        self._stop_vms = request["stop_vms"]
        self._stop.set()
        return {"stopping": True, "stop_vms": self._stop_vms}


def reference_of(against: str, disk: dict[str, Any]) -> str:
    """AGAINST/<disk>.raw for a disk of `hello`; refused when missing or the served file itself."""
    path = os.path.join(against, f"{disk['name']}.raw")
    if not os.path.isfile(path):
        raise Refused(f"reference {path!r} for disk {disk['name']!r} is missing; --against needs a "
                      f"<disk>.raw for every disk of the VM")
    if os.path.exists(disk["path"]) and os.path.samefile(path, disk["path"]):
        raise Refused(f"reference {path!r} is the disk {disk['name']!r} itself; give the directory of "
                      f"another copy, e.g. the source directory after a migration")
    return path


def strip_samples(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "samples"}


def run_agent(config: AgentConfig) -> int:
    """Entry point of `svmotion agent`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Agent(config).run()
