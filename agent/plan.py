"""What a migration is asked to do, and DiskSetup's checks of it against the VM and the destination.

Design notes
- `MigrationOptions` is the validated `migrate` request (docs/interfaces.md, section 4); a bad
  argument is a usage error (exit 2) quoting the value. `OPTION_ARGS` declares each argument's
  JSON type, default and rule (nbd_plugin/control.py `Arg`): a new option is one field here and
  one entry there.
- `plan_migration` runs before the agent answers `migrate` and again in DiskSetup: a refusal
  (exit 3) happens before anything is created, so "refused" always means "nothing changed".
- Every object goes to `DEST/<name>` and lives there as `<name>.svmotion-partial` until
  DiskCopyDone: an interrupted migration never leaves a file that looks complete.
- A partial disk already at the destination is resumed (DiskLoad) when its identity record
  matches this migration's disk, and refused otherwise (agent/partial.py).
- Where to (`Destination`, scp-like): `/path` is a directory of this host; `HOST:/path`,
  `HOST:PORT:/path`, `[IPV6]:/path` and `[IPV6]:PORT:/path` a directory in a datastore of
  another svmotion host, whose agent API listens on PORT (default 9816, mutual TLS,
  agent/remote.py). As with scp, a colon before the first slash makes it remote: a local path
  with a colon in its first component is written `./a:b` (the CLI makes it absolute). The
  remote path is absolute, on that host.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from agent.config import DEFAULT_AGENT_PORT, VmConfig
from agent.convergence import MAX_BOUND_S
from agent.errors import EXIT_USAGE, Refused, SvmotionError
from agent.partial import Identity, judge_reuse
from agent.remote import parse_name
from nbd_plugin.backend import is_nbd_uri
from nbd_plugin.control import Arg, ArgumentError, arguments, file_path, one_of, power_of_two, within
from nbd_plugin.dirtymap import MAX_GRANULARITY, MIN_GRANULARITY

if TYPE_CHECKING:
    from agent.destdir import DestDir

STRATEGIES = ("optimized", "legacy")
# sync: the guest's write is acknowledged once both sides have it; async: once the source has it,
# the destination gets it in the background; dirty: the source only, copy passes carry it.
MIRROR_MODES = ("sync", "async", "dirty")
PARTIAL_SUFFIX = ".svmotion-partial"


@dataclass(frozen=True)
class Destination:
    """Where a migration's disks and files go: a directory here, or on another host (module notes).

    Example: `parse_destination("hostb:/srv/ds2/vm1")` -> Destination("/srv/ds2/vm1", "hostb", 9816)
    """

    path: str                        # absolute; on `host` when remote
    host: str | None = None          # None: this host
    port: int = DEFAULT_AGENT_PORT   # the remote agent's API

    @property
    def remote(self) -> bool:
        return self.host is not None

    def __str__(self) -> str:
        if self.host is None:
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_AGENT_PORT else f"{self.port}:"
        return f"{host}:{port}{self.path}"


def parse_destination(text: str) -> Destination:
    """`--dest` as a Destination; raise ValueError saying what is wrong and the syntax."""
    syntax = "write /path for this host, or HOST:/path, HOST:PORT:/path, [IPV6]:/path for another"
    if not text.strip():
        raise ValueError("give the destination directory, e.g. --dest /mnt/new")
    if text.startswith("/"):
        return Destination(text)
    head = text.split("/", 1)[0].rstrip(":")
    if not text.startswith("[") and head.count(":") >= 2:
        address = next((a for a in (head, head.rpartition(":")[0]) if _is_ipv6(a)), head)
        raise ValueError(f"an IPv6 address goes in brackets, e.g. [{address}]:/path; {syntax}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"an IPv6 address in brackets must be followed by ':' and the path; {syntax}")
        rest = rest[1:]
    else:
        host, colon, rest = text.partition(":")
        if not colon or "/" in host:
            raise ValueError("must be an absolute path (the agent does not share your working directory), "
                             f"e.g. /mnt/new; or {syntax}")
    port = DEFAULT_AGENT_PORT
    if not rest.startswith("/"):
        port_text, colon, rest = rest.partition(":")
        if not colon or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"after the host comes an absolute path or PORT:/path (port 1 to 65535); {syntax}")
        port = int(port_text)
    if not rest.startswith("/"):
        raise ValueError(f"the path on host {host!r} must be absolute; {syntax}")
    try:
        name = parse_name(f"[{host}]" if text.startswith("[") else host)
    except ValueError as err:
        raise ValueError(f"{err}; {syntax}") from None
    if text.startswith("[") != (":" in str(name)):
        raise ValueError(f"an IPv6 address goes in brackets, and only one does: [{host}]:/path")
    return Destination(rest, str(name), port)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


@dataclass
class MigrationOptions:
    """What `svmotion migrate` asks for (docs/interfaces.md, section 4, op `migrate`)."""

    dest: str
    strategy: str = "optimized"
    rate: int = 0                    # bytes/s for the copier, 0 = unlimited
    mirror: str = "sync"
    granularity: int = 64 * 1024
    stun_budget: float = 0.05        # seconds the switchover stun may take
    delete_source: bool = False
    verify: bool = False             # compare both sides by digests after the switchover
    max_throttle: float = 0.005      # seconds: the most a guest write may be delayed to converge

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> "MigrationOptions":
        """The `migrate` request's options (all but its op and vm); a bad one is a usage error (exit 2)."""
        options = {k: v for k, v in req.items() if k not in ("op", "vm")}
        try:
            args = arguments(options, OPTION_ARGS, "migrate", keep=())
        except ArgumentError as err:
            raise SvmotionError(str(err), EXIT_USAGE) from None
        return cls(**{**args, "stun_budget": float(args["stun_budget"]),
                      "max_throttle": float(args["max_throttle"])})

    @property
    def destination(self) -> Destination:
        return parse_destination(self.dest)


