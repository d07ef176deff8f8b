"""JSON-lines control server on a Unix socket: the mirror node's control channel, and the agent's API.

Design notes
- Framing (docs/interfaces.md, section 2): one JSON object per line each way, replies in request
  order on each connection. A bad line gets `{"ok": false, "error": ...}` and the connection stays
  usable: a confused client must never take the server, or the guest's IO, down with it.
- A line is at most MAX_LINE_BYTES. A longer one gets one error reply and the connection is
  closed: skipping to its newline would mean reading and dropping an unbounded stream, and a
  client that sends a megabyte of request has lost its framing anyway. Memory per connection is
  thus bounded by one line plus one receive buffer. Lines must be UTF-8; bytes that are not are
  refused rather than replaced, since a replaced byte in a path would name another file.
- Arguments: every op declares its arguments with `@takes(key=Arg(kinds, default, check))`; the
  owner's dispatcher runs `arguments()` before the op, so a request with an unknown key, a value
  of the wrong JSON type or a value its check refuses is answered with one line quoting the value
  and nothing happens. JSON types are strict: `"false"` is not a boolean, `true` is not an
  integer, `1` is a number but `1.5` is not an integer, NaN and Infinity are not numbers.
- Listeners: the server accepts on a `Listener`, which binds the listening socket and admits
  each connection. `UnixListener` (the default, given a path) is the mirror node's control socket
  and the agent's API; the agent's TCP API for other hosts admits by mutual TLS
  (agent/tls.py `TlsListener`). Framing, typed arguments and dispatch are the same on every
  listener. Admission runs in the connection's own thread, so a slow TLS handshake never holds
  up the accept loop.
- Security of the Unix listener: the socket is created mode 0600 inside a umask, so there is no
  window in which another user can connect; each peer's uid (SO_PEERCRED) must equal ours, which
  also refuses root-owned clients of a non-root server. The socket holds the power to stun a VM.
- Threads: one daemon thread per connection. Handlers take their own locks; the server holds none
  while a handler runs. `on_close` tells the owner that a connection went away, so a stun held by
  a vanished agent is rolled back at once instead of waiting for its lease.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, TypeVar

MAX_LINE_BYTES = 1 << 20     # a request line, newline excluded
_RECV_BYTES = 1 << 16
_SHOWN_CHARS = 60            # how much of a bad value an error line quotes


class RequestError(Exception):
    """A request the handler refuses; its text is sent back as the one-line error.

    `extra` fields (for example the CLI exit code) travel in the reply next to `error`.
    """

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class Connection:
    """One client connection; handlers may use it as a key for per-client state (a held stun).

    `peer` says who is at the other end, for logs: "uid 0", or a TLS peer's name and address.
    """

    def __init__(self, sock: socket.socket, peer_uid: int | None = None, peer: str = ""):
        self.sock = sock
        self.peer_uid = peer_uid
        self.peer = peer or f"uid {peer_uid}"


class NotAdmitted(Exception):
    """A connection its listener refuses; `tell`: send the reason as a reply line before closing.

    (A failed TLS handshake has no channel to tell anything on: its peer sees the TLS alert.)
    """

    def __init__(self, reason: str, tell: bool = True):
        super().__init__(reason)
        self.tell = tell


class Listener(Protocol):
    """Where a ControlServer listens and whom it admits (see UnixListener, agent/tls.py TlsListener)."""

    name: str                                  # where it listens, for thread names and logs

    def open(self) -> socket.socket:
        """A bound, listening socket."""

    def admit(self, sock: socket.socket) -> Connection:
        """The accepted socket as a Connection, in the connection's own thread; raise NotAdmitted."""

    def close(self) -> None:
        """Undo what `open` left behind (the socket itself is closed by the server)."""


Handler = Callable[[dict[str, Any], Connection], dict[str, Any]]


# ---- typed arguments ------------------------------------------------------------------------

class ArgumentError(RequestError):
    """A request argument that is unknown, missing, of the wrong type or refused by its check."""


REQUIRED: Any = object()     # Arg default: the argument must be given

# What each accepted Python kind is called in JSON, for the error line.
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "a list", type(None): "null"}


@dataclass(frozen=True)
class Arg:
    """One argument of an op: its JSON kind(s), its default, and an optional check of the value.

    `kinds` are Python types as json.loads returns them (bool, int, float, str, dict, list,
    type(None)); `float` accepts integers too. `check(value)` returns what is wrong (the rule and
    an example) or None. Example: `Arg(float, 2.0, within(0.01, 60))`.
    """

    kinds: type | tuple[type, ...]
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None


