"""The NBD backend: a disk behind an NBD export, on another host, through libnbd.

Design notes
- Links. A backend keeps up to MAX_LINKS connections ("links") to its export when the server
  advertises multi-conn (then a flush on one covers the writes completed on all, and every link
  reads every completed write), else exactly one. Every link is shared by all threads: a thread
  issues its request with libnbd's aio API and waits for it; the link's own thread (its reactor)
  polls the socket and completes requests. Why not one synchronous libnbd call per request:
  libnbd holds a handle's lock for the whole of a synchronous call (and of nbd_poll), so mirrored
  guest writes would queue behind one another and behind the copier's megabytes; and a blocking
  call cannot be given a deadline. Why several links: one TCP (and TLS) stream blocks at its head
  (a 4 KiB guest write behind 1 MiB of copy) and one TLS session encrypts on one thread at a
  time. A request goes to the link with the fewest bytes in flight; the copier keeps its stream
  on one link (`Channel`), so guest writes find the others idle.
- Deadlines. Every request has one: `timeout` seconds after it was issued (the destination's
  short deadline, well under the stun lease, or the longer one of a disk the guest is served
  from), pushed on while the server makes progress: a request is late only when its deadline has
  passed AND nothing completed on any link of its backend for as long as its timeout (the links
  lead to one server, which may serve one connection's queue before another's). A slow destination (a
  thin link, a rate-limited server) answers late but steadily, and its queue of requests may be
  longer than a deadline (the copier's pipeline, the async mirror's sends): that is not a dead
  link. One that stops answering completes nothing, so its requests are late at their own
  deadlines, as before. A `hard` deadline (the switchover's cap under its stun) is not pushed.
  The reactor sleeps until the earliest deadline; when one passes, it kills the link:
  shutdown(2) of the socket (libnbd keeps its fd, so it cannot be reused under anyone's poll),
  every request on the link completes with ETIMEDOUT, the link is dropped, and so are the other
  links of the backend, which lead to the same host. The next request opens a new link. Opening
  has the same deadline. A waiter does not rely on the reactor alone: it waits for its request
  until the deadline plus REACTOR_GRACE and kills the link itself past that.
- Lock order: libnbd calls completion callbacks with the handle's lock held, and a callback takes
  the link's lock; so nothing holding a link's lock calls libnbd (the fd is read once, at open).
- Who opens links: the first at open, in the caller (install_mirror, nbdkit's start), so its
  errors reach the caller; the others, and replacements, on the backend's opener thread, which
  the caller started: a reactor inherits its creator's CPU priority (Linux threads inherit nice),
  and one started by the copier would serve the guest at nice 19 (priority.py).
- TLS: nbds:// URIs use the plugin's `tls-certificates=DIR` (X.509: ca-cert.pem,
  client-cert.pem, client-key.pem) or `tls-psk-file=FILE`; libnbd verifies the server's
  certificate against the CA and its name. TLS material never comes from a URI (libnbd refuses
  local files a URI names unless told otherwise, and we do not tell it).
- What NBD cannot do as a file does, decided here:
  trim is sent as write-zeroes that may punch: the file backend's trim leaves zeroes (a punched
  hole) and the mirror and the switchover rely on both sides reading the same, while NBD's trim
  promises nothing about what is read afterwards; servers implement both as the same punch.
  Write-back: NBD has no "write back without flush": the server has the data once it replies.
  `start_write_back` notes the range and starts a flush unless one is in flight (one flush
  covers every write acknowledged before it was sent); `write_back` waits until a flush that
  began after the note has completed, and flushes itself if none did. So the copier's
  write-behind keeps one flush in flight beside its writes (waiting for each in turn halved the
  copy's rate), the server's cache stays bounded by the window, and the flush before the
  switchover stun stays short, as for a local destination.
  Flush deadlines: at least FLUSH_TIMEOUT. A flush waits for the server's storage, which may
  legitimately take longer than a write's deadline; a dead link is still found by the deadline
  of any other request on it, which cuts every link of the backend.
  Extents: base:allocation; a range that reads as zeroes (STATE_ZERO) is a hole to the copier,
  allocated or not. A server without base:allocation has data everywhere.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import nbd

from .backend import is_nbd_uri
from .digest import chunk_digests

MAX_LINKS = 4                   # links per backend when the server advertises multi-conn
MAX_REQUEST_BYTES = 32 << 20    # one read or write request (nbdkit's limit; a server may say less)
MAX_ZERO_BYTES = 1 << 30        # one zero request (NBD counts are 32 bits)
MAX_STATUS_BYTES = 1 << 30      # the range one block status request asks about
FLUSH_TIMEOUT = 10.0            # the least deadline of a flush, seconds (module notes)
REACTOR_GRACE = 0.25            # a waiter's margin over its reactor enforcing the deadline
CLOSE_GRACE = 0.2               # how long close waits for clean disconnects
_ZEROES = bytes(1 << 20)

Done = Callable[[int], None]                               # a request's completion: 0 or an errno
Issue = Callable[[nbd.NBD, Callable[[object], int]], int]   # issues one aio command with a callback


@dataclass(frozen=True)
class NbdOptions:
    """How remote disks are reached: TLS material and deadlines (the plugin's command line)."""

    tls_certificates: str | None = None   # directory: ca-cert.pem, client-cert.pem, client-key.pem
    tls_psk_file: str | None = None       # PSK keys file (username:hexkey lines)
    dest_timeout: float = 1.0             # deadline of a destination request, seconds
    source_timeout: float = 30.0          # deadline of a request to a disk served from the remote


class Request:
    """One command in flight on a link: by when it must complete (see the notes: pushed on while
    the link makes progress, unless `hard`), and whom to tell."""

    __slots__ = ("nbytes", "deadline", "patience", "done", "finished")

    def __init__(self, nbytes: int, deadline: float, done: Done, hard: bool = False):
        self.nbytes = nbytes
        self.deadline = deadline
        self.patience = 0.0 if hard else max(0.0, deadline - time.monotonic())
        self.done = done
        self.finished = False

    def due(self, progress: float) -> float:
        """When this request is late, given the link's last completion at `progress`."""
        return max(self.deadline, progress + self.patience) if self.patience else self.deadline


class Progress:
    """When a request last completed on any link of one backend (set by the links' reactors)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()


class Link:
    """One connection to the export and its reactor thread (see the module notes).

    This lock protects `_pending`, `in_flight_bytes`, `alive`, `_killed` and `_sleep_until`.
    """

    def __init__(self, uri: str, options: NbdOptions, deadline: float,
                 on_dead: Callable[[Link], None], on_timeout: Callable[[Link], None],
                 progress: Progress | None = None):
        self.uri = uri
        self.h = _connect(uri, options, deadline)
        self.fd = self.h.aio_get_fd()
        self.in_flight_bytes = 0
        self.alive = True
        self._lock = threading.Lock()
        self._pending: set[Request] = set()
        self._killed = 0                      # the errno of a kill, else 0
        self._kill_reason = ""
        self._sleep_until = float("inf")
        self._progress = progress or Progress()   # shared by the backend's links
        self._closing: float | None = None   # close(): the deadline of the clean disconnect
        self._on_dead, self._on_timeout = on_dead, on_timeout
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._react, name="nbd-link", daemon=True)
        self._thread.start()

    # --- issuing, from any thread ---------------------------------------------------------

    def submit(self, issue: Issue, nbytes: int, done: Done, deadline: float, hard: bool = False) -> None:
        """Issue one command; `done(errno or 0)` is called once, on the reactor (or here if it fails)."""
        req = Request(nbytes, deadline, done, hard)
        with self._lock:
            if not self.alive:
                raise OSError(self._killed or errno.ENOTCONN, self._kill_reason or f"connection to {self.uri} lost")
            self._pending.add(req)
            self.in_flight_bytes += nbytes
            wake = deadline < self._sleep_until
            h = self.h
        try:
            issue(h, lambda err: self._completed(req, err.value))
            wake = wake or bool(h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE)
        except nbd.Error as err:
            with self._lock:
                if req.finished:      # the link died under the call and completed it
                    return
                req.finished = True
                self._pending.discard(req)
                self.in_flight_bytes -= nbytes
            if h.aio_is_dead() or h.aio_is_closed():    # the reactor has not seen it yet
                self.kill(errno.ENOTCONN, f"connection to {self.uri} lost")
                raise OSError(errno.ENOTCONN, f"connection to {self.uri} lost: {err.string}") from None
            raise OSError(err.errnum or errno.EIO, err.string) from None
        if wake:
            self._wake()

    def kill(self, errnum: int, reason: str) -> None:
        """Cut the connection: every request on it completes with `errnum`."""
        with self._lock:
            if not self.alive or self._killed:
                return
            self._killed, self._kill_reason = errnum, reason
            # Under the lock, so the reactor cannot have dropped the handle (and its fd) yet.
            try:
                with socket.socket(fileno=os.dup(self.fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake()

    def close(self) -> None:
        """Start a clean disconnect; the reactor ends the link when done, or kills it after CLOSE_GRACE."""
        with self._lock:
            if not self.alive or self._closing is not None:
                return
            self._closing = time.monotonic() + CLOSE_GRACE
            h = self.h
        try:
            h.aio_disconnect(0)
        except nbd.Error:
            pass
        self._wake()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def usable(self) -> bool:
        """Alive and not being cut (a killed link is alive until its reactor has ended it)."""
        return self.alive and not self._killed

    def due(self, deadline: float, patience: float) -> float:
        """When a waiter's request (its `deadline`, its timeout `patience`) is late on this link."""
        return max(deadline, self._progress.last + patience)

    @property
    def load(self) -> int:
        return self.in_flight_bytes + 4096 * len(self._pending)

    # --- the reactor ----------------------------------------------------------------------

    def _completed(self, req: Request, err: int) -> int:
        with self._lock:
            if req.finished:
                return 1
            req.finished = True
            self._pending.discard(req)
            self.in_flight_bytes -= req.nbytes
            if not self._killed:     # an answer, an error too: the server is there
                self._progress.last = time.monotonic()
            if err and self._killed:
                err = self._killed
        req.done(err)
        return 1     # retire the command: nobody asks aio_command_completed

    def _react(self) -> None:
        h, poller = self.h, select.poll()
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not (h.aio_is_closed() or h.aio_is_dead()):
                with self._lock:
                    progress = self._progress.last
                    earliest = min((r.due(progress) for r in self._pending), default=float("inf"))
                    if self._closing is not None:
                        earliest = min(earliest, self._closing)
                    self._sleep_until = earliest
                direction = h.aio_get_direction()
                events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | \
                         (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)
                poller.register(self.fd, events)
                wait = None if earliest == float("inf") else max(0, int((earliest - time.monotonic()) * 1000) + 1)
                for fd, ready in poller.poll(wait):
                    if fd != self.fd:
                        self._drain_wake()
                        continue
                    if ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        h.aio_notify_read()
                    if ready & select.POLLOUT:
                        h.aio_notify_write()
                    if ready & (select.POLLHUP | select.POLLERR) and not (h.aio_is_closed() or h.aio_is_dead()):
                        return          # the socket is gone and libnbd did not notice: end here
                self._check_deadlines()
        except nbd.Error:
            pass                        # the state machine failed: the link is dead
        finally:
            self._die()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = any(r.due(self._progress.last) <= now for r in self._pending)
            closing_late = self._closing is not None and self._closing <= now
        if late:
            self.kill(errno.ETIMEDOUT, f"no answer from {self.uri} within the deadline")
            self._on_timeout(self)
        elif closing_late:
            self.kill(errno.ESHUTDOWN, f"connection to {self.uri} closed")

    def _die(self) -> None:
        """The link is over: fail what is still pending, let go of the handle, tell the backend."""
        with self._lock:
            self.alive = False
            pending = list(self._pending)
            err = self._killed or errno.ENOTCONN
        for req in pending:
            self._completed(req, err)
        with self._lock:
            self.h = None       # the last reference (but a submitter's): nbd_close
        self._wake_r.close()
        self._wake_w.close()    # a closed Python socket refuses send(); its fd number is never reused under us
        self._on_dead(self)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:          # full (a wake is pending anyway) or closed (the link is over)
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass


def _connect(uri: str, options: NbdOptions, deadline: float) -> nbd.NBD:
    """A handle connected to `uri` and ready, by `deadline` (driven here: nobody else has it yet)."""
    h = nbd.NBD()
    h.set_pread_initialize(False)      # a failed read fails the request; no need to zero buffers first
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if options.tls_psk_file:
        h.set_tls_psk_file(options.tls_psk_file)
    elif options.tls_certificates:
        h.set_tls_certificates(options.tls_certificates)
    try:
        h.aio_connect_uri(uri)
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise OSError(errno.ECONNRESET, f"{uri}: the server closed the connection during the handshake")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.ETIMEDOUT, f"no connection to {uri} within the deadline")
            h.poll(max(1, int(remaining * 1000)))
    except nbd.Error as err:
        hint = ""
        if uri.startswith("nbds") and not err.errnum:
            hint = (f"; TLS: the server's certificate must be signed by the CA in "
                    f"{options.tls_certificates or 'the configured directory'}, and ours by its CA")
        raise OSError(err.errnum or errno.EPROTO, f"cannot connect to {uri}: {err.string}{hint}") from None
    return h


