"""Per-disk counters and the guest write latency histogram, read by the agent through `status`.

Design notes
- Counters are cumulative for the life of the nbdkit process, so the agent can export them as
  Prometheus counters without keeping state of its own.
- `+=` on a Python attribute is not atomic across threads. The guest-write figures, counted on
  every request by every worker thread, are sharded per thread instead of locked: each thread
  adds to its own shard only, and `snapshot()` sums them. (A shared lock here was the largest
  single item in the profile of max-rate 4 KiB writes, at 13% of the plugin's GIL time.)
  A shard survives its thread; a new thread that gets a dead one's ident carries on with it.
- The lock protects every other counter and the error table: those change per copied run, per
  mirrored write or per error, not per guest request.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from threading import get_ident
from typing import Any

# Upper bounds in seconds: fine enough to tell a 50 us passthrough write from a 5 ms stalled one.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _WriteShard:
    """One thread's share of a disk's guest-write figures; only that thread ever changes it."""

    __slots__ = ("written_bytes", "latency_counts", "latency_sum")

    def __init__(self) -> None:
        self.written_bytes = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0


class DiskStats:
    """What happened on one disk: bytes by kind, errors by side and op, write latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shards: dict[int, _WriteShard] = {}  # thread ident -> that thread's guest writes
        self.dirtied_bytes = 0
        self.dest_written_bytes = 0
        self.copied_bytes = {"bulk": 0, "dirty": 0, "load": 0}
        self.errors: dict[str, int] = {}
        self.overflow_bytes = 0          # async updates left to the copier (sender.py)
        self.throttled_seconds = 0.0     # guest updates' time in the throttle (mirror.py)
        self.throttled_requests = 0

    def guest_write(self, nbytes: int, seconds: float) -> None:
        shard = self._shards.get(get_ident())
        if shard is None:  # dict.setdefault is one atomic step under the GIL
            shard = self._shards.setdefault(get_ident(), _WriteShard())
        shard.written_bytes += nbytes
        shard.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        shard.latency_sum += seconds

    def dirtied(self, nbytes: int) -> None:
        with self._lock:
            self.dirtied_bytes += nbytes

    def dest_written(self, nbytes: int) -> None:
        with self._lock:
            self.dest_written_bytes += nbytes

    def overflowed(self, nbytes: int) -> None:
        with self._lock:
            self.overflow_bytes += nbytes

    def throttled(self, seconds: float) -> None:
        with self._lock:
            self.throttled_seconds += seconds
            self.throttled_requests += 1

    def copied(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.copied_bytes[kind] += nbytes
            self.dest_written_bytes += nbytes

    def error(self, side: str, op: str) -> None:
        key = f"{side}:{op}"
        with self._lock:
            self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        shards = list(self._shards.values())
        counts = [sum(column) for column in zip(*(s.latency_counts for s in shards))] or \
            [0] * (len(LATENCY_BUCKETS) + 1)
        cumulative, total = [], 0
        for n in counts:
            total += n
            cumulative.append(total)
        with self._lock:
            return {
                "guest_written_bytes": sum(s.written_bytes for s in shards),
                "dirtied_bytes": self.dirtied_bytes,
                "dest_written_bytes": self.dest_written_bytes,
                "copied_bytes": dict(self.copied_bytes),
                "errors": dict(self.errors),
                "throttled_seconds": self.throttled_seconds,
                "throttled_requests": self.throttled_requests,
                "write_latency": {"le": list(LATENCY_BUCKETS) + ["+Inf"], "counts": cumulative,
                                  "sum": sum(s.latency_sum for s in shards), "count": total},
            }
