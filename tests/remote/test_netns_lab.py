"""The network-namespace lab of svlab/netns.py, which the two-host tests stand on.

Real namespaces, veths, a bridge and TBF; the test's own sockets made on a host with
`Host.entered`. What must hold: two hosts reach each other over their veth and nothing else;
a link taken down stalls a connection without closing it and the connection resumes when the
link comes back; shaping limits a transfer to about its rate; closing leaves no namespace and
no veth, also after a setup that failed half way or with a process left inside.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from svlab.netns import Host, Lab, LabError

MiB = 1 << 20


def connect(client: Host, server: Host) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from `client` to `server`'s address: (the client's end, the server's end)."""
    with server.entered():
        listener = socket.create_server((server.address, 0))
    try:
        with client.entered():
            ours = socket.create_connection(listener.getsockname(), timeout=10)
        theirs, _ = listener.accept()
        return ours, theirs
    finally:
        listener.close()


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links(argv_prefix: list[str] = []) -> list[str]:
    """`ip -br link` names, on this machine or inside a host (`Host.argv([])`)."""
    out = subprocess.run([*argv_prefix, "ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[0].split("@")[0] for line in out.splitlines())


def test_two_hosts_reach_each_other_over_their_veth_only(two_hosts: Lab) -> None:
    a, b = two_hosts["a"], two_hosts["b"]
    assert (a.address, b.address) == ("198.18.0.1", "198.18.0.2")
    assert {a.netns, b.netns} <= namespaces() and a.netns.startswith(f"svmt-{os.getpid()}-")
    assert links(a.argv([])) == links(b.argv([])) == ["eth0", "lo"]
    for client, server in ((a, b), (b, a)):
        ours, theirs = connect(client, server)
        with ours, theirs:
            assert theirs.getpeername()[0] == client.address
            ours.sendall(b"ping")
            assert theirs.recv(4) == b"ping"
    assert not any(name.startswith(two_hosts.base) for name in links()), "nothing of the lab on this machine"


def test_a_dead_link_stalls_a_connection_without_closing_it(two_hosts: Lab) -> None:
    a, b = two_hosts["a"], two_hosts["b"]
    ours, theirs = connect(a, b)
    with ours, theirs:
        b.link_down()
        try:
            ours.sendall(b"sent while the link is down")      # queued: no error, no reset
            theirs.settimeout(1.0)
            with pytest.raises(socket.timeout):
                theirs.recv(100)
            ours.settimeout(0.5)
            with pytest.raises(socket.timeout):                   # neither a reset nor an end of stream
                ours.recv(100)
            with a.entered(), pytest.raises(socket.timeout):      # a new connection is not refused either
                socket.create_connection((b.address, 9), timeout=1.0).close()
        finally:
            b.link_up()
        theirs.settimeout(30)                                     # TCP retransmits (backoff: seconds)
        got = b""
        while len(got) < 27:
            got += theirs.recv(100)
        assert got == b"sent while the link is down"
        theirs.sendall(b"and back")
        ours.settimeout(30)
        assert ours.recv(100) == b"and back"


def transfer_rate(sender: Host, receiver: Host, size: int) -> float:
    """Bytes per second of one TCP transfer of `size` bytes, timed where they arrive."""
    ours, theirs = connect(sender, receiver)
    with ours, theirs:
        send = threading.Thread(target=ours.sendall, args=(bytes(size),))
        started = time.monotonic()
        send.start()
        try:
            theirs.settimeout(60)
            got = 0
            while got < size:
                piece = theirs.recv(1 << 20)
                assert piece, "the sender closed early"
                got += len(piece)
            return size / (time.monotonic() - started)
        finally:
            send.join(60)


def test_tbf_shaping_limits_what_a_host_sends(two_hosts: Lab) -> None:
    a, b = two_hosts["a"], two_hosts["b"]
    rate_bits = 16_000_000
    a.shape(rate_bits)
    shaped = transfer_rate(a, b, 4 * MiB) * 8
    # TBF counts IP packets (headers too) and the first burst passes at once: loose bounds.
    assert 0.5 * rate_bits < shaped < 1.1 * rate_bits, f"{shaped / 1e6:.1f} Mbit/s shaped to {rate_bits / 1e6} Mbit/s"
    reverse = transfer_rate(b, a, 4 * MiB) * 8
    assert reverse > 3 * rate_bits, f"b's sending is not shaped: {reverse / 1e6:.1f} Mbit/s"
    a.unshape()
    a.unshape()                                                   # nothing to remove: fine
    unshaped = transfer_rate(a, b, 4 * MiB) * 8
    assert unshaped > 3 * rate_bits, f"{unshaped / 1e6:.1f} Mbit/s after unshape"


def test_three_hosts_share_a_bridge_and_close_removes_everything() -> None:
    before = links()
    lab = Lab("svmt", ("a", "b", "mon"))
    try:
        made = {host.netns for host in lab.hosts.values()} | {f"{lab.base}-switch"}
        assert made <= namespaces()
        assert lab["mon"].address == "198.18.0.3"
        for client, server in ((lab["a"], lab["b"]), (lab["mon"], lab["a"]), (lab["b"], lab["mon"])):
            ours, theirs = connect(client, server)
            ours.close()
            theirs.close()
        lab["mon"].link_down()
        with lab["a"].entered(), pytest.raises(socket.timeout):   # mon is cut off, a and b are not
            socket.create_connection((lab["mon"].address, 9), timeout=1.0).close()
        ours, theirs = connect(lab["a"], lab["b"])
        ours.close()
        theirs.close()
    finally:
        lab.close()
    assert not made & namespaces()
    assert links() == before
    lab.close()                                                   # again: nothing to do


def test_a_setup_failing_half_way_leaves_nothing() -> None:
    # Namespace names are file names (255 bytes at most): the second host's name is too long, the
    # first one's is not, so the lab fails after making its first namespace.
    prefix = "x" * (249 - len(f"-{os.getpid()}-") - 6)
    with pytest.raises(LabError, match="File name too long"):
        Lab(prefix, ("a", "abcdefghij"))
    assert not any(name.startswith(prefix) for name in namespaces())


def test_a_process_left_inside_is_named_and_the_lab_removed_anyway(testlib) -> None:
    lab = Lab("svmt", ("a", "b"))
    sleeper = subprocess.Popen(lab["b"].argv(["sleep", "60"]))
    try:
        testlib.wait_until(lambda: lab.pids_inside() == {"b": [sleeper.pid]}, 10,
                           "`ip netns exec` to enter b and exec sleep in place")
        with pytest.raises(LabError) as err:
            lab.close()
        assert f"'b': [{sleeper.pid}]" in str(err.value) and "stop them" in str(err.value)
        assert not {lab["a"].netns, lab["b"].netns} & namespaces()
        # The process keeps its namespace alive without a name, but no longer its veth.
        inside = subprocess.run(["nsenter", f"--net=/proc/{sleeper.pid}/ns/net", "ip", "-br", "link"],
                                capture_output=True, text=True, check=True).stdout
        assert [line.split()[0] for line in inside.splitlines()] == ["lo"]
    finally:
        sleeper.kill()
        sleeper.wait()
        lab.close()
