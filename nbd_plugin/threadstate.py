"""Python thread states pinned to the threads that serve one nbdkit connection, released at its close.

Design notes
- Why: nbdkit's python plugin wraps every callback in PyGILState_Ensure/PyGILState_Release. A
  worker thread that nbdkit created has no Python thread state between callbacks, so every
  request creates one and destroys it again: a calloc, a 16 KiB frame stack that CPython 3.11
  maps with mmap, an munmap (which shoots down TLBs on every CPU), a gettid. `perf trace` of a
  max-rate 4 KiB writer showed one mmap/munmap pair per request; pinning took the same mirror
  node from about 13k to about 45k write IOPS (benchmarks/ANALYSIS.md has the measured runs).
- How: the first data callback on a thread calls PyGILState_Ensure once more and never
  releases it. The thread's count then never drops to zero, nbdkit's own Release at the end of
  each callback only gives up the GIL, and the state lives on between callbacks.
- Whose states: a connection's. An nbdkit worker thread serves one connection for its whole
  life (server/connections.c: `connection_worker` loops on its connection until the client is
  done), so the pinned states are kept per connection, in the handle `open` returned.
- When they go: in that connection's `close`. nbdkit calls `.close` only after it has joined
  every worker thread of the connection (`handle_single_connection`: pthread_join of each
  worker, then `backend_finalize`, then `free_connection`, which calls `.close`). A joined
  thread runs no more code, so nothing can use its state any more: PyThreadState_Clear and
  PyThreadState_Delete from the closing thread, under the GIL, are then what the thread's own
  last PyGILState_Release would have done. With one worker (`--threads 1`) nbdkit serves the
  requests on the connection thread itself, the one that runs `.close`: that state is still
  current, so it is unpinned with the matching PyGILState_Release instead, and nbdkit's own
  Release at the end of `close` deletes it.
- Nothing else still points at a joined thread's state in a way that matters (CPython 3.11,
  pystate.c and ceval_gil.h): its autoTSSkey slot went with the thread (glibc clears a thread's
  keys when it exits, and a reused pthread descriptor starts with none); the runtime's current
  state is NULL, since the thread gave up the GIL at the end of its last callback; and
  `gil->last_holder` is only ever compared with other states, never dereferenced.
- Never by thread liveness. The first version reaped, in any connection's `close`, the states
  of threads whose tid had left /proc/self/task. The listing and the dict were read at two
  moments with the GIL released in between (os.listdir), so a thread started after the listing
  that pinned meanwhile was judged dead: its state was cleared and freed while it ran. nbdkit
  then died within a second of connection churn (SIGSEGV in PyEval_RestoreThread and
  _PyEval_EvalFrameDefault, or `Fatal Python error: take_gil: PyMUTEX_LOCK(gil->mutex) failed`
  when take_gil found a freed tstate->interp); tests/plugin/test_threadstate.py reproduces it.
- "Is this thread pinned?" is a threading.local flag, not a dict by thread ident. The flag lives
  in the thread state's own dict, so it exists exactly as long as the pinned state: a new
  thread that gets a dead thread's ident (glibc reuses them at once) starts unpinned.
"""
from __future__ import annotations

import ctypes
import threading

PyGILState_LOCKED = 0  # CPython's enum value: the thread already held the GIL at Ensure

_api = ctypes.pythonapi
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Release.argtypes = [ctypes.c_int]
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]

_this_thread = threading.local()  # .pinned: True once this thread's state is pinned


class PinnedThreadStates:
    """The pinned Python thread states of the threads serving one nbdkit connection.

    Example: `h.pinned = PinnedThreadStates()` in `open`; `h.pinned.pin()` first thing in every
    data callback; `h.pinned.release()` in `close`. Both run with the GIL held (inside nbdkit
    callbacks), which is what guards the list.
    """

    def __init__(self) -> None:
        self._states: list[int] = []  # PyThreadState* of each pinned thread

    def pin(self) -> None:
        if getattr(_this_thread, "pinned", False):
            return
        # Inside a callback the thread holds the GIL: Ensure only counts up (PyGILState_LOCKED).
        _api.PyGILState_Ensure()
        _this_thread.pinned = True
        self._states.append(_api.PyThreadState_Get())

    def release(self) -> int:
        """Unpin every state of this connection (in `close`: its workers are joined); return how many."""
        current = _api.PyThreadState_Get()
        for state in self._states:
            if state == current:
                del _this_thread.pinned
                _api.PyGILState_Release(PyGILState_LOCKED)
            else:
                _api.PyThreadState_Clear(state)
                _api.PyThreadState_Delete(state)
        released = len(self._states)
        self._states.clear()
        return released

    def __len__(self) -> int:
        return len(self._states)
