"""Open-loop guest writer over libnbd: every request's latency counted from its SCHEDULED send time.

Design notes
- Open loop: in rate mode request i is due at t0 + i * bs / rate whatever happened before it.
  When the server stalls (a stun) the queue depth fills, due requests pile up in our backlog,
  and each one's latency still runs from its due time. A closed-loop writer would simply stop
  asking and report a few slow requests; this one reports what a guest with a steady stream
  of writes feels, including the catch-up after the stall.
- Max-rate mode (`--rate 0`): every free slot is refilled at once; a request is "due" when its
  slot became free, so latency there is plain service time plus our own loop time.
- One process, one thread, libnbd's non-blocking API driven by select() over every
  connection's fd (select takes a microsecond timeout; poll would round to milliseconds).
  It runs as its own process so the harness's control calls never hold its GIL.
- Timestamps are time.monotonic(), which is CLOCK_MONOTONIC on Linux and therefore comparable
  with the harness's timestamps of stun/switchover calls in another process.
- Output: PREFIX.bin holds (due, sent, done) float64 triples per request in issue order
  (done = NaN if it never completed), PREFIX.json the run's parameters and error count.
  `Trace` loads both and answers the questions the cases ask (window max wait, throughput).

Run: `python -m benchmarks.loadgen --uri 'nbd+unix:///disk0?socket=S' --rate 20000000 --qd 8
--out /tmp/run1` and stop it with SIGTERM (or give --duration). It prints `ready` once connected.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Sequence

import nbd

DRAIN_SECONDS = 15.0
MAX_SELECT_WAIT = 0.1


class OpenLoopWriter:
    """Writes `bs`-byte blocks at random aligned offsets over several NBD connections."""

    def __init__(self, uris: Sequence[str], bs: int, qd: int, rate: float, span: int, seed: int,
                 tls_certificates: str | None = None):
        self.bs = bs
        self.qd = qd
        self.interval = bs / rate if rate > 0 else 0.0
        self.handles: list[nbd.NBD] = []
        self.blocks: list[int] = []
        for uri in uris:
            h = nbd.NBD()
            if tls_certificates:   # libnbd takes no certificate directory from a URI by default
                h.set_tls_certificates(tls_certificates)
            h.connect_uri(uri)
            self.handles.append(h)
            self.blocks.append(max(1, min(h.get_size(), span or h.get_size()) // bs))
        self.buffer = nbd.Buffer.from_bytearray(bytearray(os.urandom(bs)))
        self.in_flight = [0] * len(self.handles)
        self.rng = random.Random(seed)
        self.due = array("d")
        self.sent = array("d")
        self.done = array("d")
        self.errors = 0
        self.stopping = False
        self._next = 0  # round-robin cursor over connections

    def _complete(self, index: int, conn: int, err: object) -> int:
        self.done[index] = time.monotonic()
        self.in_flight[conn] -= 1
        if getattr(err, "value", 0):
            self.errors += 1
        return 1  # auto-retire the command

    def _free_connection(self) -> int:
        """A connection with a free slot (round-robin), or -1 when all are at queue depth."""
        n = len(self.handles)
        for step in range(n):
            conn = (self._next + step) % n
            if self.in_flight[conn] < self.qd:
                self._next = (conn + 1) % n
                return conn
        return -1

    def _issue(self, conn: int, due: float) -> None:
        index = len(self.due)
        self.due.append(due)
        self.done.append(math.nan)
        offset = self.rng.randrange(self.blocks[conn]) * self.bs
        self.sent.append(time.monotonic())
        self.in_flight[conn] += 1
        self.handles[conn].aio_pwrite(self.buffer, offset,
                                      completion=functools.partial(self._complete, index, conn))

    def _wait(self, timeout: float) -> None:
        """Wait up to `timeout` s for socket readiness and let libnbd make progress."""
        readers, writers = [], []
        by_fd = {}
        for h in self.handles:
            fd = h.aio_get_fd()
            by_fd[fd] = h
            direction = h.aio_get_direction()
            if direction & nbd.AIO_DIRECTION_READ:
                readers.append(fd)
            if direction & nbd.AIO_DIRECTION_WRITE:
                writers.append(fd)
        ready_r, ready_w, _ = select.select(readers, writers, [], max(0.0, timeout))
        for fd in ready_r:
            by_fd[fd].aio_notify_read()
        for fd in ready_w:
            by_fd[fd].aio_notify_write()

    def run(self, duration: float) -> tuple[float, float]:
        """Write until `duration` elapses (0 = until stopping is set), then drain; (start, end)."""
        start = time.monotonic()
        next_due = start
        end = start + duration if duration > 0 else math.inf
        while not self.stopping and time.monotonic() < end:
            now = time.monotonic()
            if self.interval:
                while next_due <= now:
                    conn = self._free_connection()
                    if conn < 0:
                        break  # backlog: the due time stays, its latency keeps running
                    self._issue(conn, next_due)
                    next_due += self.interval
                slot_free = min(self.in_flight) < self.qd
                timeout = next_due - time.monotonic() if slot_free else MAX_SELECT_WAIT
            else:
                while (conn := self._free_connection()) >= 0:
                    self._issue(conn, time.monotonic())
                timeout = MAX_SELECT_WAIT
            self._wait(min(timeout, MAX_SELECT_WAIT))
        stopped = time.monotonic()
        while sum(self.in_flight) and time.monotonic() < stopped + DRAIN_SECONDS:
            self._wait(MAX_SELECT_WAIT)
        return start, stopped

    def close(self) -> None:
        for h in self.handles:
            try:
                h.shutdown()
            except nbd.Error:
                pass  # the server may already be gone at the end of a case
        self.handles.clear()  # libnbd 1.14 frees a handle when its last reference goes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0])
    ap.add_argument("--uri", action="append", required=True, help="NBD URI; repeat for more connections")
    ap.add_argument("--bs", type=int, default=4096, help="write size in bytes")
    ap.add_argument("--qd", type=int, default=8, help="queue depth per connection")
    ap.add_argument("--rate", type=float, default=0, help="bytes/s over all connections; 0 = as fast as possible")
    ap.add_argument("--span", type=int, default=0, help="write within the first SPAN bytes (0 = whole disk)")
    ap.add_argument("--duration", type=float, default=0, help="seconds; 0 = until SIGTERM")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True, help="output prefix: PREFIX.bin and PREFIX.json")
    ap.add_argument("--tls-certificates", help="directory with ca-cert.pem, client-cert.pem, "
                    "client-key.pem, for nbds:// URIs")
    args = ap.parse_args(argv)

    writer = OpenLoopWriter(args.uri, args.bs, args.qd, args.rate, args.span, args.seed, args.tls_certificates)

    def stop(_signum: int, _frame: object) -> None:
        writer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    failure = None
    start = stopped = time.monotonic()
    try:
        start, stopped = writer.run(args.duration)
    except nbd.Error as e:
        # The server went away mid-run: keep the trace so far, say why, exit non-zero.
        failure = f"nbd: {e}"
        stopped = time.monotonic()
    finally:
        writer.close()
    records = array("d")
    for i in range(len(writer.due)):
        records.extend((writer.due[i], writer.sent[i], writer.done[i]))
    with open(args.out + ".bin", "wb") as f:
        records.tofile(f)
    meta = {"uris": args.uri, "bs": args.bs, "qd": args.qd, "rate": args.rate, "start": start,
            "stopped": stopped, "requests": len(writer.due), "errors": writer.errors,
            "failure": failure}
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f)
    return 1 if failure else 0


@dataclass
class Trace:
    """One loadgen run: per-request (due, sent, done) times and the run's parameters."""

    due: list[float]
    sent: list[float]
    done: list[float]
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, prefix: str) -> "Trace":
        records = array("d")
        with open(prefix + ".bin", "rb") as f:
            records.frombytes(f.read())
        with open(prefix + ".json") as f:
            meta = json.load(f)
        return cls(list(records[0::3]), list(records[1::3]), list(records[2::3]), meta)

    @property
    def bs(self) -> int:
        return int(self.meta["bs"])

    @property
    def errors(self) -> int:
        return int(self.meta["errors"])

    @property
    def unfinished(self) -> int:
        return sum(1 for d in self.done if math.isnan(d))

    def latencies(self, t0: float = -math.inf, t1: float = math.inf) -> list[float]:
        """Latency from due time of every completed request that was due in [t0, t1]."""
        return [d - s for s, d in zip(self.due, self.done) if t0 <= s <= t1 and not math.isnan(d)]

    def service_times(self, t0: float, t1: float) -> list[float]:
        """Send-to-completion time of every completed request sent in [t0, t1]: the server's
        latency without the writer's own backlog (which `latencies` includes)."""
        return [d - s for s, d in zip(self.sent, self.done) if t0 <= s <= t1 and not math.isnan(d)]

    def max_wait(self, t0: float, t1: float) -> float:
        """The longest latency of any request in the system at some point of [t0, t1]."""
        longest = 0.0
        for due, done in zip(self.due, self.done):
            if due <= t1 and (math.isnan(done) or done >= t0):
                longest = max(longest, (done if not math.isnan(done) else t1) - due)
        return longest

    def throughput(self, t0: float, t1: float) -> float:
        """Bytes/s of writes completed within [t0, t1]."""
        if t1 <= t0:
            return math.nan
        count = sum(1 for d in self.done if t0 <= d <= t1)
        return count * self.bs / (t1 - t0)

    def completed_bytes(self, t0: float, t1: float) -> int:
        return sum(1 for d in self.done if t0 <= d <= t1) * self.bs


