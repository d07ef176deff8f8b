"""Hosts as Linux network namespaces: a lab of two or three "hosts" on one machine, joined by veths.

Design notes
- What remote destinations need from a second host is its own network stack: its own addresses,
  ports and links, which a network namespace is. Processes in a host share this machine's files
  (state directories, Unix sockets, certificates), so a test still reaches an agent in a host
  through its Unix socket and stops it by PID. A test's own client or server joins a host for
  a moment (`Host.entered`: setns of the calling thread) to make its sockets there.
- Made with pyroute2 (netns.create puts the name under /var/run/netns, so `ip netns exec NAME`
  runs a command there: it enters the namespace and execs the command in place, so the PID a
  caller gets from Popen is the command's own and can be SIGKILLed as before).
- Names: `PREFIX-PID-RANDOM-HOST`. The PID says whose they are (a SIGKILLed test run leaves them
  behind: `ip netns del NAME`); the random part keeps a later run with a reused PID off them.
  A name is created exclusively, so a collision is an error, never a shared namespace.
- Every host has one interface, `eth0`, with an address of SUBNET (host k of the lab, counted
  from 0, gets SUBNET[k + 1]). Two hosts are joined by one veth pair; more hosts by a veth each to
  a bridge in a namespace of its own (`...-switch`). Veths are created inside the namespaces,
  never in this machine's own, so nothing of a lab is visible there and interface names never
  clash with other labs. Each lab is a set of isolated stacks, so every lab may use the same
  addresses: that is what lets a test PKI made once per session certify them (`host_address`).
- A dead link: `link_down` sets the host's end of its veth down. The far end loses carrier and
  drops what it sends, and nothing answers with a reset: TCP connections stall, they are not
  closed, and resume after `link_up` (retransmission), as with a pulled cable.
- Shaping: a TBF qdisc on the host's eth0 limits what the host sends (one direction: shape the
  sender of the traffic to limit). netem is not available on this kernel.
- `close` removes every namespace and veth the lab made, also after a setup that failed half
  way, and may be called again. It does not stop processes: whoever started a process inside a
  host stops it (by PID) before `close`. Processes still inside then are named in a LabError,
  after the namespaces are removed (a process keeps its namespace alive, without its name, until
  it exits; its veth is deleted regardless).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_ROOT

SUBNET = ipaddress.ip_network("198.18.0.0/24")   # RFC 2544's benchmarking range: no real host uses it
INTERFACE = "eth0"
SWITCH = "switch"
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")   # becomes an interface name on the switch (15 bytes max)


class LabError(Exception):
    """A lab could not be made, or processes were still running inside it at close."""


def host_address(index: int, subnet: ipaddress.IPv4Network = SUBNET) -> str:
    """The address of a lab's host number `index` (0: the first host given), the same in every lab."""
    return str(subnet[index + 1])


@dataclass
class Host:
    """One host of a lab: a network namespace with `eth0` at `address`.

    Example: `subprocess.Popen(lab["b"].argv(["nbdkit", ...]))`, `lab["b"].link_down()`.
    """

    name: str           # "a", "b", ...: the lab's own name for it
    netns: str          # the namespace's name under /var/run/netns
    address: str
    prefixlen: int

    def argv(self, command: list[str]) -> list[str]:
        """`command` run inside this host (`ip netns exec` execs it: the PID is the command's)."""
        return ["ip", "netns", "exec", self.netns, *command]

    @contextmanager
    def entered(self) -> Iterator["Host"]:
        """Within the block the calling thread is on this host: the sockets it makes are this host's.

        setns(2) moves only the calling thread (a thread it starts meanwhile starts on this host);
        the sockets keep their host after the block.
        Example: `with lab["a"].entered(): sock = socket.create_connection((lab["b"].address, port))`.
        """
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            pyroute2_netns.setns(self.netns, flags=0)
            yield self
        finally:
            pyroute2_netns.setns(home)
            os.close(home)

    def link_down(self) -> None:
        """Cut this host's link: connections stall without a reset (module notes)."""
        self._set_link("down")

    def link_up(self) -> None:
        """Restore this host's link; stalled connections resume."""
        self._set_link("up")

    def shape(self, rate_bits: int, burst_bytes: int = 64 << 10, latency_s: float = 0.05) -> None:
        """Limit what this host sends to `rate_bits` per second (TBF; `latency_s` of queue, then drops)."""
        if not 0 < rate_bits // 8 < 1 << 32:
            raise ValueError(f"rate {rate_bits} bit/s: TBF takes 8 bit/s to 34 Gbit/s")
        with self._ipr() as ipr:
            ipr.tc("replace", "tbf", self._index(ipr), parent=TC_H_ROOT, rate=f"{rate_bits}bit",
                   burst=burst_bytes, latency=f"{latency_s * 1e6:.0f}us")

    def unshape(self) -> None:
        """Remove the shaping (nothing to do if there is none)."""
        with self._ipr() as ipr:
            try:
                ipr.tc("del", index=self._index(ipr), parent=TC_H_ROOT)
            except NetlinkError as err:
                if err.code != errno.ENOENT:      # no shaping to remove
                    raise

    def _set_link(self, state: str) -> None:
        with self._ipr() as ipr:
            ipr.link("set", index=self._index(ipr), state=state)

    def _ipr(self) -> IPRoute:
        return IPRoute(netns=self.netns, flags=0)     # flags=0: never create a namespace that is gone

    @staticmethod
    def _index(ipr: IPRoute) -> int:
        return ipr.link_lookup(ifname=INTERFACE)[0]


