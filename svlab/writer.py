"""A verifying random writer over NBD: the workload that proves a migration lost nothing.

Design notes
- The model, not the data: every 4 KiB block of every disk is in one known state: its initial
  content (INITIAL), zeroes (ZERO), or the content of write generation g > 0. The bytes of a
  block are a pure function of (disk, block offset, generation) (`block_pattern`), so the model
  costs 8 bytes per block and any copy of the disk can be checked against it afterwards.
- Defined expected content: the writer never has two overlapping requests of its own in flight.
  A write, zero or trim reserves its block range before it is issued and releases it when it
  completes; the model is updated at completion. Whatever order the server completes requests in,
  each block's last completed request is its content.
- Requests that fail leave a block "either old or new": the model keeps the set of acceptable
  states for such blocks (`_either`), and the error is recorded. A trim is also a set (old content
  or zeroes): NBD leaves trimmed data unspecified, nbdkit's file plugin reads back zeroes.
- Connections: one thread per connection, each with its own libnbd handle, issuing asynchronous
  requests up to the queue depth and driving its handle with `poll`. libnbd runs completion
  callbacks in the thread that polls, so a callback never races its own thread's issue loop;
  the shared model is guarded by `_lock` (see below).
- Latency and stalls: each request's latency is recorded; a stall is the longest time during which
  at least one request was in flight and none completed (what a guest feels during a stun). A
  rate limit pauses issuing, which is not a stall, because nothing is in flight while waiting.
- Flush and FUA writes are mixed in so the server's flush path is exercised under load; trim and
  zero are optional (they change what "identical" means for a mirror that handles them lazily).
"""
from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union

import nbd

BLOCK = 4096
CHUNK = 64 * 1024                   # the mirror's default granularity; some writes straddle it
MAX_WRITE = 256 * 1024
VERIFY_READ = 1024 * 1024           # verification reads the disk in pieces of this size
INITIAL = 0                         # block state: the content the disk started with
ZERO = -1                           # block state: zeroes (written by a zero request)
_MAGIC = 0x5356_4D4F_5449_4F4E     # "SVMOTION": marks our blocks in a hex dump
_ZERO_BLOCK = bytes(BLOCK)

# How a disk starts: all zeroes, generation-0 pattern (see `fill_pattern_image`), or a copy file.
InitialSpec = Union[str, os.PathLike]
ZEROES = "zero"
PATTERN = "pattern"


def disk_tag(disk: str) -> int:
    """A stable number for a disk name, part of every block's pattern."""
    return zlib.crc32(disk.encode("utf-8"))


