"""The floor of any nbdkit Python plugin: serve one file with os.pread/os.pwrite and nothing else.

Case 7 runs it beside nbdkit's C `file` plugin and the mirror node, so the summary can say how
much of the mirror node's passthrough cost is nbdkit's Python embedding (GIL, call, buffer
conversion) and how much is the mirror node's own code (stun gate, stats, dispatch). It pins
its Python thread states as the mirror node does (nbd_plugin/threadstate.py), so the floor is
the best a Python plugin does here, not the cost of building a thread state per request.

    nbdkit python benchmarks/floor_plugin.py file=IMAGE
"""
import os

import nbdkit

from nbd_plugin.threadstate import PinnedThreadStates

API_VERSION = 2
_path = None


class Handle:
    """One connection: the image's fd and the thread states its workers pinned."""

    __slots__ = ("fd", "pinned")

    def __init__(self, fd):
        self.fd = fd
        self.pinned = PinnedThreadStates()


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r}; use file=IMAGE")
    _path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return Handle(os.open(_path, os.O_RDONLY if readonly else os.O_RDWR))


def close(h):
    os.close(h.fd)
    h.pinned.release()


def get_size(h):
    return os.fstat(h.fd).st_size


def pread(h, buf, offset, flags):
    h.pinned.pin()
    buf[:] = os.pread(h.fd, len(buf), offset)


def pwrite(h, buf, offset, flags):
    h.pinned.pin()
    os.pwrite(h.fd, buf, offset)


def flush(h, flags):
    os.fdatasync(h.fd)
