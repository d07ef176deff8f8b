"""Per-disk counters and the guest write latency histogram, read by the agent through `status`.

Design notes
- Counters are cumulative for the life of the nbdkit process, so the agent can export them as
  Prometheus counters without keeping state of its own.
- `+=` on a Python attribute is not atomic across threads, so this lock protects every counter,
  the error table and the histogram. It is held for a few bytecodes per request.
"""
from __future__ import annotations

import bisect
import threading
from typing import Any

# Upper bounds in seconds: fine enough to tell a 50 us passthrough write from a 5 ms stalled one.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DiskStats:
    """What happened on one disk: bytes by kind, errors by side and op, write latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.guest_written_bytes = 0
        self.dirtied_bytes = 0
        self.dest_written_bytes = 0
        self.copied_bytes = {"bulk": 0, "dirty": 0}
        self.errors: dict[str, int] = {}
        self._latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0

    def guest_write(self, nbytes: int, seconds: float) -> None:
        slot = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self.guest_written_bytes += nbytes
            self._latency_counts[slot] += 1
            self._latency_sum += seconds

    def dirtied(self, nbytes: int) -> None:
        with self._lock:
            self.dirtied_bytes += nbytes

    def dest_written(self, nbytes: int) -> None:
        with self._lock:
            self.dest_written_bytes += nbytes

    def copied(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.copied_bytes[kind] += nbytes
            self.dest_written_bytes += nbytes

    def error(self, side: str, op: str) -> None:
        key = f"{side}:{op}"
        with self._lock:
            self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            cumulative, total = [], 0
            for n in self._latency_counts:
                total += n
                cumulative.append(total)
            return {
                "guest_written_bytes": self.guest_written_bytes,
                "dirtied_bytes": self.dirtied_bytes,
                "dest_written_bytes": self.dest_written_bytes,
                "copied_bytes": dict(self.copied_bytes),
                "errors": dict(self.errors),
                "write_latency": {"le": list(LATENCY_BUCKETS) + ["+Inf"], "counts": cumulative,
                                  "sum": self._latency_sum, "count": total},
            }
