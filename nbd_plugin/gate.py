"""The stun gate: holds new guest requests on every disk of a VM and drains the ones in flight.

Design notes (after nbdkit's pause filter: begin_request/end_request around each data op and a
counter of requests in flight, drained before the pause is acknowledged)
- Every data callback calls `enter()` before touching a disk and `leave()` after. While the gate
  is closed, `enter()` waits; `close()` returns once the in-flight count reaches zero, and from
  then on no guest IO touches any disk of the VM until `open()`.
- What the guest feels is measured here: each held request notes when it arrived. All held
  requests are released together, so the earliest arrival waited longest; `open()` reports that
  wait, the number held, and how long the drain took. A request still held when a second stun
  closes the gate right after `open()` counts as held by that stun too, from that stun's start.
- Nothing is failed or reordered: held requests simply proceed after `open()` in whatever order
  the scheduler wakes them, which NBD allows for requests in flight together.
- The open gate costs no lock. Tokens live in two lists; `list.append` and `list.pop` are single
  atomic steps under the GIL (this relies on the GIL: a free-threaded build needs atomics).
  `_in_flight` holds a token per request from its arrival to its end, *including* one that has
  not yet looked at the gate; `_inside` holds a token per request that has seen the gate open and
  may be doing IO. A request's `_inside` token lies within its `_in_flight` one (taken after,
  dropped before), so an empty `_in_flight` means an empty `_inside`.
- The drain (Dekker handshake): `enter()` takes its `_in_flight` token *then* looks at `_closed`;
  `close()` sets `_closed` *then* counts `_in_flight`. Either the request sees the gate closed
  (takes its token back and waits under the lock) or `close()` sees the token (and waits for it).
  `leave()` and a request taking its token back drop it *then* look at `_closed` to wake a
  waiting `close()`: the same two orders, so the wake-up cannot be lost.
- `open()` asserts the true invariant: no `_inside` token. `_in_flight` may hold tokens then:
  requests that arrived under the closed gate and have not yet looked at `_closed` or taken
  their token back. They are not inside: when they look they see closed (and wait) or, after
  `open()`, open (and enter, legitimately). Why `_inside` is empty: every `_inside` token was
  taken after its request saw `_closed` false, either lock-free before `close()` set it (so its
  `_in_flight` token was there when `close()` counted, and `close()` returned only once the
  request had left) or under the lock (the same, since `close()` sets `_closed` under the lock
  and the request takes its `_in_flight` token in that same hold). From a complete drain until
  `open()`, `_closed` stays true, so no request can take an `_inside` token. A `DrainTimeout`
  opens the gate again with requests still inside; the next `close()` counts and drains them.
- `open()` releases the held requests before it checks, so even a broken invariant never leaves
  the guest held (the lease expiry path relies on this).
- The condition's lock protects the held-request bookkeeping and every wait and wake-up.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass


class DrainTimeout(Exception):
    """In-flight requests did not finish in time; the gate was opened again."""


@dataclass
class GateRelease:
    held_requests: int
    max_wait_seconds: float


class StunGate:
    """Entry gate for the data path of one VM.

    Example: `gate.close(timeout=2.0); ...install mirror...; gate.open()`
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._closings = 0  # how many times the gate closed: a held request tells stuns apart
        self._in_flight: list[None] = []  # one token per request from its arrival to its end
        self._inside: list[None] = []     # one token per request that saw the gate open
        self._held = 0
        self._first_held_at: float | None = None

    def enter(self) -> None:
        """Called by every data request before it touches a disk."""
        self._in_flight.append(None)
        if self._closed:
            self._wait_while_closed()
        self._inside.append(None)

    def _wait_while_closed(self) -> None:
        """Hold the request until the gate opens; return with its in-flight token taken again."""
        self._drop_token()  # close() may be waiting for it
        with self._cond:
            while self._closed:
                self._held += 1
                if self._first_held_at is None:
                    self._first_held_at = time.monotonic()
                closing = self._closings
                # Until this stun ends: open() (or a DrainTimeout) clears _closed, and a close()
                # that wins the lock right after open() shows up as a new closing.
                while self._closed and self._closings == closing:
                    self._cond.wait()
            self._in_flight.append(None)  # under the lock: close() cannot be counting meanwhile

    def leave(self) -> None:
        self._inside.pop()
        self._drop_token()

    def _drop_token(self) -> None:
        self._in_flight.pop()
        if self._closed and not self._in_flight:
            with self._cond:
                self._cond.notify_all()

    def close(self, timeout: float) -> float:
        """Hold new requests and wait for in-flight ones; return the drain time in seconds."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            assert not self._closed, "the gate is already closed"
            self._closed = True
            self._closings += 1
            self._held = 0
            self._first_held_at = None
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._closed = False
                    self._cond.notify_all()
                    raise DrainTimeout(f"{len(self._in_flight)} requests still in flight after {timeout:.3f} s")
                self._cond.wait(left)
            return time.monotonic() - start

    def open(self) -> GateRelease:
        """Release every held request; report how many waited and the longest wait."""
        with self._cond:
            assert self._closed, "the gate is not closed"
            inside = len(self._inside)  # read while closed: once open, requests enter legitimately
            now = time.monotonic()
            wait = now - self._first_held_at if self._first_held_at is not None else 0.0
            release = GateRelease(self._held, wait)
            self._closed = False
            self._cond.notify_all()
        # Must be zero (see the design notes); checked after the release so the guest goes on.
        assert inside == 0, f"{inside} requests inside a closed, drained gate"
        return release

    @property
    def closed(self) -> bool:
        return self._closed
