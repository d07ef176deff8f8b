"""The convergence governor (agent/convergence.py) fed with real numbers: a guest and a destination
simulated window by window, the throttle's effect on the guest modelled as a closed loop of
`depth` writes of `block` bytes in flight, each delayed by the throttle plus its own latency."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.convergence import MIN_WINDOWS, START_S, STALL_WINDOWS, WINDOW_S, Governor, Sample

MiB = 1 << 20
KiB = 1 << 10


@dataclass
class World:
    """A guest writing into a backlog that a destination of `dest_bps` drains (an async mirror)."""

    guest_bps: float              # what the guest wants to write
    dest_bps: float
    depth: int = 8                # the guest's writes in flight
    block: int = 4 * KiB
    latency: float = 100e-6       # one write's own service time
    remaining: float = 0.0
    written: float = 0.0
    dirtied: float = 0.0
    t: float = 0.0
    target: int = 256 * KiB

    def guest_rate(self, throttle: float) -> float:
        """A closed loop: `depth` writes in flight, each taking its latency plus the throttle."""
        return min(self.guest_bps, self.depth * self.block / (self.latency + throttle))

    def step(self, throttle: float, seconds: float = 0.25) -> Sample:
        incoming = self.guest_rate(throttle) * seconds
        drained = min(self.remaining + incoming, self.dest_bps * seconds)
        self.remaining += incoming - drained
        self.written += drained
        self.dirtied += incoming      # the guest's writes all go to the backlog (chunks never twice)
        self.t += seconds
        return Sample(self.t, int(self.remaining), 0, int(self.written), int(self.dirtied), self.target)


def run(world: World, governor: Governor, seconds: float) -> list[float]:
    """Feed the governor 4 samples a second; return the throttle after every sample."""
    seen = []
    for _ in range(int(seconds / 0.25)):
        seen.append(governor.observe(world.step(governor.throttle)).throttle)
    return seen


def test_a_guest_slower_than_the_destination_is_never_throttled() -> None:
    world, governor = World(guest_bps=20 * MiB, dest_bps=100 * MiB, remaining=64 * MiB), Governor(0.005)
    assert set(run(world, governor, 30)) == {0.0}
    assert world.remaining <= world.target and governor.converge_seconds() == 0.0


def test_a_guest_four_times_faster_is_throttled_only_as_far_as_needed_and_converges() -> None:
    # 8 x 4 KiB in flight: 32 KiB per (latency + delay); the destination takes 8 MiB/s, the guest wants 32.
    world, governor = World(guest_bps=32 * MiB, dest_bps=8 * MiB, remaining=16 * MiB), Governor(0.005)
    seen = run(world, governor, 600)
    assert max(seen) <= 0.005 and max(seen) > 0
    # The delay that brings the guest under the destination: 32 KiB / 8 MiB/s - latency = 3.8 ms. The
    # governor's steps (doubling from 100 us) overshoot it by less than one doubling.
    assert max(seen) < 2 * (8 * 4 * KiB / (8 * MiB) - 100e-6)
    assert world.remaining <= world.target
    assert not governor.stalled


def test_the_throttle_lifts_when_the_guest_slows_down() -> None:
    world, governor = World(guest_bps=32 * MiB, dest_bps=8 * MiB, remaining=16 * MiB,
                            target=0), Governor(0.005)
    run(world, governor, 30)
    assert governor.throttle > 0
    world.guest_bps = 1 * MiB                 # the guest slows down: the backlog drains fast
    seen = run(world, governor, 30)
    assert seen[-1] == 0.0
    falls = [b for a, b in zip(seen, seen[1:]) if b < a]
    assert all(b == 0.0 or b == pytest.approx(a / 2) for a, b in zip(seen, seen[1:]) if b < a) and falls


def test_a_guest_the_bound_cannot_hold_back_stalls_and_keeps_the_bound() -> None:
    # 16 writes of 16 KiB in flight: even 5 ms each lets 49 MiB/s through, over a 8 MiB/s destination.
    world, governor = World(guest_bps=64 * MiB, dest_bps=8 * MiB, depth=16, block=16 * KiB,
                            remaining=16 * MiB), Governor(0.005)
    seen = run(world, governor, 30)
    assert max(seen) == 0.005 and governor.stalled
    assert governor.converge_seconds() is None             # unknown: it does not shrink
    # Raising the bound (svmotion set --max-throttle) lets it rise again and converge.
    governor.set_bound(0.1)
    assert not governor.stalled
    seen = run(world, governor, 1200)
    assert 0.005 < max(seen) <= 0.1
    assert world.remaining <= world.target and not governor.stalled


def test_a_stall_needs_several_windows_at_the_bound() -> None:
    governor = Governor(START_S)
    t, written, remaining = 0.0, 0, 10 * MiB
    stalls = []
    for _ in range(MIN_WINDOWS + STALL_WINDOWS + 2):
        t += WINDOW_S
        written += MiB
        remaining += MiB          # growing: the guest outpaces the destination
        stalls.append(governor.observe(Sample(t, remaining, 0, written, written + remaining, 0)).stalled)
    # The first sample opens the first window; MIN_WINDOWS windows on the throttle rises to the
    # bound (here the first step); STALL_WINDOWS more windows at the bound make the stall.
    assert stalls == [False] * (MIN_WINDOWS + STALL_WINDOWS) + [True] * 2


def test_lowering_the_bound_cuts_the_throttle_at_once() -> None:
    governor = Governor(0.005, throttle=0.004)
    governor.set_bound(0.001)
    assert governor.throttle == 0.001


def test_prediction_is_the_excess_over_the_shrink_rate() -> None:
    governor = Governor(0.005)
    for i in range(4):
        governor.observe(Sample(float(i), 100 * MiB - i * 10 * MiB, 0, i * 20 * MiB, i * 10 * MiB, 10 * MiB))
    # 70 MiB remain, 10 MiB may stay: 60 MiB at 10 MiB/s.
    assert governor.converge_seconds() == pytest.approx(6.0)
    rates = governor.average_rates()
    assert rates is not None and rates.dest == 20 * MiB and rates.drain == 20 * MiB and rates.added == 10 * MiB


def test_counters_that_go_back_start_a_new_window() -> None:
    governor = Governor(0.005)
    governor.observe(Sample(0.0, 10 * MiB, 0, 50 * MiB, 0, 0))
    assert governor.observe(Sample(2.0, 20 * MiB, 0, 1 * MiB, 0, 0)).reason is None   # a new mirror node
    assert governor.rates is None


def test_no_throttle_when_the_guest_is_not_what_holds_convergence_back() -> None:
    """An async guest whose sends the destination absorbs as they come (its queue does not grow,
    nothing overflows to the dirty map) while a rate-limited copier drains the dirty bytes slowly:
    throttling the guest would free nothing, so the governor leaves it alone."""
    governor = Governor(0.005)
    remaining, written = 64 * MiB, 0
    for i in range(10):
        remaining -= 256 * KiB                # the copier at 256 KiB/s
        written += 30 * MiB + 256 * KiB        # the guest's 30 MiB/s of sends, and the copier's
        assert governor.observe(Sample(float(i), remaining, 1 * MiB, written, 0, 0)).throttle == 0.0
    # The same numbers, but the queue grows by 2 MiB/s: the guest outpaces the destination.
    for i in range(10, 13):
        remaining += 2 * MiB - 256 * KiB
        written += 30 * MiB + 256 * KiB
        governor.observe(Sample(float(i), remaining, (i - 8) * 2 * MiB, written, 0, 0))
    assert governor.throttle > 0
