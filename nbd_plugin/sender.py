"""The async mirror's sender: guest updates on their way to the destination after the guest's ack.

Design notes
- A send is one guest update (write, zero, trim) the source already has, with its own copy of
  the data. `offer` queues it and returns at once; worker threads apply it to the destination.
- Order per chunk: the destination must never get an older update on top of a newer one
  (invariant 1). Sends are offered under the update's chunk range in ChunkLocks, so two sends
  that share a chunk are offered in the order their source writes happened; a send starts only
  when it is the oldest pending send of every chunk it touches (`_line`, one FIFO per chunk).
  Sends to other chunks overtake each other freely: an NBD server may reorder requests in flight,
  and a local pwrite has no order to keep with a write elsewhere.
- Bounded: at most `max_bytes` and `max_requests` pending (queued or in flight). Past the bound
  `offer` refuses, and the mirror marks the update's chunks dirty for the copier instead: the
  guest never waits for the destination, whatever its speed.
- A failed send marks its chunks dirty before it stops being pending, so a copier run that waited
  for the chunk (`wait_idle`) sees the bit. Later sends to the chunk still go (they are newer); the
  copier carries the chunk again after them.
- The copier must not copy a chunk while an older send to it is pending: the send would land
  after the copy and put old data over new. A copier run holds the chunk range (no new send can be
  offered there) and waits for the pending ones (`wait_idle`) before it clears the bits. The
  switchover waits for all of them (`drain`) under its stun, when no guest update can add one;
  `flush_dest` waits (`drain` too) for those pending when it began, not for the ones a guest
  writing on adds meanwhile, or it might never return.
- Threads: one worker for a local destination (a pwrite to the page cache is over in
  microseconds; more threads would only contend for the GIL), several for an NBD destination,
  whose requests each wait a round trip. They run at normal priority: a sender that falls behind
  the guest only moves work to the copier, which costs more (whole chunks).
- Batches: a worker takes every queued send it may (up to BATCH_MAX) and applies them in order,
  then settles them under one lock; the guest wakes a worker only when one is idle. Under a
  max-rate guest a send costs its pwrite and little else; woken per send, the sender thread cost
  the guest a third of its rate (the hand-offs of mirror.py's notes).
- One lock, two conditions: workers wait on `_work_ready`, copier runs and the switchover on
  `_settled`; the lock protects the queue, the per-chunk lines and the counters.
"""
from __future__ import annotations

import errno
import threading
import time
from collections import deque
from typing import Callable

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_REQUESTS = 8192    # 32 MiB of 4 KiB writes: a burst of a max-rate guest fits
# How many queued sends a worker passes over (their chunks held by another batch) before it stops
# looking, and how many it takes at once.
SCAN_LIMIT = 64
BATCH_MAX = 256

Apply = Callable[[], None]


class Send:
    """One guest update for the destination: its chunks and byte range, the data bytes it holds
    (what the bound counts; none for a zero or trim), and how to apply it."""

    __slots__ = ("first", "last", "offset", "count", "nbytes", "apply", "number")

    def __init__(self, first: int, last: int, offset: int, count: int, nbytes: int, apply: Apply):
        self.first, self.last, self.offset, self.count = first, last, offset, count
        self.nbytes, self.apply = nbytes, apply
        self.number = 0                             # the sender's count of offers when offered


