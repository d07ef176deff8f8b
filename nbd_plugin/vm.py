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
  A `digest` request holds the lock for its read too (bounded: MAX_DIGEST_BYTES; the agent asks
  for a few MiB at a time), so that no stun step closes or replaces a file it is reading.
- Every op declares its arguments (`@takes`, control.py); `handle` checks them before the op
  runs, so a refused request never reaches the state below.
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

from .backend import is_nbd_uri, location_problem
from .backend_nbd import NbdOptions
from .control import (Arg, Connection, RequestError, arguments, declared, file_path, one_of, power_of_two,
                      shown, takes, within)
from .copier import COPY_KINDS, DeadlineExceeded, PassProgress, copy_pass
from .dirtymap import MAX_GRANULARITY, MIN_GRANULARITY
from .disk import CLOSED, MIRRORING, PASSTHROUGH, SWITCHED, Disk
from .gate import DrainTimeout, StunGate
from .mirror import MAX_THROTTLE_SECONDS, MODES
from .sender import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS
from .priority import run_in_background
from .served import write_record

PROTOCOL_VERSION = 1
MAX_DIGEST_BYTES = 64 << 20      # one digest request reads at most this much, under the control lock
MAX_DIGEST_CHUNKS = 1 << 16
STUN_KINDS = ("mirror_install", "switchover", "abort", "other")
STUN_ID = Arg(str)


def disk_location(value: str) -> str | None:
    """Check: a file path or an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)."""
    return file_path(value) or location_problem(value)


MIRROR_SPEC = {"dest": Arg(str, check=disk_location), "mode": Arg(str, "sync", one_of(*MODES)),
               "granularity": Arg(int, 65536, power_of_two(MIN_GRANULARITY, MAX_GRANULARITY)),
               "async_bytes": Arg(int, DEFAULT_MAX_BYTES, within(0, 1 << 34)),
               "async_requests": Arg(int, DEFAULT_MAX_REQUESTS, within(0, 1 << 20))}


def _some_disks(specs: dict) -> str | None:
    return None if specs else "must map disk names to {dest, mode, granularity}"


