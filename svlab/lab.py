"""The VM lab: a small QEMU guest (TCG) whose disk is an svmotion export, for tests and demos.

Design notes
- Everything comes from Debian packages, fetched with `apt-get download` into a private build
  directory (nothing is installed on the host): the guest kernel and its modules from
  `linux-image-<abi>-amd64` (what `linux-image-amd64` points at), the guest's userland from
  `busybox-static`. KVM cannot run stock kernels on this machine, so QEMU runs under TCG; a guest
  that boots, runs a short job and powers off takes about 6 s.
- The images are built once and cached (default `~/.cache/svmotion/lab`, or SVMOTION_LAB_CACHE):
  * `vmlinuz` + `initrd.gz`: busybox, the few modules the lab needs (virtio, ext4, nbd: with
    `modules.dep` made by depmod so the guest's `modprobe` works) and an /init that loads them,
    runs the job and powers off;
  * `pyroot.img` (built only when a job wants Python): an ext4 image with Debian's python3 (the
    host's own /usr/bin/python3.11, stdlib and the shared libraries it links, Debian 12 being the
    host) and `python3-pyroute2` + `python3-click` from their .debs. The guest mounts it
    read-only and chroots into it to run the project's own attach code (kernel nbd via netlink).
  The cache directory's name is a hash of everything that shapes the images (the /init text,
  the module list, the format version), so a change rebuilds; an older build is removed when a
  new one is made, and the build directory (the .debs, the unpacked kernel) is always removed.
  A `flock` makes concurrent builders wait for one build instead of racing.
- A job is a directory of files (its `run.sh` first) packed as a second, uncompressed cpio
  archive appended to the cached initrd: the kernel unpacks both, so the per-job cost is a copy.
- Disks are svmotion exports reached through QEMU's own NBD client (`-blockdev driver=nbd`);
  `net=True` adds user-mode networking, where the host's 127.0.0.1 is 10.0.2.2 for the guest.
- The console is the guest's ttyS0 on QEMU's stdio: the host reads the guest's lines from
  QEMU's stdout and can send lines to the guest's stdin (e.g. "stop" to end a workload).
- QEMU is stopped by the PID we started, never by name: others run QEMU here too.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LAB_FORMAT = 5          # bump when the build below changes what the images hold
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4", "crc32c_generic", "nbd")
PY_EXCLUDE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
              "distutils", "config-3.11-x86_64-linux-gnu", "site-packages", "dist-packages"}
PY_DEBS = ("python3-pyroute2", "python3-click")
JOB_EXIT = "SVMOTION-JOB-EXIT"
GUEST_UP = "SVMOTION-GUEST-UP"

INIT = r"""#!/bin/busybox sh
# svmotion lab guest: set up, run /job/run.sh, power off. Its exit code is printed for the host.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo /bin/modprobe > /proc/sys/kernel/modprobe
for m in $(cat /etc/lab-modules); do modprobe "$m" || echo "lab: modprobe $m failed"; done
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
for b in /sys/block/vd*; do
  # The Python root (pyroot.img) is the disk whose serial says so: chroot /py to use it.
  if [ "$(cat "$b/serial" 2>/dev/null)" = pyroot ]; then
    mount -o ro "/dev/${b##*/}" /py && for d in proc sys dev tmp job; do mount --bind "/$d" "/py/$d"; done
  fi
done
echo "SVMOTION-GUEST-UP $(uname -r)"
cd /job && sh ./run.sh
echo "SVMOTION-JOB-EXIT $?"
sync
poweroff -f
"""


# ---------------------------------------------------------------- cpio (newc), no cpio binary needed

class Cpio:
    """Writes a newc cpio archive, the format the kernel unpacks into its initramfs."""

    def __init__(self, out: io.BufferedIOBase):
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0))
        self.ino += 1
        self.out.write(header.encode() + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, 0o100755 if executable else 0o100644, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add a directory tree (dirs before their contents, as the kernel needs)."""
        for path in sorted(root.rglob("*")):
            name = prefix + str(path.relative_to(root))
            if path.is_symlink():
                self.symlink(name, os.readlink(path))
            elif path.is_dir():
                self.directory(name)
            else:
                self.file(name, path.read_bytes(), os.access(path, os.X_OK))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


