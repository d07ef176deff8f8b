"""The stun gate's lock-free entry (nbd_plugin/gate.py) under real threads and forced GIL switches.

The gate runs inside nbdkit in production; here the same class is driven by plain threads so the
interleavings can be forced: a GIL switch interval of a microsecond makes threads change places
between almost any two bytecodes, which is where a wrong order of "take a token" and "look at
the gate" would let a request slip past a closed gate.
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
    for t in threads:
        t.start()
    stuns = held = 0
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
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a request stayed held after the gate opened"
    assert not breaches, f"{len(breaches)} requests ran while the gate was closed"
    assert stuns > 50 and held > 0 and min(done) > 0, (stuns, held, done)


class PausingTokens(list):
    """The gate's token list, with its next append paused until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = threading.Event()
        self.go = threading.Event()
        self.armed = True

    def append(self, token) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            self.go.wait(5)
        super().append(token)


def test_a_request_caught_between_its_token_and_the_gate_waits_for_open() -> None:
    """The Dekker order made deterministic: a request whose token lands while close() drains."""
    gate = StunGate()
    tokens = PausingTokens()
    gate._in_flight = tokens  # instrument the real gate's list; the code under test is unchanged
    passed = threading.Event()
    request = threading.Thread(target=lambda: (gate.enter(), passed.set(), gate.leave()))
    request.start()
    assert tokens.paused.wait(5), "the request never reached its token"
    gate.close(timeout=1.0)  # no token yet: the drain is immediate
    tokens.go.set()          # the token lands under the closed gate
    assert not passed.wait(0.3), "a request went through a closed, drained gate"
    release = gate.open()
    assert passed.wait(5) and release.held_requests == 1, release
    request.join(5)
