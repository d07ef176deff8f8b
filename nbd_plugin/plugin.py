"""nbdkit entry point of the svmotion mirror node: the callbacks translate and dispatch, nothing else.

    nbdkit python nbd_plugin/plugin.py vm=NAME disk=NAME:PATH|URI [disk=...] control=SOCKET [lease=2.0]
           [state=FILE] [tls-certificates=DIR | tls-psk-file=FILE] [dest-timeout=1.0]
           [source-timeout=30.0]

(with the directory above nbd_plugin/ on PYTHONPATH: nbdkit's embedded Python does not add the
script's directory to sys.path). See docs/interfaces.md for the control protocol.

Every data callback passes the VM's stun gate (enter ... leave) around the disk operation, like
nbdkit's pause filter, so a stun holds new requests and knows when the ones in flight are done.
An OSError from the source becomes the NBD error with its errno when NBD has that error, else EIO
(nbdkit would send an errno it cannot carry as EINVAL: a remote disk that does not answer, ETIMEDOUT,
would look like a bad request); anything else becomes EIO.

The VM (and so every backend, whose NBD links have threads) is made in `after_fork`: threads
started before nbdkit forks would be lost in the parent.
"""
from __future__ import annotations

import errno
import os

import nbdkit

from nbd_plugin.backend import location_problem
from nbd_plugin.backend_nbd import NbdOptions
from nbd_plugin.control import ControlServer
from nbd_plugin.threadstate import PinnedThreadStates
from nbd_plugin.vm import VM

API_VERSION = 2
FLAG_FUA = nbdkit.FLAG_FUA

# The errors NBD carries (nbdkit maps EROFS, EDQUOT and EFBIG itself); any other is sent as EIO.
NBD_ERRNOS = frozenset((errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW,
                        errno.ENOTSUP, errno.EOPNOTSUPP, errno.ESHUTDOWN, errno.EROFS, errno.EDQUOT, errno.EFBIG))

_config: dict = {"vm": None, "disks": [], "control": None, "lease": 2.0, "state": None,
                 "tls-certificates": None, "tls-psk-file": None, "dest-timeout": None, "source-timeout": 30.0}
DEST_TIMEOUT = 1.0      # default, or half the lease when that is shorter
# What a tls-certificates directory must hold for a client (libnbd's names).
CLIENT_CERTIFICATES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
_vm: VM | None = None
_server: ControlServer | None = None


class ConfigError(Exception):
    pass


def config(key: str, value: str) -> None:
    if key == "vm":
        _config["vm"] = value
    elif key == "disk":
        name, sep, path = value.partition(":")
        if not sep or not name or not path:
            raise ConfigError(f"disk={value!r}: expected disk=NAME:PATH or disk=NAME:URI, "
                              "e.g. disk=disk0:/var/lib/vm1/disk0.raw or disk=disk0:nbds://hostb:10809/disk0")
        if any(name == n for n, _ in _config["disks"]):
            raise ConfigError(f"disk={value!r}: disk name {name!r} is given twice")
        problem = location_problem(path)
        if problem:
            raise ConfigError(f"disk={value!r}: {problem}")
        _config["disks"].append((name, path))
    elif key == "control":
        _config["control"] = value
    elif key == "lease":
        _config["lease"] = float(value)
    elif key == "state":
        _config["state"] = value
    elif key in ("tls-certificates", "tls-psk-file"):
        _config[key] = value
    elif key in ("dest-timeout", "source-timeout"):
        _config[key] = _seconds(key, value)
    else:
        raise ConfigError(f"unknown parameter {key}={value!r}; known: vm, disk, control, lease, state, "
                          "tls-certificates, tls-psk-file, dest-timeout, source-timeout")


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(f"{key}={value!r}: expected seconds, more than 0 and at most 3600, e.g. {key}=1.0")
    return seconds