# ---------------------------------------------------------------- building the images

class LabError(Exception):
    """The lab cannot be built or run here; the message says what is missing and the fix."""


def run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip()[-500:] or 'failed'}")
    return proc.stdout


def apt_download(names: list[str], where: Path) -> list[Path]:
    """Fetch .debs with apt-get download (updating the package lists once if they lack them)."""
    try:
        run(["apt-get", "download", "-q", *names], cwd=where)
    except LabError:
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "download", "-q", *names], cwd=where)
    return sorted(where.glob("*.deb"))


def kernel_package() -> str:
    """linux-image-<abi>-amd64, the kernel that Debian's linux-image-amd64 points at."""
    for attempt in range(2):
        found = re.findall(r"Depends: (linux-image-\S+)", run(["apt-cache", "depends", "linux-image-amd64"]))
        if found:
            return found[0]
        if not attempt:
            run(["apt-get", "update", "-qq"])
    raise LabError("apt-cache knows no linux-image-amd64; check /etc/apt/sources.list (Debian main)")


def module_closure(modroot: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files of `wanted` and everything they depend on (modinfo's depends field)."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modroot.rglob("*.ko")}
    builtin = (modroot / "modules.builtin").read_text() if (modroot / "modules.builtin").exists() else ""
    chosen: dict[str, Path] = {}
    todo = list(wanted)
    while todo:
        name = todo.pop().replace("-", "_")
        if name in chosen:
            continue
        if name not in index:
            if f"/{name}.ko" in builtin.replace("-", "_"):
                continue         # built into the kernel
            raise LabError(f"kernel module {name!r} not found in the kernel package")
        chosen[name] = index[name]
        deps = run(["modinfo", "-F", "depends", str(index[name])]).strip()
        todo += [d for d in deps.split(",") if d]
    return list(chosen.values())


def lab_key() -> str:
    text = f"{LAB_FORMAT}\n{INIT}\n{GUEST_MODULES}\n{sorted(PY_EXCLUDE)}\n{PY_DEBS}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SVMOTION_LAB_CACHE") or Path.home() / ".cache" / "svmotion" / "lab")


@dataclass(frozen=True)
class LabImages:
    """The cached guest images."""
    root: Path
    kernel_release: str

    @property
    def kernel(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.root / "initrd.gz"

    @property
    def pyroot(self) -> Path:
        return self.root / "pyroot.img"


def check_host() -> None:
    """Raise LabError naming what this host lacks for the lab."""
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("apt-get", "apt"),
                      ("dpkg-deb", "dpkg"), ("depmod", "kmod"), ("mkfs.ext4", "e2fsprogs")):
        if not shutil.which(tool):
            raise LabError(f"{tool} is not installed; apt-get install {pkg}")


def ensure_images(cache_dir: Path | None = None, python: bool = False) -> LabImages:
    """The lab's images, built on first use and cached; `python=True` also builds pyroot.img.

    Example: `images = ensure_images(); Guest(images, {"run.sh": "echo hi"}, tmp_path).run()`
    """
    check_host()
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / lab_key()
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one builder at a time; others wait and reuse
        if not (root / "base.done").exists():
            for old in cache.iterdir():       # an older format's images: never used again
                if old.is_dir() and old != root:
                    shutil.rmtree(old, ignore_errors=True)
            root.mkdir(exist_ok=True)
            build_base(root)
        images = LabImages(root, (root / "base.done").read_text().strip())
        if python and not (root / "pyroot.done").exists():
            build_pyroot(root)
    return images