class Sender:
    """Pending sends of one disk's async mirror, and the threads that apply them.

    Example: `s = Sender(1, on_sent, on_failed); s.offer(Send(0, 0, 0, 4096, 4096, write))`
    """

    def __init__(self, workers: int, on_sent: Callable[[int], None],
                 on_failed: Callable[[Send, OSError], None],
                 max_bytes: int = DEFAULT_MAX_BYTES, max_requests: int = DEFAULT_MAX_REQUESTS):
        self.max_bytes, self.max_requests = max_bytes, max_requests
        self._on_sent, self._on_failed = on_sent, on_failed
        lock = threading.Lock()
        self._work_ready = threading.Condition(lock)     # workers wait here for sends
        self._settled = threading.Condition(lock)        # wait_idle and drain wait here
        self._queue: deque[Send] = deque()          # offered, not started, oldest first
        self._line: dict[int, deque[Send]] = {}     # chunk -> its pending sends, oldest first
        self._pending_bytes = 0
        self._pending = 0
        self._offered = 0                           # sends ever offered (a send's number)
        self._numbers: set[int] = set()             # the numbers of the pending sends
        self._idle = 0                              # workers waiting for sends
        self.sent_bytes = 0
        self._stopping = False
        self._abandoned = False                     # the mirror failed: fail what is pending, send nothing
        self._threads = [threading.Thread(target=self._work, name=f"mirror-send-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    # --- the guest's side ---------------------------------------------------------------------

    def offer(self, send: Send) -> bool:
        """Queue a send (the caller holds its chunk range); False when over the bound or stopping."""
        with self._work_ready:
            if (self._stopping or self._pending >= self.max_requests
                    or self._pending_bytes + send.nbytes > self.max_bytes):
                return False
            self._offered += 1
            send.number = self._offered
            self._numbers.add(send.number)
            self._queue.append(send)
            for chunk in range(send.first, send.last + 1):
                line = self._line.get(chunk)
                if line is None:
                    self._line[chunk] = deque((send,))
                else:
                    line.append(send)
            self._pending += 1
            self._pending_bytes += send.nbytes
            if self._idle:   # a busy worker takes it with its next batch: no wake-up to pay for
                self._work_ready.notify()
            return True

    def pending_in(self, first: int, last: int) -> bool:
        """Whether any send to chunks first..last is pending."""
        line = self._line
        if first == last:
            return first in line
        return any(chunk in line for chunk in range(first, last + 1))

    # --- the copier's and the switchover's side -------------------------------------------------

    def wait_idle(self, first: int, last: int) -> None:
        """Wait until no send to chunks first..last is pending (the caller holds the range)."""
        with self._settled:
            while self.pending_in(first, last):
                self._settled.wait()

    def drain(self, deadline: float | None = None) -> bool:
        """Wait until every send pending now has settled (not those offered meanwhile: a guest
        writing on would keep the queue from ever being empty); False if the deadline came first."""
        with self._settled:
            mark = self._offered
            while self._numbers and min(self._numbers) <= mark:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._settled.wait(left)
            return True

    def status(self) -> dict[str, int]:
        with self._settled:
            return {"pending_bytes": self._pending_bytes, "pending_requests": self._pending,
                    "sent_bytes": self.sent_bytes}

    def abandon(self) -> None:
        """The destination is unusable (the mirror failed): pending sends fail at once, unsent, with
        ECANCELED (their chunks marked dirty), instead of each waiting out a deadline of its own."""
        self._abandoned = True

    def stop(self) -> None:
        """Drop what is queued and wait for the sends in flight to end; the caller then closes the
        destination (a local file's descriptor must not close under a worker's pwrite)."""
        with self._work_ready:
            self._stopping = True
            for send in self._queue:
                self._forget(send)
            self._queue.clear()
            self._work_ready.notify_all()
            self._settled.notify_all()
        for thread in self._threads:
            thread.join()

    # --- the workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._work_ready:
                batch = self._take()
                while not batch:
                    if self._stopping:
                        return
                    self._idle += 1
                    self._work_ready.wait()
                    self._idle -= 1
                    batch = self._take()
            sent = self._apply(batch)
            with self._settled:
                self.sent_bytes += sent
                for send in batch:
                    self._forget(send)
                self._settled.notify_all()

    def _apply(self, batch: list[Send]) -> int:
        """Apply a batch in its order; failed sends go to `on_failed` (which marks their chunks
        dirty while they are still pending); the bytes sent."""
        sent = 0
        for send in batch:
            if self._abandoned:
                self._on_failed(send, OSError(errno.ECANCELED, "the mirror failed"))
                continue
            try:
                send.apply()
                sent += send.count
            except OSError as err:
                self._on_failed(send, err)
            except Exception as err:         # a bug must not leave the send pending for ever
                self._on_failed(send, OSError(errno.EIO, f"sender: {type(err).__name__}: {err}"))
        if sent:
            self._on_sent(sent)
        return sent

    def _take(self) -> list[Send]:
        """Take, oldest first, the queued sends whose chunks no other batch holds (under the lock).

        A send is taken when every older send of each of its chunks is already in this batch: the
        batch is applied in order by one worker, so that keeps the order per chunk."""
        batch: list[Send] = []
        taken: set[int] = set()
        skipped = 0
        for send in self._queue:
            if len(batch) >= BATCH_MAX or skipped >= SCAN_LIMIT:
                break
            if all(self._ahead_taken(self._line[chunk], send, taken)
                   for chunk in range(send.first, send.last + 1)):
                batch.append(send)
                taken.add(id(send))
            else:
                skipped += 1
        if batch:
            if len(batch) == len(self._queue):
                self._queue.clear()
            else:
                for send in batch:
                    self._queue.remove(send)
        return batch

    @staticmethod
    def _ahead_taken(line: deque[Send], send: Send, taken: set[int]) -> bool:
        for older in line:
            if older is send:
                return True
            if id(older) not in taken:
                return False
        return True

    def _forget(self, send: Send) -> None:
        """A send is no longer pending: out of its chunks' lines and the counts (under the lock)."""
        for chunk in range(send.first, send.last + 1):
            line = self._line[chunk]
            line.remove(send)
            if not line:
                del self._line[chunk]
        self._pending -= 1
        self._pending_bytes -= send.nbytes
        self._numbers.discard(send.number)