class LoadGen:
    """The harness side: start the writer as a child process, stop it, load its trace."""

    def __init__(self, uris: Sequence[str], out_prefix: str, rate: float = 0, qd: int = 8,
                 bs: int = 4096, span: int = 0, seed: int = 1, tls_certificates: str | None = None):
        self.out_prefix = out_prefix
        self.argv = [sys.executable, "-m", "benchmarks.loadgen", "--bs", str(bs), "--qd", str(qd),
                     "--rate", str(int(rate)), "--span", str(span), "--seed", str(seed),
                     "--out", out_prefix]
        if tls_certificates:
            self.argv += ["--tls-certificates", tls_certificates]
        for uri in uris:
            self.argv += ["--uri", uri]
        self.proc: subprocess.Popen[str] | None = None

    @property
    def command(self) -> str:
        return "python -m benchmarks.loadgen " + " ".join(
            a if " " not in a else repr(a) for a in self.argv[3:])

    def start(self, timeout: float = 20.0) -> "LoadGen":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, cwd=root)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"loadgen did not start ({self.command}); it said {line!r}")
        return self

    def stop(self, timeout: float = DRAIN_SECONDS + 10) -> Trace:
        """SIGTERM the writer, wait for it to drain and write its trace, and load the trace."""
        assert self.proc is not None, "loadgen not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"loadgen did not stop within {timeout:.0f}s: {self.command}")
        if rc != 0:
            raise RuntimeError(f"loadgen exited with status {rc}: {self.command}")
        return Trace.load(self.out_prefix)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "LoadGen":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


if __name__ == "__main__":
    sys.exit(main())
