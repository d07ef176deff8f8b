"""Hostile input on the mirror node's control socket: typed arguments, framing limits, property tests.

A real nbdkit with the real plugin; requests are written to the socket as raw bytes (docs/
interfaces.md, section 2). What must hold for any input: the server stays up and answers, every
non-blank line gets exactly one reply `{"ok": true|false, ...}` (an error is one line and never an
internal error), a refused request changes nothing, and once the clients are gone nbdkit holds
the fds and threads it held before.

The property tests run one server per test and many Hypothesis examples against it. They stay
safe for each other: the VM is in passthrough, so of all random requests only hello, status,
stun, abort, finish without paths, flush_dest and copy_cancel can be valid (the rest need a held
stun's id or a mirror); a valid stun is rolled back when its example's connection closes, and
each example waits for that before the next begins.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd_plugin.control import MAX_LINE_BYTES

MiB = 1024 * 1024
REPLY_TIMEOUT_S = 15.0
SETTLE_S = 10.0
PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- a raw control connection -------------------------------------------------------------------

class Raw:
    """A control connection that sends bytes as they are and reads reply lines."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes, cuts: list[int] = ()) -> None:
        """Send `data`, split at the offsets `cuts` into separate sends (a line across sends)."""
        at = 0
        for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
            if cut > at:
                self.sock.sendall(data[at:cut])
                at = cut

    def replies(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            line, sep, rest = self.buf.partition(b"\n")
            if sep:
                self.buf = rest
                out.append(json.loads(line))
                continue
            data = self.sock.recv(65536)
            assert data, f"connection closed after {len(out)} of {n} replies"
            self.buf += data
        return out

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(request).encode() + b"\n")
        return self.replies(1)[0]

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def check_reply(reply: Any, what: Any) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), f"{what!r}: bad reply {reply!r}"
    if not reply["ok"]:
        error = reply.get("error")
        assert isinstance(error, str) and error and "\n" not in error, f"{what!r}: not one line: {reply!r}"
        assert not error.startswith("internal error"), f"{what!r}: {error}"


def state(status: dict[str, Any]) -> dict[str, Any]:
    """What a refused request must not change: status without the counters that move on their own."""
    keep = ("state", "path", "dest", "mode", "granularity", "mirror_failed", "errors")
    return {"stun": status["stun"] and status["stun"]["id"],
            "stuns": [(r["id"], r["outcome"]) for r in status["stuns"]],
            "disks": {n: {k: d[k] for k in keep} | {"copying": bool(d["copy"] and d["copy"]["running"])}
                      for n, d in status["disks"].items()}}


class Node:
    """The mirror node under test as a leak check sees it: its pid, fds and threads, its stun."""

    def __init__(self, testlib, node):
        self.lib, self.pid, self.ctl = testlib, node.proc.pid, node.client()
        self.ctl.call("hello")      # its reply: ctl's own server thread runs
        self.start = testlib.steady_fds_and_threads(self.pid)

    def settle(self, leaks: bool = False) -> None:
        """Wait until no stun is held (a closed connection's stun is rolled back by its server
        thread) and, with `leaks`, until nbdkit holds the fds and threads it held at the start."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            held = self.ctl.call("status")["stun"]
            now = self.lib.fds_and_threads(self.pid)
            if held is None and (not leaks or now == self.start):
                return
            assert time.monotonic() < deadline, f"after {SETTLE_S} s: stun {held}, (fds, threads) {now} " \
                                                f"instead of {self.start}"
            time.sleep(0.02)


def install_mirrors(ctl, node, tmp_path: Path) -> None:
    dests = {}
    for name, src in node.disks.items():
        dests[name] = tmp_path / f"dest-{name}.raw"
        with open(dests[name], "wb") as f:
            f.truncate(src.stat().st_size)
    stun_id = ctl.call("stun", kind="mirror_install")["stun_id"]
    ctl.call("install_mirror", stun_id=stun_id, disks={n: {"dest": str(p)} for n, p in dests.items()})
    ctl.call("unstun", stun_id=stun_id)


def guest_still_served(node) -> None:
    """The workload's view: a write and a read back through NBD on every disk."""
    for name in node.disks:
        h = nbd.NBD()
        h.connect_uri(node.uri(name))
        try:
            h.pwrite(b"\x5a" * 4096, 8192)
            assert h.pread(4096, 8192) == b"\x5a" * 4096
        finally:
            h.shutdown()


# ---- each defect ----------------------------------------------------------------------------------

