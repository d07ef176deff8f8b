"""Pinned Python thread states (nbd_plugin/threadstate.py): built once per worker thread, freed at close.

- Without pinning, nbdkit's python plugin creates and destroys a Python thread state around every
  callback, and CPython 3.11 maps and unmaps a frame stack for each one: one munmap per request.
  The first test counts the node's munmap calls (strace) while a connection writes, after many
  earlier connections have come and gone: it fails when nothing is pinned.
- A closed connection's pinned states must be freed, or each connection would leak about 17 KiB
  per worker thread: every 16 KiB frame stack mapped while connections come and go must be
  unmapped once they have all closed (strace, one trace file per thread).
- Freeing must never touch the state of a thread that still runs. The first version freed the
  states of threads whose tid was missing from a /proc/self/task listing taken in some other
  connection's `close`, with the GIL released between the listing and its use: a worker started
  in between was judged dead and its state freed under it. nbdkit then died (SIGSEGV in
  libpython, or `Fatal Python error: take_gil: PyMUTEX_LOCK(gil->mutex) failed`) within a
  second of the churn below: connections opening while others close, up to 16 requests in
  flight, clients that vanish without NBD_CMD_DISC, the control socket polled meanwhile. The
  race is between nbdkit's own threads, so no client can force its interleaving; on the old code
  the churn test died in every run (20 of 20), after 11 to 96 connections.
- Each runs with `--threads 1` too, where nbdkit serves the requests on the connection thread
  itself and `close` must unpin the very thread it runs on.
"""
from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import nbd
import pytest

MiB = 1 << 20
DEPTH = 16  # requests in flight: as many as nbdkit has workers per connection
BLOCK = 4096
FRAME_STACK_BYTES = 16384  # CPython 3.11's data stack chunk, one mmap per thread state that ran code
CHURN_CLIENTS = 40
CHURN_SECONDS = 8.0


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