class _Countdown:
    """The pieces of one request: done when every piece is; keeps the first error."""

    def __init__(self, pieces: int):
        self._left = pieces
        self._lock = threading.Lock()
        self.error = 0
        self.event = threading.Event()
        if pieces == 0:
            self.event.set()

    def one(self, err: int) -> None:
        with self._lock:
            self.error = self.error or err
            self._left -= 1
            if self._left == 0:
                self.event.set()


class NbdBackend:
    """A disk behind an NBD export (see the module notes).

    Example: `NbdBackend("nbds://hostb:10809/disk0", NbdOptions(tls_certificates="/etc/svmotion/tls"))`
    """

    def __init__(self, uri: str, options: NbdOptions, dest: bool = False):
        self.path = uri
        self.options = options
        self.timeout = options.dest_timeout if dest else options.source_timeout
        self.guest_wait = self.timeout + REACTOR_GRACE     # mirror.py: a guest flush waits no longer
        self._progress = Progress()   # the links' last completion (deadlines, module notes)
        # This condition's lock protects the link list, the opener's state and the flush counts.
        self._cond = threading.Condition()
        self._links: list[Link] = []
        self._closed = False
        self._want_link = False
        self._begun = 0               # connection attempts the opener began ...
        self._ended = 0               # ... and the number of the last one that ended
        self._open_error: OSError | None = None   # why the last attempt failed
        self._flushes_begun = 0
        self._flushed = 0             # the highest flush number known complete
        self._flushing = False        # a write-behind flush is in flight
        self._noted: dict[tuple[int, int], int] = {}
        first = self._connect(time.monotonic() + self.timeout)
        try:
            self._learn(first.h)
        except BaseException:
            first.close()
            raise
        self._links.append(first)
        threading.Thread(target=self._open_links, name="nbd-opener", daemon=True).start()

    def _learn(self, h: nbd.NBD) -> None:
        """What the export is and can do, from the handshake of the first link."""
        try:
            if h.is_read_only():
                raise OSError(errno.EROFS, f"{self.path} is a read-only export")
            self.size = h.get_size()
            self.can_fua, self.can_flush = h.can_fua(), h.can_flush()
            self.can_zero, self.can_fast_zero = h.can_zero(), h.can_fast_zero()
            self.can_extents = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            self.max_request = min(h.get_block_size(nbd.SIZE_MAXIMUM) or MAX_REQUEST_BYTES, MAX_REQUEST_BYTES)
            self._most = MAX_LINKS if h.can_multi_conn() else 1
            self._target = self._most     # links the opener keeps; lowered after a failed attempt
        except nbd.Error as err:
            raise OSError(err.errnum or errno.EIO, f"{self.path}: {err.string}") from None

    # --- links ----------------------------------------------------------------------------

    def _connect(self, deadline: float) -> Link:
        return Link(self.path, self.options, deadline, self._link_dead, self._timed_out, self._progress)

    def _open_links(self) -> None:
        """The opener thread: links beyond the first, and replacements asked for by `_link`.

        A failed attempt stops the background ones (a host that does not answer is not called
        again and again) until a request asks for a link; one that succeeds brings them back.
        """
        while True:
            with self._cond:
                while not self._closed and not self._want_link and len(self._links) >= self._target:
                    self._cond.wait()
                if self._closed:
                    return
                self._want_link = False
                self._begun += 1
                number = self._begun
            try:
                link = self._connect(time.monotonic() + self.timeout)
            except OSError as err:
                with self._cond:
                    self._ended, self._open_error = number, err
                    self._target = len(self._links)
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._closed:
                    link.close()
                    return
                self._links.append(link)
                self._ended, self._target = number, self._most
                self._cond.notify_all()

    def _link(self, deadline: float, op: str, offset: int) -> Link:
        """The live link with the least in flight; a new one (by the deadline) when none is left."""
        with self._cond:
            while True:
                live = [link for link in self._links if link.usable]
                if live:
                    return min(live, key=lambda link: link.load)
                if self._closed:
                    raise OSError(errno.ESHUTDOWN, f"{op}: {self.path} is closed")
                # Wait for an attempt begun after this request: one already under way may be
                # failing for a reason that has passed (a server that did not answer then).
                self._want_link = True
                after = self._begun
                self._cond.notify_all()
                while self._ended <= after and not any(link.usable for link in self._links):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._timeout(op, offset)
                    self._cond.wait(remaining)
                if not any(link.usable for link in self._links) and self._open_error is not None:
                    err = self._open_error
                    raise OSError(err.errno, f"{op} at {offset}: {err.strerror}")

    def _link_dead(self, link: Link) -> None:
        with self._cond:
            if link in self._links:
                self._links.remove(link)
            self._cond.notify_all()

    def _timed_out(self, link: Link) -> None:
        """One link missed a deadline: the others lead to the same host, drop them too."""
        with self._cond:
            others = [other for other in self._links if other is not link]
        for other in others:
            other.kill(errno.ETIMEDOUT, f"no answer from {self.path} within {self.timeout} s")

    def _timeout(self, op: str, offset: int) -> OSError:
        return OSError(errno.ETIMEDOUT, f"{op} at {offset}: no answer from {self.path} within {self.timeout} s")

    # --- one request, in pieces, waited for -------------------------------------------------

    def _request(self, op: str, offset: int, pieces: list[tuple[int, Issue]], timeout: float | None = None) -> None:
        """Issue the pieces of one request on one link and wait for all of them, by the deadline.

        Always waits for every piece it issued, even after an error: a read's buffer is the
        caller's (nbdkit's), which must not be written after we return.
        """
        patience = timeout or self.timeout
        deadline = time.monotonic() + patience
        link = self._link(deadline, op, offset)
        count = _Countdown(len(pieces))
        i, retried = 0, False
        while i < len(pieces):
            nbytes, issue = pieces[i]
            try:
                link.submit(issue, nbytes, count.one, deadline)
            except OSError as err:
                if i == 0 and err.errno == errno.ENOTCONN and not retried:
                    retried = True      # a link found dead as we used it, nothing sent: another one
                    link = self._link(deadline, op, offset)
                    continue
                for _ in pieces[i:]:
                    count.one(err.errno or errno.EIO)
                break
            i += 1
        if not self._wait(count, link, deadline, patience):
            link.kill(errno.ETIMEDOUT, f"no answer from {self.path} within {self.timeout} s")
            count.event.wait(REACTOR_GRACE)
            raise self._timeout(op, offset)
        if count.error:
            if count.error == errno.ETIMEDOUT:
                raise self._timeout(op, offset)
            raise OSError(count.error, f"{op} at {offset} on {self.path}: {os.strerror(count.error)}")

    @staticmethod
    def _wait(count: "_Countdown", link: Link, deadline: float, patience: float) -> bool:
        """Wait for a request's pieces while its link makes progress (module notes); False: late."""
        while True:
            due = link.due(deadline, patience)
            if count.event.wait(max(0.0, due - time.monotonic()) + REACTOR_GRACE):
                return True
            if link.due(deadline, patience) <= due:
                return False

    # --- the Backend interface (backend.py) ---------------------------------------------------

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self._request("pread", offset, [
            (n, _pread(nbd.Buffer.from_buffer(view[pos:pos + n]), offset + pos))
            for pos, n in _pieces(len(view), self.max_request)])

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        view = memoryview(buf).cast("B")
        flags = nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        self._request("pwrite", offset, [(n, _pwrite(view[pos:pos + n], offset + pos, flags))
                                         for pos, n in _pieces(len(view), self.max_request)])
        if fua and not self.can_fua:
            self.flush()

    def flush(self) -> None:
        if not self.can_flush:
            return
        number = self._begin_flush()
        self._request("flush", 0, [(0, _flush)], max(self.timeout, FLUSH_TIMEOUT))
        self._flush_done(number, 0)

    def _begin_flush(self) -> int:
        with self._cond:
            self._flushes_begun += 1
            return self._flushes_begun

    def _flush_done(self, number: int, err: int, background: bool = False) -> None:
        with self._cond:
            if not err:
                self._flushed = max(self._flushed, number)
            if background:
                self._flushing = False
            self._cond.notify_all()

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Zeroes that may be punched, not NBD's trim: see the module notes."""
        self.zero(count, offset, may_trim=True, fast=False, fua=fua)

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool = False) -> None:
        """Make the range read as zeroes; with `fast`, fail with ENOTSUP rather than write zeroes."""
        if fast and not self.can_fast_zero:
            raise OSError(errno.ENOTSUP, f"zero: {self.path} has no fast zero")
        if not self.can_zero:
            self._write_zeroes(count, offset, fua)
            return
        flags = (0 if may_trim else nbd.CMD_FLAG_NO_HOLE) | (nbd.CMD_FLAG_FAST_ZERO if fast else 0) | \
            (nbd.CMD_FLAG_FUA if fua and self.can_fua else 0)
        self._request("zero", offset, [(0, _zero(n, offset + pos, flags))
                                       for pos, n in _pieces(count, MAX_ZERO_BYTES)])
        if fua and not self.can_fua:
            self.flush()

    def _write_zeroes(self, count: int, offset: int, fua: bool) -> None:
        for pos, n in _pieces(count, len(_ZEROES)):
            self.pwrite(memoryview(_ZEROES)[:n], offset + pos)
        if fua:
            self.flush()

    def segments(self, offset: int, count: int) -> Iterator[tuple[int, int, bool]]:
        """Yield (offset, length, is_data) runs covering [offset, offset+count), from base:allocation."""
        end = offset + count
        run_start, run_data = offset, None
        pos = offset
        while pos < end:
            for ext_off, ext_len, is_data in self._extents(pos, end - pos):
                if run_data is not None and is_data != run_data:
                    yield run_start, ext_off - run_start, run_data
                    run_start = ext_off
                run_data = is_data
                pos = ext_off + ext_len
        if run_data is not None:
            yield run_start, end - run_start, run_data

    def _extents(self, offset: int, count: int) -> list[tuple[int, int, bool]]:
        """One block status request: the extents the server tells from offset (at least one, clipped)."""
        if not self.can_extents:
            return [(offset, count, True)]
        entries: list[int] = []

        def extent(context: str, start: int, found: list[int], err: object) -> int:
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                entries.extend(found)
            return 0

        ask = min(count, MAX_STATUS_BYTES)
        self._request("block_status", offset,
                      [(0, lambda h, cb: h.aio_block_status(ask, offset, extent, completion=cb))])
        out, pos, end = [], offset, offset + count
        for i in range(0, len(entries) - 1, 2):
            length = min(entries[i], end - pos)
            if length <= 0:
                break
            out.append((pos, length, not entries[i + 1] & nbd.STATE_ZERO))
            pos += length
        if not out:
            raise OSError(errno.EPROTO, f"block_status at {offset}: {self.path} answered no extent")
        return out

    def next_data(self, offset: int) -> int:
        """The first offset at or after `offset` holding data, or the size when only a hole follows."""
        pos = offset
        while pos < self.size:
            for ext_off, ext_len, is_data in self._extents(pos, self.size - pos):
                if is_data:
                    return ext_off
                pos = ext_off + ext_len
        return self.size

    def start_write_back(self, offset: int, count: int) -> None:
        """Note a copied range and start a flush unless one is in flight (module notes, write-back)."""
        if not self.can_flush:
            return
        with self._cond:
            self._noted[(offset, count)] = self._flushes_begun
            if self._flushing:
                return
            self._flushing = True
        number = self._begin_flush()
        deadline = time.monotonic() + max(self.timeout, FLUSH_TIMEOUT)
        try:
            link = self._link(deadline, "flush", 0)
            link.submit(_flush, 0, lambda err: self._flush_done(number, err, background=True), deadline)
        except OSError:
            self._flush_done(number, errno.EIO, background=True)   # write_back flushes itself

    def write_back(self, offset: int, count: int) -> None:
        """Wait until a noted range is on the server's storage: for a flush begun after the note,
        or one of our own when none is in flight (a failed one raises)."""
        with self._cond:
            before = self._noted.pop((offset, count), None)
            while before is not None and self._flushed <= before and self._flushing:
                self._cond.wait()
            covered = before is None or self._flushed > before
        if not covered:
            self.flush()

    def write_back_all(self) -> None:
        """Make everything written durable: one NBD flush (flush_dest, Cleanup)."""
        self.flush()

    def digests(self, offset: int, count: int, granularity: int) -> bytes:
        """Per-chunk digests of a range, read over NBD for now.

        The seam for issue 11's "only digests cross the network": a remote disk whose host can
        digest where the data is (its agent's digest op) answers here instead; DiskLoad (copier.py)
        and verification only ever call `backend.digests`.
        """
        return chunk_digests(self, offset, count, granularity)

    def become_primary(self) -> None:
        """The guest is served from here now: its requests get the longer deadline of a served disk
        (a destination's short one would turn a short stall of the export into a guest error)."""
        self.timeout = self.options.source_timeout

    def check_renamed(self, location: str) -> str | None:
        """None if `location` reaches an export of the disk's size (NBD tells no more about
        identity than that); the caller then sets `path`, which new links use."""
        if not is_nbd_uri(location):
            return "is not an NBD URI, and the disk is served from an NBD export"
        try:
            probe = self._connect(time.monotonic() + self.timeout)
        except OSError as err:
            return f"cannot be reached: {err.strerror}"
        try:
            size = probe.h.get_size()
        except nbd.Error as err:
            return f"cannot be reached: {err.string}"
        finally:
            probe.close()
        if size != self.size:
            return f"reaches an export of {size} bytes, not the disk's {self.size}"
        return None

    def close(self) -> None:
        """Disconnect every link cleanly (each gives up after CLOSE_GRACE: a dead link does not answer)."""
        with self._cond:
            self._closed = True
            links = list(self._links)
            self._cond.notify_all()
        for link in links:
            link.close()
        end = time.monotonic() + CLOSE_GRACE + REACTOR_GRACE
        for link in links:
            link.join(max(0.0, end - time.monotonic()))


