"""Convergence control: how long the mirror node delays each guest write so that a migration finishes.

Design notes
- Pure logic, fed with status samples by the phase engine (agent/phases.py `_govern`) while the
  copy phases poll the mirror node; it never talks to anything. The engine applies its
  decision with the mirror node's `mirror_set(throttle=...)`: a sleep before each guest update
  (write, zero, trim) starts, on every mirroring disk of the VM.
- One governor per VM, on the sums over its disks: the switchover is one stun for all of them,
  so what must converge is their total, and their destinations share the link or the array.
- A sample is `(t, remaining, dest_written, target)`: the bytes the destinations still lack
  (dirty bytes plus async sends still queued: all of it must reach the destination before or
  under the switchover stun), the destinations' cumulative written bytes (sync mirrored, async
  sent, copied), and what the stun budget allows to remain. From two samples a window apart:
      dest rate      = what the destinations took per second (measured, whatever limits it);
      shrink rate    = how fast `remaining` falls (negative: it grows);
      dirtying rate  = dest rate - shrink rate: what the guest added for the destinations.
- The rule, once per window (WINDOW_S of samples):
      remaining > target and
        shrink <= RAISE_BELOW * dest rate          -> raise (not shrinking: the guest takes at
                                                      least 90% of what the destination does)
      dirtying <= (1 - LOWER_ABOVE) * capacity     -> lower (the guest slowed down: it takes at
                                                      most half of what the destination can)
      otherwise                                    -> hold
  `capacity` is the destination's rate in the last window that drained a backlog all through
  (with nothing queued, the destination takes only what the guest gives it, which says nothing
  of what it could take). Once what remains fits the budget the throttle holds rather than
  lifts: lifting it then would let the guest refill the backlog right before the switchover.
  Raise: from 0 to START_S, then doubled, never beyond the bound (`--max-throttle`, default
  5 ms). Lower: halved, to 0 below START_S: so the throttle rises only as far as needed, and a
  guest that slows down sees it lift within a few windows. The band between RAISE_BELOW and
  LOWER_ABOVE keeps it from flapping when it is just right.
- Stall: at the bound, STALL_WINDOWS windows in a row that would raise mean the migration needs
  more than the bound to converge. The governor says so (`stalled`) and keeps going at the
  bound; the engine reports it and lets the operator choose (raise the bound, switch to sync,
  or abort). It clears on the first window that would not raise (the guest slowed down, the
  bound was raised, the mirror switched to sync).
- Prediction: time to converge = (remaining - target) / shrink rate over the last few windows
  (bursty dirty passes make one window noisy); None when remaining does not shrink (the
  guest outpaces the destination): unknown, not guessed.

Example:
    g = Governor(bound=0.005)
    for status in polls: d = g.observe(Sample(time.monotonic(), remaining, written, target))
    if d.throttle != applied: mirror_set(throttle=d.throttle)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nbd_plugin.mirror import MAX_THROTTLE_SECONDS

WINDOW_S = 1.0          # seconds of samples per decision: several copier polls, one pass or more
START_S = 100e-6        # the first step: about what a buffered 4 KiB write costs
RAISE_BELOW = 0.1       # shrink below this share of the destination's rate: not converging
LOWER_ABOVE = 0.5       # shrink above this share: the throttle is more than needed
STALL_WINDOWS = 3
PREDICT_WINDOWS = 5     # windows the predictions average over
MAX_BOUND_S = MAX_THROTTLE_SECONDS     # the mirror node's cap on one delay


@dataclass(frozen=True)
class Sample:
    """One status poll, summed over the VM's disks (see the module notes)."""

    t: float              # monotonic seconds
    remaining: int        # bytes the destinations lack: dirty + async pending
    dest_written: int     # counter: bytes written to the destinations
    target: int           # bytes that may remain for the switchover stun


@dataclass(frozen=True)
class Rates:
    """What one or more windows measured, bytes/s."""

    dest: float
    shrink: float

    @property
    def dirtying(self) -> float:
        return max(0.0, self.dest - self.shrink)


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
        self.rates: Rates | None = None              # the last window's
        self.capacity: float | None = None           # the destination's rate while it drained a backlog
        self._at_bound_raises = 0
        self._start: Sample | None = None
        self._edges: deque[Sample] = deque(maxlen=PREDICT_WINDOWS + 1)
        self.last: Sample | None = None

    def set_bound(self, bound: float) -> None:
        """A new bound (`svmotion set --max-throttle`): the throttle is cut to it at once."""
        self.bound = bound
        self.throttle = min(self.throttle, bound)
        self._at_bound_raises = 0
        self.stalled = False

    def observe(self, sample: Sample) -> Decision:
        """Take one sample; decide at the end of each window."""
        self.last = sample
        if self._start is None or sample.t < self._start.t or sample.dest_written < self._start.dest_written:
            self._restart(sample)      # the first sample, or counters that went back (a new mirror node)
            return Decision(self.throttle, stalled=self.stalled)
        if sample.t - self._start.t < WINDOW_S:
            return Decision(self.throttle, stalled=self.stalled)
        start, rates = self._start, rates_between(self._start, sample)
        self.rates = rates
        self._start = sample
        self._edges.append(sample)
        return self._decide(start, sample, rates)

    def _restart(self, sample: Sample) -> None:
        self._start = sample
        self._edges.clear()
        self._edges.append(sample)

    def _decide(self, start: Sample, sample: Sample, rates: Rates) -> Decision:
        before = self.throttle
        backlog = sample.remaining > sample.target
        if backlog and start.remaining > start.target:
            self.capacity = rates.dest      # draining a backlog the whole window: what it can take
        if backlog and rates.shrink <= RAISE_BELOW * rates.dest:
            why = (f"not converging: the guest dirties {rates.dirtying:.0f} B/s, the destination takes "
                   f"{rates.dest:.0f} B/s")
            if before >= self.bound:
                self._at_bound_raises += 1
                self.stalled = self._at_bound_raises >= STALL_WINDOWS
                return Decision(self.throttle, None, self.stalled)
            self.throttle = min(self.bound, max(START_S, before * 2))
        elif self.capacity is None or rates.dirtying <= (1 - LOWER_ABOVE) * self.capacity:
            why = (f"the guest slowed down: it dirties {rates.dirtying:.0f} B/s, the destination can take "
                   f"{self.capacity or 0:.0f} B/s")
            self._lower()
        else:
            why = None
            self._at_bound_raises = 0
            self.stalled = False
        changed = self.throttle != before
        return Decision(self.throttle, why if changed else None, self.stalled)

    def _lower(self) -> None:
        self._at_bound_raises = 0
        self.stalled = False
        self.throttle = self.throttle / 2 if self.throttle / 2 >= START_S else 0.0

    def converge_seconds(self) -> float | None:
        """Predicted seconds until what remains fits the stun budget; None: unknown (not shrinking)."""
        if self.last is None:
            return None
        excess = self.last.remaining - self.last.target
        if excess <= 0:
            return 0.0
        rates = self.average_rates()
        if rates is None or rates.shrink <= 0:
            return None
        return excess / rates.shrink

    def average_rates(self) -> Rates | None:
        """The rates over the last PREDICT_WINDOWS windows (None before the first window ends)."""
        if len(self._edges) < 2:
            return None
        return rates_between(self._edges[0], self._edges[-1])


def rates_between(a: Sample, b: Sample) -> Rates:
    dt = b.t - a.t
    return Rates(dest=(b.dest_written - a.dest_written) / dt, shrink=(a.remaining - b.remaining) / dt)