def destination(dest: str) -> str | None:
    """Check of `dest`: a Destination, whose path is absolute (the agent's working directory is not the caller's)."""
    try:
        parse_destination(dest)
    except ValueError as err:
        return str(err)
    return file_path(dest)


def or_null(check: Callable[[Any], str | None] | None) -> Callable[[Any], str | None]:
    """A check that lets null (unchanged) through."""
    return lambda v: None if v is None or check is None else check(v)


def check_stun_budget(seconds: float) -> str | None:
    return None if 0 < seconds <= 10 else "seconds in (0, 10], e.g. 0.05"


def check_max_throttle(seconds: float) -> str | None:
    """The bound of the guest throttle (agent/convergence.py); 0 never delays the guest."""
    return None if 0 <= seconds <= MAX_BOUND_S else f"seconds from 0 to {MAX_BOUND_S:g}, e.g. 0.005"


# The `migrate` options of the agent API (docs/interfaces.md, section 4), defaults from MigrationOptions.
OPTION_ARGS = {
    "dest": Arg(str, check=destination),
    "strategy": Arg(str, MigrationOptions.strategy, one_of(*STRATEGIES)),
    "rate": Arg(int, MigrationOptions.rate, within(0, 1 << 50)),
    "mirror": Arg(str, MigrationOptions.mirror, one_of(*MIRROR_MODES)),
    "granularity": Arg(int, MigrationOptions.granularity, power_of_two(MIN_GRANULARITY, MAX_GRANULARITY)),
    "stun_budget": Arg(float, MigrationOptions.stun_budget, check_stun_budget),
    "delete_source": Arg(bool, MigrationOptions.delete_source),
    "verify": Arg(bool, MigrationOptions.verify),
    "max_throttle": Arg(float, MigrationOptions.max_throttle, check_max_throttle),
}

# What `svmotion set` may change on a running migration (daemon.py op `set`): null = unchanged.
SET_ARGS = {key: Arg((OPTION_ARGS[key].kinds, type(None)), None, or_null(OPTION_ARGS[key].check))
            for key in ("mirror", "rate", "max_throttle", "stun_budget")}


@dataclass
class DiskPlan:
    """Where one disk comes from and goes to, and its per-disk files."""

    name: str
    source: str
    size: int
    partial: str
    final: str
    sidecars: list[tuple[str, str]] = field(default_factory=list)   # (source, dest final)
    resume: Identity | None = None    # the partial disk found at the destination, to DiskLoad
    target: str = ""                  # what the mirror writes to: the partial's path, or its export's URI

    def identity(self, vm: str, migration: str, granularity: int) -> Identity:
        """The identity record of this disk's partial when `migration` makes or reuses it."""
        source = self.source if is_nbd_uri(self.source) else os.path.realpath(self.source)
        return Identity(vm=vm, disk=self.name, source=source, size=self.size,
                        migration=migration, granularity=granularity)


