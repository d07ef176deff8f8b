"""One nbdkit (the mirror node) per VM: build its command line, start it, adopt it, stop it.

Design notes
- The workload must outlive the agent. nbdkit runs in its own session (start_new_session), its
  output goes to a log file in state_dir (a pipe would break, and SIGPIPE it, when the agent
  dies), and it is not our child (see `launch_detached`: Debian's nbdkit sets a parent-death
  signal on itself). The log and the pid file are mode 0600 (statefiles.py). A SIGKILLed agent leaves the guest's IO running; the stun lease covers the
  case where it died holding a stun.
- A restarted agent adopts instead of restarting: the pid file in state_dir records the pid and
  the process start time (so a recycled pid is never mistaken for our nbdkit), and adoption also
  requires the control socket to answer `hello` for this VM with that pid.
- Processes are tracked by pid only; nothing here matches processes by name (other nbdkits run
  on the same machine).
- The command line is exactly docs/interfaces.md, section 1.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from agent.config import VmConfig
from agent.errors import SvmotionError
from agent.jsonlines import JsonLinesClient
from agent.statefiles import private
from nbd_plugin import plugin_pythonpath, plugin_script
from nbd_plugin.durable import replace_json

log = logging.getLogger("svmotion.supervisor")

THREADS = 16
READY_TIMEOUT_S = 15.0


def nbdkit_command(vm: VmConfig, disk_paths: dict[str, str], control: str, served: str,
                   tls_dir: str | None = None) -> list[str]:
    """The nbdkit command line of docs/interfaces.md, section 1, disks in configuration order.

    `tls_dir`: this host's credentials in libnbd's layout, for the nbds:// disks and destinations
    of other hosts' datastores (agent/tls.py certificates_dir).

    nbdkit takes either a Unix socket or a TCP port on its command line, never both; a VM with a
    TCP `listen` gets both listeners through socket activation instead (see listening_sockets).
    """
    cmd = ["nbdkit", "--foreground"]
    if not vm.listen:
        cmd += ["--unix", vm.socket]
    cmd += ["--threads", str(THREADS), "python", str(plugin_script()), f"vm={vm.name}"]
    cmd += [f"disk={d.name}:{disk_paths[d.name]}" for d in vm.disks]
    cmd += [f"control={control}", f"lease={vm.lease}", f"state={served}"]
    if tls_dir is not None:
        cmd.append(f"tls-certificates={tls_dir}")
    return cmd


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def remove_stale_socket(path: str) -> None:
    """Unlink a Unix socket nobody listens on (a killed nbdkit leaves it; nbdkit will not bind over it).

    A socket somebody still answers on is left alone: starting would fail with a clear error.
    """
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def tcp_listener(address: str) -> socket.socket:
    """A listening TCP socket on "HOST:PORT" ("[V6]:PORT" too), for nbdkit's socket activation."""
    host, _, port = address.rpartition(":")
    tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host.strip("[]"), int(port)))
        tcp.listen(64)
    except OSError:
        tcp.close()
        raise
    return tcp


def listening_sockets(vm: VmConfig) -> list[socket.socket]:
    """The Unix and TCP listeners of a VM with a `listen` address, for nbdkit's socket activation."""
    if not vm.listen:
        return []
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        unix.bind(vm.socket)
        unix.listen(64)
        tcp = tcp_listener(vm.listen)
    except OSError as err:
        unix.close()
        raise SvmotionError(f"VM {vm.name!r}: cannot listen on {vm.socket} and {vm.listen}: {err.strerror}; "
                            "choose a free address in the configuration") from None
    return [unix, tcp]


def _hand_over(fds: list[int]) -> Callable[[], None]:
    """A preexec function placing fds at 3, 4, ... as socket activation (LISTEN_FDS) wants them."""
    def place() -> None:
        copies = [os.dup(fd) for fd in fds]   # first dup, so that dup2 never overwrites a source
        for index, fd in enumerate(copies):
            os.dup2(fd, 3 + index)
            os.set_inheritable(3 + index, True)
    return place


