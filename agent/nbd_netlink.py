"""The kernel's NBD client, driven the modern way: user-space handshake, then generic netlink.

Design notes
- The kernel's `nbd` driver does not negotiate: it takes an already connected socket in
  *transmission* phase plus the export's size and flags. So the handshake (fixed newstyle,
  `NBD_OPT_GO`) happens here, in user space, on a plain socket; the socket's file descriptor is
  then handed to the kernel with `NBD_CMD_CONNECT`. The kernel takes its own reference to the
  socket, so this process may close its copy and exit: the device stays connected until
  `NBD_CMD_DISCONNECT` (we never set `NBD_CFLAG_DISCONNECT_ON_CLOSE`, which would tie the device
  to our netlink socket and so to the lifetime of the `svmotion attach` process).
- Structured replies stay off: we never send `NBD_OPT_STRUCTURED_REPLY`, because the kernel
  client only understands simple replies. Extended headers, likewise, are never asked for.
- `NBD_ATTR_BACKEND_IDENTIFIER` carries the export's URI (kernel >= 5.19 shows it in
  `/sys/block/nbdX/backend`): that is how attach finds a device already connected to the same
  export, even one attached by another state directory.
- Netlink messages are described with pyroute2's `genlmsg`/`nla` classes; they work with the
  pyroute2 of the venv (0.9) and with Debian's python3-pyroute2 (0.7) inside the lab guest.
- Numbers are from `linux/nbd.h`, `linux/nbd-netlink.h` and the NBD protocol document.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

# Handshake constants (NBD protocol, "Fixed newstyle negotiation").
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
TRANSMIT_FLAG_READ_ONLY = 1 << 1

# Generic netlink family "nbd" (linux/nbd-netlink.h).
GENL_FAMILY = "nbd"
GENL_VERSION = 1
CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_STATUS = 5
COMMAND_NAMES = {CMD_CONNECT: "CONNECT", CMD_DISCONNECT: "DISCONNECT", CMD_RECONFIGURE: "RECONFIGURE",
                 CMD_STATUS: "STATUS"}

DEFAULT_TIMEOUT_S = 30   # per request; a stun holds requests for at most its lease (2 s)
# After the server goes away (nbdkit killed and restarted by the agent), IO waits this long for
# a new socket (RECONFIGURE, done by `svmotion attach` again) instead of failing at once.
DEAD_CONN_TIMEOUT_S = 120
MAX_OPTION_REPLY = 1 << 20


class NbdHandshakeError(Exception):
    """The server refused or garbled the negotiation; the message names the export and why."""


class KernelNbdUnavailable(Exception):
    """No `nbd` generic netlink family: the kernel module is missing or cannot be loaded."""


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learnt: everything the kernel needs besides the socket."""
    name: str
    size: int
    flags: int                 # transmission flags, passed to the kernel as NBD_ATTR_SERVER_FLAGS
    block_size: int = 512      # the server's minimum block size, clamped to what the kernel takes

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TRANSMIT_FLAG_READ_ONLY)


# ---------------------------------------------------------------- user-space handshake

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NbdHandshakeError(f"server closed the connection during the handshake "
                                    f"(wanted {n} bytes, got {len(buf)})")
        buf += chunk
    return bytes(buf)


def _send_option(sock: socket.socket, option: int, data: bytes) -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def _read_option_reply(sock: socket.socket, option: int) -> tuple[int, bytes]:
    magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20))
    if magic != REPLY_MAGIC or opt != option:
        raise NbdHandshakeError(f"bad option reply (magic {magic:#x}, option {opt}); "
                                f"is this an NBD server?")
    if length > MAX_OPTION_REPLY:
        raise NbdHandshakeError(f"option reply of {length} bytes is too large")
    return rtype, _recv_exact(sock, length)


