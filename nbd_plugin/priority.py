"""Background work (the copier, the destination write-back) runs at a lower CPU priority than
the threads that serve the guest.

Design notes
- Why: buffered writes to one file serialize on its inode lock, and the kernel may reschedule a
  writer while it holds that lock (cond_resched in generic_perform_write). When the copier or
  the write-back competes for the CPU at equal priority, a preempted guest writer keeps every
  other guest write to the file queued behind it for a whole time slice. Off-CPU profiles of
  a 20 MB/s guest during the copy and flush_dest showed almost all of its waits there
  (rwsem_down_write_slowpath < ext4_buffered_write_iter). At nice 19 the background thread
  still gets every idle cycle but yields at once to a guest thread that wakes up.
- Linux applies nice per thread (setpriority on a tid), so nothing else in nbdkit changes.
  A thread's nice is only ever raised here, never lowered again (that needs CAP_SYS_NICE),
  so background work runs on threads of its own.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

BACKGROUND_NICE = 19

T = TypeVar("T")


def lower_this_thread() -> None:
    """Move the calling thread to background priority (for a thread that does only background work)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def run_in_background(work: Callable[[], T], name: str) -> T:
    """Run `work` on a background-priority thread of its own, wait for it, return or raise its result."""
    outcome: dict[str, object] = {}

    def body() -> None:
        lower_this_thread()
        try:
            outcome["value"] = work()
        except BaseException as err:  # handed to the caller below, on its own thread
            outcome["error"] = err

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