F = TypeVar("F", bound=Callable[..., Any])


def takes(**spec: Arg) -> Callable[[F], F]:
    """Declare the arguments of an op method; its dispatcher checks them with `arguments()` first.

    Example: `@takes(stop_vms=Arg(bool, False))` above `def op_shutdown(self, request)`.
    An op without `@takes` takes no arguments.
    """
    def mark(op: F) -> F:
        op.arguments = spec  # type: ignore[attr-defined]
        return op
    return mark


def declared(op: Callable[..., Any]) -> dict[str, Arg]:
    """The arguments an op method declared with `@takes` (none without it)."""
    return getattr(op, "arguments", {})


def shown(value: Any) -> str:
    """A value quoted for a one-line error (repr, as elsewhere), cut short: requests can be 1 MiB."""
    try:
        text = repr(value)
    except RecursionError:       # a list nested about as deep as json.loads allows
        text = f"<{_json_kind(value)} nested too deeply>"
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, float) and math.isfinite(value))
    return isinstance(value, kind)


def arguments(values: dict[str, Any], spec: dict[str, Arg], where: str,
              keep: tuple[str, ...] = ("op",)) -> dict[str, Any]:
    """`values` checked against `spec`, defaults filled in; raise ArgumentError at the first bad one.

    `where` starts the error line (the op, or the op and the object being checked). The `keep`
    keys are passed through unchecked: a request's own "op". Example:
    `arguments({"op": "shutdown", "stop_vms": "false"}, {"stop_vms": Arg(bool, False)}, "shutdown")`
    raises `shutdown: bad stop_vms 'false': must be true or false, not a string`.
    """
    unknown = [key for key in values if key not in keep and key not in spec]
    if unknown:
        takes_ = ", ".join(spec) or "no arguments"
        raise ArgumentError(f"{where}: unknown argument {shown(unknown[0])}; it takes {takes_}")
    out = {key: values[key] for key in keep if key in values}
    for key, arg in spec.items():
        kinds = arg.kinds if isinstance(arg.kinds, tuple) else (arg.kinds,)
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
        if key not in values:
            if arg.default is REQUIRED:
                raise ArgumentError(f"{where}: missing argument {shown(key)} ({wanted})")
            out[key] = arg.default
            continue
        value = values[key]
        if not any(_is(value, k) for k in kinds):
            raise ArgumentError(f"{where}: bad {key} {shown(value)}: must be {wanted}, "
                                f"not {_json_kind(value)}")
        problem = arg.check(value) if arg.check is not None else None
        if problem is not None:
            raise ArgumentError(f"{where}: bad {key} {shown(value)}: {problem}")
        out[key] = value
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a fractional number"),
                       (str, "a string"), (dict, "an object"), (list, "a list")):
        if isinstance(value, kind):
            return name
    return "null"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    """Check: the value is one of `choices`."""
    return lambda v: None if v in choices else f"use one of {', '.join(choices)}"


def within(low: float, high: float) -> Callable[[Any], str | None]:
    """Check: low <= value <= high."""
    return lambda v: None if low <= v <= high else f"must be from {low} to {high}"


def power_of_two(low: int, high: int) -> Callable[[Any], str | None]:
    """Check: a power of two from low to high (chunk sizes)."""
    def check(v: int) -> str | None:
        if low <= v <= high and not v & (v - 1):
            return None
        return f"must be a power of two from {low} to {high} bytes, e.g. 65536"
    return check


def file_path(value: str) -> str | None:
    """Check: a string the OS can take as a file name (non-empty, no NUL, encodable)."""
    try:
        if value and "\0" not in value and os.fsencode(value):
            return None
    except UnicodeEncodeError:
        pass
    return "must be a file path: a non-empty string without NUL bytes or unpaired surrogates"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode one request line; raise RequestError saying what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"malformed request: not UTF-8 (byte {line[err.start]:#04x} at offset "
                           f"{err.start})") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"malformed request: not JSON ({err.msg} at column {err.colno})") from None
    except ValueError:     # json.loads' only other ValueError: an integer over Python's digit limit
        raise RequestError(f"malformed request: an integer of more than {sys.get_int_max_str_digits()} "
                           "digits") from None
    except RecursionError:
        raise RequestError("malformed request: nested too deeply") from None
    if not isinstance(request, dict):
        raise RequestError("malformed request: expected a JSON object like {\"op\": \"status\"}")
    if not isinstance(request.get("op"), str):
        raise RequestError("malformed request: missing \"op\" (a string naming the operation)")
    return request


