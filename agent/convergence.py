"""Convergence control: how long the mirror node delays each guest write so that a migration finishes.

Design notes
- Pure logic, fed with status samples by the phase engine (agent/phases.py `_govern`) while the
  copy phases poll the mirror node; it never talks to anything. The engine applies its
  decision with the mirror node's `mirror_set(throttle=...)`: a sleep before each guest update
  (write, zero, trim) starts, on every mirroring disk of the VM.
- One governor per VM, on the sums over its disks: the switchover is one stun for all of them,
  so what must converge is their total, and their destinations share the link or the array.
- A sample is `(t, remaining, pending, dest_written, dirtied, target)`: the bytes the
  destinations still lack (dirty bytes plus async sends still queued: all of it must reach the
  destination before or under the switchover stun), the queued async part of it, the
  destinations' cumulative written bytes (sync mirrored, async sent, copied), the cumulative
  bytes guest updates newly marked dirty, and what the stun budget allows to remain. From two
  samples a window apart:
      dest rate     = what the destinations took per second (measured, whatever limits it);
      shrink rate   = how fast `remaining` falls (negative: it grows);
      added         = newly dirtied + growth of the async queue: what the guest adds to
                      `remaining` (all the throttle can take away from it);
      drain         = shrink + added: how fast `remaining` would fall if the guest added nothing.
- The rule, at the end of each window (WINDOW_S of samples), judged over the last
  DECIDE_WINDOWS windows (dirty passes make `remaining` and `added` a saw-tooth as long as a
  pass, which one window samples badly; the guest adds only where the copier has cleaned):
      remaining > target and added > 0 and
        shrink <= RAISE_BELOW * drain              -> raise (not shrinking because of the guest:
                                                      it adds at least 90% of what drains)
      shrink >= LOWER_ABOVE * drain                -> lower (shrinking fast: the guest adds at
                                                      most half of what drains; it slowed down)
      otherwise                                    -> hold
  Why `added` and not all the guest's traffic: a guest whose updates the destination absorbs
  as they come (sync writes, which wait for it and so throttle the guest already; async sends
  whose queue does not grow) holds nothing back, and throttling it would free nothing when it
  is a rate-limited or slow copier that does not keep up. Once what remains fits the budget, a
  guest still writing holds the throttle (nothing shrinks, nothing needs to): lifting it then
  would let the guest refill the backlog right before the switchover; an idle one lifts it.
  Raise: from 0 to START_S, then doubled, never beyond the bound (`--max-throttle`, default
  5 ms). Lower: halved, to 0 below START_S. A step waits MIN_WINDOWS windows after the last
  one, so that at least half of what it is judged by shows the current delay. So the throttle
  rises only as far as needed, and a guest that slows down sees it lift within a few steps.
- Stall: at the bound, STALL_WINDOWS windows in a row that would raise mean the migration needs
  more than the bound to converge. The governor says so (`stalled`) and keeps going at the
  bound; the engine reports it and lets the operator choose (raise the bound, switch to sync,
  or abort). It clears on the first window that would not raise (the guest slowed down, the
  bound was raised, the mirror switched to sync).
- Prediction: time to converge = (remaining - target) / shrink rate over the last few windows
  (bursty dirty passes make one window noisy); None when remaining does not shrink or the
  migration is stalled (the guest outpaces the destination): unknown, not guessed.

Example:
    g = Governor(bound=0.005)
    for status in polls: d = g.observe(Sample(time.monotonic(), remaining, pending, written, dirtied, target))
    if d.throttle != applied: mirror_set(throttle=d.throttle)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nbd_plugin.mirror import MAX_THROTTLE_SECONDS

WINDOW_S = 1.0          # seconds of samples per window: several copier polls
DECIDE_WINDOWS = 4      # windows a decision looks back over
MIN_WINDOWS = 2         # windows between two steps
START_S = 100e-6        # the first step: about what a buffered 4 KiB write costs
RAISE_BELOW = 0.1       # shrink below this share of the drain: not converging
LOWER_ABOVE = 0.5       # shrink above this share of the drain: more throttle than needed
STALL_WINDOWS = 3
PREDICT_WINDOWS = 5     # windows the predictions average over
MAX_BOUND_S = MAX_THROTTLE_SECONDS     # the mirror node's cap on one delay


@dataclass(frozen=True)
class Sample:
    """One status poll, summed over the VM's disks (see the module notes)."""

    t: float              # monotonic seconds
    remaining: int        # bytes the destinations lack: dirty + async pending
    pending: int          # the async sends queued or in flight (part of remaining)
    dest_written: int     # counter: bytes written to the destinations
    dirtied: int          # counter: bytes guest updates newly marked dirty
    target: int           # bytes that may remain for the switchover stun