class Channel:
    """The copier's stream of async requests, kept on one link so that guest writes avoid it.

    `done(errno or 0)` is called on a reactor thread; `cap` (the switchover's deadline under its
    stun) shortens a request's deadline. Methods raise OSError when a request cannot be issued.
    """

    def __init__(self, backend: NbdBackend):
        self.backend = backend
        self._link: Link | None = None

    def _deadline(self, cap: float | None) -> float:
        deadline = time.monotonic() + self.backend.timeout
        return deadline if cap is None else min(deadline, cap)

    def _submit(self, op: str, offset: int, nbytes: int, issue: Issue, done: Done, cap: float | None) -> None:
        deadline = self._deadline(cap)
        if self._link is None or not self._link.usable:
            self._link = self.backend._link(deadline, op, offset)
        self._link.submit(issue, nbytes, done, deadline, hard=cap is not None)

    def pread(self, buf: memoryview, offset: int, done: Done, cap: float | None = None) -> None:
        self._submit("pread", offset, len(buf), _pread(nbd.Buffer.from_buffer(buf), offset), done, cap)

    def pwrite(self, buf: memoryview, offset: int, done: Done, cap: float | None = None) -> None:
        self._submit("pwrite", offset, len(buf), _pwrite(buf, offset, 0), done, cap)

    def zero(self, count: int, offset: int, done: Done, cap: float | None = None) -> None:
        """Zeroes that may be punched (a hole of the source), in one request of at most MAX_ZERO_BYTES."""
        assert count <= MAX_ZERO_BYTES
        self._submit("zero", offset, 0, _zero(count, offset, 0), done, cap)

    def timeout_error(self, op: str, offset: int) -> OSError:
        return self.backend._timeout(op, offset)


def _pieces(count: int, most: int) -> Iterator[tuple[int, int]]:
    """(position, length) pieces of at most `most` bytes covering [0, count)."""
    for pos in range(0, count, most):
        yield pos, min(most, count - pos)


def _pread(buf: nbd.Buffer, offset: int) -> Issue:
    return lambda h, cb: h.aio_pread(buf, offset, completion=cb)


def _pwrite(buf: memoryview, offset: int, flags: int) -> Issue:
    return lambda h, cb: h.aio_pwrite(buf, offset, completion=cb, flags=flags)


def _flush(h: nbd.NBD, cb: Callable[[object], int]) -> int:
    return h.aio_flush(completion=cb)


def _zero(count: int, offset: int, flags: int) -> Issue:
    return lambda h, cb: h.aio_zero(count, offset, completion=cb, flags=flags)
