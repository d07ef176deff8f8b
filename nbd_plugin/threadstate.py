"""Python thread states pinned to nbdkit's worker threads, and reaped once those threads exit.

Design notes
- Why: nbdkit's python plugin wraps every callback in PyGILState_Ensure/PyGILState_Release. A
  worker thread that nbdkit created has no Python thread state between callbacks, so every
  request creates one and destroys it again: a calloc, a 16 KiB frame stack that CPython 3.11
  maps with mmap, an munmap (which shoots down TLBs on every CPU), a gettid. `perf trace` of a
  max-rate 4 KiB writer showed one mmap/munmap pair per request; pinning took the same mirror
  node from about 13k to about 45k write IOPS (benchmarks/ANALYSIS.md has the measured runs).
- How: the first data callback on a worker thread calls PyGILState_Ensure once more and never
  releases it. The thread's count then never drops to zero, nbdkit's own Release at the end of
  each callback only gives up the GIL, and the state lives on between callbacks.
- Reaping: nbdkit ends a connection's worker threads when the connection closes, and their
  pinned states would stay behind (about 17 KiB each). `reap()` clears and deletes the state of
  every pinned thread whose tid has left /proc/self/task. That is a fact about the thread, not a
  guess about nbdkit's order of joining threads and calling `close`; a state whose thread is
  still running is left for a later reap.
- Thread idents (pthread_t) are reused by new threads; a reused ident finds the dead thread's
  entry, skips pinning until that entry is reaped, and pins on its next callback after that.
"""
from __future__ import annotations

import ctypes
import os
import threading

_api = ctypes.pythonapi
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]


class PinnedThreadStates:
    """The pinned state of every worker thread that has served a request, by thread ident.

    Example: `states.pin()` first thing in every data callback; `states.reap()` in `close`.
    Both run with the GIL held (inside nbdkit callbacks), which is what guards the dict."""

    def __init__(self) -> None:
        self._pinned: dict[int, tuple[int, int]] = {}  # ident -> (tid, PyThreadState*)

    def pin(self) -> None:
        ident = threading.get_ident()
        if ident in self._pinned:
            return
        _api.PyGILState_Ensure()
        self._pinned[ident] = (threading.get_native_id(), _api.PyThreadState_Get())

    def reap(self) -> int:
        """Delete the states of pinned threads that have exited; return how many."""
        alive = {int(tid) for tid in os.listdir("/proc/self/task")}
        dead = [ident for ident, (tid, _) in self._pinned.items() if tid not in alive]
        for ident in dead:
            _, state = self._pinned.pop(ident)
            _api.PyThreadState_Clear(state)
            _api.PyThreadState_Delete(state)
        return len(dead)

    def __len__(self) -> int:
        return len(self._pinned)
