"""Chunk locks (nbd_plugin/chunklock.py) against a model, with real threads, deterministically.

Every request for a chunk range runs in its own thread and holds its range (`ChunkLocks.hold`)
until the test releases it. The model is the list of held ranges and the list of blocked
requests. After each step the test waits until the real locks have *settled*: every request
either holds its range or sits in `wait()` (the locks' own count of waiters says so), and the
held ranges are exactly the model's. Nothing is judged by a sleep, so a pass is never luck:
- a request whose range overlaps a held one must be waiting (never two overlapping holders);
- first come, first served: a request whose range overlaps one held, or one waiting ahead of it
  in line, waits; any other request gets its range at once (no needless wait, no lost wake-up:
  after a release, every waiting request that no longer overlaps anything held or ahead of it
  must go on). The line makes the outcome of every step deterministic, as Hypothesis needs; one
  release may still wake several waiters at once, each of which must then go on.
"""
from __future__ import annotations

import threading
import time

from hypothesis import Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbd_plugin.chunklock import ChunkLocks

CHUNKS = 12           # few chunks, so that ranges overlap often
MAX_BLOCKED = 3
SETTLE_S = 3.0        # a request reaches its wait() in microseconds: only a broken lock waits this long


def overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


class Request:
    """A thread that holds chunks first..last from when it gets them until `release()`."""

    def __init__(self, locks: ChunkLocks, first: int, last: int, seq: int) -> None:
        self.range = (first, last)
        self.seq = seq                   # arrival order
        self.holding = threading.Event()
        self.let_go = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(locks,), daemon=True,
                                       name=f"chunks-{first}-{last}")
        self.thread.start()

    def _run(self, locks: ChunkLocks) -> None:
        with locks.hold(*self.range):
            self.holding.set()
            self.let_go.wait()

    def release(self) -> None:
        """Let go of the range and wait until the release has happened."""
        self.let_go.set()
        self.thread.join(SETTLE_S)
        assert not self.thread.is_alive(), f"{self.range}: release did not return"


class ChunkLocksMachine(RuleBasedStateMachine):
    locks: ChunkLocks
    held: list[Request]
    blocked: list[Request]
    arrivals: int

    @initialize()
    def make(self) -> None:
        self.locks = ChunkLocks()
        self.held, self.blocked = [], []
        self.arrivals = 0

    def settle(self) -> None:
        """Wait until every request holds its range or waits in the lock; move holders to `held`."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            for request in [r for r in self.blocked if r.holding.is_set()]:
                self.blocked.remove(request)
                self.held.append(request)
            # In arrival order, whatever order the threads woken by one release got their ranges
            # in: the rules draw from `held`, and Hypothesis replays a case only if it is the same.
            self.held.sort(key=lambda r: r.seq)
            with self.locks._cond:
                real, waiting = sorted(self.locks._held), len(self.locks._line)
            model = sorted(r.range for r in self.held)
            due = self.due()
            if real == model and waiting == len(self.blocked) and not due:
                return
            assert time.monotonic() < deadline, (
                f"not settled after {SETTLE_S} s: held {real} (model {model}), {waiting} waiting, "
                f"blocked {[r.range for r in self.blocked]}, of which due to go on: {due}")
            time.sleep(0.0005)

    def due(self) -> list[tuple[int, int]]:
        """The blocked requests that must go on now: nothing held or ahead in line overlaps them."""
        held = [r.range for r in self.held]
        ahead: list[tuple[int, int]] = []
        due = []
        for request in self.blocked:      # in arrival order, as the line is
            if not any(overlaps(request.range, other) for other in held + ahead):
                due.append(request.range)
            ahead.append(request.range)
        return due

    @precondition(lambda self: len(self.blocked) < MAX_BLOCKED)
    @rule(first=st.integers(0, CHUNKS - 1), length=st.integers(1, 4))
    def request(self, first: int, length: int) -> None:
        wanted = (first, min(first + length - 1, CHUNKS - 1))
        busy = any(overlaps(wanted, r.range) for r in self.held + self.blocked)
        request = Request(self.locks, *wanted, seq=self.arrivals)
        self.arrivals += 1
        self.blocked.append(request)
        self.settle()
        if busy:
            assert request in self.blocked, f"{wanted} was granted while {self.held_ranges()} were held"
        else:
            assert request in self.held, (f"{wanted} overlaps nothing held ({self.held_ranges()}) or waiting "
                                          f"but waited")

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.held), label="release")
        self.held.remove(request)
        request.release()
        self.settle()

    def held_ranges(self) -> list[tuple[int, int]]:
        return [r.range for r in self.held]

    @invariant()
    def no_two_holders_overlap(self) -> None:
        ranges = self.held_ranges()
        for i, a in enumerate(ranges):
            for b in ranges[i + 1:]:
                assert not overlaps(a, b), f"{a} and {b} are held at once"
        assert self.locks.in_flight() == len(ranges)

    def teardown(self) -> None:
        """Let every request go, even after a failure: a blocked one gets its range, then lets go."""
        requests = getattr(self, "held", []) + getattr(self, "blocked", [])
        for request in requests:
            request.let_go.set()
        for request in requests:
            request.thread.join(SETTLE_S)


# No shrinking: with a broken lock every replay of a failing case waits SETTLE_S at least once,
# and a run of 25 steps is short enough to read as it is.
ChunkLocksMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, derandomize=True,
                                               deadline=None, database=None,
                                               phases=[Phase.explicit, Phase.reuse, Phase.generate])
TestChunkLocksAgainstModel = ChunkLocksMachine.TestCase
