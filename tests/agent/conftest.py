"""Fixtures for agent tests: a VM on disk, a real agent process (which starts a real nbdkit), the CLI.

Design notes
- The agent is run as `python -m agent.cli agent --config FILE` in a subprocess: the tests see
  exactly what a user sees (exit codes, one-line errors), and can SIGKILL it.
- The agent launches nbdkit detached (it must outlive the agent), so pytest's own process tree
  does not contain it: teardown asks the agent to `shutdown` with `stop_vms`, and then stops any
  nbdkit still named by a pid file in the VM's state dir, by pid and only if the process start
  time matches (never by name: other engineers run nbdkit here).
- Sockets and state live in a short directory under /tmp (Unix socket paths are limited to 107
  bytes); disks in tmp_path.
- Disks are sparse: pattern data in a few extents, holes elsewhere; a pristine copy is the
  writer's `initial` model, so a verification covers holes and data alike.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.jsonlines import JsonLinesClient, RemoteError  # noqa: E402
from agent.supervisor import process_start_time  # noqa: E402
from agent.writer import VerifyingWriter, fill_pattern_image  # noqa: E402

MiB = 1024 * 1024
PYTHON = sys.executable
READY_S = 20.0


@dataclass
class AgentVM:
    """A VM described by a config file, and the agent process serving it."""

    root: Path
    state: Path
    name: str
    disks: dict[str, Path]
    pristine: dict[str, Path]
    files: list[Path]
    sidecars: dict[str, list[Path]]
    config: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    _logs: int = 0

    @property
    def socket(self) -> Path:
        return self.state / "agent.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.state / f"{self.name}.nbd"

    @property
    def control(self) -> Path:
        return self.state / f"{self.name}.ctl"

    def uri(self, disk: str) -> str:
        return f"nbd+unix:///{disk}?socket={self.nbd_socket}"

    # ---- the agent process -------------------------------------------------------------------

    def start(self, inject: str | None = None) -> None:
        """Start the agent (optionally with SVMOTION_INJECT) and wait until its API answers."""
        env = dict(os.environ, **self.env)
        env.pop("SVMOTION_INJECT", None)
        if inject:
            env["SVMOTION_INJECT"] = inject
        self._logs += 1
        self.log = self.root / f"agent{self._logs}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([PYTHON, "-m", "agent.cli", "agent", "--config", str(self.config)],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                self.call("status")
                return
            except (OSError, ValueError, RemoteError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent did not answer within {READY_S} s:\n{self.log.read_text()}")
                time.sleep(0.05)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        with JsonLinesClient(str(self.socket), timeout=60) as c:
            return c.call(op, **args)

    def plugin(self, op: str, **args: Any) -> dict[str, Any]:
        with JsonLinesClient(str(self.control), timeout=30) as c:
            return c.call(op, **args)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "agent.cli", "--agent-socket", str(self.socket), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([PYTHON, "-m", "agent.cli", "--agent-socket", str(self.socket), *args],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def status(self) -> dict[str, Any]:
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st["migration"] is None and st["last"] is not None:
                return st["last"]
            time.sleep(0.05)
        raise AssertionError(f"migration did not end within {timeout} s:\n{self.log_text()}")

    def nbdkit_pid(self) -> int | None:
        try:
            return int(json.loads((self.state / f"{self.name}.pid").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def kill_agent(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        """Stop the agent and its nbdkit; whatever is left is stopped by pid."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.call("shutdown", stop_vms=True)
                self.proc.wait(timeout=20)
            except (OSError, ValueError, RemoteError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        stop_recorded_nbdkit(self.state / f"{self.name}.pid")

    def writer(self, **kwargs: Any) -> VerifyingWriter:
        """A verifying writer on every disk, its model starting from the pristine copies."""
        opts: dict[str, Any] = dict(connections=2, queue_depth=4, rate=2 * MiB, seed=1234,
                                    initial={d: str(p) for d, p in self.pristine.items()})
        opts.update(kwargs)
        return VerifyingWriter({d: self.uri(d) for d in self.disks}, **opts)


def stop_recorded_nbdkit(pid_file: Path) -> None:
    """Stop the nbdkit a pid file names, if that very process (same start time) still runs."""
    try:
        rec = json.loads(pid_file.read_text())
        pid, start = int(rec["pid"]), int(rec["start_time"])
    except (OSError, ValueError, KeyError):
        return
    if process_start_time(pid) != start:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while process_start_time(pid) == start and time.monotonic() < deadline:
        time.sleep(0.05)
    if process_start_time(pid) == start:
        os.kill(pid, signal.SIGKILL)


def make_disk(path: Path, name: str, size: int) -> None:
    """A sparse disk: pattern data in the first eighth and in a few extents further on."""
    step = size // 8
    extents = [(0, step), (3 * step, step // 2), (6 * step + step // 2, step // 4)]
    fill_pattern_image(path, name, size, extents)


def write_config(vm: AgentVM, extra_vm: str = "", agent_extra: str = "") -> None:
    lines = ["[agent]", f'socket = "{vm.socket}"', f'state_dir = "{vm.state}"', 'metrics = "127.0.0.1:0"',
             agent_extra, "", "[[vm]]", f'name = "{vm.name}"', f'socket = "{vm.nbd_socket}"',
             f"files = {json.dumps([str(f) for f in vm.files])}", extra_vm]
    for name, path in vm.disks.items():
        lines += ["", "  [[vm.disk]]", f'  name = "{name}"', f'  path = "{path}"',
                  f"  sidecars = {json.dumps([str(s) for s in vm.sidecars.get(name, [])])}"]
    vm.config.write_text("\n".join(lines) + "\n")


@pytest.fixture
def agent_vm(tmp_path: Path) -> Iterator[Callable[..., AgentVM]]:
    """Factory: `agent_vm(n_disks=1, size=32*MiB, start=True, inject=None)` -> AgentVM; all stopped after."""
    made: list[AgentVM] = []
    states: list[Path] = []

    def make(n_disks: int = 1, size: int = 32 * MiB, start: bool = True, inject: str | None = None,
             lease: float | None = None, listen: str | None = None) -> AgentVM:
        src = tmp_path / f"src{len(made)}"
        src.mkdir()
        state = Path(tempfile.mkdtemp(prefix="sva-", dir="/tmp"))
        states.append(state)
        disks, pristine, sidecars = {}, {}, {}
        for i in range(n_disks):
            name = f"disk{i}"
            disks[name] = src / f"{name}.raw"
            make_disk(disks[name], name, size)
            pristine[name] = tmp_path / f"pristine{len(made)}-{name}.raw"
            subprocess.run(["cp", "--sparse=always", str(disks[name]), str(pristine[name])], check=True)
            sidecar = src / f"{name}.ctk"
            sidecar.write_bytes(os.urandom(4096))
            sidecars[name] = [sidecar]
        nvram = src / "vm1.nvram"
        nvram.write_bytes(os.urandom(8192))
        vm = AgentVM(root=tmp_path, state=state, name="vm1", disks=disks, pristine=pristine,
                     files=[nvram], sidecars=sidecars, config=tmp_path / f"agent{len(made)}.toml")
        extra = [f"lease = {lease}" if lease else "", f'listen = "{listen}"' if listen else ""]
        write_config(vm, extra_vm="\n".join(extra))
        made.append(vm)
        if start:
            vm.start(inject)
        return vm

    try:
        yield make
    finally:
        for vm in reversed(made):
            vm.stop()
        for state in states:
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def dest_dir(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def file_digest(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()