class Lab:
    """Hosts in network namespaces, joined by a veth pair (two hosts) or a bridge (more).

    Example:
        with Lab("svm", ("a", "b")) as lab:
            server = subprocess.Popen(lab["b"].argv(["nbdkit", "-f", "-i", lab["b"].address, "memory", "1M"]))
            ...   # stop `server` (by PID) before the lab closes
    """

    def __init__(self, prefix: str, hosts: tuple[str, ...] = ("a", "b"),
                 subnet: ipaddress.IPv4Network = SUBNET):
        if len(hosts) < 2 or len(set(hosts)) != len(hosts) or not all(map(_HOST_NAME.match, hosts)):
            raise ValueError(f"hosts {hosts!r}: give two or more distinct names of 1-10 lower-case "
                             "letters and digits, starting with a letter")
        if len(hosts) + 1 >= subnet.num_addresses:
            raise ValueError(f"subnet {subnet} has no room for {len(hosts)} hosts")
        self.base = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.hosts = {name: Host(name, f"{self.base}-{name}", host_address(i, subnet), subnet.prefixlen)
                      for i, name in enumerate(hosts)}
        self._made: list[str] = []     # namespaces created so far, for close
        try:
            for host in self.hosts.values():
                self._create(host.netns)
            if len(hosts) == 2:
                self._join_pair(*self.hosts.values())
            else:
                self._join_switch()
            for host in self.hosts.values():
                with host._ipr() as ipr:
                    ipr.addr("add", index=host._index(ipr), address=host.address, prefixlen=host.prefixlen)
                    ipr.link("set", index=host._index(ipr), state="up")
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def _create(self, name: str) -> None:
        try:
            pyroute2_netns.create(name)      # exclusive: an existing name fails here
        except OSError as err:
            raise LabError(f"cannot create network namespace {name!r}: {err.strerror or err}") from None
        self._made.append(name)
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")   # loopback works as on a host

    def _join_pair(self, one: Host, other: Host) -> None:
        with _open_netns(other.netns) as fd, one._ipr() as ipr:
            ipr.link("add", ifname=INTERFACE, kind="veth", peer={"ifname": INTERFACE, "net_ns_fd": fd})

    def _join_switch(self) -> None:
        switch = f"{self.base}-{SWITCH}"
        self._create(switch)
        with IPRoute(netns=switch, flags=0) as sw:
            sw.link("add", ifname="br0", kind="bridge")      # no STP: ports forward at once
            bridge = sw.link_lookup(ifname="br0")[0]
            sw.link("set", index=bridge, state="up")
            for host in self.hosts.values():
                with _open_netns(host.netns) as fd:
                    sw.link("add", ifname=host.name, kind="veth", peer={"ifname": INTERFACE, "net_ns_fd": fd})
                port = sw.link_lookup(ifname=host.name)[0]
                sw.link("set", index=port, master=bridge, state="up")

    def pids_inside(self) -> dict[str, list[int]]:
        """The processes running inside each host now, by host name (empty hosts left out)."""
        running = pyroute2_netns.ns_pids()
        return {host.name: running[host.netns] for host in self.hosts.values() if running.get(host.netns)}

    def close(self) -> None:
        """Remove the veths and namespaces made; LabError if processes were still inside (module notes)."""
        inside = self.pids_inside() if self._made else {}
        failed: list[str] = []
        while self._made:
            name = self._made.pop()
            try:
                with IPRoute(netns=name, flags=0) as ipr:
                    for index in ipr.link_lookup(ifname=INTERFACE):
                        ipr.link("del", index=index)   # and its peer: a process inside cannot keep them
            except (OSError, NetlinkError) as err:
                failed.append(f"{name}: {err}")
            pyroute2_netns.remove(name)
        if failed:
            raise LabError(f"lab {self.base}: cannot delete veths: {'; '.join(failed)}")
        if inside:
            raise LabError(f"lab {self.base}: processes still running inside at close, by host: {inside}; "
                           "whoever started them must stop them (by PID) before closing the lab")

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _open_netns(name: str) -> Iterator[int]:
    """A namespace's file descriptor for the duration of a `with` (to put a veth end there)."""
    fd = os.open(os.path.join(pyroute2_netns.NETNS_RUN_DIR, name), os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)