def config_complete() -> None:
    for key in ("vm", "control"):
        if not _config[key]:
            raise ConfigError(f"missing {key}=...; usage: vm=NAME disk=NAME:PATH control=SOCKET")
    if not _config["disks"]:
        raise ConfigError("no disk=NAME:PATH given")
    certificates, psk = _config["tls-certificates"], _config["tls-psk-file"]
    if certificates and psk:
        raise ConfigError("tls-certificates= and tls-psk-file= both given; nbds:// URIs use one of them")
    if certificates:
        missing = [f for f in CLIENT_CERTIFICATES if not os.access(os.path.join(certificates, f), os.R_OK)]
        if missing:
            raise ConfigError(f"tls-certificates={certificates!r}: cannot read {', '.join(missing)} there; "
                              f"the directory holds the CA and this host's client certificate and key")
    if psk and not os.access(psk, os.R_OK):
        raise ConfigError(f"tls-psk-file={psk!r}: cannot read it")
    if _config["dest-timeout"] is None:
        _config["dest-timeout"] = min(DEST_TIMEOUT, _config["lease"] / 2)
    elif _config["dest-timeout"] >= _config["lease"]:
        raise ConfigError(f"dest-timeout={_config['dest-timeout']} must be well under the stun lease "
                          f"({_config['lease']} s): a destination request must never hold a stun past it")


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork() -> None:
    # Threads start after nbdkit has (maybe) forked, or they would be lost in the parent.
    global _vm, _server
    remote = NbdOptions(_config["tls-certificates"], _config["tls-psk-file"], _config["dest-timeout"],
                        _config["source-timeout"])
    _vm = VM(_config["vm"], _config["disks"], _config["lease"], _config["state"], remote)
    _server = ControlServer(_config["control"], _vm.handle, on_close=_vm.connection_closed)
    _server.start()


def cleanup() -> None:
    if _server is not None:
        _server.stop()
    if _vm is not None:
        _vm.close()


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    return [(name, f"disk {name} of VM {_vm.name}") for name in _vm.disks]


def default_export(readonly: bool, is_tls: bool) -> str:
    return next(iter(_vm.disks))


class Handle:
    """One client connection to one disk, and the Python thread states its worker threads pinned."""

    __slots__ = ("disk", "pinned")

    def __init__(self, disk):
        self.disk = disk
        self.pinned = PinnedThreadStates()


def open(readonly: bool) -> Handle:
    name = nbdkit.export_name() or next(iter(_vm.disks))
    disk = _vm.disks.get(name)
    if disk is None:
        nbdkit.set_error(errno.ENOENT)
        raise LookupError(f"no disk {name!r} in VM {_vm.name}; exports: {', '.join(_vm.disks)}")
    return Handle(disk)


def close(h: Handle) -> None:
    # nbdkit has joined this connection's worker threads: their pinned Python thread states can go.
    h.pinned.release()


def get_size(h: Handle) -> int:
    return h.disk.size


def can_write(h: Handle) -> bool:
    return True


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return True


def can_zero(h: Handle) -> bool:
    return True


def can_fast_zero(h: Handle) -> bool:
    return True


def can_fua(h: Handle) -> int:
    return nbdkit.FUA_NATIVE


def can_multi_conn(h: Handle) -> bool:
    # Safe: every connection shares one fd per side, so a flush on any connection covers all.
    return True


def can_extents(h: Handle) -> bool:
    return True


def can_cache(h: Handle) -> int:
    return nbdkit.CACHE_NONE


def pread(h: Handle, buf: bytearray, offset: int, flags: int) -> None:
    _call(h, h.disk.pread, buf, offset)


def pwrite(h: Handle, buf: bytes, offset: int, flags: int) -> None:
    # _call inlined: the guest's hot path (benchmark case 7) pays no extra call and no *args.
    h.pinned.pin()
    gate = _vm.gate
    gate.enter()
    try:
        h.disk.pwrite(buf, offset, flags & FLAG_FUA != 0)
    except OSError as err:
        nbdkit.set_error(err.errno if err.errno in NBD_ERRNOS else errno.EIO)
        raise
    finally:
        gate.leave()


def flush(h: Handle, flags: int) -> None:
    _call(h, h.disk.flush)


def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    _call(h, h.disk.trim, count, offset, bool(flags & nbdkit.FLAG_FUA))


def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    _call(h, h.disk.zero, count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM),
          bool(flags & nbdkit.FLAG_FAST_ZERO), bool(flags & nbdkit.FLAG_FUA))


def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    runs = _call(h, h.disk.extents, count, offset)
    return [(off, length, 0 if is_data else hole) for off, length, is_data in runs]


def _call(h: Handle, op, *args):
    """Run one disk op of connection `h` inside the stun gate; give nbdkit the source's errno."""
    h.pinned.pin()
    gate = _vm.gate
    gate.enter()
    try:
        return op(*args)
    except OSError as err:
        nbdkit.set_error(err.errno if err.errno in NBD_ERRNOS else errno.EIO)
        raise
    finally:
        gate.leave()
