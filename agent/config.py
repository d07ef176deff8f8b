"""The agent's TOML configuration (docs/interfaces.md, section 3): load, validate, normalise.

Design notes
- Validation happens once, at load, so the daemon never starts half-configured: every problem is
  a `ConfigError` (exit 7) naming the file, the key and the bad value, and saying the fix.
- Relative paths are taken relative to the configuration file's directory, so a config written
  next to its disks (the demo, the tests) works from any working directory.
- Disk names become NBD export names and file names (`DEST/<disk>.raw`), so they are restricted
  to a safe alphabet; VM names name pid files and sockets in state_dir, same rule.
- Unknown keys are errors, not ignored: a typo (`sidecar =`) must not silently drop a file from
  a migration.
- Network exposure: a listener that hands out disks or control without authentication must not
  face the network. The agent's TCP API (`[agent] listen`) and the datastores' NBD export
  (`[agent] nbd_listen`) are mutual TLS only, so they need `[tls]` on any address; a VM's plain
  NBD `listen` must be a loopback address (the mirror node has no TLS). `metrics` is exempt: it
  shows figures, no data and no control.
- Datastores (`[[datastore]] name, path`) are the directories other hosts' migrations may write
  into, through this agent only (agent/datastore.py confines every path to them): they must
  exist, be directories and not nest, and they come with `listen` and `nbd_listen`. An agent
  may offer datastores and no VM.
"""
from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_AGENT_SOCKET = "/run/svmotion/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/svmotion"
DEFAULT_METRICS = "127.0.0.1:9815"
DEFAULT_AGENT_PORT = 9816          # [agent] listen's usual port; HOST:/path destinations assume it
# What `[tls] dir` holds: nbdkit's --tls-certificates layout (man nbdkit-tls), which libnbd's
# set_tls_certificates(DIR) reads too. `svmotion tls init` writes it (agent/certs.py).
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


@dataclass(frozen=True)
class DiskConfig:
    name: str
    path: str
    sidecars: tuple[str, ...] = ()


@dataclass(frozen=True)
class VmConfig:
    name: str
    socket: str
    disks: tuple[DiskConfig, ...]
    listen: str | None = None
    files: tuple[str, ...] = ()
    lease: float = 2.0

    def disk(self, name: str) -> DiskConfig:
        return next(d for d in self.disks if d.name == name)


@dataclass(frozen=True)
class TlsConfig:
    """This host's X.509 credentials: the site CA, and one certificate (server and client) and its key.

    `dir` is set when they were given as a directory in nbdkit's layout (TLS_FILES); otherwise
    the agent lays out such a directory itself for nbdkit and libnbd (agent/tls.py).
    """

    ca: str
    cert: str
    key: str
    dir: str | None = None


@dataclass(frozen=True)
class DatastoreConfig:
    name: str
    path: str


@dataclass(frozen=True)
class AgentConfig:
    socket: str
    state_dir: str
    metrics: str | None
    vms: tuple[VmConfig, ...] = field(default_factory=tuple)
    source: str = ""
    listen: str | None = None                 # the agent API for other hosts' agents (mutual TLS)
    nbd_listen: str | None = None             # the datastores' NBD export (TLS, client certificates)
    tls: TlsConfig | None = None
    datastores: tuple[DatastoreConfig, ...] = ()

    def vm(self, name: str) -> VmConfig | None:
        return next((v for v in self.vms if v.name == name), None)


class _Reader:
    """Typed access to one TOML table, with errors that say where the bad value is."""

    def __init__(self, file: str, where: str, table: Any, allowed: set[str]):
        self.file, self.where = file, where
        if not isinstance(table, dict):
            self.fail(f"expected a table, got {table!r}", "write it as [section] or [[vm]]")
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(f"unknown key {unknown[0]!r}", f"allowed keys: {', '.join(sorted(allowed))}")
        self.table: dict[str, Any] = table

    def fail(self, problem: str, fix: str) -> None:
        raise ConfigError(f"{self.file}: {self.where}: {problem}; {fix}")

    def str(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.table.get(key, default)
        if value is None:
            if required:
                self.fail(f"missing {key!r}", f"add {key} = \"...\"")
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"{key} = {value!r} is not a non-empty string", f"write {key} = \"...\"")
        return value

    def path(self, key: str, base: Path, default: str | None = None, required: bool = False) -> str | None:
        value = self.str(key, default, required)
        return None if value is None else resolve(value, base)

    def paths(self, key: str, base: Path) -> tuple[str, ...]:
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(f"{key} = {value!r} is not a list of paths", f"write {key} = [\"/path/a\", ...]")
        return tuple(resolve(v, base) for v in value)

    def name(self, key: str) -> str:
        value = self.str(key, required=True)
        assert value is not None
        if not NAME_RE.match(value):
            self.fail(f"{key} = {value!r} is not a valid name",
                      "use letters, digits, '.', '_' or '-' (at most 63, starting with a letter or digit)")
        return value


