"""The destination directory of a migration: a directory of this host, or one in another host's datastore.

Design notes
- The phase engine (agent/phases.py) reaches the destination only through a DestDir, so one
  engine runs both kinds: `LocalDir` with this host's system calls, `DatastoreDir` with the
  destination agent's `ds_*` ops (agent/datastore.py) over mutual TLS (agent/remote.py).
- Paths are the destination host's absolute paths (`/srv/ds2/vm1/disk0.raw`); what the mirror
  node writes to is a disk's *target*: the partial's path here, or the NBD URI of the export the
  destination agent made for it (`ds_create`). An export keeps its name across the rename, so a
  remote target is also where the disk lives after the switchover.
- `PartialFacts` is what DiskSetup learns of a partial disk already at the destination, for
  partial.judge_reuse to decide on, wherever it is.
- Remote calls go over one connection, made again after any failure (a connection that timed
  out is unusable); each failure is one line naming the host: `RemoteUnreachable` (exit 4) or
  the remote agent's refusal with its exit code.
- Leftovers: partials a failed migration could not remove because the destination host did not
  answer are listed in state_dir/leftovers.json by host, and the next contact with that host
  (the next DatastoreDir opened on it) removes them first.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent import partial
from agent.config import TlsConfig
from agent.errors import Refused, SvmotionError
from agent.partial import Identity
from agent.plan import Destination, free_bytes, human_bytes, parse_destination, partial_name
from agent.remote import RemoteAgent, RemoteUnreachable, host_port, nbd_uri
from nbd_plugin.durable import replace_json

log = logging.getLogger("svmotion.destdir")

WRITE_PIECE = 512 << 10      # one ds_write_file piece (datastore.MAX_WRITE_BYTES)
# A `ds_*` op of a migration does little work on the far side; past this the host is as good as
# gone (a dead link drops nothing, so without a deadline a rollback would wait on TCP for minutes).
CALL_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PartialFacts:
    """A partial disk found at the destination by DiskSetup."""

    regular: bool
    size: int
    identity: Identity | None


@dataclass(frozen=True)
class FileFacts:
    """What the destination says of one of its files (DestDir.stat)."""

    regular: bool
    size: int
    allocated: int
    identity: bool               # an identity record beside it (agent/partial.py)


class FileWriter(Protocol):
    """One copy of a per-VM file or sidecar into its partial: written in order, then finished."""

    def write(self, data: bytes) -> None: ...

    def finish(self, length: int, mode: int) -> None: ...

    def abandon(self) -> None:
        """The copy failed midway: release what the writer holds (the partial stays, and is rolled back)."""


class DestDir(Protocol):
    """A migration's destination directory (module notes)."""

    path: str                    # the directory, absolute, on its host
    remote: bool

    def shown_path(self, path: str) -> str: ...

    def check(self, names: list[str], resumable: list[str], need_bytes: int) -> dict[str, PartialFacts]: ...

    def create_disk(self, partial_path: str, size: int, mode: int, identity: Identity) -> str: ...

    def reuse_disk(self, partial_path: str, size: int, identity: Identity) -> str: ...

    def target(self, partial_path: str) -> str: ...

    def file_writer(self, partial_path: str) -> FileWriter: ...

    def stat(self, paths: list[str]) -> dict[str, FileFacts]: ...

    def free_bytes(self) -> int: ...

    def fsync(self, path: str) -> None: ...

    def fsync_dir(self) -> None: ...

    def rename(self, partial_path: str, final: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def close(self) -> None: ...


class DestinationVanished(Refused):
    """A destination object a phase needs is gone (renamed away, deleted by hand)."""


# ---- this host ---------------------------------------------------------------------------------

class _LocalWriter:
    """Overwritten in place, then cut to size: ext4 starts writeback when a file truncated to zero
    is closed (auto_da_alloc), which cost ms under the switchover stun."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def finish(self, length: int, mode: int) -> None:
        try:
            os.ftruncate(self._fd, length)
            os.fchmod(self._fd, mode)
        finally:
            os.close(self._fd)

    def abandon(self) -> None:
        os.close(self._fd)


def local_file_writer(path: str) -> FileWriter:
    return _LocalWriter(path)


class LocalDir:
    """A directory of this host. Example: `LocalDir("/mnt/new/vm1")`."""

    remote = False

    def __init__(self, path: str, shown: str | None = None):
        self.path = os.path.realpath(path)
        self._shown = shown or path

    def __str__(self) -> str:
        return self._shown

    def shown_path(self, path: str) -> str:
        return path

    def check(self, names: list[str], resumable: list[str], need_bytes: int) -> dict[str, PartialFacts]:
        if not os.path.isdir(self.path):
            raise Refused(f"destination {self._shown!r} is not a directory; create it first (mkdir -p)")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise Refused(f"destination {self._shown!r} is not writable; fix its permissions")
        found: dict[str, PartialFacts] = {}
        for name in names + resumable:
            final = os.path.join(self.path, name)
            for path in (final,) if name in resumable else (final, partial_name(final)):
                if os.path.lexists(path):
                    raise Refused(f"destination file {path!r} already exists; remove it or choose another --dest")
        for name in resumable:
            path = partial_name(os.path.join(self.path, name))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            found[name] = PartialFacts(stat.S_ISREG(st.st_mode), st.st_size, partial.read_identity(path))
        free = self.free_bytes()
        if need_bytes > free:
            raise Refused(f"destination {self._shown!r} has {human_bytes(free)} free but the disks and files hold "
                          f"{human_bytes(need_bytes)}; free space there or choose another --dest")
        return found

    def create_disk(self, partial_path: str, size: int, mode: int, identity: Identity) -> str:
        fd = os.open(partial_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.ftruncate(fd, size)     # sparse: the copier skips holes
        finally:
            os.close(fd)
        partial.write_identity(partial_path, identity)
        return partial_path

    def reuse_disk(self, partial_path: str, size: int, identity: Identity) -> str:
        if partial.reusable(partial_path, identity) is None:
            raise DestinationVanished(f"partial disk {partial_path!r} to resume has gone; migrate again")
        partial.write_identity(partial_path, identity)
        return partial_path

    def target(self, partial_path: str) -> str:
        return partial_path

    def file_writer(self, partial_path: str) -> FileWriter:
        return local_file_writer(partial_path)

    def stat(self, paths: list[str]) -> dict[str, FileFacts]:
        out = {}
        for path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            out[path] = FileFacts(stat.S_ISREG(st.st_mode), st.st_size, st.st_blocks * 512,
                                  os.path.isfile(partial.identity_path(path)))
        return out

    def free_bytes(self) -> int:
        return free_bytes(self.path)

    def fsync(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, partial_path: str, final: str) -> None:
        """Give an object its final name; done already (an earlier run of this job) is fine."""
        if os.path.lexists(partial_path):
            os.rename(partial_path, final)
        elif not os.path.lexists(final):
            raise DestinationVanished(f"destination file {partial_path!r} vanished before it could be renamed "
                                      f"to {final!r}")
        partial.discard(partial_path)      # its identity record: nothing is partial any more

    def remove(self, path: str) -> None:
        partial.discard(path)

    def close(self) -> None:
        pass


# ---- another host's datastore ------------------------------------------------------------------

class _RemoteWriter:
    """A file sent to the destination agent in pieces (`ds_write_file`); the first piece creates it."""

    def __init__(self, dest: "DatastoreDir", path: str):
        self._dest, self._path = dest, path
        self._buffer = bytearray()
        self._sent = 0
        self._mode = 0o600

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= WRITE_PIECE:
            self._send(bytes(self._buffer[:WRITE_PIECE]))
            del self._buffer[:WRITE_PIECE]

    def finish(self, length: int, mode: int) -> None:
        # The last piece (empty if the file ended at a piece's end) carries the source's mode.
        self._mode = mode
        self._send(bytes(self._buffer))
        self._buffer.clear()
        assert self._sent == length, (self._sent, length)

    def abandon(self) -> None:
        self._buffer.clear()

    def _send(self, piece: bytes) -> None:
        self._dest.call("ds_write_file", path=self._path, offset=self._sent, mode=self._mode,
                        data=base64.b64encode(piece).decode())
        self._sent += len(piece)


class DatastoreDir:
    """A directory in a datastore of another svmotion host.

    Example: `DatastoreDir(parse_destination("hostb:/srv/ds2/vm1"), cfg.tls, leftovers)`
    """

    remote = True

    def __init__(self, where: Destination, tls: TlsConfig | None, leftovers: "Leftovers"):
        assert where.host is not None
        if tls is None:
            raise Refused(f"destination {where} is on another host: this agent needs [tls] in its config "
                          f"(svmotion tls init) to reach it")
        self.path = where.path.rstrip("/") or "/"
        self.host, self.port = where.host, where.port
        self._shown = str(where)
        self._tls = tls
        self._agent: RemoteAgent | None = None
        self._nbd_port: int | None = None
        self._targets: dict[str, str] = {}
        self._cleaned = False
        self._lock = threading.Lock()      # one connection, one request at a time on it
        self.leftovers = leftovers

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"host {host_port(self.host, self.port)}"

    def shown_path(self, path: str) -> str:
        return str(Destination(path, self.host, self.port))

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """One `ds_*` op; the connection is made on first use and again after any failure. The
        first contact removes what earlier migrations left there (module notes)."""
        with self._lock:
            if self._agent is None:
                self._agent = RemoteAgent(self.host, self.port, self._tls, timeout=CALL_TIMEOUT_S)
            try:
                if not self._cleaned:
                    self._clean_leftovers(self._agent)
                    self._cleaned = True
                return self._agent.call(op, **args)
            except Exception:
                self._agent.close()
                self._agent = None
                raise

    def _clean_leftovers(self, agent: RemoteAgent) -> None:
        for path in self.leftovers.of(self.key):
            try:
                agent.call("ds_remove", path=path)
            except RemoteUnreachable:
                raise
            except SvmotionError as err:      # answered: not ours to remove any more
                log.warning("%s on %s, left by an earlier failed migration, is not removed: %s", path, self, err)
            else:
                log.warning("removed %s on %s, left there by an earlier failed migration", path, self)
            self.leftovers.forget(self.key, path)

    def check(self, names: list[str], resumable: list[str], need_bytes: int) -> dict[str, PartialFacts]:
        hello = self.call("ds_hello")
        self._nbd_port = int(hello["nbd_port"])
        reply = self.call("ds_check", dir=self.path, names=names, resumable=resumable, need_bytes=need_bytes)
        return {name: PartialFacts(f["regular"], f["size"], Identity(**f["identity"]) if f["identity"] else None)
                for name, f in reply["partials"].items()}

    def create_disk(self, partial_path: str, size: int, mode: int, identity: Identity) -> str:
        reply = self.call("ds_create", path=partial_path, size=size, mode=mode, identity=asdict(identity))
        return self._remember(partial_path, reply["export"])

    def reuse_disk(self, partial_path: str, size: int, identity: Identity) -> str:
        reply = self.call("ds_create", path=partial_path, size=size, identity=asdict(identity), resume=True)
        return self._remember(partial_path, reply["export"])

    def _remember(self, partial_path: str, export: str) -> str:
        if self._nbd_port is None:
            self._nbd_port = int(self.call("ds_hello")["nbd_port"])
        self._targets[partial_path] = nbd_uri(self.host, self._nbd_port, export)
        return self._targets[partial_path]

    def target(self, partial_path: str) -> str:
        """The export of a partial this job made before (a resumed job: `ds_export` names it again)."""
        if partial_path not in self._targets:
            self._remember(partial_path, self.call("ds_export", path=partial_path)["export"])
        return self._targets[partial_path]

    def file_writer(self, partial_path: str) -> FileWriter:
        return _RemoteWriter(self, partial_path)

    def stat(self, paths: list[str]) -> dict[str, FileFacts]:
        names = {os.path.basename(p): p for p in paths}
        assert all(os.path.dirname(p) == self.path for p in paths), paths
        reply = self.call("ds_stat", dir=self.path, names=list(names))
        return {names[name]: FileFacts(**facts) for name, facts in reply["files"].items()}

    def free_bytes(self) -> int:
        return int(self.call("ds_stat", dir=self.path)["free_bytes"])

    def fsync(self, path: str) -> None:
        self.call("ds_fsync", path=path)

    def fsync_dir(self) -> None:
        self.call("ds_fsync", path=self.path)

    def rename(self, partial_path: str, final: str) -> None:
        # ds_rename completes an earlier, interrupted rename, and syncs the directory.
        self.call("ds_rename", path=partial_path)

    def remove(self, path: str) -> None:
        self.call("ds_remove", path=path)

    def read_file(self, path: str, offset: int, count: int) -> tuple[bytes, "SourceStat"]:
        """A piece of a file of the datastore (a source file there), and the file's stat."""
        reply = self.call("ds_read_file", path=path, offset=offset, count=count)
        return base64.b64decode(reply["data"]), SourceStat(**reply["stat"])

    def close(self) -> None:
        with self._lock:
            if self._agent is not None:
                self._agent.close()
                self._agent = None


@dataclass(frozen=True)
class SourceStat:
    """The stat of a file on another host, as agent/files.py reads a stat result."""

    st_mode: int
    st_size: int
    st_dev: int
    st_ino: int
    st_mtime_ns: int
    st_ctime_ns: int


@dataclass
class _RemoteHandle:
    path: str
    offset: int = 0


class DatastoreFiles:
    """Source files on another host's datastore, read through its agent (agent/files.py FileSource)."""

    def __init__(self, where: DatastoreDir):
        self._where = where

    def stat(self, path: str) -> SourceStat:
        return self._where.read_file(_path_of(path), 0, 0)[1]

    def open(self, path: str) -> _RemoteHandle:
        return _RemoteHandle(_path_of(path))

    def fstat(self, handle: _RemoteHandle) -> SourceStat:
        return self._where.read_file(handle.path, 0, 0)[1]

    def read(self, handle: _RemoteHandle, n: int) -> bytes:
        data, _ = self._where.read_file(handle.path, handle.offset, min(n, WRITE_PIECE))
        handle.offset += len(data)
        return data

    def close(self, handle: _RemoteHandle) -> None:
        pass


def _path_of(remote: str) -> str:
    """The path on its host of a HOST:PORT:/path source."""
    return parse_destination(remote).path


def on_other_host(path: str) -> bool:
    """A file an earlier migration put on another host is recorded as HOST[:PORT]:/path (planned_paths)."""
    return not path.startswith("/")


class Leftovers:
    """Partials at other hosts that a failed migration could not remove (module notes)."""

    def __init__(self, state_dir: str):
        self._file = os.path.join(state_dir, "leftovers.json")
        self._lock = threading.Lock()

    def _read(self) -> dict[str, list[str]]:
        try:
            return dict(json.loads(Path(self._file).read_text()))
        except FileNotFoundError:
            return {}
        except ValueError as err:
            log.warning("%s: unreadable (%s); ignoring it", self._file, err)
            return {}

    def of(self, host: str) -> list[str]:
        with self._lock:
            return list(self._read().get(host, []))

    def add(self, host: str, paths: list[str]) -> None:
        with self._lock:
            data = self._read()
            data[host] = sorted(set(data.get(host, [])) | set(paths))
            replace_json(self._file, data)

    def forget(self, host: str, path: str) -> None:
        with self._lock:
            data = self._read()
            left = [p for p in data.get(host, []) if p != path]
            if left:
                data[host] = left
            else:
                data.pop(host, None)
            replace_json(self._file, data)


@dataclass
class Removal:
    """What `remove_created` did."""

    kept: list[str] = field(default_factory=list)     # partial disks kept for the next migration's DiskLoad
    left: list[str] = field(default_factory=list)     # not removed: the destination host did not answer
    errors: list[str] = field(default_factory=list)   # one line each


def remove_created(dest: DestDir, created: list[str], mirror_node_died: bool) -> Removal:
    """Remove what a failed migration created at the destination, but for the partial disks (those
    with an identity record) a dead mirror node leaves for the next migration to resume
    (agent/partial.py). A destination host that does not answer keeps the rest as leftovers."""
    out = Removal()
    try:
        if mirror_node_died:
            facts = dest.stat(created)
            out.kept = [p for p in created if p in facts and facts[p].identity]
        for path in reversed(created):
            if path not in out.kept:
                try:
                    dest.remove(path)
                except RemoteUnreachable:
                    raise
                except (OSError, SvmotionError) as err:
                    out.errors.append(f"remove {dest.shown_path(path)}: {getattr(err, 'strerror', None) or err}")
    except RemoteUnreachable as err:
        # One timeout is enough to know: the rest is left for the next contact with that host.
        out.left = [p for p in created if p not in out.kept]
        out.errors.append(f"clean-up: {err}")
        if isinstance(dest, DatastoreDir):
            dest.leftovers.add(dest.key, out.left)
    return out


def open_destdir(where: Destination, tls: TlsConfig | None, state_dir: str) -> DestDir:
    """The DestDir of a parsed --dest."""
    if where.remote:
        return DatastoreDir(where, tls, Leftovers(state_dir))
    return LocalDir(where.path)
