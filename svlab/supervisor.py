"""The namespace lab's stand-in for systemd: runs the lab's units inside their hosts.

`python -m svlab.supervisor PLAN.json` (started detached by nslab.up, stopped by SIGTERM from
nslab.down). PLAN.json lists, in start order, {"host": ROLE, "unit": FILE, "netns": NAME, "log": FILE}: each
unit's ExecStart= (units.py) runs as `ip netns exec NAME ...` (execs in place: the PID is the
command's), its output appended to its log, with systemd's environment for a system unit
(UNIT_ENV and the unit's Environment=, nothing of the caller's). A unit that exits with a failure and says
Restart=on-failure is started again after RestartSec=; one that exits cleanly stays down.
The state file beside the plan (supervisor-state.json, rewritten at every change) names each
unit ("ROLE/UNIT") with its PID and start time, so `svmotion lab status` and the tests find processes by PID.
On SIGTERM: units are stopped newest first (SIGTERM, SIGKILL after TimeoutStopSec=), then this
process exits. Nothing is ever stopped by name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.supervisor import process_start_time
from svlab.units import Unit, read_unit

POLL_S = 0.2
# What systemd gives a system unit, before its Environment=: not the caller's environment (a
# PYTHONDONTWRITEBYTECODE of the caller once hid a provisioning that was not idempotent).
UNIT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass
class Running:
    host: str
    unit: Unit
    netns: str
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    last_exit: int | None = None
    restart_at: float | None = None    # when to start it again after a failed exit
    exited: bool = False                # its exit has been handled

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *self.unit.exec_start],
                                         env={**UNIT_ENV, **self.unit.environment},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.restart_at = None
        self.exited = False

    def check(self) -> bool:
        """Handle an exit or a due restart; True if something changed."""
        assert self.proc is not None
        if self.restart_at is not None:
            if time.monotonic() < self.restart_at:
                return False
            self.restarts += 1
            self.start()
            return True
        code = self.proc.poll()
        if code is None or self.exited:
            return False
        self.exited, self.last_exit = True, code
        print(f"svlab supervisor: {self.unit.name} in {self.netns} exited with {code}", flush=True)
        if code != 0 and self.unit.restart:
            self.restart_at = time.monotonic() + self.unit.restart_sec
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.unit.timeout_stop_sec)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def record(self) -> dict:
        alive = self.proc is not None and self.proc.poll() is None
        pid = self.proc.pid if alive and self.proc else None
        return {"netns": self.netns, "pid": pid, "start_time": process_start_time(pid) if pid else None,
                "restarts": self.restarts, "last_exit": self.last_exit, "log": str(self.log)}


def state_file(plan: Path) -> Path:
    return plan.with_name("supervisor-state.json")


def write_state(plan: Path, units: list[Running]) -> None:
    tmp = state_file(plan).with_suffix(".tmp")
    tmp.write_text(json.dumps({f"{r.host}/{r.unit.name}": r.record() for r in units}, indent=1) + "\n")
    os.replace(tmp, state_file(plan))


def supervise(plan: Path) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    units = [Running(e["host"], read_unit(Path(e["unit"])), e["netns"], Path(e["log"]))
             for e in json.loads(plan.read_text())]
    for running in units:
        running.start()
    write_state(plan, units)
    while not stop.wait(POLL_S):
        if any([running.check() for running in units]):
            write_state(plan, units)
    for running in reversed(units):
        running.stop()
    write_state(plan, units)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m svlab.supervisor PLAN.json", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(supervise(Path(sys.argv[1])))
