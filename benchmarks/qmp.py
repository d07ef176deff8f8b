"""A small QMP client (QEMU Machine Protocol: JSON over a Unix socket) for qemu-storage-daemon.

Design notes
- One reader thread reads every line as it arrives and stamps it with time.monotonic(), so an
  event's time is when QEMU sent it, not when the harness got round to looking (this matters
  for the pivot window at `job-complete`).
- Commands are serialized by a lock; a command's reply is the next `return`/`error` line (QMP
  answers in order and we never pipeline). Events queue up separately; `wait_event` scans them.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable


class QMPError(RuntimeError):
    """QEMU answered a command with an error, or the connection failed."""


class QMPClient:
    """Example: `QMPClient(path).execute("query-block-jobs")`."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._file = self._sock.makefile("r", encoding="utf-8")
        # This condition protects _events and _replies, filled by the reader thread.
        self._cond = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._replies: list[dict[str, Any]] = []
        self._closed = False
        # This lock keeps one command in flight, so the next reply is ours.
        self._command_lock = threading.Lock()
        greeting = json.loads(self._file.readline())
        if "QMP" not in greeting:
            raise QMPError(f"{path}: not a QMP greeting: {greeting}")
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def _read_loop(self) -> None:
        for line in self._file:
            message = json.loads(line)
            message["_received"] = time.monotonic()
            with self._cond:
                if "event" in message:
                    self._events.append(message)
                else:
                    self._replies.append(message)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command and return its `return` value; raise QMPError on `error`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with self._command_lock:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            with self._cond:
                if not self._cond.wait_for(lambda: self._replies or self._closed, self.timeout):
                    raise QMPError(f"{command}: no reply within {self.timeout:.0f}s")
                if not self._replies:
                    raise QMPError(f"{command}: QMP connection closed")
                reply = self._replies.pop(0)
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def wait_event(self, name: str, timeout: float,
                   match: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        """Remove and return the first queued or future event `name` that `match`es."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, event in enumerate(self._events):
                    if event["event"] == name and match(event):
                        return self._events.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    raise QMPError(f"no {name} event within {timeout:.0f}s")
                self._cond.wait(remaining)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
