"""The Vagrant machines' path with systemd, on this machine: Debian 12 containers (svlab/nspawn.py).

Three machines booting Debian 12's systemd, each provisioned by vagrant/provision.sh as a
Vagrant box is (no --root, no --no-systemd; packages installed from Debian for real; mon
without Grafana, whose repository this machine cannot reach): the units enabled and started by
systemctl, a second provisioning changing nothing (with Python's bytecode written meanwhile),
systemd restarting a SIGKILLed agent, the guest's disk migrated there and back by migrate.sh
(vagrant/lab-migrate.sh's steps), and mon's Prometheus scraping both agents. The machines share
this machine's network, each on a loopback address of its own, with free ports.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from agentproc import free_tcp_ports

from svlab import lab as guest_lab
from svlab import nspawn

pytestmark = [pytest.mark.slow, pytest.mark.kernel]

ADDRESSES = {"src": "127.0.1.1", "dst": "127.0.1.2", "mon": "127.0.1.3"}


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, nspawn.Machine]]:
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    try:
        base = nspawn.image(nspawn.default_cache())
    except nspawn.MachineError as err:
        pytest.skip(f"no Debian 12 machine image: {err}")
    work = tmp_path_factory.mktemp("machines")
    archives = nspawn.apt_archives(nspawn.default_cache())
    shared = work / "shared"
    shared.mkdir()
    binds = {str(shared): "/var/lib/svlab-shared", str(archives): "/var/cache/apt/archives",
             str(guest_lab.ensure_images().root.parent): "/var/cache/svlab/guest"}
    made: dict[str, nspawn.Machine] = {}
    try:
        for role in ("dst", "src", "mon"):
            made[role] = nspawn.Machine(role, base, work, binds).boot()
        yield made
    finally:
        for machine in reversed(made.values()):
            machine.stop()


@pytest.fixture(scope="module")
def settings() -> dict[str, str]:
    names = ("METRICS_PORT", "AGENT_PORT", "NBD_PORT", "PROMETHEUS_PORT")
    ports = {name: str(port) for name, port in zip(names, free_tcp_ports(len(names)))}
    return {"SRC_ADDR": ADDRESSES["src"], "DST_ADDR": ADDRESSES["dst"], "MON_ADDR": ADDRESSES["mon"], **ports}


def provision(machine: nspawn.Machine, settings: dict[str, str]) -> str:
    extra = ["--no-grafana"] if machine.name == "mon" else []
    return machine.run(["sh", "/vagrant/vagrant/provision.sh", machine.name, "--shared", "/var/lib/svlab-shared",
                        *extra], env=settings).stdout


def wait_for_line(console: Path, text: str, after: int = 0, timeout: float = 120) -> None:
    """Until the guest's console holds `text` more than `after` times."""
    deadline = time.monotonic() + timeout
    while not (console.exists() and console.read_text(errors="replace").count(text) > after):
        assert time.monotonic() < deadline, f"the guest never printed {text!r}: " + \
            (console.read_text(errors="replace")[-2000:] if console.exists() else "no console")
        time.sleep(0.5)


def prometheus(settings: dict[str, str], expr: str) -> list[dict]:
    url = f"http://{ADDRESSES['mon']}:{settings['PROMETHEUS_PORT']}/api/v1/query?query={expr}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]["result"]


@pytest.mark.timeout(900)      # a first run on a machine builds the image: minutes of apt-get
def test_provisioned_with_systemd_idempotent_and_migrating(machines: dict[str, nspawn.Machine],
                                                          settings: dict[str, str]) -> None:
    units = {"dst": ["svmotion-agent"], "src": ["svmotion-agent", "svmotion-guest"], "mon": ["svmotion-prometheus"]}
    for role in ("dst", "src", "mon"):
        out = provision(machines[role], settings)
        assert all(f"restarted {u}.service" in out for u in units[role]), out
        for unit in units[role]:
            assert machines[role].run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled"
            assert machines[role].run(["systemctl", "is-active", unit]).stdout.strip() == "active"
    assert machines["mon"].run(["systemctl", "is-enabled", "prometheus"], check=False).stdout.strip() == "disabled"

    # The guest's disk there and back, as vagrant/lab-migrate.sh does it (on dst, then on src),
    # once the guest writes; then the guest checks its files again.
    console = machines["src"].tree / "var/lib/svlab/guest-run/console.log"
    wait_for_line(console, "ROUND 3")
    machines["dst"].run(["sh", "/vagrant/vagrant/migrate.sh", "prepare", "t1"])
    for step in ("there", "back"):
        done = machines["src"].run(["sh", "/vagrant/vagrant/migrate.sh", step, "t1", "--json", "--rate", "8M"],
                                   check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["state"] == "success"
    verified = len(re.findall(r" VERIFIED ", console.read_text(errors="replace")))
    wait_for_line(console, " VERIFIED ", after=verified)
    text = console.read_text(errors="replace")
    assert "FAILED" not in text and "ERROR" not in text, text[-2000:]

    # systemd restarts a SIGKILLed agent (Restart=on-failure); its nbdkit serves on (KillMode=process).
    dst = machines["dst"]
    dst.run(["sh", "-c", "kill -9 $(systemctl show -p MainPID --value svmotion-agent)"])
    dst.run(["sh", "-c", "for i in $(seq 50); do [ $(systemctl show -p NRestarts --value svmotion-agent) -ge 1 ] "
             "&& systemctl is-active -q svmotion-agent && exit 0; sleep 0.2; done; exit 1"])

    # A second provisioning changes nothing, though the agents have run Python from /opt/svmotion.
    for role in ("dst", "src", "mon"):
        out = provision(machines[role], settings)
        assert "changed:" not in out and out.rstrip().endswith("done, 0 change(s)"), out

    # mon's Prometheus scrapes both agents.
    deadline = time.monotonic() + 30
    while True:
        ups = {s["metric"]["host"]: s["value"][1] for s in prometheus(settings, "up")}
        if ups == {"src": "1", "dst": "1"} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert ups == {"src": "1", "dst": "1"}
    stuns = prometheus(settings, "svmotion_stun_duration_seconds_count")
    assert {s["metric"]["kind"] for s in stuns} == {"mirror_install", "switchover"}, stuns