# Run "$@" as an orphan: a subshell waits until its parent shell is gone (reaped by us), so it has
# been re-parented, and only then execs nbdkit (same pid, printed first). Why: nbdkit 1.32 as
# shipped in Debian 12 calls prctl(PR_SET_PDEATHSIG, SIGTERM) at start-up even without
# --exit-with-parent (seen with strace), so a child of the agent would die with the agent.
# The inner sh exports its own pid as LISTEN_PID before exec'ing nbdkit under that same pid, as
# socket activation requires; without LISTEN_FDS nbdkit ignores it.
_LAUNCH = ('( while kill -0 "$$" 2>/dev/null; do sleep 0.005; done; '
           'exec /bin/sh -c \'LISTEN_PID=$$; export LISTEN_PID; exec "$@"\' sh "$@" ) '
           '</dev/null >>"$SVMOTION_LOG" 2>&1 & echo $!')


def launch_detached(cmd: list[str], log_file: str, env: dict[str, str],
                    listeners: list[socket.socket] = ()) -> int:
    """Start `cmd` in a new session, not as our child, output appended to log_file; return its pid.

    `listeners` are handed to it by socket activation (fds 3, 4, ...; LISTEN_FDS).
    """
    with open(log_file, "ab", opener=private) as out:   # it names the disks' paths
        out.write(f"--- {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
    if listeners:
        env = dict(env, LISTEN_FDS=str(len(listeners)))
    shell = subprocess.run(["/bin/sh", "-c", _LAUNCH, "sh", *cmd], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                           env=dict(os.environ, SVMOTION_LOG=log_file, **env), timeout=10, check=True,
                           preexec_fn=_hand_over([s.fileno() for s in listeners]) if listeners else None,
                           close_fds=not listeners)
    return int(shell.stdout)


class Detached:
    """A process we launched detached (`launch_detached`), known by its pid file: pid and start time.

    The base of the VMs' mirror nodes and of the datastores' export (agent/export.py). `what`
    names it in logs, e.g. "vm vm1".
    """

    def __init__(self, what: str, pid_file: str, log_file: str):
        self.what = what
        self.pid_file = pid_file
        self.log_file = log_file
        self.pid: int | None = None
        self._start_time: int | None = None

    def identity(self) -> dict[str, int | None]:
        """Which process this is: a restarted one has another pid or start time."""
        return {"pid": self.pid, "start_time": self._start_time}

    def alive(self) -> bool:
        if self.pid is None:
            return False
        return process_start_time(self.pid) == self._start_time

    def recorded(self) -> tuple[int, int] | None:
        """(pid, start time) of the pid file when that very process still runs, else None."""
        try:
            recorded = json.loads(Path(self.pid_file).read_text())
            pid, start = int(recorded["pid"]), int(recorded["start_time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (pid, start) if process_start_time(pid) == start else None

    def stale_pid(self) -> int | None:
        """A still-running process our pid file names that could not be adopted (it must be stopped)."""
        found = self.recorded()
        return None if found is None else found[0]

    def _stop_stale(self) -> None:
        stale = self.stale_pid()
        if stale is not None:
            # Our own earlier process that we could not adopt: it would hold its sockets.
            log.warning("%s: stopping unresponsive nbdkit pid %d", self.what, stale)
            self.pid, self._start_time = stale, process_start_time(stale)
            self.stop()

    def _launch(self, cmd: list[str], env: dict[str, str], listeners: list[socket.socket]) -> None:
        """Launch `cmd` detached (handing it `listeners`, closed here after) and record it in the pid file."""
        try:
            self.pid = launch_detached(cmd, self.log_file, env, listeners)
        finally:
            for listener in listeners:   # the child holds its own copies now
                listener.close()
        # None here means it already exited (alive() says so, and the caller shows the log).
        self._start_time = process_start_time(self.pid)
        replace_json(self.pid_file, {"pid": self.pid, "start_time": self._start_time})

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = Path(self.log_file).read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop it (SIGTERM, then SIGKILL) and remove its pid file. nbdkit disconnects its clients."""
        if self.pid is not None and self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                log.warning("%s: nbdkit pid %d ignored SIGTERM; killing it", self.what, self.pid)
                os.kill(self.pid, signal.SIGKILL)
                while self.alive():
                    time.sleep(0.05)
        self.pid = None
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass


class Nbdkit(Detached):
    """The mirror node of one VM, started by us or adopted from a previous agent.

    Example: `node = Nbdkit(vm, state_dir); node.adopt() or node.start(paths); node.client()`
    """

    def __init__(self, vm: VmConfig, state_dir: str, tls_dir: str | None = None):
        super().__init__(f"vm {vm.name}", os.path.join(state_dir, f"{vm.name}.pid"),
                         os.path.join(state_dir, f"{vm.name}.nbdkit.log"))
        self.vm = vm
        self.tls_dir = tls_dir
        self.control = os.path.join(state_dir, f"{vm.name}.ctl")
        # Where each disk lives, written by nbdkit itself before it serves a new place
        # (nbd_plugin/served.py): the truth about the disks after any crash.
        self.served_file = os.path.join(state_dir, f"{vm.name}.served.json")
        self.hello: dict[str, Any] = {}

    def client(self, timeout: float | None = 30.0) -> JsonLinesClient:
        """A new connection to the control socket (each user gets its own: a stun belongs to one)."""
        return JsonLinesClient(self.control, timeout=timeout)

    def adopt(self) -> bool:
        """Take over an nbdkit left running by a previous agent; False when there is none to adopt."""
        found = self.recorded()
        if found is None:
            log.info("vm %s: no running nbdkit of ours to adopt (pid file %s)", self.vm.name, self.pid_file)
            return False
        pid, start = found
        try:
            with self.client(timeout=5.0) as c:
                hello = c.call("hello")
        except (OSError, ValueError) as err:
            log.warning("vm %s: nbdkit pid %d is running but its control socket does not answer (%s)",
                        self.vm.name, pid, err)
            return False
        if hello.get("vm") != self.vm.name or hello.get("pid") != pid:
            log.warning("vm %s: control socket answered for vm %r pid %r, not ours",
                        self.vm.name, hello.get("vm"), hello.get("pid"))
            return False
        self.pid, self._start_time, self.hello = pid, start, hello
        log.info("vm %s: adopted running nbdkit pid %d", self.vm.name, pid)
        return True

    def start(self, disk_paths: dict[str, str]) -> None:
        """Start nbdkit for the VM and wait until its control socket answers `hello`."""
        self._stop_stale()
        for path in (self.control, self.vm.socket):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        remove_stale_socket(self.vm.socket)
        cmd = nbdkit_command(self.vm, disk_paths, self.control, self.served_file, self.tls_dir)
        self._launch(cmd, {"PYTHONPATH": str(plugin_pythonpath())}, listening_sockets(self.vm))
        self.hello = self._wait_ready(time.monotonic() + READY_TIMEOUT_S)
        log.info("vm %s: started nbdkit pid %d", self.vm.name, self.pid)

    def _wait_ready(self, deadline: float) -> dict[str, Any]:
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not self.alive():
                raise SvmotionError(f"nbdkit for VM {self.vm.name!r} exited at start: "
                                    f"{self.log_tail()}; see {self.log_file}")
            try:
                with self.client(timeout=2.0) as c:
                    return c.call("hello")
            except (OSError, ValueError) as err:
                last_error = str(err)
            time.sleep(0.05)
        self.stop()
        raise SvmotionError(f"nbdkit for VM {self.vm.name!r} did not answer on {self.control} within "
                            f"{READY_TIMEOUT_S:.0f} s ({last_error}); see {self.log_file}")
