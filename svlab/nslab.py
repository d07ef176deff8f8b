"""The lab on one machine (README, "Lab"): hosts src, dst and mon as network namespaces on a bridge.

Design notes
- `up`: the hosts first (svlab/netns.py: one namespace each, a veth each to a bridge in a
  namespace of its own; src 198.18.0.1, dst .2, mon .3), then vagrant/provision.sh for each host,
  run inside it, with `--root LABDIR/HOST --shared LABDIR/shared --no-systemd --no-grafana`: the
  very script the Vagrant machines run, each host's files under a directory of its own (the
  hosts share this machine's filesystem), which is how CI proves it. Then the supervisor
  (supervisor.py, detached) runs the units the script wrote, inside their hosts: dst's agent,
  src's agent, src's guest (QEMU on the agent's export, verifying its files), mon's Prometheus
  (scraping both agents over the lab's bridge). `up` returns once the agents answer, the guest
  writes and Prometheus has scraped both agents, and prints where to look.
- `LABDIR/state.json` records the namespaces (their base name), the supervisor's PID and start
  time and the guest's image cache: `down` and `status`, other processes, find everything there.
- `down`: SIGTERM to the supervisor (it stops its units newest first: the guest verifies its files
  once more and powers off), SIGKILL for any unit process it left (by recorded PID and start
  time), then the nbdkits the agents' pid files name (the agent's unit is KillMode=process: its
  nbdkit outlives it, on a real host too), then the namespaces (Lab.close fails naming any process
  still inside), then LABDIR. Everything by PID, nothing by name.
- The guest's images come from svlab/lab.py's cache (this user's by default), built once (~20 s,
  from Debian packages) by `up` in this machine's own namespace: the lab's hosts have no route
  out, so src's provisioning finds them there (on a Vagrant box it builds them itself).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from svlab import lab as guest_lab
from agent.errors import EXIT_LAB, Refused, SvmotionError
from agent.jsonlines import JsonLinesClient, RemoteError
from svlab.netns import Host, Lab, LabError
from agent.supervisor import process_start_time
from svlab.supervisor import UNIT_ENV

PROJECT = Path(__file__).resolve().parents[1]
PROVISION = PROJECT / "vagrant" / "provision.sh"
MIGRATE = PROJECT / "vagrant" / "migrate.sh"
DEFAULT_DIR = Path("/var/tmp/svlab")
HOSTS = ("src", "dst", "mon")              # in this order: src gets 198.18.0.1, dst .2, mon .3
PROVISION_ORDER = ("dst", "src", "mon")
UNITS = (("dst", "svmotion-agent.service"), ("src", "svmotion-agent.service"),
         ("src", "svmotion-guest.service"), ("mon", "svmotion-prometheus.service"))
PROMETHEUS_PORT = 9090
READY_S = 180.0            # a first `up` on a machine also builds the guest's images
SAFE_DIR = re.compile(r"[A-Za-z0-9._/-]+")
STOP_S = 200.0             # the supervisor's stop: the guest's last check, then the agents


class LabFailed(SvmotionError):
    """The lab could not be brought up or down (exit 9): one line, naming the log that says why."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_LAB)


