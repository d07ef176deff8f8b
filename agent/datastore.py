"""Datastores: the directories this host offers to other hosts' migrations, and the ops that reach them.

Design notes
- Other hosts' agents call the `ds_*` ops on the agent's TCP API (mutual TLS, agent/tls.py);
  never the local VM ops. They are what the phases of a migration need at a remote destination
  (docs/interfaces.md, section 4b): DiskSetup `ds_check`, DiskCreate `ds_create`, FileCreate and
  sidecars `ds_write_file`, DiskCopyDone `ds_rename`, Cleanup `ds_remove`, DiskLoad and verify
  `ds_digests` (only digests cross the network), durability `ds_fsync`, `ds_stat` (space, sizes),
  `ds_read_file` (files a migration brings back), and `ds_export` to serve an existing file
  over NBD.
- Confinement. Every path is absolute and must lie in a configured datastore. It is walked from
  the datastore's root (resolved with realpath once, at start) one component at a time with
  O_NOFOLLOW|O_DIRECTORY, and the last component is then used relative to that directory fd
  (openat, linkat, unlinkat, with O_NOFOLLOW): a symbolic link anywhere below a root is refused,
  never followed, and nothing can be swapped under a check (no check-then-use on path names).
  `..` and `.` components are refused outright; the root may be given as configured or as its
  real path. A refusal is one line, exit 3, and nothing changed.
- What may be created is narrow: new files only ever have partial names (`X.svmotion-partial`,
  with `X.svmotion-partial.json` identity records, agent/partial.py); a final name `X` comes
  only from `ds_rename` of its partial, which never replaces an existing `X` (link, then unlink
  the partial: atomic, and a crash in between leaves both names on one inode, which the next
  `ds_rename` completes). `ds_remove` removes partials and their records only. So a peer can
  neither overwrite nor delete a finished disk.
- NBD exports (agent/export.py serves them): nbdkit's file plugin in `dir=` mode serves the
  files directly inside one directory, export name = file name, no slashes. The agent keeps
  that directory, state_dir/exports, as symbolic links to datastore files: a disk's export is
  named `<datastore>-<first 32 hex digits of SHA-256 of its final path within the datastore>`,
  made by `ds_create` (or `ds_export`) and pointed at the final file by `ds_rename`, so its name
  is the same before and after the rename: a mirror node that opened it keeps a valid URI. Only
  files made or exported through these ops are served, not everything in a datastore.
- Concurrency: ops run in the API's connection threads; each works on its own fds, and the
  file system's atomic operations (O_EXCL, link, rename) settle races between two peers.
"""
from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from agent import __version__
from agent.config import DatastoreConfig
from agent.errors import EXIT_FAILED, EXIT_USAGE, Refused, SvmotionError
from agent.partial import IDENTITY_SUFFIX, Identity, discard, identity_path, read_identity, write_identity
from agent.plan import PARTIAL_SUFFIX, human_bytes
from nbd_plugin.backend import FileBackend
from nbd_plugin.control import (Arg, ArgumentError, Connection, RequestError, arguments, declared, file_path,
                                power_of_two, shown, takes, within)
from nbd_plugin.digest import chunk_digests
from nbd_plugin.vm import MAX_DIGEST_BYTES, MAX_DIGEST_CHUNKS

log = logging.getLogger("svmotion.datastore")

CHANGING_OPS = ("ds_create", "ds_rename", "ds_remove", "ds_export")    # logged with the peer's name
MAX_WRITE_BYTES = 512 << 10      # one ds_write_file piece; base64 of it fits a 1 MiB request line
MAX_NAMES = 4096                 # names in one ds_check
EXPORT_HASH_CHARS = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
IDENTITY_ARGS = {"vm": Arg(str), "disk": Arg(str), "source": Arg(str, check=file_path), "size": Arg(int),
                 "migration": Arg(str), "granularity": Arg(int)}


def _absolute(value: str) -> str | None:
    return file_path(value) or (None if value.startswith("/") else
                                "must be an absolute path inside a datastore of this host, e.g. /srv/ds2/vm1")


