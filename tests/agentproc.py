"""A real `svmotion agent` process for tests: its config, its start, its API and CLI, its stop.

Design notes
- One harness for every test area that runs the agent (tests/agent, tests/kernel, the live
  metrics test); each area adds its own parts (disk images, sidecars, attach state, guests,
  Prometheus) around it. A plain module, not a conftest: pytest keeps one module named conftest.
- The agent is run as `python -m agent.cli agent --config FILE` in a subprocess: the tests see
  exactly what a user sees (exit codes, one-line errors), and can SIGKILL it.
- The config is written from a small description (`AgentProcess` fields) in the shape of
  docs/interfaces.md section 3; tests that break a config on purpose edit that text.
- The agent launches nbdkit detached (it must outlive the agent), so pytest's own process tree
  does not contain it: `stop` asks the agent to `shutdown` with stop_vms, kills the agent by PID
  if it does not go, and then stops any nbdkit still named by the VM's pid file (or by the
  datastores' export pid file) in the state dir, by PID and only if the process start time
  matches (never by name: other engineers run nbdkit here).
- An agent without disks writes no [[vm]]: a datastore host (`agent_keys`, `extra_config`).
- `command_prefix` runs the agent under another command, e.g. inside a host of a network
  namespace lab (svlab/netns.py `Host.argv([])`: `ip netns exec` execs the agent in place, so
  the PID is still the agent's). Its Unix sockets and files are this machine's as before.
- Sockets and state live in a short directory under /tmp (Unix socket paths are limited to 107
  bytes); `AgentPool` makes those directories and removes them with the agents.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.jsonlines import JsonLinesClient, RemoteError  # noqa: E402
from agent.supervisor import process_start_time  # noqa: E402

PYTHON = sys.executable
READY_S = 20.0
STOP_S = 20.0
# What a call to an agent that is starting or going away raises.
NOT_ANSWERING = (OSError, ValueError, RemoteError)


def cli_argv(agent_socket: Path, *args: str) -> list[str]:
    """The command line of `svmotion --agent-socket SOCK ARGS...` (run with cwd=ROOT)."""
    return [PYTHON, "-m", "agent.cli", "--agent-socket", str(agent_socket), *args]


def free_tcp_ports(count: int) -> list[int]:
    """`count` different loopback TCP ports nobody listens on right now.

    All are held bound until the last is picked: a port picked and released at once may come
    back from the next pick (it did, and an agent refused the same port for API and NBD).
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_tcp_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    return free_tcp_ports(1)[0]


