"""Pinned Python thread states (nbd_plugin/threadstate.py): no thread state is built per request.

Without pinning, nbdkit's python plugin creates and destroys a Python thread state around every
callback, and CPython 3.11 maps and unmaps a frame stack for each one: one munmap per request.
The test counts the node's munmap calls (strace) while a connection writes, after many earlier
connections have come and gone, so it fails both when nothing is pinned and when the states of
exited threads are never reaped (new worker threads reuse the dead ones' idents and would then
go unpinned).
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import nbd

MiB = 1 << 20
DEPTH = 16  # requests in flight: as many as nbdkit has workers per connection
BLOCK = 4096


def write_bursts(uri: str, bursts: int) -> int:
    """One connection writing `bursts` x DEPTH blocks with DEPTH in flight; the request count."""
    block = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * BLOCK))
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(bursts):
        for i in range(DEPTH):
            h.aio_pwrite(block, i * BLOCK)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    h.shutdown()
    return bursts * DEPTH


def munmap_calls_during(pid: int, work) -> int:
    """munmap calls made by every thread of `pid` (and threads it starts) while `work()` runs."""
    tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=munmap", "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # strace attaches to every existing thread before the work starts
        work()
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            _, summary = tracer.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            tracer.kill()     # never leave strace attached to the server
            tracer.communicate()
            raise
    match = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?munmap$", summary, re.M)
    return int(match.group(1)) if match else 0


def test_worker_threads_keep_their_python_thread_state(tmp_path: Path, testlib, start_mirror_node) -> None:
    node = start_mirror_node({"disk0": testlib.make_dense_image(tmp_path / "disk0.raw", 4 * MiB)})
    for _ in range(30):  # connections come and go; their workers' states must be reaped
        write_bursts(node.uri(), 2)
    requests = 0

    def work() -> None:
        nonlocal requests
        requests = write_bursts(node.uri(), 100)

    unmaps = munmap_calls_during(node.proc.pid, work)
    # Pinned: a handful (allocator housekeeping). Unpinned: one or more per request.
    assert requests == 1600
    assert unmaps < requests // 10, f"{unmaps} munmap calls for {requests} requests"
