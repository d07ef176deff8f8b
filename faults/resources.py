"""What a trial makes and must unmake: processes (by PID), mounts, attached devices, directories.

Design notes
- One `Resources` per trial, a stack: everything is registered as it is made and undone in
  reverse order, whatever way the trial ends (an invariant failing, the harness crashing, the
  operator's Ctrl-C or SIGTERM: `__main__` turns SIGTERM into KeyboardInterrupt so that the same
  `finally` runs). An undo that fails does not stop the others; its error is kept and reported
  with the trial (a leak is a harness defect to see, not to hide).
- Processes the harness starts itself (fio, the failing destination's nbdkit) get
  PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed harness leaves none of them behind, and are
  stopped by the PID Popen gave us, never by name (others run fio and nbdkit on this machine).
  The agent and its nbdkit are tests/agentproc.py's (stopped by PID, start time checked).
- `leftovers()` asks the kernel afterwards: processes still alive, mounts and loop devices under
  the trial's directory. The results record them.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from agent import attach as attach_mod

log = logging.getLogger("faults")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the harness dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Resources:
    """A stack of undo callbacks plus the PIDs and paths to check afterwards.

    Example: `res.spawn(["fio", ...], log=path)`; `res.defer("umount", umount, where)`; `res.close()`.
    """

    def __init__(self, root: Path):
        self.root = root
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self.pids: list[int] = []
        self.errors: list[str] = []

    def defer(self, what: str, fn: Callable[..., object], *args: object) -> None:
        self._undo.append((what, lambda: fn(*args)))

    def spawn(self, argv: list[str], *, stdout: object = subprocess.DEVNULL, stderr: object = subprocess.STDOUT,
              cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process that dies with the harness; it is killed (by PID) when the trial ends."""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
                                env=env, preexec_fn=die_with_parent)
        self.pids.append(proc.pid)
        self.defer(f"stop {Path(argv[0]).name} pid {proc.pid}", stop_process, proc)
        return proc

    def close(self) -> None:
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except BaseException as err:  # noqa: BLE001  (a failed undo must not skip the rest)
                self.errors.append(f"{what}: {type(err).__name__}: {err}")
                log.warning("cleanup %s failed: %s", what, err)

    def leftovers(self, extra_pids: list[int] = ()) -> list[str]:
        """What the kernel still holds of this trial (empty: all clean)."""
        left = [f"pid {pid} alive" for pid in [*self.pids, *extra_pids] if attach_mod.pid_alive(pid)]
        root = str(self.root)
        left += [f"loop {dev} on {backing}" for dev, backing in attach_mod.loop_backing_files().items()
                 if backing.startswith(root)]
        with open("/proc/self/mountinfo") as f:
            left += [f"mount {line.split()[4]}" for line in f if line.split()[4].startswith(root)]
        return left


def stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; by the PID we started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def mount_tmpfs(res: Resources, where: Path, size: int) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True, capture_output=True)
    res.defer(f"umount {where}", umount, where)
    return where


def umount(where: Path) -> None:
    if not attach_mod.is_mounted(str(where)):
        return
    done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        # Busy (a process we could not stop still holds a file): detach it lazily, and say so.
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        raise RuntimeError(f"umount {where}: {done.stderr.strip()} (unmounted lazily)")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def tail(path: Path, limit: int = 3000) -> str:
    """The last `limit` characters of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