def block_pattern(disk: str, offset: int, generation: int) -> bytes:
    """The 4 KiB content of the block at `offset` written by `generation` (0 = initial pattern)."""
    record = struct.pack("<QQQQ", _MAGIC, disk_tag(disk), offset, generation & 0xFFFF_FFFF_FFFF_FFFF)
    return record * (BLOCK // len(record))


def fill_pattern_image(path: str | os.PathLike, disk: str, size: int,
                       extents: Iterable[tuple[int, int]] | None = None) -> None:
    """Create a raw image whose blocks hold generation-0 patterns (`initial=PATTERN`).

    Writes in pieces of at most 64 KiB. With `extents` only those (offset, length) ranges are
    written and the rest stays a hole (reads zero); such an image needs `initial=<a copy>` or a
    writer that never relies on the holes.
    """
    if size % BLOCK:
        raise ValueError(f"image size {size} is not a multiple of {BLOCK}: round it up")
    ranges = list(extents) if extents is not None else [(0, size)]
    with open(path, "wb") as f:
        f.truncate(size)
        for start, length in ranges:
            for piece in range(start, start + length, CHUNK):
                end = min(piece + CHUNK, start + length)
                f.seek(piece)
                f.write(b"".join(block_pattern(disk, o, 0) for o in range(piece, end, BLOCK)))


@dataclass
class WriterReport:
    """What one run of the writer saw; `errors` empty means the server never failed a request."""
    writes: int = 0
    bytes_written: int = 0
    fua_writes: int = 0
    flushes: int = 0
    zeroes: int = 0
    trims: int = 0
    errors: list[str] = field(default_factory=list)
    max_latency: float = 0.0
    longest_stall: float = 0.0
    longest_stall_start: float = 0.0      # time.monotonic() when the longest stall began
    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        """Latency percentile, e.g. `report.percentile(99)`; 0 when nothing completed."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    def summary(self) -> str:
        return (f"{self.writes} writes ({self.bytes_written / 2**20:.1f} MiB, {self.fua_writes} FUA), "
                f"{self.flushes} flushes, {self.zeroes} zeroes, {self.trims} trims in {self.duration:.2f} s; "
                f"latency p50 {self.percentile(50) * 1e3:.2f} ms max {self.max_latency * 1e3:.1f} ms; "
                f"longest stall {self.longest_stall * 1e3:.1f} ms; {len(self.errors)} errors")


@dataclass
class _Request:
    kind: str                       # write | zero | trim | flush
    disk: str
    offset: int
    length: int
    generation: int = 0
    flags: int = 0
    buffer: object = None           # the nbd.Buffer must live until completion
    issued: float = 0.0


class _DiskModel:
    """Expected state of one disk; all fields are guarded by the writer's `_lock`."""

    def __init__(self, name: str, size: int, initial: InitialSpec):
        if size % BLOCK:
            raise ValueError(f"disk {name!r}: size {size} is not a multiple of {BLOCK}")
        self.name = name
        self.size = size
        self.initial = initial
        self.state = array("q", bytes(8 * (size // BLOCK)))
        self.either: dict[int, frozenset[int]] = {}
        self.inflight: list[tuple[int, int]] = []     # reserved [start, end) byte ranges

    def acceptable(self, block: int) -> frozenset[int]:
        return self.either.get(block) or frozenset((self.state[block],))

    def overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self.inflight)

    def settle(self, req: _Request, new_state: int | None, ok: bool) -> None:
        """Record the outcome of a completed request on its blocks."""
        for block in range(req.offset // BLOCK, (req.offset + req.length) // BLOCK):
            old = self.acceptable(block)
            if ok and new_state is not None:
                self.state[block] = new_state
                self.either.pop(block, None)
            else:
                # Failed request, or trim: old content, or new content / zeroes.
                self.either[block] = old | {new_state if new_state is not None else ZERO}
        self.inflight.remove((req.offset, req.offset + req.length))


class VerifyingWriter:
    """Random writes over several NBD connections, checked afterwards against a model.

    Example:
        w = VerifyingWriter({"disk0": "nbd+unix:///disk0?socket=/tmp/vm1.nbd"}, initial={"disk0": PATTERN})
        w.start(); ...; report = w.stop()
        assert not report.errors and not w.verify_image("disk0", "/dest/disk0.raw")
    """

    def __init__(self, disks: Mapping[str, str], *,
                 initial: Mapping[str, InitialSpec] | None = None,
                 connections: int = 2, queue_depth: int = 4,
                 rate: float | None = None,
                 region: tuple[int, int] | None = None,
                 hot_region: tuple[int, int] | None = None, hot_ratio: float = 0.0,
                 max_write: int = MAX_WRITE,
                 fua_ratio: float = 0.05, flush_ratio: float = 0.02,
                 zero_ratio: float = 0.0, trim_ratio: float = 0.0,
                 seed: int | None = None):
        if connections < 1 or queue_depth < 1:
            raise ValueError(f"connections={connections}, queue_depth={queue_depth}: both must be >= 1")
        if max_write < BLOCK or max_write % BLOCK:
            raise ValueError(f"max_write={max_write} must be a positive multiple of {BLOCK}")
        self.uris = dict(disks)
        self._initial_spec = dict(initial or {})
        self.connections = connections
        self.queue_depth = queue_depth
        self.rate = rate
        self.region = region
        self.hot_region = hot_region
        self.hot_ratio = hot_ratio
        self.max_write = max_write
        self.fua_ratio = fua_ratio
        self.flush_ratio = flush_ratio
        self.zero_ratio = zero_ratio
        self.trim_ratio = trim_ratio
        self.seed = seed if seed is not None else random.randrange(2**32)
        # This lock protects the disk models, the counters and the stall clock below.
        self._lock = threading.Lock()
        self._models: dict[str, _DiskModel] = {}
        self._generation = 0
        self._report = WriterReport()
        self._inflight_total = 0
        self._progress_mark = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        # This lock protects the rate limiter's next free slot.
        self._rate_lock = threading.Lock()
        self._next_slot = 0.0

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect every connection (errors here raise) and start writing in background threads."""
        if self._threads:
            raise RuntimeError("VerifyingWriter.start() called twice: make a new writer")
        handles: list[tuple[str, nbd.NBD]] = []
        try:
            for disk, uri in self.uris.items():
                for _ in range(self.connections):
                    h = nbd.NBD()
                    h.connect_uri(uri)
                    handles.append((disk, h))
                if disk not in self._models:
                    size = handles[-1][1].get_size()
                    self._models[disk] = _DiskModel(disk, size, self._initial_spec.get(disk, ZEROES))
        except Exception:
            handles.clear()             # libnbd handles disconnect when dropped
            raise
        self._started = time.monotonic()
        for index, (disk, h) in enumerate(handles):
            rng = random.Random(self.seed * 1000 + index)
            t = threading.Thread(target=self._run_connection, args=(disk, h, rng),
                                 name=f"writer-{disk}-{index}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float = 60.0) -> WriterReport:
        """Stop issuing, wait for in-flight requests, close connections; return the report."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = [t.name for t in self._threads if t.is_alive()]
            if stuck:
                self._report.errors.append(f"stop: connections still waiting after {timeout} s: {stuck}")
            self._report.duration = time.monotonic() - self._started if self._started else 0.0
            return self._copy_report()

    def snapshot(self) -> WriterReport:
        """The report so far, while the writer keeps running."""
        with self._lock:
            return self._copy_report()

    def __enter__(self) -> "VerifyingWriter":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _copy_report(self) -> WriterReport:
        r = self._report
        return WriterReport(r.writes, r.bytes_written, r.fua_writes, r.flushes, r.zeroes, r.trims,
                            list(r.errors), r.max_latency, r.longest_stall, r.longest_stall_start,
                            r.duration or time.monotonic() - self._started, list(r.latencies))

    # ---- issuing ----------------------------------------------------------------------------

    def _run_connection(self, disk: str, h: nbd.NBD, rng: random.Random) -> None:
        can_fua = h.can_fua()
        can_flush = h.can_flush()
        can_trim = h.can_trim()
        can_zero = h.can_zero()
        pending: _Request | None = None
        try:
            while True:
                stopping = self._stop.is_set()
                if stopping and pending is not None:
                    self._cancel(pending)
                    pending = None
                if stopping and h.aio_in_flight() == 0:
                    break
                wait = 0.1
                while not stopping and h.aio_in_flight() < self.queue_depth:
                    pending = pending or self._next_request(disk, rng, can_fua, can_flush, can_trim, can_zero)
                    if pending is None:
                        wait = 0.001                # every candidate range overlapped: retry soon
                        break
                    delay = self._rate_delay(pending.length if pending.kind == "write" else 0)
                    if delay > 0:
                        wait = delay                # keep polling meanwhile: completions stay timely
                        break
                    self._issue(h, pending)
                    pending = None
                if h.aio_in_flight() == 0:
                    self._stop.wait(wait)
                else:
                    h.poll(max(1, int(wait * 1000)))
        except nbd.Error as err:
            with self._lock:
                self._report.errors.append(f"{disk}: connection failed: {err}")
        except Exception as err:  # a writer bug must show up in the report, not end a thread quietly
            with self._lock:
                self._report.errors.append(f"{disk}: writer failed: {type(err).__name__}: {err}")
        finally:
            try:
                if h.aio_in_flight() == 0:
                    h.shutdown()
            except nbd.Error:
                pass

    def _next_request(self, disk: str, rng: random.Random, can_fua: bool, can_flush: bool,
                      can_trim: bool, can_zero: bool) -> _Request | None:
        roll = rng.random()
        if can_flush and roll < self.flush_ratio:
            return _Request("flush", disk, 0, 0)
        roll -= self.flush_ratio
        kind = "write"
        if can_zero and 0 <= roll < self.zero_ratio:
            kind = "zero"
        elif can_trim and 0 <= roll - self.zero_ratio < self.trim_ratio:
            kind = "trim"
        with self._lock:
            model = self._models[disk]
            for _ in range(16):
                offset, length = self._pick_range(model.size, rng)
                if not model.overlaps(offset, offset + length):
                    model.inflight.append((offset, offset + length))
                    self._generation += 1
                    flags = nbd.CMD_FLAG_FUA if can_fua and kind != "trim" and rng.random() < self.fua_ratio else 0
                    return _Request(kind, disk, offset, length, self._generation, flags)
        return None

    def _pick_range(self, size: int, rng: random.Random) -> tuple[int, int]:
        """A random block-aligned range: mostly 4 KiB, some up to max_write, some straddling a chunk edge."""
        start, span = (self.hot_region if self.hot_region and rng.random() < self.hot_ratio
                       else self.region or (0, size))
        span = min(span, size - start)
        most = self.max_write // BLOCK
        medium = min(CHUNK // BLOCK, most)
        roll = rng.random()
        if roll < 0.5 or most == 1:
            length = BLOCK
        elif roll < 0.8:
            length = BLOCK * rng.randint(min(2, medium), medium)
        else:
            length = BLOCK * rng.randint(medium, most)
        length = max(BLOCK, min(length, self.max_write, span - span % BLOCK))
        blocks = (span - length) // BLOCK
        offset = start + BLOCK * rng.randint(0, blocks)
        if length > BLOCK and rng.random() < 0.3:
            # Straddle a chunk boundary on purpose: one write, two chunks of the dirty map.
            edge = (offset // CHUNK + 1) * CHUNK
            moved = edge - BLOCK * rng.randint(1, length // BLOCK - 1)
            if start <= moved and moved + length <= start + span:
                offset = moved
        return offset, length

    def _rate_delay(self, nbytes: int) -> float:
        """0 and take the bytes from the budget if `nbytes` may go now, else seconds to wait."""
        if not self.rate or not nbytes:
            return 0.0
        with self._rate_lock:
            now = time.monotonic()
            # A short burst is allowed so that the queue depth survives a rate limit.
            slot = max(self._next_slot, now - 0.05)
            if slot > now:
                return slot - now
            self._next_slot = slot + nbytes / self.rate
            return 0.0

    def _cancel(self, req: _Request) -> None:
        """Give back the range of a request that was picked but never issued."""
        if req.kind != "flush":
            with self._lock:
                self._models[req.disk].inflight.remove((req.offset, req.offset + req.length))

    def _issue(self, h: nbd.NBD, req: _Request) -> None:
        now = time.monotonic()
        with self._lock:
            if self._inflight_total == 0:
                self._progress_mark = now
            self._inflight_total += 1
        req.issued = now

        def completed(err: object) -> int:
            self._complete(req, getattr(err, "value", 0))
            return 1

        try:
            if req.kind == "write":
                data = b"".join(block_pattern(req.disk, o, req.generation)
                                for o in range(req.offset, req.offset + req.length, BLOCK))
                req.buffer = nbd.Buffer.from_bytearray(data)
                h.aio_pwrite(req.buffer, req.offset, completed, req.flags)
            elif req.kind == "zero":
                h.aio_zero(req.length, req.offset, completed, req.flags)
            elif req.kind == "trim":
                h.aio_trim(req.length, req.offset, completed, req.flags)
            else:
                h.aio_flush(completed)
        except nbd.Error as err:
            self._complete(req, err.errno or -1, str(err))

    def _complete(self, req: _Request, errno: int, message: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            r = self._report
            latency = now - req.issued
            r.latencies.append(latency)
            r.max_latency = max(r.max_latency, latency)
            gap = now - self._progress_mark
            if gap > r.longest_stall:
                r.longest_stall, r.longest_stall_start = gap, self._progress_mark
            self._progress_mark = now
            self._inflight_total -= 1
            ok = errno == 0
            if not ok:
                reason = message or os.strerror(errno)
                r.errors.append(f"{req.disk}: {req.kind} offset={req.offset} length={req.length} "
                                f"flags={req.flags:#x}: {reason}")
            if req.kind == "flush":
                r.flushes += ok
                return
            model = self._models[req.disk]
            if req.kind == "write":
                model.settle(req, req.generation, ok)
                if ok:
                    r.writes += 1
                    r.bytes_written += req.length
                    r.fua_writes += bool(req.flags & nbd.CMD_FLAG_FUA)
            elif req.kind == "zero":
                model.settle(req, ZERO, ok)
                r.zeroes += ok
            else:
                model.settle(req, None, False)    # trimmed: old content or zeroes
                r.trims += ok

    # ---- verification -----------------------------------------------------------------------

    def disks(self) -> list[str]:
        return list(self.uris)

    def size(self, disk: str) -> int:
        return self._models[disk].size

    def expected(self, disk: str, offset: int, length: int) -> bytes:
        """What the range must contain now (for blocks in an either-state: the first choice)."""
        model = self._models[disk]
        out = []
        for o in range(offset, offset + length, BLOCK):
            state = min(model.acceptable(o // BLOCK))
            out.append(self._block_content(model, o, state, None))
        return b"".join(out)

    def verify_image(self, disk: str, path: str | os.PathLike,
                     region: tuple[int, int] | None = None) -> list[int]:
        """Offsets of the 4 KiB blocks of a raw file that differ from the model (empty: all good).

        `region` (start, length), block-aligned, checks only that part: the rest of the disk may
        belong to another workload (the fault campaign runs fio there).
        """
        with open(path, "rb") as f:
            return self._verify(disk, lambda off, n: os.pread(f.fileno(), n, off), region)

    def verify_nbd(self, disk: str, uri: str, region: tuple[int, int] | None = None) -> list[int]:
        """Like `verify_image`, reading the disk through an NBD server."""
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            size = h.get_size()
            return self._verify(disk, lambda off, n: h.pread(min(n, size - off), off) if off < size else b"",
                                region)
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def _verify(self, disk: str, read: Callable[[int, int], bytes],
                region: tuple[int, int] | None = None) -> list[int]:
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError("verify while the writer runs: call stop() first")
        model = self._models[disk]
        start, end = (region[0], region[0] + region[1]) if region else (0, model.size)
        if start % BLOCK or end % BLOCK or not 0 <= start < end <= model.size:
            raise ValueError(f"region {region} of disk {disk!r}: must be {BLOCK}-byte aligned inside "
                             f"its {model.size} bytes")
        initial_file = None
        if model.initial not in (ZEROES, PATTERN):
            initial_file = open(model.initial, "rb")
        bad: list[int] = []
        either_pieces = {start + (b * BLOCK - start) // VERIFY_READ * VERIFY_READ for b in model.either}
        try:
            for base in range(start, end, VERIFY_READ):
                n = min(VERIFY_READ, end - base)
                data = read(base, n)
                initial = os.pread(initial_file.fileno(), n, base) if initial_file else None
                first, last = base // BLOCK, (base + n) // BLOCK
                untouched = not any(model.state[first:last]) and base not in either_pieces
                if untouched and model.initial != PATTERN:
                    # Fast path for the (usually large) part the writer never touched.
                    expected = initial.ljust(n, b"\0") if initial is not None else bytes(n)
                    if data == expected:
                        continue
                for o in range(base, base + n, BLOCK):
                    got = data[o - base:o - base + BLOCK]
                    if not any(got == self._block_content(model, o, s, initial and initial[o - base:o - base + BLOCK])
                               for s in model.acceptable(o // BLOCK)):
                        bad.append(o)
        finally:
            if initial_file:
                initial_file.close()
        return bad

    def _block_content(self, model: _DiskModel, offset: int, state: int, initial: bytes | None) -> bytes:
        if state == ZERO:
            return _ZERO_BLOCK
        if state > 0:
            return block_pattern(model.name, offset, state)
        if model.initial == ZEROES:
            return _ZERO_BLOCK
        if model.initial == PATTERN:
            return block_pattern(model.name, offset, 0)
        if initial is None:
            with open(model.initial, "rb") as f:
                initial = os.pread(f.fileno(), BLOCK, offset)
        return initial.ljust(BLOCK, b"\0")

    def describe(self, disk: str, offset: int, got: bytes | None = None) -> str:
        """One line explaining a mismatching block: what the model expects, what the data looks like."""
        model = self._models[disk]
        line = f"{disk}@{offset:#x}: expected state(s) {sorted(model.acceptable(offset // BLOCK))}"
        if got is not None:
            if got[:8] == struct.pack("<Q", _MAGIC):
                _, tag, off, gen = struct.unpack("<QQQQ", got[:32])
                line += f"; found pattern of disk-tag {tag:#x} offset {off:#x} generation {gen}"
            else:
                line += f"; found {'zeroes' if got == _ZERO_BLOCK else 'foreign data'}"
        return line


def patch_image(path: str | os.PathLike, offset: int, data: bytes) -> None:
    """Overwrite bytes of an image in place: how the verifiers' own tests plant a lost write."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike, piece: int = VERIFY_READ) -> str:
    """SHA-256 of a file's content, read in pieces (tests: "the source was not written again")."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as f:
        while block := f.read(piece):
            digest.update(block)
    return digest.hexdigest()
