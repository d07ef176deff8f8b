"""JSON-lines control server on a Unix socket: the mirror node's control channel, and the agent's API.

Design notes
- Framing (docs/interfaces.md, section 2): one JSON object per line each way, replies in request
  order on each connection. A bad line gets `{"ok": false, "error": ...}` and the connection stays
  usable: a confused client must never take the server, or the guest's IO, down with it.
- Security: the socket is created mode 0600 inside a umask, so there is no window in which another
  user can connect; each peer's uid (SO_PEERCRED) must equal ours, which also refuses root-owned
  clients of a non-root server. The socket holds the power to stun a VM.
- Threads: one daemon thread per connection. Handlers take their own locks; the server holds none
  while a handler runs. `on_close` tells the owner that a connection went away, so a stun held by
  a vanished agent is rolled back at once instead of waiting for its lease.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
from typing import Any, Callable


class RequestError(Exception):
    """A request the handler refuses; its text is sent back as the one-line error.

    `extra` fields (for example the CLI exit code) travel in the reply next to `error`.
    """

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.extra = extra


class Connection:
    """One client connection; handlers may use it as a key for per-client state (a held stun)."""

    def __init__(self, sock: socket.socket, peer_uid: int):
        self.sock = sock
        self.peer_uid = peer_uid


Handler = Callable[[dict[str, Any], Connection], dict[str, Any]]


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def parse_request(line: str) -> dict[str, Any]:
    """Decode one request line; raise RequestError saying what is wrong with it."""
    try:
        request = json.loads(line)
    except ValueError as err:
        raise RequestError(f"malformed request: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(request, dict):
        raise RequestError("malformed request: expected a JSON object like {\"op\": \"status\"}")
    if not isinstance(request.get("op"), str):
        raise RequestError("malformed request: missing \"op\" (a string naming the operation)")
    return request


class ControlServer:
    """Serves `handle(request, connection) -> reply fields` on a Unix socket.

    Example: `ControlServer("/run/svmotion/vm1.ctl", handle).start()`
    """

    def __init__(self, path: str, handle: Handler,
                 on_close: Callable[[Connection], None] | None = None):
        self.path = path
        self._handle = handle
        self._on_close = on_close
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in background threads."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    def stop(self) -> None:
        """Stop accepting; open connections end when their clients close them."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            uid = peer_uid(sock)
            if uid != os.getuid():
                self._refuse(sock, f"permission denied: peer uid {uid} is not the server's uid {os.getuid()}")
                continue
            conn = Connection(sock, uid)
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    @staticmethod
    def _refuse(sock: socket.socket, reason: str) -> None:
        try:
            sock.sendall((json.dumps({"ok": False, "error": reason}) + "\n").encode())
        finally:
            sock.close()

    def _serve(self, conn: Connection) -> None:
        reader = conn.sock.makefile("r", encoding="utf-8", errors="replace", newline="\n")
        try:
            for line in reader:
                if not line.strip():
                    continue
                reply = self._answer(line, conn)
                conn.sock.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass
        finally:
            reader.close()
            conn.sock.close()
            if self._on_close is not None:
                self._on_close(conn)

    def _answer(self, line: str, conn: Connection) -> dict[str, Any]:
        try:
            request = parse_request(line)
            return {"ok": True, **self._handle(request, conn)}
        except RequestError as err:
            return {"ok": False, "error": str(err), **err.extra}
        except Exception as err:  # a handler bug must not kill the connection or the server
            return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}