@dataclass(frozen=True)
class Rates:
    """What one or more windows measured, bytes/s."""

    dest: float
    shrink: float
    added: float

    @property
    def drain(self) -> float:
        return self.shrink + self.added


@dataclass(frozen=True)
class Decision:
    """The governor's answer to a sample: the delay to apply and why it changed (None: unchanged)."""

    throttle: float
    reason: str | None = None
    stalled: bool = False


class Governor:
    """The throttle of one migration (module notes). Not thread-safe: the engine serialises calls."""

    def __init__(self, bound: float, throttle: float = 0.0):
        self.bound = bound
        self.throttle = min(throttle, bound)
        self.stalled = False
        self.rates: Rates | None = None              # what the last decision judged by
        self.last: Sample | None = None
        self._at_bound_raises = 0
        self._start: Sample | None = None            # the current window's first sample
        self._edges: deque[Sample] = deque(maxlen=PREDICT_WINDOWS + 1)     # window ends, for predictions
        self._recent: deque[Sample] = deque(maxlen=DECIDE_WINDOWS + 1)     # window ends a decision judges by
        self._since_step = 0                         # windows since the throttle last changed

    def set_bound(self, bound: float) -> None:
        """A new bound (`svmotion set --max-throttle`): the throttle is cut to it at once."""
        self.bound = bound
        if self.throttle > bound:
            self.throttle = bound
            self._since_step = 0
        self._at_bound_raises = 0
        self.stalled = False

    def observe(self, sample: Sample) -> Decision:
        """Take one sample; decide at the end of each window."""
        self.last = sample
        start = self._start
        if start is None or sample.t < start.t or sample.dest_written < start.dest_written \
                or sample.dirtied < start.dirtied:
            # The first sample, or counters that went back (a new mirror node): start over.
            self._start = sample
            for edges in (self._edges, self._recent):
                edges.clear()
                edges.append(sample)
            return Decision(self.throttle, stalled=self.stalled)
        if sample.t - start.t < WINDOW_S:
            return Decision(self.throttle, stalled=self.stalled)
        self._start = sample
        self._edges.append(sample)
        self._recent.append(sample)
        self._since_step += 1
        self.rates = rates_between(self._recent[0], sample)
        return self._decide(sample, self.rates)

    def _decide(self, sample: Sample, rates: Rates) -> Decision:
        before = self.throttle
        if sample.remaining > sample.target and rates.added > 0 and rates.shrink <= RAISE_BELOW * rates.drain:
            why = (f"not converging: the guest adds {rates.added:.0f} B/s to what remains, {rates.drain:.0f} "
                   f"B/s of it drains to the destination")
            if before >= self.bound:
                self._at_bound_raises += 1
                self.stalled = self._at_bound_raises >= STALL_WINDOWS
                return Decision(self.throttle, None, self.stalled)
            if self._since_step >= MIN_WINDOWS:
                self.throttle = min(self.bound, max(START_S, before * 2))
        else:
            self._at_bound_raises = 0
            self.stalled = False
            if rates.shrink >= LOWER_ABOVE * rates.drain and self._since_step >= MIN_WINDOWS:
                why = (f"the guest slowed down: it adds {rates.added:.0f} B/s to what remains, "
                       f"{rates.drain:.0f} B/s drains")
                self.throttle = self.throttle / 2 if self.throttle / 2 >= START_S else 0.0
        if self.throttle == before:
            return Decision(self.throttle, None, self.stalled)
        self._since_step = 0
        return Decision(self.throttle, why, self.stalled)

    def converge_seconds(self) -> float | None:
        """Predicted seconds until what remains fits the stun budget; None: unknown (not shrinking)."""
        if self.last is None:
            return None
        excess = self.last.remaining - self.last.target
        if excess <= 0:
            return 0.0
        rates = self.average_rates()
        if rates is None or rates.shrink <= 0 or self.stalled:
            return None
        return excess / rates.shrink

    def average_rates(self) -> Rates | None:
        """The rates over the last PREDICT_WINDOWS windows (None before the first window ends)."""
        if len(self._edges) < 2:
            return None
        return rates_between(self._edges[0], self._edges[-1])


def rates_between(a: Sample, b: Sample) -> Rates:
    dt = b.t - a.t
    return Rates(dest=(b.dest_written - a.dest_written) / dt, shrink=(a.remaining - b.remaining) / dt,
                 added=(b.dirtied - a.dirtied + max(0, b.pending - a.pending)) / dt)