def _disk_paths(paths: dict) -> str | None:
    if all(isinstance(p, str) and disk_location(p) is None for p in paths.values()):
        return None
    return "must map disk names to file paths or NBD URIs"


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

    def __init__(self, name: str, disks: list[tuple[str, str]], lease: float = 2.0,
                 state_file: str | None = None, remote: NbdOptions | None = None):
        self.name = name
        self.lease = lease
        self.state_file = state_file   # the served-disks record (served.py); None: not kept
        self.disks: dict[str, Disk] = {}
        for disk_name, path in disks:
            self.disks[disk_name] = Disk(disk_name, path, remote)
        self.gate = StunGate()
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="mirror")
        self._control = threading.Lock()
        self._stun: Stun | None = None
        self._stun_ids = itertools.count(1)
        self.stuns: deque[StunRecord] = deque(maxlen=64)
        self._record_served({d.name: d.path for d in self.disks.values()})

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

    @takes(lease=Arg(float, None, within(0.01, 60.0)), kind=Arg(str, "other", one_of(*STUN_KINDS)))
    def op_stun(self, req: dict, conn: Connection) -> dict:
        lease = self.lease if req["lease"] is None else float(req["lease"])
        kind = req["kind"]
        with self._control:
            if self._stun is not None:
                raise RequestError(f"stun: VM {self.name} is already stunned ({self._stun.record.id})")
            record = self._begin_stun(kind, lease, conn).record
            return {"stun_id": record.id, "drain_seconds": record.drain_seconds}

    @takes(stun_id=STUN_ID)
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

    @takes(disks=Arg(dict, check=_some_disks))
    def op_prepare_mirror(self, req: dict, conn: Connection) -> dict:
        """Open the destinations of a coming install_mirror now, outside any stun (disk.py)."""
        plan = [self._mirror_plan(name, spec, "prepare_mirror") for name, spec in req["disks"].items()]
        with self._control:
            for disk, dest, _ in plan:
                if disk.state != PASSTHROUGH or disk.mirror is not None:
                    raise RequestError(f"prepare_mirror: disk {disk.name} is {disk.state}, not passthrough")
            for disk, dest, _ in plan:
                try:
                    disk.prepare_mirror(dest)
                except (OSError, ValueError) as err:
                    for done, _, _ in plan:
                        done.discard_prepared()
                    raise RequestError(f"prepare_mirror: disk {disk.name}: {_reason(err)}") from None
            return {}

    @takes(stun_id=STUN_ID, disks=Arg(dict, check=_some_disks))
    def op_install_mirror(self, req: dict, conn: Connection) -> dict:
        plan = [self._mirror_plan(name, spec) for name, spec in req["disks"].items()]
        with self._control:
            stun = self._held_stun(req)
            for disk, dest, _ in plan:
                if disk.state not in (PASSTHROUGH, CLOSED) or disk.mirror is not None:
                    raise RequestError(f"install_mirror: disk {disk.name} is {disk.state}, not passthrough")
            installed: list[tuple[Disk, bool]] = []
            for disk, dest, spec in plan:
                was_closed = disk.state == CLOSED
                try:
                    disk.install_mirror(dest, spec["mode"], spec["granularity"], self.pool,
                                        async_bytes=spec["async_bytes"], async_requests=spec["async_requests"])
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

    @takes(stun_id=STUN_ID)
    def op_unstun(self, req: dict, conn: Connection) -> dict:
        with self._control:
            stun = self._held_stun(req)
            return {"stun": asdict(self._end_stun(stun, "released"))}

    @takes(kind=Arg(str, "bulk", one_of(*COPY_KINDS)), rate=Arg(int, 0, within(0, 1 << 50)),
           disk=Arg(str, None))
    def op_copy(self, req: dict, conn: Connection) -> dict:
        kind, rate = req["kind"], req["rate"]
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

    @takes(disk=Arg(str, None), mode=Arg(str, None, one_of(*MODES)),
           throttle=Arg(float, None, within(0.0, MAX_THROTTLE_SECONDS)), rate=Arg(int, None, within(0, 1 << 50)))
    def op_mirror_set(self, req: dict, conn: Connection) -> dict:
        """Change a running mirror: its mode, the guest's throttle, the copier's rate; no stun
        (mirror.py notes). `rate` is for the selected disks together, as in `copy`."""
        disks = self._selected(req, "mirror_set")
        with self._control:
            for disk in disks:
                if disk.state != MIRRORING or disk.mirror is None:
                    raise RequestError(f"mirror_set: disk {disk.name} is {disk.state}, not mirroring")
            if not disks:
                raise RequestError("mirror_set: no disk is mirroring")
            for disk in disks:
                if req["mode"] is not None:
                    disk.mirror.set_mode(req["mode"])
                if req["throttle"] is not None:
                    disk.mirror.set_throttle(req["throttle"])
                if req["rate"] is not None:
                    disk.set_copy_rate(req["rate"] // len(disks) if req["rate"] else 0)
            return {"disks": {d.name: {"mode": d.mirror.mode, "throttle_seconds": d.mirror.throttle}
                              for d in disks}}

    @takes(disk=Arg(str, None))
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
            mirror.drain_sends()   # what the guest wrote lately reaches the destination, then its disk
            try:
                run_in_background(mirror.dest.write_back_all, f"flush-dest-{disk.name}")
            except OSError as err:
                disk.stats.error("dest", "flush")
                raise RequestError(f"flush_dest: disk {disk.name}: {err.strerror}") from None
        return {"seconds": time.monotonic() - start}

    @takes(disk=Arg(str), granularity=Arg(int, 65536, power_of_two(1, MAX_DIGEST_BYTES)),
           offset=Arg(int, 0, within(0, 1 << 62)), count=Arg(int, None, within(0, MAX_DIGEST_BYTES)))
    def op_digest(self, req: dict, conn: Connection) -> dict:
        """Per-chunk digests of a range of a disk as served, and its chunks rewritten since switchover."""
        disk = self._disk_named(req)
        granularity, offset = req["granularity"], req["offset"]
        count = min(disk.size - offset, MAX_DIGEST_BYTES) if req["count"] is None else req["count"]
        if offset > disk.size or offset % granularity or offset + count > disk.size:
            raise RequestError(f"digest: range {offset}+{count} must start at a multiple of the "
                               f"granularity {granularity} and end by the disk's size {disk.size}")
        if count > granularity * MAX_DIGEST_CHUNKS:
            raise RequestError(f"digest: {count} bytes are more than {MAX_DIGEST_CHUNKS} chunks of "
                               f"{granularity}; ask for less or a larger granularity")
        with self._control:   # no stun step may close or replace the disk's files meanwhile
            try:
                blob, skipped, tracked = run_in_background(
                    lambda: disk.digests(offset, count, granularity), f"digest-{disk.name}")
            except OSError as err:
                raise RequestError(f"digest: disk {disk.name}: {_reason(err)}") from None
        return {"digests": blob.hex(), "skipped": skipped, "tracked": tracked}

    @takes(stun_id=STUN_ID, reopen=Arg(bool, False))
    def op_switchover(self, req: dict, conn: Connection) -> dict:
        reopen = req["reopen"]
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
            # Durable before served (served.py): the sides are equal now and no request runs.
            served = {d.name: d.mirror.dest.path if d in mirroring else d.path for d in self.disks.values()}
            try:
                self._record_served(served)
            except OSError as err:
                raise RequestError(f"switchover: cannot record the destination paths in "
                                   f"{self.state_file}: {err.strerror}") from None
            for disk in mirroring:
                disk.switch(reopen)
            stun.undo.clear()
            return {"final_bytes": final, "seconds": time.monotonic() - start}

    @takes(stun_id=Arg(str, None))
    def op_abort(self, req: dict, conn: Connection) -> dict:
        """Back to the intact source on every disk, under the caller's stun or one of our own."""
        with self._control:
            own = self._stun is None
            # The stun first: an abort refused for a wrong stun_id must not have cancelled the copies.
            stun = self._begin_stun("abort", self.lease, conn) if own else self._held_stun(req)
            for disk in self.disks.values():
                disk.stop_copy()
            for disk in self.disks.values():
                if disk.state != SWITCHED:
                    disk.drop_mirror()
            stun.undo.clear()
            if own:
                self._end_stun(stun, "released")
            return {}

    @takes(paths=Arg(dict, {}, _disk_paths))
    def op_finish(self, req: dict, conn: Connection) -> dict:
        # `paths` (optional, {disk: path or URI}): the agent renamed the destination files after
        # the switchover (DEST/x.raw.svmotion-partial -> DEST/x.raw, here or on the remote host);
        # a legacy reopen, and a new connection to a remote disk, must use the new name.
        paths = req["paths"]
        with self._control:
            for name, path in paths.items():
                disk = self.disks.get(name)
                if disk is None:
                    raise RequestError(f"finish: unknown disk {shown(name)}; this VM has {', '.join(self.disks)}")
                problem = "is not open" if disk.primary is None else disk.primary.check_renamed(path)
                if problem is not None:
                    raise RequestError(f"finish: disk {name}: {shown(path)} {problem}")
            for disk in self.disks.values():
                if disk.state == SWITCHED:
                    disk.finish()
                if disk.name in paths:
                    disk.path = disk.primary.path = paths[disk.name]
            self._record_served({d.name: d.path for d in self.disks.values()})
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
            raise RequestError(f"{req['op']}: stun_id {shown(stun_id)} is not the held stun {stun.record.id!r}")
        # Must hold: a stun is only ever held with the gate closed and drained.
        assert self.gate.closed
        return stun

    # --- helpers ---------------------------------------------------------------------------------

    def _mirror_plan(self, name: str, spec: Any, op: str = "install_mirror") -> tuple[Disk, str, dict]:
        disk = self.disks.get(name)
        if disk is None:
            raise RequestError(f"{op}: unknown disk {shown(name)}; this VM has {', '.join(self.disks)}")
        where = f"{op}: disk {name}"
        if not isinstance(spec, dict):
            raise RequestError(f"{where}: bad spec {shown(spec)}: must be an object {{\"dest\": PATH, ...}}")
        spec = arguments(spec, MIRROR_SPEC, where, keep=())
        if _same_location(spec["dest"], disk.path):
            raise RequestError(f"{where}: the destination is the source itself")
        return disk, spec["dest"], spec

    def _disk_named(self, req: dict) -> Disk:
        name = req.get("disk")
        disk = self.disks.get(name) if isinstance(name, str) else None
        if disk is None:
            raise RequestError(f"{req['op']}: unknown disk {name!r}; this VM has {', '.join(self.disks)}")
        if disk.primary is None:
            raise RequestError(f"{req['op']}: disk {disk.name} is {disk.state}")
        return disk

    def _selected(self, req: dict, op: str) -> list[Disk]:
        name = req.get("disk")
        if name is None:
            chosen = [d for d in self.disks.values() if d.state == MIRRORING]
            if not chosen and op == "copy":
                raise RequestError("copy: no disk is mirroring")
            return chosen
        if name not in self.disks:
            raise RequestError(f"{op}: unknown disk {shown(name)}; this VM has {', '.join(self.disks)}")
        return [self.disks[name]]

    def _final_copy(self, disk: Disk, deadline: float) -> int:
        """Copy a disk's last dirty chunks under the switchover stun; flush the destination if written.

        Pending async sends land first (a chunk's copy must not be overtaken by an older send), and
        a mirror that ever sent is flushed: the guest's flushes did not flush what it sent."""
        if not disk.mirror.drain_sends(deadline):
            raise RequestError(f"switchover: disk {disk.name}: async sends to the destination still pending "
                               "at the deadline; copy more dirty passes first")
        progress = PassProgress("dirty", disk.mirror.map.dirty_bytes())
        try:
            copy_pass(disk.primary, disk.mirror, disk.stats, progress, lambda: False, deadline=deadline)
        except DeadlineExceeded as err:
            raise RequestError(f"switchover: disk {disk.name}: {err}; the lease would run out — "
                               "copy more dirty passes first") from None
        if progress.error:
            raise RequestError(f"switchover: disk {disk.name}: {progress.error}")
        if progress.done_bytes or disk.mirror.sender is not None:
            try:
                disk.mirror.dest.flush()
            except OSError as err:
                raise RequestError(f"switchover: disk {disk.name}: flush: {err.strerror}") from None
        return progress.done_bytes

    def _record_served(self, disks: dict[str, str]) -> None:
        if self.state_file is not None:
            write_record(self.state_file, self.name, disks)

    def handle(self, req: dict, conn: Connection) -> dict:
        """Check one control request's arguments (see control.takes) and dispatch it to its op_ method."""
        method = getattr(self, f"op_{req['op']}", None)
        if method is None:
            raise RequestError(f"unknown op {shown(req['op'])}; known: {', '.join(OPS)}")
        return method(arguments(req, declared(method), req["op"]), conn)

    def close(self) -> None:
        for disk in self.disks.values():
            disk.close()
        self.pool.shutdown(wait=False)


OPS = [name[3:] for name in dir(VM) if name.startswith("op_")]


def _same_location(a: str, b: str) -> bool:
    """Whether two disk locations name the same disk, as far as their text tells (URIs as given)."""
    if is_nbd_uri(a) or is_nbd_uri(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or ''} {err.strerror}".strip()
    return str(err)