def resolve(path: str, base: Path) -> str:
    """An absolute, normalised path; relative ones are relative to the config file's directory."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def check_address(reader: _Reader, key: str, value: str | None) -> None:
    """host:port with a numeric port, as the metrics and TCP listeners take it."""
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        reader.fail(f"{key} = {value!r} is not host:port", f"write {key} = \"127.0.0.1:9815\"")


def is_loopback(address: str) -> bool:
    """Whether a listener's host:port is on a loopback address ([::1] and localhost included).

    A host name other than localhost counts as not loopback: it may resolve to anything.
    """
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str) -> AgentConfig:
    """Read and validate the agent's configuration; raise ConfigError (exit 7) on any problem.

    Example: `load_config("/etc/svmotion/agent.toml").vm("vm1").disks[0].path`
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass the agent's TOML file with --config") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror}); check its permissions") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the syntax at that line") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: str = "<config>") -> AgentConfig:
    """Validate an already-parsed TOML document (tests use this directly)."""
    base = Path(os.path.abspath(path)).parent
    top = _Reader(path, "top level", data, {"agent", "vm", "tls", "datastore"})
    agent = _Reader(path, "[agent]", data.get("agent", {}),
                    {"socket", "state_dir", "metrics", "listen", "nbd_listen"})
    metrics = agent.table.get("metrics", DEFAULT_METRICS)
    if metrics == "":
        metrics = None     # metrics = "" switches the HTTP server off
    else:
        metrics = agent.str("metrics", DEFAULT_METRICS)
    check_address(agent, "metrics", metrics)
    listen, nbd_listen = agent.str("listen"), agent.str("nbd_listen")
    check_address(agent, "listen", listen)
    check_address(agent, "nbd_listen", nbd_listen)
    tls = parse_tls(path, base, data["tls"]) if "tls" in data else None
    datastores = parse_datastores(path, base, data.get("datastore", []))
    check_network(agent, listen, nbd_listen, tls, datastores)
    vm_tables = data.get("vm", [])
    if not isinstance(vm_tables, list) or (not vm_tables and not datastores):
        top.fail("no [[vm]] table and no [[datastore]] table",
                 "describe at least one VM with [[vm]] name = ... and [[vm.disk]], or offer a datastore")
    vms = tuple(parse_vm(path, base, i, table) for i, table in enumerate(vm_tables))
    check_unique(path, vms, [a for a in (listen, nbd_listen) if a])
    return AgentConfig(
        socket=agent.path("socket", base, DEFAULT_AGENT_SOCKET) or DEFAULT_AGENT_SOCKET,
        state_dir=agent.path("state_dir", base, DEFAULT_STATE_DIR) or DEFAULT_STATE_DIR,
        metrics=metrics, vms=vms, source=path, listen=listen, nbd_listen=nbd_listen, tls=tls,
        datastores=datastores)


def parse_tls(path: str, base: Path, table: Any) -> TlsConfig:
    """`[tls] dir = ...` (nbdkit's layout, TLS_FILES) or `ca, cert, key`; the files must be there."""
    tls = _Reader(path, "[tls]", table, {"dir", "ca", "cert", "key"})
    fix = "write [tls] dir = \"/etc/svmotion/tls/HOST\" (made by `svmotion tls init`), or ca, cert and key"
    tls_dir = tls.path("dir", base)
    given = {k: tls.path(k, base) for k in ("ca", "cert", "key")}
    if tls_dir is not None:
        if any(given.values()):
            tls.fail("both dir and ca/cert/key are set", "keep one of them")
        if not os.path.isdir(tls_dir):
            tls.fail(f"dir = {tls_dir!r} is not a directory", fix)
        files = {name: os.path.join(tls_dir, name) for name in TLS_FILES}
        config = TlsConfig(ca=files["ca-cert.pem"], cert=files["server-cert.pem"], key=files["server-key.pem"],
                           dir=tls_dir)
        keys = [files["server-key.pem"], files["client-key.pem"]]
    else:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            tls.fail(f"missing {missing[0]!r}", fix)
        files = {k: v for k, v in given.items() if v is not None}
        config = TlsConfig(ca=files["ca"], cert=files["cert"], key=files["key"])
        keys = [files["key"]]
    for name, file in files.items():
        if not os.path.isfile(file):
            tls.fail(f"{name}: {file!r} does not exist", f"run `svmotion tls init` or fix the path; {fix}")
    for key in keys:
        mode = os.stat(key).st_mode
        if mode & 0o077:
            tls.fail(f"the private key {key!r} is readable by others (mode {stat.S_IMODE(mode):04o})",
                     f"chmod 600 {key}")
    return config