def strace_during(pid: int, work, *args: str) -> str:
    """strace's summary or messages for every thread of `pid` (and threads it starts) while `work()` runs."""
    tracer = subprocess.Popen(["strace", "-f", *args, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # strace attaches to every existing thread before the work starts
        work()
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            _, out = tracer.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # it can hang on a tracee that crashed, and keep it a zombie
            tracer.kill()
            _, out = tracer.communicate()
    return out


def munmap_calls_during(pid: int, work) -> int:
    """munmap calls made by every thread of `pid` (and threads it starts) while `work()` runs."""
    summary = strace_during(pid, work, "-c", "-e", "trace=munmap")
    match = re.search(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?munmap$", summary, re.M)
    return int(match.group(1)) if match else 0


def frame_stacks_left_mapped(pid: int, work, trace_dir: Path) -> tuple[int, int]:
    """(mapped, still mapped at the end): the 16 KiB frame stacks `pid` maps while `work()` runs.

    One trace file per thread (-ff), so no call is split across lines by another thread's.
    """
    trace_dir.mkdir()
    strace_during(pid, work, "-ff", "-o", str(trace_dir / "t"), "-e", "trace=mmap,munmap")
    maps: Counter[str] = Counter()
    unmaps: Counter[str] = Counter()
    for path in trace_dir.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            if m := re.match(rf"mmap\(NULL, {FRAME_STACK_BYTES}, .* = (0x[0-9a-f]+)$", line):
                maps[m.group(1)] += 1
            elif m := re.match(rf"munmap\((0x[0-9a-f]+), {FRAME_STACK_BYTES}\) += 0$", line):
                unmaps[m.group(1)] += 1
    return sum(maps.values()), sum(max(0, n - unmaps[address]) for address, n in maps.items())


def test_worker_threads_keep_their_python_thread_state(tmp_path: Path, testlib, start_mirror_node) -> None:
    node = start_mirror_node({"disk0": testlib.make_dense_image(tmp_path / "disk0.raw", 4 * MiB)})
    for _ in range(30):  # connections come and go; new ones must pin again
        write_bursts(node.uri(), 2)
    requests = 0

    def work() -> None:
        nonlocal requests
        requests = write_bursts(node.uri(), 100)

    unmaps = munmap_calls_during(node.proc.pid, work)
    # Pinned: a handful (allocator housekeeping). Unpinned: one or more per request.
    assert requests == 1600
    assert unmaps < requests // 10, f"{unmaps} munmap calls for {requests} requests"


@pytest.mark.parametrize("threads", [16, 1])
def test_a_closed_connection_frees_the_states_its_threads_pinned(
        tmp_path: Path, testlib, start_mirror_node, threads: int) -> None:
    node = start_mirror_node({"disk0": testlib.make_dense_image(tmp_path / "disk0.raw", 4 * MiB)},
                             threads=threads)
    connections = 20
    baseline = testlib.steady_fds_and_threads(node.proc.pid)

    def work() -> None:
        for _ in range(connections):
            write_bursts(node.uri(), 2)
        # nbdkit calls `close` after the client has gone: wait until every connection has ended.
        testlib.wait_until(lambda: testlib.fds_and_threads(node.proc.pid) == baseline, 20,
                           "the connections' threads to end", node.proc, node.log)

    mapped, left = frame_stacks_left_mapped(node.proc.pid, work, tmp_path / "strace")
    assert mapped >= connections, f"only {mapped} frame stacks in the trace: is strace's format still parsed?"
    assert left == 0, f"{left} of {mapped} frame stacks still mapped after every connection closed"


def churn(node, seconds: float) -> int:
    """CHURN_CLIENTS threads connecting, writing and disconnecting over and over while the control
    socket is polled, for `seconds` or until nbdkit exits; returns the connections made."""
    stop = threading.Event()
    made = [0] * CHURN_CLIENTS

    def client(n: int) -> None:
        rng = random.Random(n)
        block = nbd.Buffer.from_bytearray(bytearray(b"\xa5" * BLOCK))
        while not stop.is_set() and node.proc.poll() is None:
            try:
                h = nbd.NBD()
                h.connect_uri(node.uri())
                for _ in range(rng.randint(1, DEPTH)):
                    h.aio_pwrite(block, rng.randrange(1024) * BLOCK)
                # All replies in: a client gone with several in flight trips an assertion of
                # nbdkit 1.32 itself (raw_send_socket: `sock >= 0`, fixed upstream in 1.33.10).
                give_up = time.monotonic() + 20
                while h.aio_in_flight() > 0 and time.monotonic() < give_up:
                    h.poll(1000)
                if rng.random() < 0.5:
                    h.shutdown()
                del h  # closes the socket: a client that vanishes, unless it was shut down
                made[n] += 1
            except nbd.Error:
                time.sleep(0.01)

    def sampler() -> None:
        try:
            status = node.client(timeout=10)
            while not stop.is_set():
                status.call("status")
        except (OSError, ValueError):
            pass  # nbdkit gone (a closed socket or an empty reply): the assertions below say so

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CHURN_CLIENTS)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and node.proc.poll() is None:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "churn clients still running 30 s after the end"
    return sum(made)


@pytest.mark.parametrize("threads", [16, 1])
def test_connection_churn_never_frees_the_state_of_a_running_thread(
        tmp_path: Path, testlib, start_mirror_node, threads: int) -> None:
    node = start_mirror_node({"disk0": testlib.make_dense_image(tmp_path / "disk0.raw", 4 * MiB)},
                             threads=threads)
    connections = churn(node, CHURN_SECONDS)
    assert node.proc.poll() is None, \
        f"nbdkit died (status {node.proc.returncode}) after {connections} connections:\n{node.log_tail()}"
    assert "Fatal Python error" not in node.log.read_text(errors="replace"), node.log_tail()
    assert connections >= 100, f"only {connections} connections in {CHURN_SECONDS} s: the churn did not run"
