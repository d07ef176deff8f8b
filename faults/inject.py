"""Firing one fault at its moment, and bringing back what a real operator's machine would.

Design notes
- A thread waits for the moment by polling: the agent's `status` for a phase (the phase's
  SVMOTION_INJECT hold makes it last long enough), or the mirror node's own `status` every 5 ms
  for `switched` / `finished` (those instants are not phases). Then it sleeps the drawn delay and
  fires. What was really hit is recorded: the phase last seen, seconds since `migrate` started.
- If the migration ends before the moment, a kill still fires (an agent or nbdkit dying after a
  migration is a fault too: the restart must come back on the right disks); a destination fault
  does not (it would break the VM's new home, see params.py) and the trial records it as missed.
- After an agent kill the thread starts a new agent (without SVMOTION_INJECT), as systemd would.
  After an nbdkit kill the agent's supervisor restarts nbdkit by itself; the thread only waits
  for it (and records how long it took, or that it never came back).
- nbdkit is killed by the PID in the agent's pid file, and only if that process still has the
  recorded start time (never by name).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from agent.supervisor import process_start_time
from faults.dest import Destination
from faults.params import FaultParams
from faults.resources import wait_until

POLL_S = 0.01
PLUGIN_POLL_S = 0.005
MOMENT_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 30.0


@dataclass
class Fired:
    """What the fault really did (the results file's `fault` record, with the drawn parameters)."""
    fired: bool = False
    missed: bool = False              # the migration ended before the moment
    phase_seen: str | None = None     # the agent's phase when the moment was met
    at_s: float | None = None         # seconds after `migrate` started
    detail: str = ""
    recovered_s: float | None = None  # agent or nbdkit back after this many seconds
    killed_pid: int | None = None     # nbdkit_kill: the nbdkit we killed
    wall: float | None = None         # time.time() when it fired
    error: str | None = None          # the harness could not fire or recover


class FaultThread(threading.Thread):
    """Example: `t = FaultThread(params, vm, dest, finals, t0); t.start(); ...; t.join(); t.fired`"""

    def __init__(self, params: FaultParams, vm: Any, dest: Destination, finals: dict[str, str], t0: float):
        super().__init__(daemon=True, name=f"fault-{params.kind}")
        self.params, self.vm, self.dest, self.finals, self.t0 = params, vm, dest, finals, t0
        self.fired = Fired()
        self.cancel = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001  (recorded: a harness failure, shown in the results)
            self.fired.error = f"{type(err).__name__}: {err}"

    def _run(self) -> None:
        met = self._wait_moment()
        if met is None:
            return
        if self.params.delay and self.cancel.wait(self.params.delay):
            return
        if self.params.kind.startswith("dest_") and (self.fired.missed or self._switched()):
            self.fired.missed = True
            self.fired.detail = "the switchover came before the moment: the destination was left alone"
            return
        if self.params.kind == "hung_stun":
            self.fired.fired = True
            self.fired.detail = f"agent held the mirror-install stun {self.params.hang} s (SVMOTION_INJECT)"
            return
        self.fired.at_s = round(time.monotonic() - self.t0, 3)
        self.fired.wall = time.time()
        {"agent_kill": self._kill_agent, "nbdkit_kill": self._kill_nbdkit,
         "dest_eio": self._fail_writes, "dest_full": self._fill}[self.params.kind]()
        self.fired.fired = True

    # ---- the moment -----------------------------------------------------------------------------

    def _wait_moment(self) -> bool | None:
        """True when the moment came, False when the migration ended first; None: cancelled."""
        moment = self.params.moment
        deadline = time.monotonic() + MOMENT_TIMEOUT_S
        seen_running = False
        while time.monotonic() < deadline:
            if self.cancel.is_set():
                return None
            state = self.vm.status()
            running, last = state["migration"], state["last"]
            if running:
                seen_running = True
                self.fired.phase_seen = running["phase"]
                if running["phase"] == moment:
                    self.fired.at_s = round(time.monotonic() - self.t0, 3)
                    return True
                if moment in ("switched", "finished") and running["phase"] in ("CopyDirtyData", "DiskCopyDone",
                                                                              "Complete", "Cleanup"):
                    return self._wait_plugin(moment, deadline)
            elif seen_running or last is not None:
                self.fired.missed = True
                self.fired.phase_seen = f"ended ({last['state'] if last else '?'})"
                return False
            time.sleep(POLL_S)
        raise TimeoutError(f"moment {moment} not reached in {MOMENT_TIMEOUT_S:.0f} s")

    def _wait_plugin(self, moment: str, deadline: float) -> bool | None:
        """Poll the mirror node itself for `switched` / `finished`; past it, fire anyway (missed)."""
        polls = 0
        while time.monotonic() < deadline:
            if self.cancel.is_set():
                return None
            disks = self.vm.plugin("status")["disks"]
            if moment == "switched" and any(d["state"] == "switched" for d in disks.values()):
                break
            on_finals = all(d["state"] == "passthrough" and d["path"] == self.finals.get(n)
                            for n, d in disks.items())
            if moment == "finished" and on_finals:
                break
            polls += 1
            if polls % 20 == 0 and not self.vm.status()["migration"]:
                self.fired.missed = True      # the instant passed between two polls
                break
            time.sleep(PLUGIN_POLL_S)
        self.fired.phase_seen = f"{moment} (mirror node)"
        self.fired.at_s = round(time.monotonic() - self.t0, 3)
        return True

    def _switched(self) -> bool:
        """The mirror node serves a destination already (a destination fault would be too late)."""
        disks = self.vm.plugin("status")["disks"].values()
        return any(d["state"] == "switched" or (d["state"] == "passthrough" and d["path"] in self.finals.values())
                   for d in disks)

    # ---- the faults -----------------------------------------------------------------------------

    def _kill_agent(self) -> None:
        self.vm.kill_agent()
        start = time.monotonic()
        self.vm.start(None, wait_nbdkit=True)
        self.fired.recovered_s = round(time.monotonic() - start, 3)
        self.fired.detail = "agent SIGKILLed, then started again without SVMOTION_INJECT"

    def _kill_nbdkit(self) -> None:
        pid, start = self._nbdkit()
        if process_start_time(pid) != start:
            raise RuntimeError(f"nbdkit pid {pid} is not the recorded process any more")
        os.kill(pid, signal.SIGKILL)
        self.fired.killed_pid = pid
        t = time.monotonic()
        back = wait_until(lambda: self._nbdkit_back(pid), RESTART_TIMEOUT_S, 0.05)
        self.fired.recovered_s = round(time.monotonic() - t, 3) if back else None
        self.fired.detail = f"nbdkit pid {pid} SIGKILLed; " + (
            "the agent restarted it" if back else f"NOT restarted within {RESTART_TIMEOUT_S:.0f} s")

    def _nbdkit(self) -> tuple[int, int]:
        rec = json.loads(self.vm.pid_file.read_text())
        return int(rec["pid"]), int(rec["start_time"])

    def _nbdkit_back(self, old: int) -> bool:
        try:
            pid, start = self._nbdkit()
        except (OSError, ValueError, KeyError):
            return False
        if pid == old or process_start_time(pid) != start:
            return False
        try:
            return self.vm.plugin("hello")["pid"] == pid
        except (OSError, ValueError):
            return False

    def _fail_writes(self) -> None:
        self.dest.fail_writes()
        self.fired.detail = f"destination device fails {self.params.eio_rate}% of writes from now on (EIO)"

    def _fill(self) -> None:
        size = self.dest.fill(self.params.full_slack)
        self.fired.detail = f"destination filled ({size >> 10} KiB filler, {self.params.full_slack >> 10} KiB left)"


def record(params: FaultParams, fired: Fired) -> dict[str, Any]:
    return {**asdict(params), **asdict(fired)}
