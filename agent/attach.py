"""Attach a VM's disk, served by svmotion over NBD, as a kernel block device; detach it again.

Design notes
- Two ways to a block device, chosen automatically:
  * `netlink`: the kernel's own NBD client (`/dev/nbdX`), configured through the `nbd` generic
    netlink family after a user-space handshake (agent/nbd_netlink.py).
  * `nbdfuse`: where the kernel has no `nbd` module, `nbdfuse` exposes the export as a file in a
    FUSE mount and a loop device is put on that file. Writes through the loop reach nbdfuse
    synchronously (FUSE without writeback cache is write-through), and a flush of the loop device
    becomes an fsync of the file and so an NBD flush: the migration's invariants hold unchanged.
  The choice, and why, is part of every answer (`Attachment.reason`), so the user sees it.
- State lives in a state directory, one sub-directory per attached disk (`<vm>.<disk>/`) holding
  `record.json`, and for nbdfuse its mount point and log. One `flock` on `<state>/.lock`
  serialises attach and detach on the host, so two concurrent attaches cannot both win.
- Idempotence: attaching a disk that is attached and alive answers with the same device and
  changes nothing; detaching a device that is not attached says so and succeeds. A record whose
  device died (crash, reboot) is cleaned up and replaced. For a kernel nbd device, attaching
  again also offers the kernel a fresh socket (NBD_CMD_RECONFIGURE): the kernel takes it only
  in place of a dead connection, so after nbdkit was restarted the held IO resumes, and on a
  healthy device nothing changes.
- "Attached elsewhere" is asked of the kernel, not only of our records: a loop device whose
  backing file is an svmotion nbdfuse file for the same export, or an nbd device whose backend
  identifier (sysfs `backend`) is the same export URI, in any state directory, is a refusal,
  because two block devices caching one disk corrupt its filesystem.
- Nothing is left behind on failure: every step of attach registers its undo on an ExitStack
  that is unwound unless the whole attach succeeded.
- Processes are stopped by the PID recorded for them, never by name: others run nbdfuse too.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from agent.errors import Refused, SvmotionError
from agent import nbd_netlink

DEFAULT_STATE_DIR = "/run/svmotion/attach"
METHODS = ("auto", "netlink", "nbdfuse")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
READY_TIMEOUT_S = 15.0
LOOP_RELEASE_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Export:
    """One disk of one VM and the NBD URI it is served at."""
    vm: str
    disk: str
    uri: str

    def __post_init__(self) -> None:
        for what, name in (("VM", self.vm), ("disk", self.disk)):
            if not NAME_RE.match(name):
                raise Refused(f"{what} name {name!r} is not valid; use letters, digits, '.', '_' or '-'")
        parse_uri(self.uri)

    @property
    def key(self) -> str:
        return f"{self.vm}.{self.disk}"


@dataclass
class Attachment:
    """What `attach` made (and `record.json` keeps)."""
    vm: str
    disk: str
    uri: str
    device: str
    method: str                      # netlink | nbdfuse
    reason: str                      # why this method was used
    size: int
    fuse_pid: int | None = None      # nbdfuse only
    fuse_file: str | None = None     # nbdfuse only: the loop's backing file
    created: bool = True             # False when attach found it already there

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("fuse_pid", "fuse_file")}


def unix_uri(socket_path: str, disk: str) -> str:
    """The URI of export `disk` on an nbdkit Unix socket."""
    return f"nbd+unix:///{urllib.parse.quote(disk)}?socket={urllib.parse.quote(socket_path)}"


def parse_uri(uri: str) -> tuple[str | tuple[str, int], str]:
    """Split an NBD URI into the address to connect to and the export name.

    Example: `parse_uri("nbd://10.0.2.2:10809/disk0") == (("10.0.2.2", 10809), "disk0")`
    """
    parts = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if parts.scheme == "nbd+unix":
        sock = urllib.parse.parse_qs(parts.query).get("socket", [""])[0]
        if not sock:
            raise Refused(f"URI {uri!r} has no socket; write nbd+unix:///DISK?socket=/path/to.sock")
        return sock, export
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise Refused(f"URI {uri!r} has no host; write nbd://HOST:PORT/DISK")
        return (parts.hostname, parts.port or 10809), export
    raise Refused(f"URI {uri!r} is not nbd:// or nbd+unix://; TLS (nbds) is not supported by attach")


# ---------------------------------------------------------------- method choice

def choose_method(requested: str) -> tuple[str, str]:
    """Pick netlink or nbdfuse; return (method, reason). Refuse a forced method that cannot work."""
    if requested not in METHODS:
        raise Refused(f"method {requested!r} is unknown; use one of {', '.join(METHODS)}")
    if requested == "nbdfuse":
        return "nbdfuse", "nbdfuse + loop requested"
    problem = kernel_nbd_problem()
    if problem is None:
        return "netlink", "the kernel has the nbd module"
    if requested == "netlink":
        raise Refused(f"cannot use the kernel nbd client: {problem}; use --method nbdfuse")
    if not shutil.which("nbdfuse"):
        raise Refused(f"no way to attach: {problem}, and nbdfuse is not installed (apt-get install nbdfuse)")
    return "nbdfuse", f"fallback: {problem}"


def kernel_nbd_problem() -> str | None:
    """None when the kernel's nbd netlink family answers (loading the module if needed), else why not."""
    try:
        import pyroute2.netlink  # noqa: F401  (only the netlink path needs it)
    except ImportError:
        return "pyroute2 is not installed"
    for attempt in range(2):
        try:
            nbd_netlink.KernelNbd().close()
            return None
        except nbd_netlink.KernelNbdUnavailable as err:
            if attempt:
                return str(err)
        load = subprocess.run(["modprobe", "nbd"], capture_output=True, text=True)
        if load.returncode != 0:
            detail = (load.stderr.strip().splitlines() or ["failed"])[-1].replace("modprobe: FATAL: ", "")
            return f"the kernel has no nbd module ({detail})"
    return "kernel nbd family not found"


