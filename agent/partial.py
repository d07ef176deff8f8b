"""Partial destination disks: their identity records, when one may be reused, when one is kept.

Design notes
- A partial disk is `DEST/<disk>.raw.svmotion-partial` (plan.py): never a name that looks
  complete. DiskCreate writes its identity record beside it, `<partial>.json`: which VM, disk
  and source it copies, the size, the migration that made it and the dirty-map granularity. A
  JSON file rather than an xattr because tmpfs and some network file systems drop user xattrs,
  and beside the data so that the record moves, and dies, with the partial.
- When a migration fails because its mirror node died (nbdkit SIGKILLed or crashed), the copying
  done so far is worth keeping: its partial disks stay, with their records, and the next
  `migrate` of the VM to the same destination reuses them (DiskLoad: the load pass compares
  per-chunk digests and copies only the chunks that differ, so any content is safe to start
  from). Every other failure and every abort removes them as before: the operator asked to stop,
  or the destination itself is suspect.
- Reuse needs the record to match: same VM, disk, source file (real path) and size, and the
  file's size to agree. Anything else is refused, naming the file, what differs and the fix; a
  partial without a record was not made by DiskCreate and is refused as any file in the way.
- Per-VM files and sidecars are small and copied whole: their partials are always removed.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from typing import Callable

from agent.errors import Refused

IDENTITY_SUFFIX = ".json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class Identity:
    """What a partial destination disk is a copy of.

    Example: `Identity("vm1", "disk0", "/var/lib/vm1/disk0.raw", 1 << 30, "3f2a9c1b7d04", 65536)`
    """

    vm: str
    disk: str
    source: str            # the source disk's real path
    size: int
    migration: str         # the id of the migration that made (or last reused) the partial
    granularity: int

    def mismatch(self, wanted: "Identity") -> str | None:
        """What differs from `wanted` in the fields that make a partial reusable, or None."""
        for field in ("vm", "disk", "source", "size"):
            have, want = getattr(self, field), getattr(wanted, field)
            if have != want:
                return f"its identity record says {field} {have!r}, this migration's is {want!r}"
        return None


def identity_path(partial: str) -> str:
    return partial + IDENTITY_SUFFIX


def _nofollow(dir_fd: int | None) -> Callable[[str, int], int]:
    """An opener for open(): never through a symlink at the last component, relative to dir_fd."""
    return lambda name, flags: os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)


def write_identity(partial: str, identity: Identity, dir_fd: int | None = None) -> None:
    """Write (or replace) a partial's identity record atomically, durably.

    With `dir_fd`, `partial` is a name in that directory (a datastore's, agent/datastore.py).
    """
    path = identity_path(partial)
    tmp = path + ".tmp"
    with open(tmp, "w", opener=_nofollow(dir_fd)) as f:
        json.dump({"version": RECORD_VERSION, **asdict(identity)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def read_identity(partial: str, dir_fd: int | None = None) -> Identity | None:
    """A partial's identity record, or None when it has none (or an unreadable one)."""
    try:
        with open(identity_path(partial), opener=_nofollow(dir_fd)) as f:
            record = json.load(f)
        return Identity(**{k: record[k] for k in Identity.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reusable(partial: str, wanted: Identity) -> Identity | None:
    """The record of a partial this migration may resume from; None when there is no partial.

    Raises Refused, naming the file and the fix, when a file is there that is not ours to reuse.
    """
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return None
    return judge_reuse(partial, stat.S_ISREG(st.st_mode), st.st_size, read_identity(partial), wanted)


def judge_reuse(partial: str, regular: bool, size: int, found: Identity | None, wanted: Identity) -> Identity:
    """`reusable` on facts about an existing partial: local ones, or a datastore's (`ds_check`)."""
    fix = f"remove it and {identity_path(partial)!r}, or choose another --dest"
    if not regular:
        raise Refused(f"destination file {partial!r} already exists and is not a regular file; {fix}")
    if found is None:
        raise Refused(f"destination file {partial!r} already exists and has no svmotion identity record; {fix}")
    why = found.mismatch(wanted)
    if why is None and size != wanted.size:
        why = f"it has {size} bytes, the disk has {wanted.size}"
    if why is not None:
        raise Refused(f"destination file {partial!r} is a partial disk this migration cannot resume: {why}; {fix}")
    return found


def discard(path: str, dir_fd: int | None = None) -> None:
    """Remove a partial and its identity record, if any (missing files are fine)."""
    for victim in (path, identity_path(path)):
        try:
            os.unlink(victim, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
