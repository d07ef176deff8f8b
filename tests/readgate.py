"""A read gate on files (fanotify permission events): a test acts inside another process's read.

Design notes
- `ReadGate(paths, before_read)` marks each path with FAN_ACCESS_PERM: every read() of it, by
  any process, waits in the kernel until the gate answers. A thread of the test reads each
  event, calls `before_read(path, pid)` and then allows the read, so `before_read` runs after the
  reader opened and stat'ed the file and before its read returns data: a forced interleaving
  with a real process on a real file system, nothing mocked.
- The gate always answers (allow, in a finally), and `close()` stops the thread and closes the
  fanotify group; the kernel allows whatever is still pending then, so a failing test never
  leaves a reader hanging.
- Needs CAP_SYS_ADMIN and CONFIG_FANOTIFY_ACCESS_PERMISSIONS (the tests run as root here).
  Reads through the event's own descriptor do not raise events; the gate never reads the files.
"""
from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from pathlib import Path
from typing import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]

FAN_CLOEXEC = 0x01
FAN_CLASS_CONTENT = 0x04
FAN_MARK_ADD = 0x01
FAN_ACCESS_PERM = 0x0002_0000
FAN_ALLOW = 0x01
AT_FDCWD = -100
_EVENT = struct.Struct("=IBBHQii")      # struct fanotify_event_metadata
_RESPONSE = struct.Struct("=iI")        # struct fanotify_response


class ReadGate:
    """Run `before_read(path, pid)` inside every read of `paths`, before the read returns data."""

    def __init__(self, paths: list[Path], before_read: Callable[[Path, int], None]):
        self._before_read = before_read
        self._fd = _libc.fanotify_init(FAN_CLOEXEC | FAN_CLASS_CONTENT, os.O_RDONLY)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        self._inodes: dict[tuple[int, int], Path] = {}
        try:
            for path in paths:
                if _libc.fanotify_mark(self._fd, FAN_MARK_ADD, FAN_ACCESS_PERM, AT_FDCWD, os.fsencode(path)) < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"fanotify_mark {path}: {os.strerror(err)}")
                st = os.stat(path)
                self._inodes[(st.st_dev, st.st_ino)] = path
        except BaseException:
            os.close(self._fd)
            raise
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-gate", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        os.close(self._fd)

    def __enter__(self) -> "ReadGate":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._fd], [], [], 0.1)[0]:
                continue
            data = os.read(self._fd, 64 * _EVENT.size)
            for offset in range(0, len(data), _EVENT.size):
                event_len, _, _, _, _, fd, pid = _EVENT.unpack_from(data, offset)
                assert event_len == _EVENT.size
                try:
                    st = os.fstat(fd)
                    path = self._inodes.get((st.st_dev, st.st_ino))
                    if path is not None:
                        self._before_read(path, pid)
                except BaseException as err:      # reported by the test; the read goes on
                    self.errors.append(err)
                finally:
                    os.write(self._fd, _RESPONSE.pack(fd, FAN_ALLOW))
                    os.close(fd)