def build_base(root: Path) -> None:
    """vmlinuz + initrd.gz from linux-image-*-amd64 and busybox-static."""
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        debs = apt_download([kernel_package(), "busybox-static"], work)
        kernel_deb = next(d for d in debs if d.name.startswith("linux-image-"))
        busybox_deb = next(d for d in debs if d.name.startswith("busybox-static"))
        unpacked = work / "kernel"
        run(["dpkg-deb", "-x", str(kernel_deb), str(unpacked)])
        run(["dpkg-deb", "-x", str(busybox_deb), str(work / "busybox")])
        release = next((unpacked / "lib/modules").iterdir()).name
        modroot = unpacked / "lib/modules" / release
        tree = work / "initrd"
        dest_mods = tree / "lib/modules" / release
        for ko in module_closure(modroot, GUEST_MODULES):
            target = dest_mods / ko.relative_to(modroot)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ko, target)
        for meta in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
            if (modroot / meta).exists():
                shutil.copy2(modroot / meta, dest_mods / meta)
        run(["depmod", "-b", str(tree), release])     # modules.dep, so the guest's modprobe works
        (tree / "bin").mkdir()
        shutil.copy2(work / "busybox/bin/busybox", tree / "bin/busybox")
        (tree / "etc").mkdir()
        # nbd is loaded by the jobs that need it (`modprobe nbd`), like on a real host.
        (tree / "etc/lab-modules").write_text(" ".join(m for m in GUEST_MODULES if m != "nbd") + "\n")
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        for d in ("dev", "proc", "sys", "tmp", "mnt", "job", "py"):
            (tree / d).mkdir()
        with gzip.open(root / "initrd.gz.tmp", "wb", compresslevel=6) as out:
            cpio = Cpio(out)
            cpio.tree(tree)
            cpio.chardev("dev/console", 5, 1)     # init's stdio, before devtmpfs is mounted
            cpio.close()
        os.replace(root / "initrd.gz.tmp", root / "initrd.gz")
        shutil.copy2(next((unpacked / "boot").glob("vmlinuz-*")), root / "vmlinuz")
    (root / "base.done").write_text(release + "\n")


def host_python() -> tuple[Path, Path]:
    """Debian's python3 binary and its stdlib directory (not a venv's, not pyenv's)."""
    binary = Path(os.path.realpath("/usr/bin/python3"))
    stdlib = Path("/usr/lib") / binary.name
    if not binary.exists() or not (stdlib / "os.py").exists():
        raise LabError("Debian's python3 is not installed at /usr/bin/python3; apt-get install python3")
    return binary, stdlib


def shared_libraries(binaries: list[Path]) -> set[str]:
    """Every shared library (as the loader names it) that the binaries need, via ldd."""
    libs: set[str] = set()
    for chunk in range(0, len(binaries), 64):
        out = run(["ldd", *map(str, binaries[chunk:chunk + 64])])
        libs.update(re.findall(r"(/\S+\.so[.\d]*) \(0x", out))
    return libs


def build_pyroot(root: Path) -> None:
    """pyroot.img: an ext4 image (no journal, mounted read-only) with Debian's Python + pyroute2."""
    binary, stdlib = host_python()
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        work = Path(tmp)
        tree = work / "root"
        for d in ("usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp", "job", "mnt"):
            (tree / d).mkdir(parents=True)
        for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            (tree / link).symlink_to(target)
        shutil.copy2(binary, tree / "usr/bin" / binary.name)
        (tree / "usr/bin/python3").symlink_to(binary.name)
        shutil.copytree(stdlib, tree / "usr/lib" / stdlib.name, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in PY_EXCLUDE and d == str(stdlib)])
        extensions = sorted((tree / "usr/lib" / stdlib.name / "lib-dynload").glob("*.so"))
        for lib in shared_libraries([binary, *extensions]):
            # /lib and /lib64 are relative symlinks into usr/ (Debian's merged /usr), so the
            # loader's own paths work as they are.
            target = tree / lib.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(lib, target)
            target.chmod(0o755)
        debs = work / "debs"
        debs.mkdir()
        for deb in apt_download(list(PY_DEBS), debs):
            run(["dpkg-deb", "-x", str(deb), str(tree)])
        shutil.rmtree(tree / "usr/share", ignore_errors=True)      # docs and man pages
        # Debian compiles .py at install time (py3compile); a .deb unpacked by hand has no .pyc,
        # and compiling pyroute2 on every import costs seconds under TCG.
        run([str(binary), "-m", "compileall", "-q", str(tree / "usr/lib/python3/dist-packages")])
        size_mb = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink()) >> 20
        image = root / "pyroot.img.tmp"
        image.unlink(missing_ok=True)
        run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "pyroot", "-d", str(tree),
             str(image), f"{size_mb * 5 // 4 + 32}M"])
        os.replace(image, root / "pyroot.img")
    (root / "pyroot.done").write_text(f"{binary.name}\n")


