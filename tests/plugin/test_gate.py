"""The stun gate's lock-free entry (nbd_plugin/gate.py) under real threads and forced GIL switches.

The gate runs inside nbdkit in production; here the same class is driven by plain threads so the
interleavings can be forced: a GIL switch interval of a microsecond makes threads change places
between almost any two bytecodes, which is where a wrong order of "take a token" and "look at
the gate" would let a request slip past a closed gate. The windows that matter are also forced
one by one: the gate's token list is instrumented to stop a request at an exact point
(`PausingTokens`) while the test runs close() or open() in the gap.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest

from nbd_plugin.gate import StunGate

WORKERS = 8


@pytest.fixture
def fast_switching():
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_no_request_is_inside_a_closed_gate_and_every_held_one_is_released(fast_switching) -> None:
    gate = StunGate()
    inside = [0]               # requests between enter() and leave(); guarded by `count`
    sealed = [False]           # close() has returned and open() not yet begun; guarded by `count`
    count = threading.Lock()
    breaches: list[int] = []
    stop = threading.Event()
    done = [0] * WORKERS

    def worker(i: int) -> None:
        while not stop.is_set():
            gate.enter()
            with count:
                inside[0] += 1
                if sealed[0]:
                    breaches.append(inside[0])
            with count:
                inside[0] -= 1
            gate.leave()
            done[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    stuns = held = 0
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            gate.close(timeout=2.0)
            with count:
                assert inside[0] == 0, f"{inside[0]} requests inside a drained gate"
                sealed[0] = True
            with count:
                sealed[0] = False
            held += gate.open().held_requests
            stuns += 1
    finally:
        stop.set()
        try:
            if gate.closed:   # an assertion above left it closed: let held workers see `stop`
                gate.open()
        finally:
            for t in threads:
                if t.ident is not None:
                    t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a request stayed held after the gate opened"
    assert not breaches, f"{len(breaches)} requests ran while the gate was closed"
    assert stuns > 50 and held > 0 and min(done) > 0, (stuns, held, done)


class PausingTokens(list):
    """The gate's token list, paused once at `where` until the test lets the request go on.

    `where`: "before append" (the request's token has not landed), "after append" (it has, and
    the request has not yet looked at the gate), "before pop" (the first token taken back: a
    request that saw the gate closed, about to give its token back and wait).
    """

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.paused = threading.Event()
        self.go = threading.Event()

    def _pause(self, where: str) -> None:
        if where == self.where and not self.paused.is_set():
            self.paused.set()
            self.go.wait(5)

    def append(self, token) -> None:
        self._pause("before append")
        super().append(token)
        self._pause("after append")

    def pop(self, *index):
        self._pause("before pop")
        return super().pop(*index)


class Request:
    """One guest request in its own thread: enter, note that it passed, leave."""

    def __init__(self, gate: StunGate) -> None:
        self.passed = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(gate,), daemon=True)

    def _run(self, gate: StunGate) -> None:
        gate.enter()
        self.passed.set()
        gate.leave()


@pytest.fixture
def request_threads():
    """Start `Request`s; at teardown, let every paused token go and join every request."""
    started: list[tuple[Request, PausingTokens | None]] = []
    gates: list[StunGate] = []

    def start(gate: StunGate, tokens: PausingTokens | None = None) -> Request:
        request = Request(gate)
        started.append((request, tokens))
        if gate not in gates:
            gates.append(gate)
        request.thread.start()
        return request

    try:
        yield start
    finally:
        for request, tokens in started:
            if tokens is not None:
                tokens.go.set()
        try:
            for gate in gates:
                if gate.closed:
                    gate.open()
        finally:
            for request, _ in started:
                request.thread.join(5)
        assert not any(r.thread.is_alive() for r, _ in started), "a request thread did not end"


def instrumented_gate(where: str) -> tuple[StunGate, PausingTokens]:
    gate = StunGate()
    tokens = PausingTokens(where)
    gate._in_flight = tokens  # instrument the real gate's list; the code under test is unchanged
    return gate, tokens


def test_a_request_caught_between_its_token_and_the_gate_waits_for_open(request_threads) -> None:
    """The Dekker order made deterministic: a request whose token lands while close() drains."""
    gate, tokens = instrumented_gate("before append")
    request = request_threads(gate, tokens)
    assert tokens.paused.wait(5), "the request never reached its token"
    gate.close(timeout=1.0)  # no token yet: the drain is immediate
    tokens.go.set()          # the token lands under the closed gate
    assert not request.passed.wait(0.3), "a request went through a closed, drained gate"
    release = gate.open()
    assert request.passed.wait(5) and release.held_requests == 1, release


@pytest.mark.parametrize("where", ["after append", "before pop"])
def test_open_counts_no_request_that_has_not_passed_the_gate(request_threads, where: str) -> None:
    """Issue 10 defect 5: open() runs while a request that arrived under the closed gate still
    holds its token ("after append": it has not looked at `_closed`; "before pop": it saw the
    gate closed and has not yet given the token back). That request is not inside: open() must
    not count it (it raised "1 requests in flight under a closed gate" inside nbdkit)."""
    gate, tokens = instrumented_gate(where)
    gate.close(timeout=1.0)
    request = request_threads(gate, tokens)
    assert tokens.paused.wait(5), f"the request never reached its token ({where})"
    assert not request.passed.is_set()
    release = gate.open()    # the gap: the request's token is in the list, the request is not inside
    assert release.held_requests == 0, release
    tokens.go.set()
    assert request.passed.wait(5), "the request did not go through the open gate"


def test_a_close_right_after_open_drains_a_request_that_has_not_looked_yet(request_threads) -> None:
    """The token of a request paused before its look at `_closed` survives open(); a second
    close() must wait for it, and the request, when it looks, must see the second stun."""
    gate, tokens = instrumented_gate("after append")
    gate.close(timeout=1.0)
    request = request_threads(gate, tokens)
    assert tokens.paused.wait(5)
    gate.open()
    drained = threading.Event()
    closer = threading.Thread(target=lambda: (gate.close(timeout=5.0), drained.set()), daemon=True)
    try:
        closer.start()
        assert not drained.wait(0.3), "close() did not wait for a token that may be about to enter"
        tokens.go.set()      # the request looks: closed again, so it gives the token back and waits
        assert drained.wait(5), "close() never drained"
        assert not request.passed.wait(0.3), "a request went through the second, drained stun"
        release = gate.open()
        assert request.passed.wait(5) and release.held_requests == 1, release
    finally:
        tokens.go.set()
        closer.join(5)


def test_a_request_held_through_open_and_an_immediate_close_counts_in_both_stuns(request_threads) -> None:
    """A held request that the scheduler wakes only after a second close() is held by that stun
    too: it stays out, and the second stun reports it."""
    gate = StunGate()
    gate.close(timeout=1.0)
    request = request_threads(gate)
    wait_until_held(gate, 1)
    with gate._cond:         # the lock is re-entrant: the woken request cannot run in between
        first = gate.open()
        gate.close(timeout=1.0)
    assert first.held_requests == 1, first
    assert not request.passed.wait(0.3), "a request went through the second, drained stun"
    second = gate.open()
    assert request.passed.wait(5)
    assert second.held_requests == 1 and second.max_wait_seconds > 0, second


def wait_until_held(gate: StunGate, n: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        with gate._cond:
            if gate._held >= n:
                return
        assert time.monotonic() < deadline, f"{n} requests never got held"
        time.sleep(0.005)
