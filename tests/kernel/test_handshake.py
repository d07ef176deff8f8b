"""The user-space half of the kernel path: the NBD handshake that precedes NBD_CMD_CONNECT.

The kernel takes a socket already in transmission phase plus the export's size and flags, so
this handshake decides what the kernel will believe about the disk. Checked against the real
plugin and against nbdkit's own `memory` plugin, on real sockets; no kernel feature needed.
"""
from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from agent import nbd_netlink
from agent.attach import Export, parse_uri, unix_uri
from agent.errors import Refused

MiB = 1024 * 1024


def transmit_read(sock: socket.socket, offset: int, length: int) -> bytes:
    """One NBD_CMD_READ with a simple reply: proves the socket is left in transmission phase."""
    sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, offset, length))
    header = b""
    while len(header) < 16:
        header += sock.recv(16 - len(header))
    magic, error, handle = struct.unpack(">IIQ", header)
    assert (magic, error, handle) == (0x67446698, 0, 7), "expected a simple reply: structured replies must be off"
    data = b""
    while len(data) < length:
        data += sock.recv(length - len(data))
    return data


def test_handshake_with_the_plugin_leaves_the_socket_in_transmission(tmp_path: Path, start_mirror_node,
                                                                     testlib) -> None:
    image = testlib.make_dense_image(tmp_path / "disk0.raw", 4 * MiB, random_data=True)
    node = start_mirror_node({"disk0": image, "disk1": testlib.make_dense_image(tmp_path / "disk1.raw", 2 * MiB)})
    sock, info = nbd_netlink.open_export(str(node.socket), "disk1")
    with sock:
        assert (info.name, info.size, info.read_only) == ("disk1", 2 * MiB, False)
        assert info.flags & 1, "NBD_FLAG_HAS_FLAGS"
        assert info.block_size in (512, 1024, 2048, 4096)
    sock, info = nbd_netlink.open_export(str(node.socket), "disk0")
    with sock:
        assert info.size == 4 * MiB
        assert transmit_read(sock, MiB, 4096) == image.read_bytes()[MiB:MiB + 4096]


def test_handshake_reports_a_refused_export(tmp_path: Path, start_mirror_node, testlib) -> None:
    node = start_mirror_node({"disk0": testlib.make_dense_image(tmp_path / "disk0.raw", MiB)})
    with pytest.raises(nbd_netlink.NbdHandshakeError, match="refused export 'nosuch'"):
        nbd_netlink.open_export(str(node.socket), "nosuch")


def test_handshake_sees_a_read_only_export(sock_dir: Path, processes, testlib) -> None:
    path = sock_dir / "ro.sock"
    proc = processes.spawn(["nbdkit", "--foreground", "--exit-with-parent", "-r", "--unix", str(path),
                            "memory", "1M"])
    testlib.wait_until(lambda: testlib.socket_answers(path), 10, "nbdkit memory", proc)
    sock, info = nbd_netlink.open_export(str(path), "")
    with sock:
        assert info.read_only and info.size == MiB


def test_not_an_nbd_server(sock_dir: Path) -> None:
    path = str(sock_dir / "echo.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    with server:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        peer, _ = server.accept()
        with client, peer:
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            with pytest.raises(nbd_netlink.NbdHandshakeError, match="not an NBD server"):
                nbd_netlink.negotiate(client, "disk0")


def test_kernel_block_size_is_the_servers_minimum_rounded_to_what_the_kernel_takes() -> None:
    assert [nbd_netlink.kernel_block_size(m) for m in (1, 512, 513, 4096, 65536)] == [512, 512, 1024, 4096, 4096]


def test_uris() -> None:
    assert parse_uri("nbd://10.0.2.2:10809/disk0") == (("10.0.2.2", 10809), "disk0")
    assert parse_uri("nbd://host/disk1") == (("host", 10809), "disk1")
    assert parse_uri(unix_uri("/run/svm/vm1.nbd", "disk0")) == ("/run/svm/vm1.nbd", "disk0")
    for bad in ("nbds://host/disk0", "nbd+unix:///disk0", "http://x/y"):
        with pytest.raises(Refused):
            parse_uri(bad)
    with pytest.raises(Refused, match="VM name"):
        Export("../etc", "disk0", "nbd://h/disk0")