# ---------------------------------------------------------------- state directory

@contextlib.contextmanager
def locked_state(state_dir: str) -> Iterator[Path]:
    """Hold the host-wide attach lock of a state directory."""
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def read_record(slot: Path) -> Attachment | None:
    try:
        data = json.loads((slot / "record.json").read_text())
        return Attachment(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_record(slot: Path, att: Attachment) -> None:
    tmp = slot / "record.json.tmp"
    tmp.write_text(json.dumps(asdict(att), indent=1))
    os.replace(tmp, slot / "record.json")


def attachments(state_dir: str) -> list[Attachment]:
    """Every attachment recorded in a state directory."""
    root = Path(state_dir)
    if not root.is_dir():
        return []
    found = (read_record(slot) for slot in sorted(root.iterdir()) if slot.is_dir())
    return [att for att in found if att is not None]


# ---------------------------------------------------------------- kernel views

def loop_backing_files() -> dict[str, str]:
    """/dev/loopN -> backing file, for every configured loop device."""
    found = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            found[f"/dev/{backing.parent.parent.name}"] = backing.read_text().strip()
    return found


def nbd_backends() -> dict[str, str]:
    """/dev/nbdN -> backend identifier, for every connected kernel nbd device."""
    found = {}
    for backend in Path("/sys/block").glob("nbd*/backend"):
        with contextlib.suppress(OSError):
            text = backend.read_text().strip()
            if text:
                found[f"/dev/{backend.parent.name}"] = text
    return found


def holders(device: str) -> list[str]:
    """Mount points of a block device, plus the kernel holders (device mapper, md) of it."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    dev_id = f"{os.major(rdev)}:{os.minor(rdev)}"
    users = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev_id:
                users.append(fields[4])
    name = os.path.basename(device)
    with contextlib.suppress(OSError):
        users += [f"/dev/{h}" for h in os.listdir(f"/sys/block/{name}/holders")]
    return users


def pid_alive(pid: int | None) -> bool:
    """True while a process runs (a zombie counts as gone); reaps it if it is our child."""
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pid_is(pid: int, program: str) -> bool:
    """Guard against PID reuse: only signal a PID whose command line is still `program`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return False
    return os.path.basename(argv0) == program


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def is_alive(att: Attachment) -> bool:
    """Does the kernel still have the device this record describes?"""
    if att.method == "nbdfuse":
        return (pid_alive(att.fuse_pid) and att.fuse_file is not None
                and loop_backing_files().get(att.device) == att.fuse_file)
    return nbd_backends().get(att.device) == att.uri


def attached_elsewhere(export: Export, own_device: str | None) -> str | None:
    """A device, other than ours, that the kernel has connected to this export."""
    for device, backend in nbd_backends().items():
        if backend == export.uri and device != own_device:
            return device
    for device, backing in loop_backing_files().items():
        slot = Path(backing).parent.parent     # <state>/<vm>.<disk>/fuse/<disk>
        if device == own_device or Path(backing).parent.name != "fuse":
            continue
        other = read_record(slot)
        if other is not None and other.uri == export.uri:
            return device
    return None


# ---------------------------------------------------------------- attach

def attach(export: Export, state_dir: str = DEFAULT_STATE_DIR, method: str = "auto",
           connections: int = 1) -> Attachment:
    """Attach `export` as a block device, or return the live attachment it already has.

    Example: `attach(Export("vm1", "disk0", unix_uri("/run/svmotion/vm1.nbd", "disk0"))).device`
    """
    with locked_state(state_dir) as root:
        slot = root / export.key
        existing = read_record(slot)
        if existing is not None and is_alive(existing):
            if existing.uri != export.uri:
                raise Refused(f"{export.vm}/{export.disk} is already attached at {existing.device} to "
                              f"{existing.uri}; detach it first (svmotion detach {existing.device})")
            existing.created = False
            if existing.method == "netlink":
                refresh_netlink(existing)
            return existing
        if existing is not None:
            remove_remains(slot, existing)
        other = attached_elsewhere(export, None)
        if other is not None:
            raise Refused(f"{export.vm}/{export.disk} ({export.uri}) is already attached elsewhere, at "
                          f"{other}; detach it there first")
        chosen, reason = choose_method(method)
        slot.mkdir(exist_ok=True, mode=0o700)
        with contextlib.ExitStack() as undo:
            undo.callback(shutil.rmtree, slot, True)
            if chosen == "netlink":
                att = attach_netlink(export, reason, connections, undo)
            else:
                att = attach_nbdfuse(export, slot, reason, undo)
            write_record(slot, att)
            undo.pop_all()
        return att


def attach_netlink(export: Export, reason: str, connections: int, undo: contextlib.ExitStack
                   ) -> Attachment:
    """Handshake in user space, hand the socket(s) to the kernel, return /dev/nbdX."""
    address, name = parse_uri(export.uri)
    socks = []
    try:
        for _ in range(max(1, connections)):
            try:
                sock, info = nbd_netlink.open_export(address, name)
            except (OSError, nbd_netlink.NbdHandshakeError) as err:
                raise SvmotionError(f"cannot open {export.uri}: {err}; is the VM's nbdkit running?", 3) from None
            socks.append(sock)
            if not info.flags & (1 << 8):      # NBD_FLAG_CAN_MULTI_CONN: else one connection only
                break
        with nbd_netlink.KernelNbd() as kernel:
            index = kernel.connect([s.fileno() for s in socks], info, backend=export.uri)
            undo.callback(_disconnect_quietly, index)
    finally:
        for s in socks:      # the kernel holds its own references now
            s.close()
    device = f"/dev/nbd{index}"
    wait_for(lambda: os.path.exists(device), f"{device} to appear")
    return Attachment(export.vm, export.disk, export.uri, device, "netlink", reason, info.size)


def refresh_netlink(att: Attachment) -> None:
    """Hand the kernel a fresh socket for a connection that died (nbdkit restarted by the agent).

    IO on a dead connection waits (NBD_ATTR_DEAD_CONN_TIMEOUT) rather than failing, so running
    `svmotion attach` again resumes it. On a healthy device the kernel ignores the socket.
    """
    address, name = parse_uri(att.uri)
    try:
        sock, _ = nbd_netlink.open_export(address, name)
    except (OSError, nbd_netlink.NbdHandshakeError) as err:
        raise SvmotionError(f"{att.vm}/{att.disk} is attached at {att.device}, but {att.uri} cannot be "
                            f"reached to refresh its connection ({err}); is the VM's nbdkit running?", 3) from None
    with sock, nbd_netlink.KernelNbd() as kernel:
        kernel.reconnect(int(att.device.removeprefix("/dev/nbd")), [sock.fileno()], backend=att.uri)


def disconnect_netlink(index: int) -> None:
    """NBD_CMD_DISCONNECT, then NBD_CMD_STATUS until the kernel says the device is free."""
    with nbd_netlink.KernelNbd() as kernel:
        kernel.disconnect(index)
        wait_for(lambda: not any(d.connected for d in kernel.status(index)),
                 f"/dev/nbd{index} to disconnect", EXIT_TIMEOUT_S)


def _disconnect_quietly(index: int) -> None:
    """The undo of a half-made attach: best effort, the original error is what the user sees."""
    with contextlib.suppress(OSError, nbd_netlink.KernelNbdUnavailable, SvmotionError):
        disconnect_netlink(index)


def attach_nbdfuse(export: Export, slot: Path, reason: str, undo: contextlib.ExitStack) -> Attachment:
    """nbdfuse exposes the export as <slot>/fuse/<disk>; a loop device goes on top of it."""
    mount = slot / "fuse"
    mount.mkdir(exist_ok=True)
    fuse_file = str(mount / export.disk)
    pidfile = slot / "nbdfuse.pid"
    with open(slot / "nbdfuse.log", "wb") as log:
        # Its own session: nbdfuse must outlive `svmotion attach` and ignore the CLI's signals.
        proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), fuse_file, export.uri],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    undo.callback(stop_nbdfuse, proc.pid, str(mount))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not pidfile.exists() or not pidfile.read_text().strip():
        if proc.poll() is not None:
            raise SvmotionError(f"nbdfuse could not open {export.uri}: {last_line(slot / 'nbdfuse.log')}; "
                                f"is the VM's nbdkit running?", 3)
        if time.monotonic() > deadline:
            raise SvmotionError(f"nbdfuse did not get ready within {READY_TIMEOUT_S:.0f} s for {export.uri}")
        time.sleep(0.02)
    losetup = subprocess.run(["losetup", "--find", "--show", fuse_file], capture_output=True, text=True)
    if losetup.returncode != 0:
        raise SvmotionError(f"losetup {fuse_file}: {losetup.stderr.strip()}; are loop devices available "
                            f"(modprobe loop)?")
    device = losetup.stdout.strip()
    undo.callback(detach_loop, device)
    return Attachment(export.vm, export.disk, export.uri, device, "nbdfuse", reason,
                      os.stat(fuse_file).st_size, fuse_pid=proc.pid, fuse_file=fuse_file)


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return "no message"