@dataclass
class NsLab:
    """A namespace lab that is up, as recorded in its directory."""

    dir: Path
    lab: Lab
    guest_cache: Path

    # ---- where things are ---------------------------------------------------------------------

    def host(self, role: str) -> Host:
        return self.lab[role]

    def root(self, role: str) -> Path:
        """The host's own root directory (provision.sh --root)."""
        return self.dir / role

    def agent_socket(self, role: str) -> Path:
        return self.root(role) / "run/svmotion/agent.sock"

    @property
    def console(self) -> Path:
        """The guest's console, one line each with seconds since boot (svlab/lab.py)."""
        return self.root("src") / "var/lib/svlab/guest-run/console.log"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host('mon').address}:{PROMETHEUS_PORT}"

    @property
    def plan(self) -> Path:
        return self.dir / "supervisor.json"

    def env(self) -> dict[str, str]:
        """The provisioning's environment: a root shell's PATH and this lab's settings (vagrant/lab.env's
        names), nothing else of the caller's, as on a Vagrant machine."""
        return dict(UNIT_ENV, SRC_ADDR=self.host("src").address, DST_ADDR=self.host("dst").address,
                    MON_ADDR=self.host("mon").address, DST_DATASTORE=str(self.root("dst") / "srv/svlab/ds1"),
                    GUEST_CACHE=str(self.guest_cache))

    # ---- state --------------------------------------------------------------------------------

    def save(self, **extra: Any) -> None:
        state = self.state() if (self.dir / "state.json").exists() else {}
        state.update(base=self.lab.base, hosts=list(HOSTS), guest_cache=str(self.guest_cache), **extra)
        (self.dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    def state(self) -> dict[str, Any]:
        return json.loads((self.dir / "state.json").read_text())

    def units(self) -> dict[str, dict[str, Any]]:
        """The supervisor's record: "ROLE/UNIT" -> pid, start_time, restarts, last_exit, log."""
        try:
            return json.loads((self.dir / "supervisor-state.json").read_text())
        except FileNotFoundError:
            return {}

    def unit_pid(self, role: str, unit: str) -> int | None:
        rec = self.units().get(f"{role}/{unit}", {})
        pid = rec.get("pid")
        return pid if pid and process_start_time(pid) == rec.get("start_time") else None

    # ---- doing things on the hosts ------------------------------------------------------------

    def provision(self, role: str) -> str:
        """Run vagrant/provision.sh for `role` inside its host; its output (LabFailed if it fails)."""
        argv = ["sh", str(PROVISION), role, "--root", str(self.root(role)), "--shared", str(self.dir / "shared"),
                "--no-systemd", "--no-grafana"]
        done = subprocess.run(self.host(role).argv(argv), env=self.env(), capture_output=True, text=True,
                              timeout=600)
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / f"provision-{role}.log", "a") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            last = (done.stdout + done.stderr).strip().splitlines() or [""]
            raise LabFailed(f"provisioning {role} failed (exit {done.returncode}): {last[-1]}; "
                            f"see {logs}/provision-{role}.log")
        return done.stdout

    def migrate_step(self, step: str, name: str, *options: str) -> int:
        """vagrant/migrate.sh STEP NAME OPTIONS... on the host the step belongs to (output: ours); its exit code."""
        role = "dst" if step == "prepare" else "src"
        argv = ["sh", str(MIGRATE), "--root", str(self.root(role)), step, name, *options]
        return subprocess.run(self.host(role).argv(argv), timeout=600).returncode

    def prometheus(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH from mon's Prometheus, over the lab network (from inside mon)."""
        url = f"{self.prometheus_url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with self.host("mon").entered():
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
        if body.get("status") != "success":
            raise LabFailed(f"Prometheus: {url}: {body}")
        return body["data"]

    def agent_status(self, role: str) -> dict[str, Any]:
        with JsonLinesClient(str(self.agent_socket(role)), timeout=10) as client:
            return client.call("status")

    # ---- start and readiness ------------------------------------------------------------------

    def start_supervisor(self) -> None:
        plan = [{"host": role, "unit": str(self.root(role) / "etc/systemd/system" / unit),
                 "netns": self.host(role).netns, "log": str(self.dir / "logs" / f"{role}-{unit}.log")}
                for role, unit in UNITS]
        self.plan.write_text(json.dumps(plan, indent=1) + "\n")
        with open(self.dir / "logs" / "supervisor.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "svlab.supervisor", str(self.plan)], cwd=PROJECT,
                                    env=dict(os.environ, PYTHONPATH=str(PROJECT)), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.save(supervisor={"pid": proc.pid, "start_time": process_start_time(proc.pid)})

    def wait_ready(self, timeout: float = READY_S) -> None:
        """Until the agents answer, the guest writes and Prometheus has both agents up."""
        deadline = time.monotonic() + timeout
        checks: list[tuple[str, Callable[[], bool]]] = [
            ("dst's agent", lambda: self.agent_status("dst") is not None),
            ("src's agent serving the guest's disk", lambda: self.agent_status("src")["vms"][0]["nbdkit_up"]),
            ("the guest writing its files", lambda: "ROUND 2" in self.console.read_text(errors="replace")),
            ("Prometheus on mon scraping both agents",
             lambda: sorted(r["value"][1] for r in self.prometheus("query", query='up{job="svmotion"}')["result"])
             == ["1", "1"]),
        ]
        for what, check in checks:
            while True:
                try:
                    if check():
                        break
                except (OSError, ValueError, KeyError, IndexError, RemoteError):
                    pass
                self._fail_if_down(what)
                if time.monotonic() > deadline:
                    raise LabFailed(f"waiting for {what}: timed out after {timeout:.0f} s; see {self.dir}/logs/")
                time.sleep(0.25)

    def _fail_if_down(self, what: str) -> None:
        sup = self.state().get("supervisor") or {}
        if sup and process_start_time(sup["pid"]) != sup["start_time"]:
            raise LabFailed(f"waiting for {what}: the supervisor exited; see {self.dir}/logs/supervisor.log")
        for name, rec in self.units().items():
            if rec.get("last_exit") not in (None, 0) and rec.get("pid") is None:
                raise LabFailed(f"waiting for {what}: {name} exited with {rec['last_exit']}; see {rec['log']}")

    def summary(self) -> str:
        """Where everything is, and what to run (printed by `svmotion lab up` and `status`)."""
        src, dst, mon = (self.host(r) for r in HOSTS)
        sock = self.agent_socket("src")
        lines = [f"svmotion lab in {self.dir}:",
                 f"  src {src.address} (netns {src.netns}): agent, nbdkit, QEMU guest on VM 'guest' disk0",
                 f"  dst {dst.address} (netns {dst.netns}): agent offering datastore ds1 (API :9816, NBD :10810, TLS)",
                 f"  mon {mon.address} (netns {mon.netns}): Prometheus {self.prometheus_url}",
                 "migrate the guest's disk to dst and back:   svmotion lab migrate",
                 f"the src agent:                              svmotion --agent-socket {sock} status guest",
                 f"the guest's console (it verifies its files): {self.console}",
                 "Prometheus (alerts: ALERTS):                 svmotion lab query 'svmotion_dirty_bytes'",
                 f"logs:                                       {self.dir}/logs/",
                 "remove it all:                              svmotion lab down"]
        if self.dir != DEFAULT_DIR:
            lines[1:] = [line.replace("svmotion lab ", f"svmotion lab --dir {self.dir} ") for line in lines[1:]]
        return "\n".join(lines)


# ---- the commands ---------------------------------------------------------------------------

def up(labdir: Path, guest_cache: Path | None = None, progress: Callable[[str], None] = lambda s: None) -> NsLab:
    """Bring the lab up in `labdir` (module notes); on failure whatever was made is removed."""
    labdir = labdir.resolve()
    if os.geteuid() != 0:
        raise Refused("svmotion lab needs root (network namespaces, the hosts' files); run it as root")
    if not PROVISION.exists():
        raise Refused(f"{PROVISION} not found: svmotion lab runs from the project's checkout (make lab)")
    if (labdir / "state.json").exists():
        raise Refused(f"a lab is already up in {labdir}: run svmotion lab down first")
    if len(str(labdir / "src/run/svmotion/guest.nbd")) > 100:
        raise Refused(f"lab directory {labdir} is too long for Unix sockets under it; choose a shorter one")
    if not SAFE_DIR.fullmatch(str(labdir)):
        # The hosts' unit files and launchers name paths under it unquoted, as systemd's do.
        raise Refused(f"lab directory {str(labdir)!r} has characters other than letters, digits and ._/-; "
                      f"choose another")
    try:
        (labdir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Refused(f"cannot make the lab directory {labdir}: {err.strerror}; choose another") from None
    try:
        hosts = Lab("svlab", HOSTS)
    except LabError as err:
        raise LabFailed(f"cannot make the lab's hosts: {err}") from None
    ns = NsLab(labdir, hosts, guest_cache or guest_lab.default_cache_dir())
    ns.save()
    try:
        # The hosts have no way out to the internet: the guest's images are built (or found) here.
        progress(f"the guest's images (cache {ns.guest_cache})")
        guest_lab.ensure_images(ns.guest_cache)
        for role in PROVISION_ORDER:
            progress(f"provisioning {role} ({ns.host(role).address})")
            ns.provision(role)
        progress("starting the units: dst agent, src agent, guest, Prometheus")
        ns.start_supervisor()
        ns.wait_ready()
    except (OSError, subprocess.TimeoutExpired) as err:
        _remove_half_made(labdir, progress)
        what = f"{err.strerror}: {err.filename}" if getattr(err, "filename", None) else str(err)
        raise LabFailed(f"cannot bring the lab up: {what}; the half-made lab is removed, its logs are in "
                        f"{labdir}/logs") from None
    except BaseException:
        _remove_half_made(labdir, progress)
        raise
    return ns


def _remove_half_made(labdir: Path, progress: Callable[[str], None]) -> None:
    try:
        down(labdir, keep_logs=True)
    except SvmotionError as err:
        progress(f"while removing the half-made lab: {err}")


def load(labdir: Path) -> NsLab:
    """The lab recorded in `labdir` (Refused if there is none)."""
    labdir = labdir.resolve()
    try:
        state = json.loads((labdir / "state.json").read_text())
    except FileNotFoundError:
        raise Refused(f"no lab in {labdir}: run svmotion lab up") from None
    return NsLab(labdir, Lab.adopt(state["base"], tuple(state["hosts"])), Path(state["guest_cache"]))


def down(labdir: Path, keep_logs: bool = False) -> None:
    """Stop everything the lab runs, by PID, remove its namespaces and its directory (module notes)."""
    ns = load(labdir)
    sup = ns.state().get("supervisor")
    if sup:
        _stop(sup["pid"], sup["start_time"], STOP_S)
    for rec in ns.units().values():
        if rec.get("pid"):
            _stop(rec["pid"], rec["start_time"], 0)
    for role in ("src", "dst"):
        for pid_file in (ns.root(role) / "var/lib/svmotion").glob("*.pid"):
            try:
                rec = json.loads(pid_file.read_text())
                _stop(int(rec["pid"]), int(rec["start_time"]), 5)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    try:
        ns.lab.close()
    except (LabError, OSError) as err:
        raise LabFailed(f"removing the lab's namespaces: {err}") from None
    if not keep_logs:
        shutil.rmtree(ns.dir)
        return
    for entry in ns.dir.iterdir():       # a half-made lab: everything but what says why it failed
        if entry.name == "logs":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _stop(pid: int, start_time: int | None, patience: float) -> None:
    """SIGTERM the process if it is still that very one (same start time), SIGKILL after `patience`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if start_time is None or process_start_time(pid) != start_time:
            return
        if sig == signal.SIGTERM and patience <= 0:
            continue
        os.kill(pid, sig)
        deadline = time.monotonic() + (patience if sig == signal.SIGTERM else 5)
        while process_start_time(pid) == start_time and time.monotonic() < deadline:
            time.sleep(0.1)


def migrate(labdir: Path, steps: tuple[str, ...], name: str, options: tuple[str, ...]) -> int:
    """The guest's disk to dst ("there"), back to src ("back"), or both: vagrant/migrate.sh's steps."""
    ns = load(labdir)
    for step in (("prepare",) if "there" in steps else ()) + steps:
        code = ns.migrate_step(step, name, *options)
        if code != 0:
            return code
    return 0