def _plain_names(values: list) -> str | None:
    if len(values) > MAX_NAMES:
        return f"at most {MAX_NAMES} names"
    for v in values:
        if not isinstance(v, str) or file_path(v) or "/" in v or v in (".", "..") or len(os.fsencode(v)) > 255:
            return f"{shown(v)} is not a file name (no '/', not '.' or '..', at most 255 bytes)"
    return None


PATH = Arg(str, check=_absolute)


@dataclass(frozen=True)
class Datastore:
    name: str
    configured: tuple[str, ...]       # the root's components as configured
    real: tuple[str, ...]             # and as realpath resolved them at start

    @property
    def root(self) -> str:
        return "/" + "/".join(self.real)


@dataclass(frozen=True)
class Place:
    """A path resolved inside a datastore: its parent directory (an open fd) and its last component."""

    path: str                         # as the peer gave it
    datastore: Datastore
    rel: tuple[str, ...]              # components below the root; () is the root itself
    dir_fd: int                       # the parent directory (the root itself when rel is ())

    @property
    def name(self) -> str:
        return self.rel[-1]


def _parts(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


class DatastoreService:
    """The `ds_*` ops over the configured datastores. Example: `DatastoreService(cfg.datastores, exports, 10810)`."""

    def __init__(self, datastores: tuple[DatastoreConfig, ...], exports_dir: str, nbd_port: int):
        self.datastores = [Datastore(d.name, _parts(os.path.normpath(d.path)), _parts(os.path.realpath(d.path)))
                           for d in datastores]
        self.exports_dir = exports_dir
        self.nbd_port = nbd_port
        os.makedirs(exports_dir, mode=0o700, exist_ok=True)

    # ---- dispatch ------------------------------------------------------------------------------

    def handle(self, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
        """The TCP API's handler: ds_* ops only; refusals carry their exit code (docs section 5)."""
        op = request["op"]
        handler: Callable[[dict[str, Any]], dict[str, Any]] | None = getattr(self, f"op_{op}", None) \
            if op.startswith("ds_") else None
        if handler is None:
            raise RequestError(f"unknown op {shown(op)}: this API serves {', '.join(self.ops())}", exit=EXIT_USAGE)
        try:
            reply = handler(arguments(request, declared(handler), op))
            if op in CHANGING_OPS:
                log.info("%s from %s: %s", op, conn.peer, request.get("path"))
            return reply
        except ArgumentError as err:
            raise RequestError(str(err), exit=EXIT_USAGE) from None
        except SvmotionError as err:
            raise RequestError(f"{op}: {err}", exit=err.exit_code) from None
        except OSError as err:
            where = f" {err.filename!r}" if err.filename else ""
            raise RequestError(f"{op} {shown(request.get('path', request.get('dir', '')))}:{where} "
                               f"{err.strerror or err}", exit=EXIT_FAILED) from None

    @classmethod
    def ops(cls) -> list[str]:
        return sorted(name[3:] for name in dir(cls) if name.startswith("op_ds_"))

    # ---- confinement ---------------------------------------------------------------------------

    def _datastore_of(self, path: str) -> tuple[Datastore, tuple[str, ...]]:
        parts = path.split("/")[1:]
        if any(p in (".", "..") for p in parts):
            raise Refused(f"{path!r} has a '.' or '..' component; give the path plainly, e.g. /srv/ds2/vm1")
        parts = tuple(p for p in parts if p)
        for ds in self.datastores:
            for root in (ds.configured, ds.real):
                if parts[:len(root)] == root:
                    return ds, parts[len(root):]
        known = ", ".join(f"{ds.name} ({'/' + '/'.join(ds.configured)})" for ds in self.datastores)
        raise Refused(f"{path!r} is outside every datastore of this host ({known}); give a path inside one")

    @contextmanager
    def _dir(self, path: str, parts: tuple[str, ...], ds: Datastore) -> Iterator[int]:
        """An fd of the directory ds/parts, walked without following any symlink."""
        fd = os.open(ds.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    where = "/".join((ds.root, *parts[:i + 1]))
                    raise Refused(f"{path!r}: {where!r} {_why_not_dir(err)}") from None
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def place(self, path: str) -> Iterator[Place]:
        """The parent directory and last component of a path below a datastore root."""
        ds, rel = self._datastore_of(path)
        if not rel:
            raise Refused(f"{path!r} is the datastore {ds.name!r} itself; name a file inside it")
        with self._dir(path, rel[:-1], ds) as fd:
            yield Place(path, ds, rel, fd)

    @contextmanager
    def directory(self, path: str) -> Iterator[Place]:
        """A directory in a datastore (its root included), as an open fd."""
        ds, rel = self._datastore_of(path)
        with self._dir(path, rel, ds) as fd:
            yield Place(path, ds, rel, fd)

    # ---- exports -------------------------------------------------------------------------------

    def export_name(self, ds: Datastore, final_rel: tuple[str, ...]) -> str:
        digest = hashlib.sha256("/".join(final_rel).encode("utf-8", "surrogateescape")).hexdigest()
        return f"{ds.name}-{digest[:EXPORT_HASH_CHARS]}"

    def _point_export(self, export: str, target: str) -> None:
        """(Re)point an export's link at `target`, atomically (a connecting client sees old or new)."""
        link = os.path.join(self.exports_dir, export)
        tmp = f"{link}.{secrets.token_hex(4)}.tmp"
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def _export_target(self, export: str) -> str | None:
        try:
            return os.readlink(os.path.join(self.exports_dir, export))
        except (FileNotFoundError, OSError):
            return None

    def _unexport(self, export: str, target: str) -> bool:
        """Remove an export's link if it points at `target` (another file's export is left alone)."""
        if self._export_target(export) != target:
            return False
        os.unlink(os.path.join(self.exports_dir, export))
        return True

    @staticmethod
    def _target(place: Place, rel: tuple[str, ...]) -> str:
        return "/".join((place.datastore.root, *rel))

    # ---- ops -----------------------------------------------------------------------------------

    def op_ds_hello(self, request: dict[str, Any]) -> dict[str, Any]:
        """What this host offers: its datastores with their space, the NBD port, the limits."""
        stores = []
        for ds in self.datastores:
            st = os.statvfs(ds.root)
            stores.append({"name": ds.name, "path": "/" + "/".join(ds.configured),
                           "free_bytes": st.f_bavail * st.f_frsize, "total_bytes": st.f_blocks * st.f_frsize})
        return {"version": __version__, "datastores": stores, "nbd_port": self.nbd_port,
                "ops": self.ops(), "limits": {"write_bytes": MAX_WRITE_BYTES, "digest_bytes": MAX_DIGEST_BYTES,
                                              "digest_chunks": MAX_DIGEST_CHUNKS}}

    @takes(dir=PATH, names=Arg(list, [], _plain_names), resumable=Arg(list, [], _plain_names),
           need_bytes=Arg(int, 0, within(0, 1 << 62)))
    def op_ds_check(self, request: dict[str, Any]) -> dict[str, Any]:
        """DiskSetup: none of `names` (nor their partials) exists in `dir`, and `need_bytes` fit.

        `resumable` names may have a partial (DiskLoad): its facts come back for the caller to
        judge (agent/partial.py judge_reuse); their final names must not exist either.
        """
        partials = {}
        with self.directory(request["dir"]) as where:
            shown_dir = request["dir"].rstrip("/")
            for name in request["names"] + request["resumable"]:
                candidates = [name] if name in request["resumable"] else [name, name + PARTIAL_SUFFIX]
                for candidate in candidates:
                    if _lexists(candidate, where.dir_fd):
                        raise Refused(f"destination file {shown_dir}/{candidate!r} already exists; remove it "
                                      f"or choose another --dest")
            for name in request["resumable"]:
                partial_name = name + PARTIAL_SUFFIX
                try:
                    st = os.stat(partial_name, dir_fd=where.dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found = read_identity(partial_name, where.dir_fd)
                partials[name] = {"regular": stat.S_ISREG(st.st_mode), "size": st.st_size,
                                  "identity": None if found is None else asdict(found)}
            st = os.statvfs(where.dir_fd)
            free = st.f_bavail * st.f_frsize
        if request["need_bytes"] > free:
            raise Refused(f"destination {request['dir']!r} has {human_bytes(free)} free but the disks and files "
                          f"hold {human_bytes(request['need_bytes'])}; free space there or choose another --dest")
        return {"free_bytes": free, "partials": partials}

    @takes(path=PATH, size=Arg(int, check=within(0, 1 << 62)), identity=Arg((dict, type(None)), None),
           mode=Arg(int, 0o600, within(0, 0o777)), resume=Arg(bool, False))
    def op_ds_create(self, request: dict[str, Any]) -> dict[str, Any]:
        """DiskCreate: a new sparse partial disk of `size` bytes and its identity record; its export.

        With `resume` (DiskLoad), the partial must exist with that size: only its record is replaced.
        """
        identity = None
        if request["identity"] is not None:
            fields = arguments(request["identity"], IDENTITY_ARGS, "ds_create identity", keep=())
            identity = Identity(**fields)
            if identity.size != request["size"]:
                raise ArgumentError(f"ds_create: identity size {identity.size} is not size {request['size']}")
        with self.place(request["path"]) as where:
            final = _final_of(where)
            if _lexists(final, where.dir_fd):
                raise Refused(f"{request['path']!r}: its final name {final!r} already exists; remove it or choose "
                              f"another --dest")
            if request["resume"]:
                self._check_resumable(where, request["size"])
            else:
                try:
                    fd = os.open(where.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 request["mode"], dir_fd=where.dir_fd)
                except FileExistsError:
                    raise Refused(f"{where.path!r} already exists; resume it (resume) or remove it first "
                                  f"(ds_remove)") from None
                try:
                    os.ftruncate(fd, request["size"])    # sparse: the copier skips holes
                except OSError:
                    os.unlink(where.name, dir_fd=where.dir_fd)
                    raise
                finally:
                    os.close(fd)
            if identity is not None:
                write_identity(where.name, identity, where.dir_fd)
            export = self.export_name(where.datastore, (*where.rel[:-1], final))
            self._point_export(export, self._target(where, where.rel))
        return {"path": request["path"], "export": export}

    @staticmethod
    def _check_resumable(where: Place, size: int) -> None:
        try:
            st = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(f"partial disk {where.path!r} to resume has gone; migrate again") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise Refused(f"partial disk {where.path!r} is not a regular file of {size} bytes; remove it "
                          f"(ds_remove) and migrate again")

    @takes(path=PATH, data=Arg(str), offset=Arg(int, 0, within(0, 1 << 62)),
           mode=Arg(int, 0o600, within(0, 0o777)), sha256=Arg(bool, False))
    def op_ds_write_file(self, request: dict[str, Any]) -> dict[str, Any]:
        """FileCreate, sidecars: a piece of a small file (base64 `data`) at `offset` of a partial.

        Offset 0 creates or truncates the partial; a later piece must start at its current end.
        `mode`: the file's mode after this piece (the last piece has the source's). `sha256`: the
        digest of the whole file after this piece (what the file mirror records).
        """
        try:
            data = base64.b64decode(request["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ArgumentError(f"ds_write_file: bad data {shown(request['data'])}: must be base64") from None
        if len(data) > MAX_WRITE_BYTES:
            raise ArgumentError(f"ds_write_file: {len(data)} bytes of data, at most {MAX_WRITE_BYTES} per piece; "
                                f"send the file in pieces with offset")
        with self.place(request["path"]) as where:
            _final_of(where)
            offset = request["offset"]
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            if offset == 0:
                flags |= os.O_CREAT
            fd = _open_regular(where, flags, request["mode"])
            try:
                size = os.fstat(fd).st_size
                if offset == 0:
                    os.ftruncate(fd, 0)
                elif size != offset:
                    raise Refused(f"{where.path!r} has {size} bytes, the piece starts at {offset}; send the pieces "
                                  f"in order, the first at offset 0")
                _pwrite_all(fd, data, offset)
                os.fchmod(fd, request["mode"])
                reply: dict[str, Any] = {"bytes": offset + len(data)}
                if request["sha256"]:
                    reply["sha256"] = _sha256(fd)
            finally:
                os.close(fd)
        return reply

    @takes(path=PATH)
    def op_ds_rename(self, request: dict[str, Any]) -> dict[str, Any]:
        """DiskCopyDone: a partial gets its final name (never replacing one); its record goes, the dir is synced."""
        with self.place(request["path"]) as where:
            final = _final_of(where)
            dir_fd = where.dir_fd
            final_rel = (*where.rel[:-1], final)
            try:
                st = os.stat(where.name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                if not _is_regular(final, dir_fd):
                    raise Refused(f"{where.path!r} vanished before it could be renamed to {final!r}") from None
                st = None          # renamed already: an earlier call finished, or died after the link
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    raise Refused(f"{where.path!r} is not a regular file; it cannot become {final!r}")
                try:
                    os.link(where.name, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    done = os.stat(final, dir_fd=dir_fd, follow_symlinks=False)
                    if (done.st_dev, done.st_ino) != (st.st_dev, st.st_ino):
                        raise Refused(f"{final!r} already exists beside {where.path!r}; it is not replaced: remove "
                                      f"one of them") from None
            export = self.export_name(where.datastore, final_rel)
            if self._export_target(export) is not None:
                self._point_export(export, self._target(where, final_rel))
            discard(where.name, dir_fd)          # the partial name and its identity record
            os.fsync(dir_fd)
        return {"path": "/".join(request["path"].split("/")[:-1] + [final]), "export": export}

    @takes(path=PATH)
    def op_ds_remove(self, request: dict[str, Any]) -> dict[str, Any]:
        """Cleanup: a partial (file or disk), its identity record and its export; missing ones are fine."""
        with self.place(request["path"]) as where:
            final = _final_of(where)
            try:
                st = os.stat(where.name, dir_fd=where.dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise Refused(f"{where.path!r} is not a regular file; it is not removed")
            removed = [n for n in (where.name, identity_path(where.name)) if _lexists(n, where.dir_fd)]
            discard(where.name, where.dir_fd)
            export = self.export_name(where.datastore, (*where.rel[:-1], final))
            unexported = self._unexport(export, self._target(where, where.rel))
        return {"removed": removed, "unexported": export if unexported else None}

    @takes(path=PATH)
    def op_ds_export(self, request: dict[str, Any]) -> dict[str, Any]:
        """Serve an existing regular file of a datastore (a partial or a final disk) over NBD: its export name."""
        with self.place(request["path"]) as where:
            if not _is_regular(where.name, where.dir_fd):
                raise Refused(f"{where.path!r} is not an existing regular file; give a disk in a datastore")
            name = where.name.removesuffix(PARTIAL_SUFFIX) if where.name.endswith(PARTIAL_SUFFIX) else where.name
            export = self.export_name(where.datastore, (*where.rel[:-1], name))
            self._point_export(export, self._target(where, where.rel))
        return {"export": export}

    @takes(path=PATH, offset=Arg(int, 0, within(0, 1 << 62)), count=Arg((int, type(None)), None),
           granularity=Arg(int, 65536, power_of_two(1, MAX_DIGEST_BYTES)))
    def op_ds_digests(self, request: dict[str, Any]) -> dict[str, Any]:
        """Per-chunk digests of a range of a file (nbd_plugin/digest.py), same limits as the plugin's `digest`."""
        offset, granularity, count = request["offset"], request["granularity"], request["count"]
        if offset % granularity:
            raise ArgumentError(f"ds_digests: offset {offset} must be a multiple of the granularity {granularity}")
        with self.place(request["path"]) as where:
            fd = _open_regular(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                # /proc/self/fd/N reopens this very file (no path lookup): the backend's own fd.
                backend = FileBackend(f"/proc/self/fd/{fd}", readonly=True)
            finally:
                os.close(fd)
            try:
                size = backend.size
                if offset > size:
                    raise ArgumentError(f"ds_digests: offset {offset} is past the end of the file ({size} bytes)")
                count = min(size - offset, MAX_DIGEST_BYTES) if count is None else count
                if count < 0 or offset + count > size or count > MAX_DIGEST_BYTES or \
                        count > granularity * MAX_DIGEST_CHUNKS:
                    raise ArgumentError(f"ds_digests: range {offset}+{count} must lie in the file ({size} bytes) "
                                        f"and span at most {MAX_DIGEST_BYTES} bytes and {MAX_DIGEST_CHUNKS} chunks")
                blob = chunk_digests(backend, offset, count, granularity)
            finally:
                backend.close()
        return {"digests": blob.hex(), "size": size, "count": count}

    @takes(path=PATH, offset=Arg(int, 0, within(0, 1 << 62)),
           count=Arg(int, MAX_WRITE_BYTES, within(0, MAX_WRITE_BYTES)))
    def op_ds_read_file(self, request: dict[str, Any]) -> dict[str, Any]:
        """A piece of a regular file (base64 `data`, short at its end) and the file's stat: the per-VM
        files and sidecars a migration brings back from this datastore."""
        with self.place(request["path"]) as where:
            fd = _open_regular(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                data = os.pread(fd, request["count"], request["offset"])
                st = os.fstat(fd)
            finally:
                os.close(fd)
        return {"data": base64.b64encode(data).decode(),
                "stat": {"st_mode": st.st_mode, "st_size": st.st_size, "st_dev": st.st_dev, "st_ino": st.st_ino,
                         "st_mtime_ns": st.st_mtime_ns, "st_ctime_ns": st.st_ctime_ns}}

    @takes(dir=PATH, names=Arg(list, [], _plain_names))
    def op_ds_stat(self, request: dict[str, Any]) -> dict[str, Any]:
        """The free space of `dir`, and of each of `names` that exists there: type, size, allocated
        bytes, whether an identity record is beside it (the switchover's room check, resumes)."""
        files = {}
        with self.directory(request["dir"]) as where:
            for name in request["names"]:
                try:
                    st = os.stat(name, dir_fd=where.dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                files[name] = {"regular": stat.S_ISREG(st.st_mode), "size": st.st_size,
                               "allocated": st.st_blocks * 512,
                               "identity": _is_regular(identity_path(name), where.dir_fd)}
            st = os.statvfs(where.dir_fd)
        return {"free_bytes": st.f_bavail * st.f_frsize, "files": files}

    @takes(path=PATH)
    def op_ds_fsync(self, request: dict[str, Any]) -> dict[str, Any]:
        """Make a file, or a directory's entries, durable."""
        _, rel = self._datastore_of(request["path"])
        if not rel:
            with self.directory(request["path"]) as where:
                os.fsync(where.dir_fd)
            return {}
        with self.place(request["path"]) as where:
            fd = _open_regular(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, directory_ok=True)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return {}


# ---- helpers -------------------------------------------------------------------------------------

def _why_not_dir(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "is a symbolic link; datastore paths are never followed through links"
    if err.errno == errno.ENOTDIR:
        return "is not a directory"
    if err.errno == errno.ENOENT:
        return "does not exist; create it first (mkdir -p on that host)"
    return f"cannot be opened ({err.strerror})"


def _final_of(where: Place) -> str:
    """The final name of a partial; refused for any other name (peers create partials only)."""
    name = where.name
    if name.endswith(IDENTITY_SUFFIX) and name[:-len(IDENTITY_SUFFIX)].endswith(PARTIAL_SUFFIX):
        raise Refused(f"{where.path!r} is an identity record; name its partial instead")
    if not name.endswith(PARTIAL_SUFFIX) or name == PARTIAL_SUFFIX:
        raise Refused(f"{where.path!r} is not a partial name; only NAME{PARTIAL_SUFFIX} files are made, renamed "
                      f"or removed this way")
    return name[:-len(PARTIAL_SUFFIX)]


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _is_regular(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _open_regular(where: Place, flags: int, mode: int = 0o600, directory_ok: bool = False) -> int:
    """Open the last component (no symlink: O_NOFOLLOW, no blocking on a FIFO); a regular file (or directory)."""
    try:
        fd = os.open(where.name, flags, mode, dir_fd=where.dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise Refused(f"{where.path!r} is a symbolic link; datastore paths are never followed through "
                          f"links") from None
        if err.errno == errno.ENOENT:
            raise Refused(f"{where.path!r} does not exist") from None
        raise
    st_mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(st_mode) or directory_ok and stat.S_ISDIR(st_mode)):
        os.close(fd)
        raise Refused(f"{where.path!r} is not a regular file")
    return fd


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()