def wait_for(condition, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SvmotionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------- detach

def detach(device: str, state_dir: str = DEFAULT_STATE_DIR) -> Attachment | None:
    """Detach a device made by attach; None when it was not attached (nothing to do).

    Refuses a device that is mounted or held, and a device svmotion did not attach.
    """
    device = os.path.realpath(device)
    with locked_state(state_dir) as root:
        att = next((a for a in attachments(state_dir) if a.device == device), None)
        if att is None:
            if device in nbd_backends() or device in loop_backing_files():
                raise Refused(f"{device} is attached, but not by svmotion in {state_dir}; "
                              f"detach it with the tool that made it (or pass its --state-dir)")
            return None
        users = holders(device) if is_alive(att) else []
        if users:
            raise Refused(f"{device} is in use by {', '.join(users)}; unmount it first")
        remove_remains(root / f"{att.vm}.{att.disk}", att)
        return att


def remove_remains(slot: Path, att: Attachment) -> None:
    """Undo an attachment, live or half-dead, then forget it. Each step tolerates being done."""
    if att.method == "netlink":
        index = int(att.device.removeprefix("/dev/nbd"))
        if nbd_backends().get(att.device) == att.uri:
            disconnect_netlink(index)
    else:
        if att.fuse_file and loop_backing_files().get(att.device) == att.fuse_file:
            detach_loop(att.device)
        stop_nbdfuse(att.fuse_pid, str(slot / "fuse"))
    shutil.rmtree(slot, ignore_errors=True)


def detach_loop(device: str) -> None:
    """losetup -d, then wait until the kernel really let go of the backing file.

    The release writes the device's dirty pages back first, through nbdfuse and NBD to the mirror
    node: on a loaded host that took more than 10 s (a full suite beside other work), so the wait
    is for the write-back, not for a process exit."""
    subprocess.run(["losetup", "--detach", device], capture_output=True)
    wait_for(lambda: device not in loop_backing_files(), f"{device} to release its backing file",
             LOOP_RELEASE_TIMEOUT_S)


def stop_nbdfuse(pid: int | None, mount: str) -> None:
    """Unmount (nbdfuse then exits by itself); signal the recorded PID only if it lingers."""
    if is_mounted(mount):
        subprocess.run(["fusermount3", "-u", mount], capture_output=True)
        if is_mounted(mount):      # a dead nbdfuse leaves a mount that only a lazy unmount clears
            subprocess.run(["fusermount3", "-u", "-z", mount], capture_output=True)
    if pid and not wait_gone(pid, EXIT_TIMEOUT_S) and pid_is(pid, "nbdfuse"):
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, EXIT_TIMEOUT_S):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, EXIT_TIMEOUT_S)