def test_wrong_types_and_unknown_arguments_are_refused_and_change_nothing(vm_factory, tmp_path: Path) -> None:
    node = vm_factory(2, size=4 * MiB)
    ctl = node.client()
    install_mirrors(ctl, node, tmp_path)
    raw = Raw(node.control)
    try:
        def refused(request: dict[str, Any], *words: str) -> None:
            before = state(ctl.call("status"))
            reply = raw.call(request)
            check_reply(reply, request)
            assert reply["ok"] is False, f"{request}: accepted"
            for word in words:
                assert word in reply["error"], reply["error"]
            assert state(ctl.call("status")) == before, f"{request}: a refused request changed the VM"

        refused({"op": "copy", "kind": "bulk", "rate": 1.5}, "rate", "1.5", "an integer")
        refused({"op": "copy", "kind": "bulk", "rat": 0}, "unknown argument 'rat'", "rate")
        refused({"op": "copy", "kind": ["bulk"]}, "kind", "a string")
        refused({"op": "copy_cancel", "disk": 0}, "disk", "a string")
        refused({"op": "stun", "lese": 5}, "unknown argument 'lese'", "lease")
        refused({"op": "stun", "kind": None}, "kind", "a string, not null")
        refused({"op": "stun", "lease": float("nan")}, "lease", "not a non-finite number")
        refused({"op": "finish", "paths": []}, "paths", "an object")
        refused({"op": "finish", "paths": {"disk0": "a\0b"}}, "paths", "file paths")
        refused({"op": "hello", "verbose": True}, "unknown argument 'verbose'", "no arguments")
        stun_id = ctl.call("stun", lease=30)["stun_id"]
        refused({"op": "switchover", "stun_id": stun_id, "reopen": "false"}, "reopen", "true or false")
        refused({"op": "switchover", "stun_id": stun_id, "reopen": 0}, "reopen", "not an integer")
        refused({"op": "unstun", "stun_id": stun_id, "now": True}, "unknown argument 'now'")
        refused({"op": "unstun", "stun_id": [stun_id]}, "stun_id", "a string")
        refused({"op": "abort", "stun_id": 1}, "stun_id")
        refused({"op": "install_mirror", "stun_id": stun_id, "disks": {"disk0": {"dest": "/x", "mode": 1}}},
                "disk disk0", "mode")
        refused({"op": "install_mirror", "stun_id": stun_id, "disks": {"disk0": {"dst": "/x"}}},
                "unknown argument 'dst'", "dest")
        assert ctl.call("unstun", stun_id=stun_id)["stun"]["outcome"] == "released"
        assert {d["state"] for d in ctl.call("status")["disks"].values()} == {"mirroring"}
    finally:
        raw.close()
    guest_still_served(node)


def test_granularity_is_capped_at_64_mib(vm_factory, tmp_path: Path) -> None:
    node = vm_factory(1, size=4 * MiB)
    ctl = node.client()
    dest = tmp_path / "dest.raw"
    dest.write_bytes(b"")
    os.truncate(dest, 4 * MiB)
    stun_id = ctl.call("stun", lease=30)["stun_id"]
    try:
        reply = ctl.call_raw(json.dumps({"op": "install_mirror", "stun_id": stun_id,
                                         "disks": {"disk0": {"dest": str(dest), "granularity": 1 << 40}}}))
        check_reply(reply, "1 TiB granularity")
        assert reply["ok"] is False and "1099511627776" in reply["error"] and "67108864" in reply["error"]
        assert ctl.call("status")["disks"]["disk0"]["state"] == "passthrough"
        ctl.call("install_mirror", stun_id=stun_id, disks={"disk0": {"dest": str(dest), "granularity": 64 * MiB}})
        assert ctl.call("status")["disks"]["disk0"]["granularity"] == 64 * MiB
        ctl.call("abort", stun_id=stun_id)
    finally:
        ctl.call("unstun", stun_id=stun_id)


def test_a_huge_integer_or_deep_nesting_is_a_malformed_request(vm2) -> None:
    raw = Raw(vm2.control)
    try:
        lines = [b'{"op": "status", "n": ' + b"9" * 5000 + b"}",
                 b'{"op": "stun", "lease": ' + b"1" * 4301 + b"}",
                 b"[" * 100000,
                 b'{"op": "status", "x": ' + b"[" * 50000 + b"]" * 50000 + b"}"]
        raw.send(b"\n".join(lines) + b"\n")
        for line, reply in zip(lines, raw.replies(len(lines))):
            check_reply(reply, line[:40])
            assert reply["ok"] is False and reply["error"].startswith("malformed request"), reply
        assert raw.call({"op": "status"})["stun"] is None
    finally:
        raw.close()


