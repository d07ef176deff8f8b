"""The VM: its disks, its stun gate, and the control operations the agent drives.

Design notes
- One VM per nbdkit process; one stun covers every disk of the VM (the seed stuns the VM).
- A stun is a lease, not a lock (invariant 4). `stun` starts a timer; if `unstun` has not come
  when it fires, or the control connection that holds the stun closes, the VM undoes whatever the
  stun began (in reverse order) and opens the gate itself. Each step done under a stun that can
  be undone registers its undo; a switchover commits (clears the undo list) once every disk has
  switched, since from then on the destination is the disk.
- This lock (`_control`) serializes control operations and lease expiry against each other. It
  is never taken on the data path: the gate alone keeps guest IO away from state changes.
  The lease can be overrun only by a control step already running when it fires; the steps
  proportional to data (the switchover's last copy) carry the lease deadline and give up at it.
- Stun strategies, from the seed: optimized = stun, install the mirror on the open disks,
  unstun. legacy = stun, close every disk (flush + close), reopen each with the mirror
  installed during open, unstun. The agent picks by calling `close_disks` or not.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .backend import FileBackend, write_back_in_slices
from .control import Connection, RequestError
from .copier import DeadlineExceeded, PassProgress, copy_pass
from .disk import CLOSED, MIRRORING, PASSTHROUGH, SWITCHED, Disk
from .gate import DrainTimeout, StunGate
from .mirror import MODES
from .priority import run_in_background

PROTOCOL_VERSION = 1
STUN_KINDS = ("mirror_install", "switchover", "abort", "other")


@dataclass
class StunRecord:
    id: str
    kind: str
    started: float
    lease: float
    drain_seconds: float = 0.0
    duration_seconds: float = 0.0
    held_requests: int = 0
    max_wait_seconds: float = 0.0
    outcome: str = "held"


@dataclass
class Stun:
    record: StunRecord
    owner: Connection | None
    begun: float
    timer: threading.Timer | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)


class VM:
    """The disks of one VM and the operations on them."""

    def __init__(self, name: str, disks: list[tuple[str, str]], lease: float = 2.0):
        self.name = name
        self.lease = lease
        self.disks: dict[str, Disk] = {}
        for disk_name, path in disks:
            self.disks[disk_name] = Disk(disk_name, path)
        self.gate = StunGate()
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="mirror")
        self._control = threading.Lock()
        self._stun: Stun | None = None
        self._stun_ids = itertools.count(1)
        self.stuns: deque[StunRecord] = deque(maxlen=64)

    # --- the control protocol: one method per op ----------------------------------------------

    def op_hello(self, req: dict, conn: Connection) -> dict:
        return {"vm": self.name, "pid": os.getpid(), "version": PROTOCOL_VERSION, "lease": self.lease,
                "disks": [{"name": d.name, "path": d.path, "size": d.size} for d in self.disks.values()]}

    def op_status(self, req: dict, conn: Connection) -> dict:
        stun = self._stun
        return {"vm": self.name,
                "stun": None if stun is None else {"id": stun.record.id, "kind": stun.record.kind,
                                                   "age_seconds": time.monotonic() - stun.begun},
                "disks": {d.name: d.status() for d in self.disks.values()},
                "stuns": [asdict(r) for r in self.stuns]}

    def op_stun(self, req: dict, conn: Connection) -> dict:
        lease = _number(req, "lease", self.lease, low=0.01, high=60.0)
        kind = req.get("kind", "other")
        if kind not in STUN_KINDS:
            raise RequestError(f"stun: unknown kind {kind!r}; use one of {', '.join(STUN_KINDS)}")
        with self._control:
            if self._stun is not None:
                raise RequestError(f"stun: VM {self.name} is already stunned ({self._stun.record.id})")
            record = self._begin_stun(kind, lease, conn).record
            return {"stun_id": record.id, "drain_seconds": record.drain_seconds}

    def op_close_disks(self, req: dict, conn: Connection) -> dict:
        with self._control:
            stun = self._held_stun(req)
            for disk in self.disks.values():
                if disk.copying():
                    raise RequestError(f"close_disks: disk {disk.name} is copying; cancel the copy first")
            for disk in self.disks.values():
                disk.close_files()
                stun.undo.append(disk.reopen_source)
            return {}

    def op_install_mirror(self, req: dict, conn: Connection) -> dict:
        specs = req.get("disks")
        if not isinstance(specs, dict) or not specs:
            raise RequestError("install_mirror: \"disks\" must map disk names to {dest, mode, granularity}")
        plan = [self._mirror_plan(name, spec) for name, spec in specs.items()]
        with self._control:
            stun = self._held_stun(req)
            for disk, dest, mode, granularity in plan:
                if disk.state not in (PASSTHROUGH, CLOSED) or disk.mirror is not None:
                    raise RequestError(f"install_mirror: disk {disk.name} is {disk.state}, not passthrough")
            installed: list[tuple[Disk, bool]] = []
            for disk, dest, mode, granularity in plan:
                was_closed = disk.state == CLOSED
                try:
                    disk.install_mirror(dest, mode, granularity, self.pool)
                except (OSError, ValueError) as err:
                    # All or nothing: a refused request leaves every disk as it found it,
                    # closed ones (legacy) closed again.
                    for done, closed_before in reversed(installed):
                        done.drop_mirror()
                        if closed_before:
                            done.close_files()
                        stun.undo.remove(done.drop_mirror)
                    raise RequestError(f"install_mirror: disk {disk.name}: {_reason(err)}") from None
                installed.append((disk, was_closed))
                stun.undo.append(disk.drop_mirror)
            return {}

    def op_unstun(self, req: dict, conn: Connection) -> dict:
        with self._control:
            stun = self._held_stun(req)
            return {"stun": asdict(self._end_stun(stun, "released"))}

    def op_copy(self, req: dict, conn: Connection) -> dict:
        kind = req.get("kind", "bulk")
        if kind not in ("bulk", "dirty"):
            raise RequestError(f"copy: kind {kind!r} is not bulk or dirty")
        rate = int(_number(req, "rate", 0, low=0, high=1 << 50))
        disks = self._selected(req, "copy")
        with self._control:
            if self._stun is not None:
                raise RequestError("copy: the VM is stunned; copy after unstun")
            for disk in disks:
                if disk.state != MIRRORING:
                    raise RequestError(f"copy: disk {disk.name} is {disk.state}, not mirroring")
                if disk.copying():
                    raise RequestError(f"copy: disk {disk.name} is already copying")
            per_disk = rate // len(disks) if rate else 0
            for disk in disks:
                disk.start_copy(kind, per_disk)
            return {}

    def op_copy_cancel(self, req: dict, conn: Connection) -> dict:
        for disk in self._selected(req, "copy_cancel"):
            disk.stop_copy()
        return {}

    def op_flush_dest(self, req: dict, conn: Connection) -> dict:
        start = time.monotonic()
        for disk in self.disks.values():
            mirror = disk.mirror
            if mirror is None:
                continue
            try:
                run_in_background(lambda: _write_back(mirror.dest), f"flush-dest-{disk.name}")
            except OSError as err:
                disk.stats.error("dest", "flush")
                raise RequestError(f"flush_dest: disk {disk.name}: {err.strerror}") from None
        return {"seconds": time.monotonic() - start}

    def op_switchover(self, req: dict, conn: Connection) -> dict:
        reopen = bool(req.get("reopen", False))
        with self._control:
            stun = self._held_stun(req)
            start = time.monotonic()
            deadline = stun.begun + stun.record.lease - 0.05
            mirroring = [d for d in self.disks.values() if d.state == MIRRORING]
            if not mirroring:
                raise RequestError("switchover: no disk is mirroring")
            for disk in mirroring:
                if disk.copying():
                    raise RequestError(f"switchover: disk {disk.name} is still copying; wait for the pass")
                if disk.mirror.failed:
                    raise RequestError(f"switchover: disk {disk.name}: {disk.mirror.failed}")
            final = sum(self._final_copy(disk, deadline) for disk in mirroring)
            for disk in mirroring:
                disk.switch(reopen)
            stun.undo.clear()
            return {"final_bytes": final, "seconds": time.monotonic() - start}

    def op_abort(self, req: dict, conn: Connection) -> dict:
        """Back to the intact source on every disk, under the caller's stun or one of our own."""
        with self._control:
            for disk in self.disks.values():
                disk.stop_copy()
            own = self._stun is None
            stun = self._begin_stun("abort", self.lease, conn) if own else self._held_stun(req)
            for disk in self.disks.values():
                if disk.state != SWITCHED:
                    disk.drop_mirror()
            stun.undo.clear()
            if own:
                self._end_stun(stun, "released")
            return {}

    def op_finish(self, req: dict, conn: Connection) -> dict:
        # `paths` (optional, {disk: path}): the agent renamed the destination files after the
        # switchover (DEST/x.raw.svmotion-partial -> DEST/x.raw); a legacy reopen must use the new name.
        paths = req.get("paths") or {}
        if not isinstance(paths, dict) or not all(isinstance(v, str) for v in paths.values()):
            raise RequestError("finish: paths must map disk names to paths")
        with self._control:
            for name, path in paths.items():
                disk = self.disks.get(name)
                if disk is None:
                    raise RequestError(f"finish: unknown disk {name!r}; this VM has {', '.join(self.disks)}")
                if disk.primary is None or not _same_file(disk.primary.fd, path):
                    raise RequestError(f"finish: disk {name}: {path} is not the file the disk has open")
            for disk in self.disks.values():
                if disk.state == SWITCHED:
                    disk.finish()
                if disk.name in paths:
                    disk.path = paths[disk.name]
            return {"disks": [{"name": d.name, "path": d.path} for d in self.disks.values()]}

    # --- stun lifecycle -------------------------------------------------------------------------

    def _begin_stun(self, kind: str, lease: float, owner: Connection | None) -> Stun:
        """Close the gate and start the lease; the caller holds _control."""
        begun = time.monotonic()
        record = StunRecord(id=f"{self.name}-stun-{next(self._stun_ids)}", kind=kind,
                            started=time.time(), lease=lease)
        try:
            record.drain_seconds = self.gate.close(timeout=lease)
        except DrainTimeout as err:
            raise RequestError(f"stun: {err}") from None
        stun = Stun(record, owner, begun)
        stun.timer = threading.Timer(lease, self._expire, args=(record.id,))
        stun.timer.daemon = True
        self._stun = stun
        stun.timer.start()
        return stun

    def _end_stun(self, stun: Stun, outcome: str) -> StunRecord:
        """Open the gate and record what the guest felt; the caller holds _control."""
        if stun.timer is not None:
            stun.timer.cancel()
        record = stun.record
        try:
            # open() releases the guest before it checks the gate's invariant: if that check
            # ever failed, the guest goes on and the stun still ends here.
            release = self.gate.open()
        finally:
            record.duration_seconds = time.monotonic() - stun.begun
            record.outcome = outcome
            self._stun = None
            self.stuns.append(record)
        record.held_requests = release.held_requests
        record.max_wait_seconds = release.max_wait_seconds
        return record

    def _expire(self, stun_id: str) -> None:
        """The lease ran out (or its holder vanished): undo what the stun began, release the guest."""
        with self._control:
            stun = self._stun
            if stun is None or stun.record.id != stun_id:
                return
            try:
                for undo in reversed(stun.undo):
                    undo()
            finally:
                # Even if an undo fails (a source file gone), the guest must not stay held.
                self._end_stun(stun, "expired")

    def connection_closed(self, conn: Connection) -> None:
        stun = self._stun
        if stun is not None and stun.owner is conn:
            self._expire(stun.record.id)

    def _held_stun(self, req: dict) -> Stun:
        """The stun named by the request, which must be the one held; the caller holds _control."""
        stun_id = req.get("stun_id")
        stun = self._stun
        if stun is None:
            raise RequestError(f"{req['op']}: needs a held stun; call stun first")
        if stun_id != stun.record.id:
            raise RequestError(f"{req['op']}: stun_id {stun_id!r} is not the held stun {stun.record.id!r}")
        # Must hold: a stun is only ever held with the gate closed and drained.
        assert self.gate.closed
        return stun

    # --- helpers ---------------------------------------------------------------------------------

    def _mirror_plan(self, name: str, spec: Any) -> tuple[Disk, str, str, int]:
        disk = self.disks.get(name)
        if disk is None:
            raise RequestError(f"install_mirror: unknown disk {name!r}; this VM has {', '.join(self.disks)}")
        if not isinstance(spec, dict) or not isinstance(spec.get("dest"), str):
            raise RequestError(f"install_mirror: disk {name}: needs {{\"dest\": PATH}}")
        mode = spec.get("mode", "sync")
        if mode not in MODES:
            raise RequestError(f"install_mirror: disk {name}: mode {mode!r} is not sync or dirty")
        granularity = spec.get("granularity", 65536)
        if not isinstance(granularity, int) or granularity < 4096 or granularity & (granularity - 1):
            raise RequestError(f"install_mirror: disk {name}: granularity {granularity!r} must be a power "
                               "of two of at least 4096")
        if os.path.realpath(spec["dest"]) == os.path.realpath(disk.path):
            raise RequestError(f"install_mirror: disk {name}: the destination is the source itself")
        return disk, spec["dest"], mode, granularity

    def _selected(self, req: dict, op: str) -> list[Disk]:
        name = req.get("disk")
        if name is None:
            chosen = [d for d in self.disks.values() if d.state == MIRRORING]
            if not chosen and op == "copy":
                raise RequestError("copy: no disk is mirroring")
            return chosen
        if name not in self.disks:
            raise RequestError(f"{op}: unknown disk {name!r}; this VM has {', '.join(self.disks)}")
        return [self.disks[name]]

    def _final_copy(self, disk: Disk, deadline: float) -> int:
        """Copy a disk's last dirty chunks under the switchover stun; flush the destination if written."""
        progress = PassProgress("dirty", disk.mirror.map.dirty_bytes())
        try:
            copy_pass(disk.primary, disk.mirror, disk.stats, progress, lambda: False, deadline=deadline)
        except DeadlineExceeded as err:
            raise RequestError(f"switchover: disk {disk.name}: {err}; the lease would run out — "
                               "copy more dirty passes first") from None
        if progress.error:
            raise RequestError(f"switchover: disk {disk.name}: {progress.error}")
        if progress.done_bytes:
            try:
                disk.mirror.dest.flush()
            except OSError as err:
                raise RequestError(f"switchover: disk {disk.name}: flush: {err.strerror}") from None
        return progress.done_bytes

    def handle(self, req: dict, conn: Connection) -> dict:
        """Dispatch one control request to its op_ method."""
        method = getattr(self, f"op_{req['op']}", None)
        if method is None:
            raise RequestError(f"unknown op {req['op']!r}; known: {', '.join(OPS)}")
        return method(req, conn)

    def close(self) -> None:
        for disk in self.disks.values():
            disk.close()
        self.pool.shutdown(wait=False)


OPS = [name[3:] for name in dir(VM) if name.startswith("op_")]


def _number(req: dict, key: str, default: float, low: float, high: float) -> float:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{req['op']}: {key} {value!r} must be a number from {low} to {high}")
    return value


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or ''} {err.strerror}".strip()
    return str(err)


def _write_back(dest: FileBackend) -> None:
    """Make everything written to a destination durable, slice by slice (see write_back_in_slices)."""
    write_back_in_slices(dest.fd, dest.size)
    dest.flush()