def partial_name(final: str) -> str:
    return final + PARTIAL_SUFFIX


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plan_migration(vm: VmConfig, paths: dict[str, Any], hello: dict[str, Any], options: MigrationOptions,
                   dest: "DestDir") -> tuple[list[DiskPlan], list[tuple[str, str]]]:
    """Check the request against the VM and the destination; raise Refused naming what is wrong.

    `dest` (agent/destdir.py) is `options.dest` opened: here, or another host's datastore.
    """
    sizes = {d["name"]: int(d["size"]) for d in hello.get("disks", [])}
    plan: list[DiskPlan] = []
    claimed: set[str] = set()

    def target(name: str) -> str:
        final = os.path.join(dest.path, name)
        if final in claimed:
            raise Refused(f"two objects of VM {vm.name!r} would both be copied to {final!r}; rename one")
        claimed.add(final)
        return final

    def existing(path: str, what: str) -> str:
        if is_nbd_uri(path) or not path.startswith("/"):
            # A disk served from another host's export (the mirror node reads it), or a file an
            # earlier migration put on another host as HOST:PORT:/path (read through its agent).
            return path
        if not os.path.isfile(path):
            raise Refused(f"source {what} {path!r} is missing; restore it or fix the agent's configuration")
        return path

    for disk in vm.disks:
        source = existing(paths["disks"][disk.name], f"disk {disk.name!r}")
        if not dest.remote and not is_nbd_uri(source) and os.path.realpath(os.path.dirname(source)) == dest.path:
            raise Refused(f"destination {options.dest!r} is the directory of the source disk {source!r}; "
                          f"choose another --dest")
        if disk.name not in sizes:
            raise Refused(f"the mirror node does not serve disk {disk.name!r}; restart the agent")
        side_sources = paths["sidecars"].get(disk.name, list(disk.sidecars))
        final = target(f"{disk.name}.raw")
        plan.append(DiskPlan(name=disk.name, source=source, size=sizes[disk.name], partial=partial_name(final),
                             final=final))
        plan[-1].sidecars = [(existing(s, f"sidecar of disk {disk.name!r}"), "") for s in side_sources]
    for disk in plan:
        disk.sidecars = [(s, target(os.path.basename(s))) for s, _ in disk.sidecars]
    files = [(existing(f, "file"), "") for f in paths["files"]]
    files = [(s, target(os.path.basename(s))) for s, _ in files]
    names = [os.path.basename(f) for _, f in files] + [os.path.basename(f) for d in plan for _, f in d.sidecars]
    found = dest.check(names, [os.path.basename(d.final) for d in plan],
                       allocated_bytes([d.source for d in plan] + [s for s, _ in files] +
                                       [s for d in plan for s, _ in d.sidecars]))
    for disk in plan:
        facts = found.get(os.path.basename(disk.final))
        if facts is not None:
            disk.resume = judge_reuse(disk.partial, facts.regular, facts.size, facts.identity,
                                      disk.identity(vm.name, "", options.granularity))
    return plan, files


# Room a thin destination must keep for the disks to grow after the switchover (see below).
GROWTH_HEADROOM = 64 << 20


def growth_room_needed(disks: list[tuple[int, int]]) -> int:
    """What the destination must still have free to take the VM: the disks' unallocated bytes, at
    most GROWTH_HEADROOM. `disks`: (allocated bytes, size). After the switchover the guest's first
    write into a hole allocates there; a destination that filled up during the migration would fail
    it (the fault campaign found one, trial seed 237986542), an error the destination caused."""
    unallocated = sum(max(0, size - allocated) for allocated, size in disks)
    return min(unallocated, GROWTH_HEADROOM)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocated_bytes(sources: list[str]) -> int:
    """What the sources hold now, the least a destination must have free. What is on another
    host (an export, a file there) counts nothing here: the switchover's room check sees disks."""
    return sum(os.stat(p).st_blocks * 512 for p in sources if p.startswith("/"))
