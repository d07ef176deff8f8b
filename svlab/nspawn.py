"""Debian 12 machines with systemd on one host (systemd-nspawn): the Vagrant lab's systemd path.

Design notes
- The namespace lab (nslab.py) runs vagrant/provision.sh with --no-systemd; what only a machine
  with systemd runs (systemctl daemon-reload, enable, restart, Debian's prometheus.service
  disabled, Restart=on-failure) is proved here, in containers booting Debian 12's systemd as
  PID 1, each provisioned by the same script without --root, as a Vagrant box is.
- The machine image is built once and cached (default ~/.cache/svmotion/nspawn, a flock against
  concurrent builders): debootstrap minbase + systemd from deb.debian.org, booted once to run
  `provision.sh ROLE --packages-only` for every role (the script's own package lists, so the
  image follows them: its name holds a digest of the script's packages() function). A machine
  is a copy of it, so a test's provisioning finds its packages installed, as the namespace lab
  does on the CI machine (installing them takes minutes; the image build does it for real).
- Networking: the host's own (nspawn without --private-network), each machine on a loopback
  address of its own (127.0.1.N): the package step of the provisioning installs from Debian for
  real, as on a Vagrant box. The caller picks free ports (vagrant/lab.env's *_PORT settings).
  Downloaded .debs are kept in a cache directory bound into every machine.
- nspawn runs with --register=no --keep-unit: no systemd-machined needed on the host. Commands
  run in a machine through nsenter(1) into its PID 1's namespaces. A machine is stopped by
  SIGTERM to the nspawn process we started (its systemd powers off), SIGKILL to its PID 1 and to
  nspawn if it lingers; its tree is removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE_FORMAT = 1               # bump when what the base tree holds changes
BASE_PACKAGES = "systemd,systemd-sysv,dbus,procps"
MIRROR = "http://deb.debian.org/debian"
BOOT_S = 60.0
PROJECT = Path(__file__).resolve().parents[1]


class MachineError(Exception):
    """A machine could not be built, booted or reached."""


def default_cache() -> Path:
    return Path.home() / ".cache" / "svmotion" / "nspawn"


def image(cache: Path) -> Path:
    """The cached machine image (module notes), built on first use (MachineError if it cannot be)."""
    script = (PROJECT / "vagrant/provision.sh").read_text()
    packages = re.search(r"^packages\(\) \{.*?^\}", script, re.M | re.S)
    if packages is None:
        raise MachineError("vagrant/provision.sh has no packages() function")
    name = f"bookworm-{BASE_FORMAT}-svlab-{hashlib.sha256(packages.group(0).encode()).hexdigest()[:12]}"
    base = base_tree(cache)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / f"{name}.done").exists():
            for old in cache.glob(f"bookworm-{BASE_FORMAT}-svlab-*"):     # other package lists: not used again
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink()
            shutil.rmtree(cache / "build", ignore_errors=True)     # a build that was killed half way
            builder = Machine("build", base, cache, {str(apt_archives(cache)): "/var/cache/apt/archives"}).boot()
            try:
                for role in ("src", "dst", "mon"):
                    builder.run(["sh", "/vagrant/vagrant/provision.sh", role, "--packages-only", "--no-grafana"])
            finally:
                builder.stop(remove=False)
            builder.tree.rename(cache / name)
            (cache / f"{name}.done").touch()
    return cache / name


def apt_archives(cache: Path) -> Path:
    """Where the machines keep the .debs they download (bound to /var/cache/apt/archives)."""
    (cache / "apt-archives" / "partial").mkdir(parents=True, exist_ok=True)
    return cache / "apt-archives"


def base_tree(cache: Path) -> Path:
    """Debian 12 minbase with systemd, built on first use."""
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            raise MachineError(f"{tool} is not installed (Debian packages debootstrap, systemd-container, util-linux)")
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"bookworm-{BASE_FORMAT}"
    with open(cache / ".base-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cache / f"bookworm-{BASE_FORMAT}.done").exists():
            shutil.rmtree(root, ignore_errors=True)
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                                   str(root), MIRROR], capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(root, ignore_errors=True)
                raise MachineError(f"debootstrap failed: {(done.stdout + done.stderr)[-1500:]}")
            (cache / f"bookworm-{BASE_FORMAT}.done").touch()
    return root


@dataclass
class Machine:
    """One booted Debian 12 machine. Example: `m = Machine("dst", base, tmp).boot(); m.run(["true"])`."""

    name: str
    base: Path
    workdir: Path
    binds: dict[str, str] = field(default_factory=dict)     # host path -> machine path (read-write)
    nspawn: subprocess.Popen | None = None
    leader: int | None = None

    @property
    def tree(self) -> Path:
        return self.workdir / self.name

    def boot(self) -> "Machine":
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.base), str(self.tree)], check=True)
        (self.tree / "etc/hostname").write_text(f"svlab-{self.name}\n")
        (self.tree / "vagrant").mkdir(exist_ok=True)
        argv = ["systemd-nspawn", "-D", str(self.tree), "--boot", f"--machine=svlab-{self.name}", "--register=no",
                "--keep-unit", f"--bind-ro={PROJECT}:/vagrant"]
        argv += [f"--bind={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.workdir / f"{self.name}.console", "wb") as console:
            self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = time.monotonic() + BOOT_S
        while True:
            children = subprocess.run(["ps", "--ppid", str(self.nspawn.pid), "-o", "pid="], capture_output=True,
                                      text=True).stdout.split()
            if children:
                self.leader = int(children[0])
                state = self.run(["systemctl", "is-system-running", "--wait"], check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / f"{self.name}.console").read_text(errors="replace")[-1500:]
                raise MachineError(f"machine {self.name} did not boot:\n{tail}")
            time.sleep(0.5)

    def run(self, argv: list[str], env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`argv` inside the machine, as root, with `env` only (and a root shell's PATH)."""
        assert self.leader is not None
        environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--",
                               "env", "-i", *[f"{k}={v}" for k, v in environment.items()], *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise MachineError(f"{self.name}: {' '.join(argv)} exited {done.returncode}:\n"
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return done

    def stop(self, remove: bool = True) -> None:
        """Power the machine off (SIGTERM to our nspawn; SIGKILL after 60 s) and remove its tree."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                if self.leader is not None:
                    os.kill(self.leader, signal.SIGKILL)     # the machine's PID 1: all of it goes
                self.nspawn.kill()
                self.nspawn.wait()
        if remove:
            shutil.rmtree(self.tree, ignore_errors=True)