# ---------------------------------------------------------------- running a guest

@dataclass(frozen=True)
class NbdDisk:
    """A guest disk served over NBD on a Unix socket (what svmotion's nbdkit listens on)."""
    socket: str
    export: str


def job_initrd(images: LabImages, files: dict[str, str | bytes], dest: Path) -> Path:
    """The cached initrd with the job's files appended as a second cpio archive under /job."""
    shutil.copyfile(images.initrd, dest)
    with open(dest, "ab") as out:
        # The kernel takes an uncompressed archive only at a 4-byte aligned offset; zeros between
        # archives are skipped.
        out.write(b"\0" * (-out.tell() % 4))
        cpio = Cpio(out)
        dirs: set[str] = set()
        for name, content in files.items():
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "job/" + "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    cpio.directory(d)
            data = content.encode() if isinstance(content, str) else content
            cpio.file(f"job/{name}", data, executable=name.endswith(".sh"))
        cpio.close()
    return dest


@dataclass
class Guest:
    """One QEMU guest running a job. Use as a context manager: it is killed (by PID) on exit.

    Example:
        with Guest(images, {"run.sh": "echo hello"}, tmp_path) as g:
            g.wait_for("hello"); assert g.wait_exit() == 0
    """
    images: LabImages
    job: dict[str, str | bytes]
    workdir: Path
    disks: list[NbdDisk] = field(default_factory=list)
    python: bool = False
    net: bool = False
    memory_mb: int = 384
    lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    _new: queue.Queue = field(default_factory=queue.Queue)
    _eof: bool = False
    _started: float = 0.0

    def command(self, initrd: Path) -> list[str]:
        cmd = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1",
               "-m", str(self.memory_mb), "-nodefaults", "-no-user-config", "-display", "none",
               "-serial", "stdio", "-no-reboot", "-kernel", str(self.images.kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off tsc=unstable "
                          "i8042.noaux i8042.nokbd random.trust_cpu=on"]
        for i, disk in enumerate(self.disks):
            node = {"driver": "nbd", "node-name": f"nbd{i}", "export": disk.export,
                    "server": {"type": "unix", "path": disk.socket}}
            cmd += ["-blockdev", json.dumps(node), "-device", f"virtio-blk-pci,drive=nbd{i}"]
        if self.python:
            if not self.images.pyroot.exists():
                raise LabError("pyroot.img is not built; get the images with ensure_images(python=True)")
            image = {"driver": "file", "node-name": "pyfile", "filename": str(self.images.pyroot),
                     "read-only": True}
            cmd += ["-blockdev", json.dumps(image),
                    "-blockdev", json.dumps({"driver": "raw", "node-name": "pyroot", "file": "pyfile",
                                             "read-only": True}),
                    "-device", "virtio-blk-pci,drive=pyroot,serial=pyroot"]
        if self.net:
            cmd += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        return cmd

    def start(self) -> "Guest":
        self._started = time.monotonic()
        initrd = job_initrd(self.images, self.job, self.workdir / "initrd-job.gz")
        with open(self.workdir / "qemu.log", "wb") as err:
            self.proc = subprocess.Popen(self.command(initrd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.workdir / "console.log", "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
                log.write(f"{time.monotonic() - self._started:7.2f} {line}\n")
                log.flush()
                self.lines.append(line)
                self._new.put(line)
        self._eof = True
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match:
        """Wait for a console line matching `pattern` (from line `start` on); fail with the console."""
        regex = re.compile(pattern)
        seen = start
        deadline = time.monotonic() + timeout
        while True:
            while seen < len(self.lines):
                match = regex.search(self.lines[seen])
                seen += 1
                if match:
                    return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._eof and seen >= len(self.lines)):
                raise LabError(f"guest: no line matching {pattern!r} "
                               f"({'QEMU exited' if remaining > 0 else f'timed out after {timeout:.0f} s'})\n"
                               f"{self.console_tail()}")
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(remaining, 0.2))

    def send(self, line: str) -> None:
        """A line to the guest's console (its stdin)."""
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = 120.0) -> int:
        """The job's exit code (from the console), after QEMU has exited."""
        match = self.wait_for(rf"^{JOB_EXIT} (\d+)", timeout)
        assert self.proc
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise LabError(f"QEMU did not exit after the job ended\n{self.console_tail()}") from None
        return int(match.group(1))

    def console_tail(self, n: int = 60) -> str:
        qemu_err = (self.workdir / "qemu.log").read_text(errors="replace")[-2000:] \
            if (self.workdir / "qemu.log").exists() else ""
        return "\n".join(self.lines[-n:]) + (f"\n[qemu stderr]\n{qemu_err}" if qemu_err.strip() else "")

    def stop(self) -> None:
        """Kill QEMU by its PID (a guest has nothing to flush that the test still needs)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream:
                    stream.close()
        (self.workdir / "initrd-job.gz").unlink(missing_ok=True)     # a per-job copy of the cache

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- demo entry point

def main(argv: list[str] | None = None) -> int:
    """`python -m svlab.lab [--disk SOCKET:EXPORT]... [--net] [--python] 'SHELL COMMAND'`.

    Boots the lab guest on svmotion exports (they appear as /dev/vda, /dev/vdb, ... in order),
    runs the command with busybox sh, streams the console, and exits with the command's code.
    Example: `python -m svlab.lab --disk /run/svmotion/vm1.nbd:disk0 'mount /dev/vda /mnt && df /mnt'`
    """
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m svlab.lab", description=main.__doc__.splitlines()[0])
    parser.add_argument("--disk", action="append", default=[], metavar="SOCKET:EXPORT",
                        help="an NBD export on a Unix socket, e.g. /run/svmotion/vm1.nbd:disk0 (repeatable)")
    parser.add_argument("--net", action="store_true", help="user-mode network (the host is 10.0.2.2)")
    parser.add_argument("--python", action="store_true", help="attach pyroot.img (chroot /py python3 ...)")
    parser.add_argument("--cache", type=Path, help="image cache (default ~/.cache/svmotion/lab)")
    parser.add_argument("command", help="shell command run in the guest")
    args = parser.parse_args(argv)
    disks = []
    for spec in args.disk:
        sock, sep, export = spec.rpartition(":")
        if not sep or not sock:
            parser.error(f"--disk {spec!r} is not SOCKET:EXPORT; write e.g. /run/svmotion/vm1.nbd:disk0")
        disks.append(NbdDisk(sock, export))
    try:
        images = ensure_images(args.cache, python=args.python)
        with tempfile.TemporaryDirectory(prefix="svmotion-lab-") as tmp:
            guest = Guest(images, {"run.sh": args.command + "\n"}, Path(tmp), disks=disks,
                          python=args.python, net=args.net)
            with guest:
                shown = 0
                match = None
                while match is None:
                    try:
                        match = guest.wait_for(rf"^{JOB_EXIT} (\d+)$", timeout=1.0, start=shown)
                    except LabError:
                        if guest.proc and guest.proc.poll() is not None:
                            raise
                    for line in guest.lines[shown:]:
                        if not line.startswith((JOB_EXIT, GUEST_UP)):
                            print(line, flush=True)
                    shown = len(guest.lines)
                return int(match.group(1))
    except LabError as err:
        print(f"svmotion lab: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