def request_lines(sock: socket.socket) -> Iterator[bytes | None]:
    """The lines a client sends, newline stripped; None for a line over MAX_LINE_BYTES, then stop.

    A last line without a newline (the client shut down its side) is a line too. The buffer never
    holds more than MAX_LINE_BYTES plus one receive.
    """
    buf = bytearray()
    while True:
        data = sock.recv(_RECV_BYTES)
        if not data:
            if buf:
                yield bytes(buf) if len(buf) <= MAX_LINE_BYTES else None
            return
        start = len(buf)
        buf += data
        begin = 0
        # Only the new bytes can hold a newline: what was buffered had none.
        end = buf.find(b"\n", start)
        while end >= 0:
            if end - begin > MAX_LINE_BYTES:
                yield None
                return
            yield bytes(buf[begin:end])
            begin = end + 1
            end = buf.find(b"\n", begin)
        del buf[:begin]
        if len(buf) > MAX_LINE_BYTES:
            yield None
            return


class UnixListener:
    """A Unix socket, mode 0600, admitting only peers of our own uid (the module's notes).

    Example: `ControlServer(UnixListener("/run/svmotion/vm1.ctl"), handle)`, or just the path.
    """

    def __init__(self, path: str):
        self.path = path
        self.name = path

    def open(self) -> socket.socket:
        """Bind the socket (replacing a stale one)."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        # A full backlog makes a client's connect fail at once with EAGAIN when it has a timeout
        # set (Unix sockets do not wait), so the agent's own calls would fail under a burst.
        listener.listen(socket.SOMAXCONN)
        return listener

    def admit(self, sock: socket.socket) -> Connection:
        uid = peer_uid(sock)
        if uid != os.getuid():
            raise NotAdmitted(f"permission denied: peer uid {uid} is not the server's uid {os.getuid()}")
        return Connection(sock, uid)

    def close(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ControlServer:
    """Serves `handle(request, connection) -> reply fields` on a Listener (a Unix socket path is one).

    `malformed` are extra fields of the reply to a line the server refuses itself (not a JSON
    object with an op, too long): the agent's API adds its usage exit code.
    Example: `ControlServer("/run/svmotion/vm1.ctl", handle).start()`
    """

    def __init__(self, listener: "str | Listener", handle: Handler,
                 on_close: Callable[[Connection], None] | None = None,
                 malformed: dict[str, Any] | None = None):
        self.listener: Listener = UnixListener(listener) if isinstance(listener, str) else listener
        self._handle = handle
        self._on_close = on_close
        self._malformed = malformed or {}
        self._socket: socket.socket | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Open the listener and serve in background threads."""
        self._socket = self.listener.open()
        threading.Thread(target=self._accept_loop, name=f"control-accept {self.listener.name}", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting; open connections end when their clients close them."""
        self._stopping.set()
        if self._socket is not None:
            self._socket.close()
        self.listener.close()

    def _accept_loop(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._socket.accept()
            except OSError:
                return
            threading.Thread(target=self._admit_and_serve, args=(sock,), name="control-conn",
                             daemon=True).start()

    def _admit_and_serve(self, sock: socket.socket) -> None:
        try:
            conn = self.listener.admit(sock)
        except NotAdmitted as refusal:
            self._refuse(sock, str(refusal), refusal.tell)
            return
        except OSError:
            sock.close()
            return
        self._serve(conn)

    @staticmethod
    def _refuse(sock: socket.socket, reason: str, tell: bool) -> None:
        try:
            if tell:
                sock.sendall((json.dumps({"ok": False, "error": reason}) + "\n").encode())
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, conn: Connection) -> None:
        try:
            for line in request_lines(conn.sock):
                if line is None:
                    self._send(conn, {"ok": False, "error": f"request line longer than {MAX_LINE_BYTES} "
                                      "bytes; closing the connection (send one JSON object per line)",
                                      **self._malformed})
                    break
                if line.strip():
                    self._send(conn, self._answer(line, conn))
        except OSError:
            pass
        finally:
            conn.sock.close()
            if self._on_close is not None:
                self._on_close(conn)

    @staticmethod
    def _send(conn: Connection, reply: dict[str, Any]) -> None:
        conn.sock.sendall((json.dumps(reply) + "\n").encode())

    def _answer(self, line: bytes, conn: Connection) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except RequestError as err:
            return {"ok": False, "error": str(err), **self._malformed}
        try:
            return {"ok": True, **self._handle(request, conn)}
        except RequestError as err:
            return {"ok": False, "error": str(err), **err.extra}
        except Exception as err:  # a handler bug must not kill the connection or the server
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}
