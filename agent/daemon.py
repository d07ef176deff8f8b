"""`svmotion agent`: supervises one nbdkit per VM, runs migrations, serves the API and /metrics.

Design notes
- The API (docs/interfaces.md, section 4) is a `ControlServer` on `[agent] socket`: ops
  migrate, status, abort, shutdown. A refusal is a `RequestError` carrying `exit` (section 5), so
  the CLI prints the agent's one line and exits with the agent's code. Each op declares its
  arguments with `@takes` (nbd_plugin/control.py); `handle` checks them before the op runs, and
  an unknown key or a wrong type is a usage error (exit 2) that changes nothing.
- State in state_dir, so the agent can die at any moment (even SIGKILL) and come back:
  `<vm>.pid` (the supervisor's), `<vm>.paths.json` (where the VM's disks and files live now:
  written after a successful migration, so a restart serves the destination), and
  `<vm>.migration.json` (a journal of the running migration: the destination files it may have
  created). A journal found at start means the agent died mid-migration: the mirror node is told
  to abort (its stun, if any, ended with our connection) and the partial files are removed.
- Supervision: a thread checks every nbdkit once a second. A dead one fails the VM's running
  migration (the source was authoritative until switchover, so nothing is lost) and is
  restarted on the VM's current paths.
- Threads: API connection threads, one thread per running migration, the supervision thread,
  the metrics server. `_lock` protects the migrations/last/paths maps; no call to nbdkit is
  made while holding it.
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
from agent.errors import EXIT_INTERNAL, EXIT_USAGE, ConfigError, Refused, SvmotionError
from agent.jsonlines import JsonLinesClient, RemoteError
from agent.phases import Injection, Migration
from agent.plan import OPTION_ARGS, PARTIAL_SUFFIX, MigrationOptions
from agent.statefiles import private, private_dir
from agent.supervisor import Nbdkit
from nbd_plugin.control import (Arg, ArgumentError, Connection, ControlServer, RequestError, arguments,
                                declared, shown, takes)

log = logging.getLogger("svmotion.agent")

SUPERVISE_INTERVAL_S = 1.0
ABORT_WAIT_S = 15.0


def write_json(path: str, data: Any) -> None:
    """Atomically replace a small JSON state file (a crash leaves the old or the new one); mode 0600."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", opener=private) as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.nodes = {vm.name: Nbdkit(vm, config.state_dir) for vm in config.vms}
        # This lock protects migrations, last and paths.
        self._lock = threading.Lock()
        self.migrations: dict[str, Migration] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.paths: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._stop_vms = False
        self._server: ControlServer | None = None
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
        for vm in self.config.vms:
            self.paths[vm.name] = self._current_paths(vm)
        for vm in self.config.vms:
            self._bring_up(vm)
            self._recover(vm)
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

    def stop(self) -> None:
        """Stop serving; abort running migrations; stop nbdkit only if `shutdown` asked for it."""
        if self._server is not None:
            self._server.stop()
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
        for name, path in paths["disks"].items():
            if not os.path.isfile(path):
                raise ConfigError(f"{self.config.source}: disk {name!r} of VM {vm.name!r}: {path!r} does not "
                                  f"exist; create the raw image (truncate -s SIZE FILE) or fix its path")
        return paths

    def _state(self, vm: str, suffix: str) -> str:
        return os.path.join(self.config.state_dir, f"{vm}.{suffix}")

    def _bring_up(self, vm: VmConfig) -> None:
        node = self.nodes[vm.name]
        if not node.adopt():
            node.start(self.paths[vm.name]["disks"])
        metrics.set_nbdkit_up(vm.name, True)
        metrics.set_phase(vm.name, None)

    def _recover(self, vm: VmConfig) -> None:
        """Finish the story of a migration the previous agent did not live to end."""
        journal = read_json(self._state(vm.name, "migration.json"))
        if not journal:
            return
        log.warning("vm %s: the agent stopped during migration %s; rolling it back", vm.name, journal.get("id"))
        error = "interrupted: the agent stopped during the migration"
        try:
            with self.nodes[vm.name].client() as c:
                states = {d["state"] for d in c.call("status")["disks"].values()}
                if states & {"switched"}:
                    # Too late to roll back: the destination is authoritative. Rare (the agent died
                    # between switchover and rename); finish it, the operator gets a warning.
                    c.call("finish")
                    self._adopt_switched(vm, journal)
                    error = None
                elif states != {"passthrough"}:
                    c.call("abort")
        except (OSError, ValueError, RemoteError) as err:
            log.error("vm %s: cannot roll back the interrupted migration: %s", vm.name, err)
        if error is not None:
            for path in journal.get("created", []):
                if path.endswith(PARTIAL_SUFFIX) and os.path.lexists(path):
                    os.unlink(path)
        record = {"id": journal.get("id"), "vm": vm.name, "state": "failed" if error else "success",
                  "error": error, "phase": "Cleanup", "warnings": ["recovered by a restarted agent"]}
        with self._lock:
            self.last[vm.name] = record
        os.unlink(self._state(vm.name, "migration.json"))

    def _adopt_switched(self, vm: VmConfig, journal: dict[str, Any]) -> None:
        for path in journal.get("created", []):
            if os.path.exists(path):
                os.rename(path, path[: -len(PARTIAL_SUFFIX)])
        self._save_paths(vm.name, journal["new_paths"])

    def _save_paths(self, vm: str, paths: dict[str, Any]) -> None:
        write_json(self._state(vm, "paths.json"), paths)
        with self._lock:
            self.paths[vm] = paths

    # ---- supervision ---------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart a dead nbdkit on the VM's current paths; a running migration of it fails."""
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
                    migration.abort("nbdkit exited during the migration", failed=True)
                except Refused:
                    pass
                migration.wait(ABORT_WAIT_S)
            try:
                with self._lock:
                    disks = self.paths[vm.name]["disks"]
                node.start(disks)
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
        handler = {"migrate": self.op_migrate, "status": self.op_status,
                   "abort": self.op_abort, "shutdown": self.op_shutdown}.get(op)
        if handler is None:
            raise RequestError(f"unknown op {shown(op)}: use migrate, status, abort or shutdown", exit=EXIT_USAGE)
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
        migration = Migration(vm, lambda: node.client(timeout=60.0), paths, options,
                              on_done=self._migration_done, injection=self._injection)
        migration.validate(hello)
        with self._lock:
            current = self.migrations.get(vm.name)
            if current is not None and not current.finished:
                raise Refused(f"VM {vm.name!r} is already migrating (migration {current.id}); "
                              f"wait for it or run `svmotion abort {vm.name}`")
            self.migrations[vm.name] = migration
        created = [d.partial for d in migration.plan] + \
                  [f + PARTIAL_SUFFIX for _, f in migration.files] + \
                  [f + PARTIAL_SUFFIX for d in migration.plan for _, f in d.sidecars]
        new_paths = {"disks": {d.name: d.final for d in migration.plan},
                     "files": [f for _, f in migration.files],
                     "sidecars": {d.name: [f for _, f in d.sidecars] for d in migration.plan}}
        write_json(self._state(vm.name, "migration.json"),
                   {"id": migration.id, "created": created, "new_paths": new_paths})
        migration.start()
        log.info("vm %s: migration %s to %s started (%s, mirror %s)", vm.name, migration.id,
                 options.dest, options.strategy, options.mirror)
        return {"migration": migration.to_dict(samples=False)}

    def _migration_done(self, migration: Migration) -> None:
        name = migration.vm.name
        if migration.state == "success" and migration.new_paths is not None:
            self._save_paths(name, migration.new_paths)
        with self._lock:
            self.last[name] = migration.to_dict(samples=True)
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

    @takes(stop_vms=Arg(bool, False))
    def op_shutdown(self, request: dict[str, Any]) -> dict[str, Any]:
        # The reply goes out before the agent stops: run() does the stopping.
        self._stop_vms = request["stop_vms"]
        self._stop.set()
        return {"stopping": True, "stop_vms": self._stop_vms}


def strip_samples(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "samples"}


def run_agent(config: AgentConfig) -> int:
    """Entry point of `svmotion agent`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Agent(config).run()