def parse_datastores(path: str, base: Path, tables: Any) -> tuple[DatastoreConfig, ...]:
    """The `[[datastore]]` tables: existing directories, unique names, none inside another."""
    if not isinstance(tables, list):
        _Reader(path, "[[datastore]]", {}, set()).fail(f"{tables!r} is not a list of tables",
                                                       "write [[datastore]] name = ... path = ...")
    out: list[DatastoreConfig] = []
    for index, table in enumerate(tables):
        ds = _Reader(path, f"[[datastore]] #{index + 1}", table, {"name", "path"})
        name = ds.name("name")
        ds.where = f"datastore {name!r}"
        ds_path = ds.path("path", base, required=True) or ""
        if not os.path.isdir(ds_path):
            ds.fail(f"path = {ds_path!r} is not a directory", f"create it (mkdir -p {ds_path}) or fix the path")
        real = os.path.realpath(ds_path)
        for other in out:
            if other.name == name:
                ds.fail("the name is used twice", "give each datastore its own name")
            other_real = os.path.realpath(other.path)
            if os.path.commonpath([real, other_real]) in (real, other_real):
                ds.fail(f"path {ds_path!r} and datastore {other.name!r} ({other.path!r}) overlap",
                        "give datastores directories that do not contain each other")
        out.append(DatastoreConfig(name=name, path=ds_path))
    return tuple(out)


def check_network(agent: _Reader, listen: str | None, nbd_listen: str | None, tls: TlsConfig | None,
                  datastores: tuple[DatastoreConfig, ...]) -> None:
    """TCP listeners only with TLS, and datastores together with both of theirs (module notes)."""
    for key, value in (("listen", listen), ("nbd_listen", nbd_listen)):
        if value is None:
            continue
        if tls is None:
            network = "" if is_loopback(value) else "a listener on the network needs TLS, and "
            agent.fail(f"{key} = {value!r} without [tls]: {network}it serves other hosts with mutual TLS only",
                       "add [tls] dir = \"...\" (see `svmotion tls init`) or remove it")
        if not datastores:
            agent.fail(f"{key} = {value!r} but no [[datastore]] is configured: it would offer nothing",
                       "add [[datastore]] name = ... path = ..., or remove it")
    if datastores and (listen is None or nbd_listen is None):
        missing = "listen" if listen is None else "nbd_listen"
        agent.fail(f"datastores are configured but {missing} is not: other hosts reach them through the agent "
                   "API (listen) and the NBD export (nbd_listen)",
                   f"add {missing} = \"HOST:PORT\" (e.g. {DEFAULT_AGENT_PORT} and 10810)")


def parse_vm(path: str, base: Path, index: int, table: Any) -> VmConfig:
    vm = _Reader(path, f"[[vm]] #{index + 1}", table, {"name", "socket", "listen", "files", "disk", "lease"})
    name = vm.name("name")
    vm.where = f"[[vm]] {name!r}"
    listen = vm.str("listen")
    check_address(vm, "listen", listen)
    if listen is not None and not is_loopback(listen):
        vm.fail(f"listen = {listen!r} would serve the VM's disks over plain NBD, without TLS, on the network",
                "use a loopback address, e.g. listen = \"127.0.0.1:10809\"")
    lease = vm.table.get("lease", 2.0)
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0.1 <= lease <= 60:
        vm.fail(f"lease = {lease!r} is not a number of seconds in [0.1, 60]", "write lease = 2.0")
    disk_tables = vm.table.get("disk", [])
    if not isinstance(disk_tables, list) or not disk_tables:
        vm.fail("no [[vm.disk]] table", "add [[vm.disk]] name = \"disk0\" path = \"/path/disk0.raw\"")
    disks = tuple(parse_disk(path, base, name, i, t) for i, t in enumerate(disk_tables))
    return VmConfig(name=name, socket=vm.path("socket", base, required=True) or "", disks=disks,
                    listen=listen, files=vm.paths("files", base), lease=float(lease))


def parse_disk(path: str, base: Path, vm: str, index: int, table: Any) -> DiskConfig:
    disk = _Reader(path, f"[[vm.disk]] #{index + 1} of VM {vm!r}", table, {"name", "path", "sidecars"})
    name = disk.name("name")
    disk.where = f"disk {name!r} of VM {vm!r}"
    disk_path = disk.path("path", base, required=True) or ""
    # Existence is checked by the daemon against the *current* path: after a migration with
    # --delete-source the configured path is gone and the disk lives at its destination.
    return DiskConfig(name=name, path=disk_path, sidecars=disk.paths("sidecars", base))


def check_unique(path: str, vms: tuple[VmConfig, ...], agent_listens: list[str] = ()) -> None:
    """Names, paths and addresses that must not be shared: two owners of one file would corrupt it."""
    seen: dict[tuple[str, str], str] = {}

    def claim(what: str, value: str, owner: str) -> None:
        if (what, value) in seen:
            raise ConfigError(f"{path}: {what} {value!r} is used by {seen[(what, value)]} and by {owner}; "
                              f"give each its own")
        seen[(what, value)] = owner

    for address in agent_listens:
        claim("listen address", address, "[agent]")
    for vm in vms:
        owner = f"VM {vm.name!r}"
        claim("VM name", vm.name, owner)
        claim("path", vm.socket, owner)
        if vm.listen:
            claim("listen address", vm.listen, owner)
        for p in vm.files:
            claim("path", p, owner)
        for disk in vm.disks:
            claim("disk", f"{vm.name}/{disk.name}", owner)
            for p in (disk.path, *disk.sidecars):
                claim("path", p, f"disk {disk.name!r} of {owner}")