def negotiate(sock: socket.socket, export: str) -> ExportInfo:
    """Run the fixed-newstyle handshake for `export` on a connected socket; leave it in transmission.

    Example: `info = negotiate(sock, "disk0")`, then hand `sock.fileno()` to `connect_device`.
    """
    if _recv_exact(sock, 8) != NBDMAGIC:
        raise NbdHandshakeError("no NBDMAGIC greeting: the peer is not an NBD server")
    (magic,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if magic == OLDSTYLE_MAGIC:
        raise NbdHandshakeError("server speaks the oldstyle protocol, which has no export names; "
                                "use a newstyle server (nbdkit does this by default)")
    if magic != IHAVEOPT:
        raise NbdHandshakeError(f"unknown handshake magic {magic:#x}")
    (server_flags,) = struct.unpack(">H", _recv_exact(sock, 2))
    if not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdHandshakeError("server does not offer fixed newstyle negotiation")
    no_zeroes = server_flags & FLAG_NO_ZEROES
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | no_zeroes))
    name = export.encode("utf-8")
    # NBD_OPT_GO: name, then one information request (block sizes). No structured replies.
    _send_option(sock, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    size = flags = None
    block_size = 512
    while True:
        rtype, data = _read_option_reply(sock, OPT_GO)
        if rtype == REP_ACK:
            break
        if rtype == REP_INFO and len(data) >= 2:
            (info,) = struct.unpack(">H", data[:2])
            if info == INFO_EXPORT and len(data) == 12:
                size, flags = struct.unpack(">QH", data[2:])
            elif info == INFO_BLOCK_SIZE and len(data) == 14:
                minimum, _, _ = struct.unpack(">III", data[2:])
                block_size = minimum
            continue
        if rtype == REP_ERR_UNSUP:
            return _export_name_fallback(sock, export, no_zeroes)
        if rtype & REP_FLAG_ERROR:
            text = data.decode("utf-8", "replace") or f"error {rtype & ~REP_FLAG_ERROR}"
            raise NbdHandshakeError(f"server refused export {export!r}: {text}")
        # Any other reply type is informational and may be ignored (protocol rule).
    if size is None or flags is None:
        raise NbdHandshakeError(f"server acknowledged export {export!r} without saying its size")
    return ExportInfo(export, size, flags, kernel_block_size(block_size))


def _export_name_fallback(sock: socket.socket, export: str, no_zeroes: int) -> ExportInfo:
    """NBD_OPT_EXPORT_NAME, for servers without NBD_OPT_GO (the older way to enter transmission)."""
    name = export.encode("utf-8")
    _send_option(sock, OPT_EXPORT_NAME, name)
    size, flags = struct.unpack(">QH", _recv_exact(sock, 10))
    if not no_zeroes:
        _recv_exact(sock, 124)
    return ExportInfo(export, size, flags)


def kernel_block_size(minimum: int) -> int:
    """The device's logical block size: the server's minimum IO size, rounded up to a power of
    two the kernel takes (512 .. page size). A preferred size is a hint only; using it would make
    smaller IO impossible."""
    size = 512
    while size < min(minimum, 4096):
        size *= 2
    return size


def open_export(address: str | tuple[str, int], export: str, timeout: float = 10.0
                ) -> tuple[socket.socket, ExportInfo]:
    """Connect to a Unix socket path or a (host, port) pair and negotiate `export`.

    The returned socket is blocking and in transmission phase; the caller owns it.
    """
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info = negotiate(sock, export)
        sock.settimeout(None)
        return sock, info
    except BaseException:
        sock.close()
        raise


# ---------------------------------------------------------------- generic netlink

def _netlink_classes():
    """Build the message classes lazily: pyroute2 is only needed where the kernel client is."""
    from pyroute2.netlink import genlmsg, nla

    class nbd_msg(genlmsg):
        nla_map = (
            ("NBD_ATTR_UNSPEC", "none"),
            ("NBD_ATTR_INDEX", "uint32"),
            ("NBD_ATTR_SIZE_BYTES", "uint64"),
            ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
            ("NBD_ATTR_TIMEOUT", "uint64"),
            ("NBD_ATTR_SERVER_FLAGS", "uint64"),
            ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
            ("NBD_ATTR_SOCKETS", "sock_items"),
            ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
            ("NBD_ATTR_DEVICE_LIST", "device_items"),
            ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
        )

        class sock_items(nla):
            nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

            class sock_item(nla):
                nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

        class device_items(nla):
            nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

            class device_item(nla):
                nla_map = (("NBD_DEVICE_UNSPEC", "none"), ("NBD_DEVICE_INDEX", "uint32"),
                           ("NBD_DEVICE_CONNECTED", "uint8"))

    return nbd_msg


def _sockets(fds: list[int]) -> list:
    return ["NBD_ATTR_SOCKETS", {"attrs": [["NBD_SOCK_ITEM", {"attrs": [["NBD_SOCK_FD", fd]]}] for fd in fds]}]


@dataclass(frozen=True)
class DeviceStatus:
    index: int
    connected: bool

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"


class KernelNbd:
    """A generic netlink connection to the kernel's `nbd` family.

    Example: `with KernelNbd() as k: index = k.connect([sock.fileno()], info, "nbd+unix:///...")`
    """

    def __init__(self) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.generic import GenericNetlinkSocket
        self._flags = NLM_F_REQUEST | NLM_F_ACK
        self._msg = _netlink_classes()
        self._error = NetlinkError
        self._sock = GenericNetlinkSocket()
        try:
            self._sock.bind(GENL_FAMILY, self._msg)
        except NetlinkError as err:
            self._sock.close()
            raise KernelNbdUnavailable(f"no '{GENL_FAMILY}' generic netlink family "
                                       f"({os.strerror(err.code)}): the nbd module is not loaded") from None

    def _request(self, cmd: int, attrs: list) -> list:
        msg = self._msg()
        msg["cmd"] = cmd
        msg["version"] = GENL_VERSION
        msg["attrs"] = attrs
        try:
            return list(self._sock.nlm_request(msg, msg_type=self._sock.prid, msg_flags=self._flags))
        except self._error as err:
            raise OSError(err.code, f"nbd netlink {COMMAND_NAMES.get(cmd, cmd)}: {os.strerror(err.code)} "
                                    f"(the kernel log says why: dmesg)") from None

    def connect(self, fds: list[int], info: ExportInfo, backend: str, index: int | None = None,
                timeout: int = DEFAULT_TIMEOUT_S, dead_conn_timeout: int = DEAD_CONN_TIMEOUT_S) -> int:
        """NBD_CMD_CONNECT: give the kernel the negotiated sockets; return the device index."""
        attrs = [
            ["NBD_ATTR_SIZE_BYTES", info.size],
            ["NBD_ATTR_BLOCK_SIZE_BYTES", info.block_size],
            ["NBD_ATTR_SERVER_FLAGS", info.flags],
            ["NBD_ATTR_TIMEOUT", timeout],
            ["NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout],
            _sockets(fds),
            ["NBD_ATTR_BACKEND_IDENTIFIER", backend],
        ]
        if index is not None:
            attrs.insert(0, ["NBD_ATTR_INDEX", index])
        for reply in self._request(CMD_CONNECT, attrs):
            found = reply.get_attr("NBD_ATTR_INDEX")
            if found is not None:
                return int(found)
        raise OSError("NBD_CMD_CONNECT succeeded without naming the device (kernel sent no index)")

    def disconnect(self, index: int) -> None:
        """NBD_CMD_DISCONNECT: the kernel sends NBD_CMD_DISC and drops its sockets."""
        self._request(CMD_DISCONNECT, [["NBD_ATTR_INDEX", index]])

    def reconnect(self, index: int, fds: list[int], backend: str) -> None:
        """NBD_CMD_RECONFIGURE with sockets: each replaces a *dead* connection of the device.

        The kernel ignores a socket when no connection is dead (and says nothing), so this is
        safe to call on a healthy device: it then changes nothing. A device connected with a
        backend identifier must be named with the same one, or the kernel refuses (EINVAL).
        """
        self._request(CMD_RECONFIGURE, [["NBD_ATTR_INDEX", index], _sockets(fds),
                                        ["NBD_ATTR_BACKEND_IDENTIFIER", backend]])

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        """NBD_CMD_STATUS: every nbd device (or one) and whether it is connected."""
        attrs = [] if index is None else [["NBD_ATTR_INDEX", index]]
        devices = []
        for reply in self._request(CMD_STATUS, attrs):
            dev_list = reply.get_attr("NBD_ATTR_DEVICE_LIST")
            if dev_list is None:
                continue
            for item in dev_list.get_attrs("NBD_DEVICE_ITEM"):
                devices.append(DeviceStatus(int(item.get_attr("NBD_DEVICE_INDEX")),
                                            bool(item.get_attr("NBD_DEVICE_CONNECTED"))))
        return devices

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "KernelNbd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_of(index: int) -> str | None:
    """What a connected device says it is connected to (sysfs), or None."""
    try:
        with open(f"/sys/block/nbd{index}/backend") as f:
            return f.read().strip() or None
    except OSError:
        return None
