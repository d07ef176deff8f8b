"""JSON-lines request/response client, shared by the agent (-> mirror node) and the CLI (-> agent).

Both control sockets speak the same framing (docs/interfaces.md, section 2): one JSON object per
line each way, replies in request order, `{"ok": false, "error": ...}` on failure. A client is one
connection used by one thread at a time; the lock makes a shared client safe without interleaving
a request of one thread with the reply of another.
"""
from __future__ import annotations

import json
import socket
import threading
from typing import Any


class RemoteError(Exception):
    """The peer answered `ok: false`; `reply` holds its whole answer (error text, exit code)."""

    def __init__(self, op: str, reply: dict[str, Any]):
        self.op = op
        self.reply = reply
        super().__init__(f"{op}: {reply.get('error', 'failed')}")


class JsonLinesClient:
    """A connection to a JSON-lines control socket.

    Example: `JsonLinesClient("/run/svmotion/vm1.ctl").call("status")["disks"]`
    """

    def __init__(self, path: str, timeout: float | None = 30.0, sock: socket.socket | None = None):
        """Connect to the Unix socket `path`; or use `sock`, already connected (TLS: agent/remote.py),
        `path` then only naming the peer."""
        self.path = path
        if sock is not None:
            self._sock = sock
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
            except OSError:
                self._sock.close()
                raise
        self._reader = self._sock.makefile("r", encoding="utf-8", newline="\n")
        # This lock protects the request/reply pairing on the one connection.
        self._lock = threading.Lock()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its reply; raise RemoteError when the peer says ok: false."""
        reply = self.call_raw(json.dumps({"op": op, **args}))
        if not reply.get("ok"):
            raise RemoteError(op, reply)
        return reply

    def call_raw(self, line: str) -> dict[str, Any]:
        """Send one line as it is (tests use this for malformed input) and return the parsed reply."""
        with self._lock:
            self._sock.sendall(line.encode("utf-8") + b"\n")
            answer = self._reader.readline()
        if not answer:
            raise ConnectionError(f"{self.path}: connection closed by peer")
        return json.loads(answer)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> "JsonLinesClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