@dataclass
class AgentProcess:
    """An agent serving one VM, described by the config file it writes, and its process."""

    root: Path                        # where the config and the logs go (a tmp_path)
    state: Path                       # the agent's state_dir; sockets too, so keep it short
    disks: dict[str, Path]
    name: str = "vm1"
    config: Path | None = None        # default: root / "agent.toml"
    sidecars: dict[str, list[Path]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    lease: float | None = None
    listen: str | None = None         # "127.0.0.1:PORT": nbdkit also serves NBD over TCP
    metrics: str = "127.0.0.1:0"      # "" switches the agent's /metrics off
    env: dict[str, str] = field(default_factory=dict)
    agent_keys: dict[str, str] = field(default_factory=dict)   # more [agent] keys (listen, nbd_listen)
    extra_config: str = ""            # more tables ([tls], [[datastore]]); no disks: no [[vm]] at all
    command_prefix: list[str] = field(default_factory=list)   # e.g. netns Host.argv([]): run it on that host
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    _logs: int = 0
    _background: list[subprocess.Popen[str]] = field(default_factory=list)  # CLIs, stopped by `stop`

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = self.root / "agent.toml"

    @property
    def socket(self) -> Path:
        return self.state / "agent.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.state / f"{self.name}.nbd"

    @property
    def control(self) -> Path:
        return self.state / f"{self.name}.ctl"

    @property
    def pid_file(self) -> Path:
        return self.state / f"{self.name}.pid"

    def uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"

    # ---- the config ----------------------------------------------------------------------------

    def config_text(self) -> str:
        """The TOML of docs/interfaces.md section 3 for this description."""
        lines = ["[agent]", f'socket = "{self.socket}"', f'state_dir = "{self.state}"',
                 f'metrics = "{self.metrics}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in self.agent_keys.items()]
        if not self.disks:
            return "\n".join(lines) + "\n\n" + self.extra_config
        lines += ["", "[[vm]]", f'name = "{self.name}"',
                  f'socket = "{self.nbd_socket}"', f"files = {json.dumps([str(f) for f in self.files])}"]
        if self.lease is not None:
            lines.append(f"lease = {self.lease}")
        if self.listen:
            lines.append(f'listen = "{self.listen}"')
        for name, path in self.disks.items():
            lines += ["", "  [[vm.disk]]", f'  name = "{name}"', f'  path = "{path}"',
                      f"  sidecars = {json.dumps([str(s) for s in self.sidecars.get(name, [])])}"]
        return "\n".join(lines) + "\n\n" + self.extra_config

    def write_config(self) -> Path:
        assert self.config is not None
        self.config.write_text(self.config_text())
        return self.config

    # ---- the agent process ---------------------------------------------------------------------

    def start(self, inject: str | None = None, *, wait_nbdkit: bool = False) -> None:
        """Start the agent (optionally with SVMOTION_INJECT) and wait until its API answers.

        With `wait_nbdkit`, wait also until the VM's nbdkit is up and its socket exists.
        """
        env = dict(os.environ, **self.env)
        env.pop("SVMOTION_INJECT", None)
        if inject:
            env["SVMOTION_INJECT"] = inject
        self._logs += 1
        assert self.config is not None
        self.log = self.root / f"{self.config.stem}-{self._logs}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*self.command_prefix, PYTHON, "-m", "agent.cli", "agent", "--config",
                                          str(self.config)],
                                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        what = f"serve {self.name}" if wait_nbdkit else "answer"
        deadline = time.monotonic() + READY_S
        while not self._ready(wait_nbdkit):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not {what} within {READY_S} s:\n{self.log_text()}")
            time.sleep(0.05)

    def _ready(self, wait_nbdkit: bool) -> bool:
        try:
            vms = self.call("status")["vms"]
        except NOT_ANSWERING:
            return False
        return not wait_nbdkit or not self.disks or (vms[0].get("nbdkit_up", True) and self.nbd_socket.exists())

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One request to the agent API (docs/interfaces.md section 4)."""
        with JsonLinesClient(str(self.socket), timeout=60) as c:
            return c.call(op, **args)

    def plugin(self, op: str, **args: Any) -> dict[str, Any]:
        """One request to the mirror node's control socket (docs/interfaces.md section 2)."""
        with JsonLinesClient(str(self.control), timeout=30) as c:
            return c.call(op, **args)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_argv(self.socket, *args), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """The CLI in the background; `stop` kills it (by PID) if it is still running then."""
        proc = subprocess.Popen(cli_argv(self.socket, *args), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self._background.append(proc)
        return proc

    def status(self) -> dict[str, Any]:
        """The VM's entry of the agent's `status`."""
        return self.call("status", vm=self.name)["vms"][0]

    def wait_phase(self, phase: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the running migration is in `phase`; return its record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.status()["migration"]
            if m and m["phase"] == phase:
                return m
            time.sleep(0.02)
        raise AssertionError(f"migration never reached {phase}: {self.status()}\n{self.log_text()}")

    def wait_done(self, timeout: float = 90.0) -> dict[str, Any]:
        """Wait until no migration runs and one has ended; return that record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st["migration"] is None and st["last"] is not None:
                return st["last"]
            time.sleep(0.05)
        raise AssertionError(f"migration did not end within {timeout} s:\n{self.log_text()}")

    def nbdkit_pid(self) -> int | None:
        """The nbdkit PID the VM's pid file records (None: no pid file)."""
        try:
            return int(json.loads(self.pid_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def kill_agent(self) -> None:
        """SIGKILL the agent (its nbdkit, detached, keeps serving)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the running agent's log holds `text`."""
        assert self.log is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, f"the agent never logged {text!r}:\n{self.log_text()}"
            assert self.proc.poll() is None, f"the agent exited:\n{self.log_text()}"
            time.sleep(0.02)

    def migrate_killed_and_resumed(self, dest: str, point: str) -> dict[str, Any]:
        """`migrate` to `dest` with the agent started with SVMOTION_INJECT hold:POINT: SIGKILL the
        agent there, start it again without the hold, and return the resumed migration's record
        (which must be a success that says it was resumed)."""
        started = self.cli("migrate", self.name, "--dest", dest, "--no-wait")
        assert started.returncode == 0, started.stderr
        self.wait_for_log(f"SVMOTION_INJECT hold at {point}")
        self.kill_agent()
        time.sleep(0.3)              # the guest goes on writing while no agent runs
        self.start()                 # no injection now: the restarted agent resumes
        last = self.wait_done()
        assert last["state"] == "success", last
        assert any("resumed" in w for w in last["warnings"]), last["warnings"]
        return last

    def served_paths(self) -> dict[str, str]:
        """Where the VM's nbdkit serves each disk from (a path or an NBD URI)."""
        return {d["name"]: d["path"] for d in self.plugin("hello")["disks"]}

    def kill_nbdkit_and_wait_restart(self, timeout: float = 20.0) -> None:
        """SIGKILL the VM's nbdkit by its recorded pid; wait until the agent's supervisor restarted it."""
        old = self.nbdkit_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            pid = self.nbdkit_pid()
            if pid not in (None, old) and self.status()["nbdkit_up"]:
                try:
                    self.plugin("hello")
                    return
                except (OSError, ValueError):
                    pass
            assert time.monotonic() < deadline, f"nbdkit was not restarted:\n{self.log_text()}"
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        """Stop the agent and its nbdkit; whatever is left is stopped by PID."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.call("shutdown", stop_vms=True)
                self.proc.wait(timeout=STOP_S)
            except (*NOT_ANSWERING, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        stop_recorded_nbdkit(self.pid_file)
        for cli in self._background:   # a test that failed before reading its CLI's result
            if cli.poll() is None:
                cli.kill()
            cli.communicate()
        self._background.clear()
        stop_recorded_nbdkit(self.state / "exports.pid")     # the datastores' export, if any


def stop_recorded_nbdkit(pid_file: Path) -> None:
    """Stop the nbdkit a pid file names, if that very process (same start time) still runs.

    SIGTERM, then SIGKILL after 5 s: nbdkit does not exit on SIGTERM while a client that sent a
    request stays connected.
    """
    try:
        rec = json.loads(pid_file.read_text())
        pid, start = int(rec["pid"]), int(rec["start_time"])
    except (OSError, ValueError, KeyError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process_start_time(pid) != start:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while process_start_time(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)


class AgentPool:
    """The agents a fixture made and their short state directories, all stopped and removed by `close`."""

    def __init__(self) -> None:
        self.agents: list[AgentProcess] = []
        self._dirs: list[Path] = []

    def state_dir(self, prefix: str = "sva-") -> Path:
        """A new short directory under /tmp (Unix socket paths must stay under 107 bytes)."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self._dirs.append(path)
        return path

    def add(self, agent: AgentProcess) -> AgentProcess:
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        """Stop every agent (newest first), then remove the state directories."""
        try:
            for agent in reversed(self.agents):
                agent.stop()
        finally:
            self.agents.clear()
            for path in self._dirs:
                shutil.rmtree(path, ignore_errors=True)
            self._dirs.clear()