def test_lines_are_utf8_and_may_arrive_in_pieces(vm2) -> None:
    raw = Raw(vm2.control)
    try:
        raw.send(b'{"op": "hello", "x": "\xff"}\n')
        reply = raw.replies(1)[0]
        check_reply(reply, "invalid UTF-8")
        assert reply["ok"] is False and "UTF-8" in reply["error"] and "0xff" in reply["error"], reply
        # One request split into single bytes, then two requests in one send, then blank lines.
        raw.send(b'{"op": "hello"}\n', cuts=list(range(16)))
        raw.send(b'{"op": "status"}\n  \n\n{"op": "hello"}\n')
        hello, status, hello2 = raw.replies(3)
        assert hello["ok"] and hello["vm"] == "vm1" and status["ok"] and "disks" in status and hello2["ok"]
        # A last line without a newline is answered when the client shuts its side down.
        raw.send(b'{"op": "hello"}')
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.replies(1)[0]["ok"] is True
        assert raw.closed_by_server()
    finally:
        raw.close()


def test_an_overlong_line_gets_one_error_and_its_connection_is_closed(vm2, testlib) -> None:
    watch = Node(testlib, vm2)
    ctl = watch.ctl
    # A line of exactly the limit is served.
    padded = json.dumps({"op": "hello"}).encode()
    padded = b" " * (MAX_LINE_BYTES - len(padded)) + padded
    raw = Raw(vm2.control)
    try:
        raw.send(padded + b"\n")
        assert raw.replies(1)[0]["ok"] is True
        # One more byte, newline-terminated, and the connection that holds a stun is closed.
        stun_id = raw.call({"op": "stun", "lease": 30})["stun_id"]
        raw.send(b" " + padded + b"\n")
        reply = raw.replies(1)[0]
        check_reply(reply, "line of the limit + 1")
        assert reply["ok"] is False and str(MAX_LINE_BYTES) in reply["error"], reply
        assert raw.closed_by_server()
    finally:
        raw.close()
    watch.settle()
    assert ctl.call("status")["stuns"][-1]["id"] == stun_id
    assert ctl.call("status")["stuns"][-1]["outcome"] == "expired"
    # A line that never ends: refused once it passes the limit, not read forever.
    raw = Raw(vm2.control)
    try:
        piece = b"x" * 65536
        try:
            for _ in range(MAX_LINE_BYTES // len(piece) + 8):
                raw.sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass     # the server closed it while we were still sending
        reply = raw.replies(1)[0]
        assert reply["ok"] is False and str(MAX_LINE_BYTES) in reply["error"], reply
        assert raw.closed_by_server()
    finally:
        raw.close()
    watch.settle(leaks=True)
    assert ctl.call("hello")["vm"] == "vm1"


def test_a_refused_abort_does_not_cancel_the_copies(vm_factory, tmp_path: Path) -> None:
    """abort with a stun_id that is not the held stun is refused, and the copy goes on."""
    node = vm_factory(1, size=16 * MiB)
    ctl = node.client()
    install_mirrors(ctl, node, tmp_path)
    ctl.call("copy", kind="bulk", rate=256 * 1024)   # a minute: still running below
    holder = node.client()
    stun_id = holder.call("stun", lease=30)["stun_id"]
    try:
        reply = ctl.call_raw(json.dumps({"op": "abort", "stun_id": "vm1-stun-999"}))
        check_reply(reply, "abort with a wrong stun_id")
        assert reply["ok"] is False and "vm1-stun-999" in reply["error"], reply
        disk = ctl.call("status")["disks"]["disk0"]
        assert disk["copy"]["running"] and disk["state"] == "mirroring", disk
    finally:
        holder.call("unstun", stun_id=stun_id)
        ctl.call("copy_cancel")
        ctl.call("abort")


# ---- properties -----------------------------------------------------------------------------------

# Each op with the arguments it takes (docs/interfaces.md, section 2).
OPS = {"hello": [], "status": [], "stun": ["lease", "kind"], "close_disks": ["stun_id"],
       "install_mirror": ["stun_id", "disks"], "unstun": ["stun_id"], "copy": ["kind", "rate", "disk"],
       "copy_cancel": ["disk"], "flush_dest": [], "switchover": ["stun_id", "reopen"], "abort": ["stun_id"],
       "finish": ["paths"]}
KEYS = sorted({key for keys in OPS.values() for key in keys} | {"dest", "mode", "granularity"})
# What can be valid on a VM in passthrough with no stun held by anyone but the example itself.
MAY_SUCCEED = {"hello", "status", "stun", "abort", "finish", "flush_dest", "copy_cancel"}
WORDS = ["disk0", "disk1", "bulk", "dirty", "sync", "switchover", "mirror_install", "other", "vm1-stun-1",
         "false", "true", "", " ", "/", "/nonexistent/d.raw", "a\0b", "\ud800", "\u00e9"]

leaves = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() |
          st.text(max_size=12) | st.sampled_from(WORDS) |
          st.sampled_from([0, 1, 0.5, 2, 60, 61, 4096, 65536, 64 * MiB, 1 << 40, -1]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.sampled_from(KEYS + WORDS[:2]) | st.text(max_size=6), inner,
                                           max_size=3), max_leaves=8)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a known op with its own argument names (so the type and value checks are reached);
    sometimes an unknown op, a stray argument, or any JSON value as the op."""
    op = draw(st.sampled_from(sorted(OPS)) if draw(st.integers(0, 9)) else
              st.text(max_size=12) | json_values)
    keys = OPS.get(op, KEYS) if isinstance(op, str) else KEYS
    args = draw(st.dictionaries(st.sampled_from(keys or KEYS), json_values, max_size=len(keys)))
    if not draw(st.integers(0, 7)):
        args[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = draw(json_values)
    return {**args, "op": op}


# Whole lines: any JSON value, a request, text, or bytes (often not UTF-8); never a newline inside.
lines = (requests().map(lambda r: json.dumps(r).encode()) |
         json_values.map(lambda v: json.dumps(v).encode()) |
         st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")) |
         st.binary(max_size=40)).map(lambda b: b.replace(b"\n", b" "))


def test_random_requests_get_one_reply_and_refusals_change_nothing(vm_factory, testlib) -> None:
    node = vm_factory(2, size=4 * MiB)
    watch = Node(testlib, node)
    ctl = watch.ctl

    @PROPERTY
    @given(st.lists(requests(), min_size=1, max_size=6))
    def example(batch: list[dict[str, Any]]) -> None:
        raw = Raw(node.control)
        try:
            for request in batch:
                before = state(ctl.call("status"))
                reply = raw.call(request)
                check_reply(reply, request)
                if reply["ok"]:
                    assert isinstance(request["op"], str) and request["op"] in MAY_SUCCEED, \
                        f"{request!r} accepted: {reply!r}"
                else:
                    assert state(ctl.call("status")) == before, f"refused {request!r} changed the VM"
        finally:
            raw.close()
            watch.settle()

    example()
    watch.settle(leaks=True)
    assert {(d["state"], d["path"]) for d in ctl.call("status")["disks"].values()} == \
        {("passthrough", str(p)) for p in node.disks.values()}
    guest_still_served(node)


def test_random_bytes_in_random_pieces_get_one_reply_per_line(vm_factory, testlib) -> None:
    node = vm_factory(1, size=4 * MiB)
    watch = Node(testlib, node)

    @PROPERTY
    @given(st.lists(lines, min_size=1, max_size=8), st.lists(st.integers(0, 1 << 12), max_size=6))
    def example(batch: list[bytes], cuts: list[int]) -> None:
        raw = Raw(node.control)
        try:
            raw.send(b"".join(line + b"\n" for line in batch), cuts)
            expected = [line for line in batch if line.strip()]
            for line, reply in zip(expected, raw.replies(len(expected))):
                check_reply(reply, line)
            assert raw.call({"op": "hello"})["ok"], "the connection is no longer usable"
        finally:
            raw.close()
            watch.settle()

    example()
    watch.settle(leaks=True)
    guest_still_served(node)


def test_many_concurrent_connections_leak_nothing(vm_factory, testlib) -> None:
    """Clients at once: whole lines, lines cut off by a disconnect, overlong lines; then none."""
    node = vm_factory(2, size=4 * MiB)
    watch = Node(testlib, node)
    ctl = watch.ctl
    stop = threading.Event()

    def client(batch: list[bytes], ending: str) -> None:
        raw = Raw(node.control)
        try:
            raw.send(b"".join(line + b"\n" for line in batch))
            expected = [line for line in batch if line.strip()]
            for line, reply in zip(expected, raw.replies(len(expected))):
                check_reply(reply, line)
            if ending == "cut":
                raw.send(b'{"op": "sta')
            elif ending == "overlong":
                try:
                    while not stop.is_set():
                        raw.sock.sendall(b"y" * 65536)
                except OSError:
                    pass      # closed by the server, as it should be
        finally:
            raw.close()

    @settings(PROPERTY, max_examples=4)
    @given(st.lists(st.tuples(st.lists(lines, max_size=6), st.sampled_from(["close", "cut", "overlong"])),
                    min_size=24, max_size=32))
    def example(clients: list[tuple[list[bytes], str]]) -> None:
        with ThreadPoolExecutor(len(clients)) as pool:
            try:
                for done in [pool.submit(client, batch, ending) for batch, ending in clients]:
                    done.result(timeout=REPLY_TIMEOUT_S * 2)
            finally:
                stop.set()
        stop.clear()
        assert ctl.call("hello")["vm"] == "vm1"
        watch.settle(leaks=True)

    example()
    guest_still_served(node)
