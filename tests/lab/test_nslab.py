"""The lab on one machine, end to end (issue 13): up, migrate there and back, idempotent
provisioning, a host failing, down.

One lab for the module (conftest.py `nslab`), brought up by `svmotion lab up`: src, dst and mon
are network namespaces on a bridge, each provisioned by vagrant/provision.sh (the Vagrant
machines' script) and running the units that script wrote, under the lab's supervisor. The
guest on src (QEMU, TCG) writes files on its svmotion disk and verifies them itself all along
(svlab/guest_job.sh); mon's Prometheus scrapes both agents over the lab's bridge and is queried
through its HTTP API from inside mon. The tests run in file order: the failing host comes
after the migrations, and the last test takes the lab down and checks that nothing is left.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from agentproc import PYTHON, ROOT
from labtest import console_lines, lab_cli

from agent.attach import loop_backing_files
from agent.supervisor import process_start_time
from svlab.nslab import NsLab
from svlab.units import read_unit

pytestmark = [pytest.mark.slow, pytest.mark.kernel]

GUEST_FAILURES = re.compile(r"^(VERIFY-FAILED|WRITE-ERROR|GUEST-IO-ERRORS|MOUNT-FAILED|UMOUNT-FAILED)")


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll `check` until it returns something true; fail naming `what` with its last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as err:
            last = err
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"waiting for {what}: gave up after {timeout:.0f} s; last {last!r}")


def rounds(ns: NsLab) -> int:
    return max((int(m.group(1)) for line in console_lines(ns) if (m := re.match(r"^ROUND (\d+)$", line))),
               default=0)


def verified_rounds(ns: NsLab) -> list[int]:
    return [int(m.group(1)) for line in console_lines(ns) if (m := re.match(r"^VERIFIED (\d+) \d+$", line))]


def assert_guest_healthy(ns: NsLab) -> None:
    bad = [line for line in console_lines(ns) if GUEST_FAILURES.match(line)]
    assert not bad, "the guest saw trouble:\n" + "\n".join(console_lines(ns)[-40:])


def migrate(ns: NsLab, to: str, name: str, *options: str) -> tuple[int, dict[str, Any], str]:
    """`svmotion lab migrate --to TO --name NAME --json OPTIONS`: exit code, the record, stderr."""
    done = lab_cli(ns.dir, "migrate", "--to", to, "--name", name, "--json", *options)
    try:
        record = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no record from migrate (exit {done.returncode}):\n{done.stdout}\n{done.stderr}") from None
    return done.returncode, record, done.stderr


def served_path(ns: NsLab) -> str:
    return ns.agent_status("src")["vms"][0]["disks"][0]["path"]


def instant(ns: NsLab, expr: str) -> list[dict[str, Any]]:
    return ns.prometheus("query", query=expr)["result"]


def test_live_migration_there_and_back_over_tls(nslab: NsLab) -> None:
    ns = nslab
    assert_guest_healthy(ns)
    before = rounds(ns)
    # 2 MiB/s: the bulk copy lasts a few seconds, with the guest writing and verifying meanwhile.
    code, record, err = migrate(ns, "dst", "e2e", "--rate", "2M")
    assert code == 0 and record["state"] == "success", (record, err)
    at_switchover = rounds(ns)
    served = served_path(ns)
    assert served.startswith(f"nbds://{ns.host('dst').address}:10810/"), served     # NBD over TLS, from dst
    assert [s["kind"] for s in record["stuns"] if s.get("outcome") == "released"] == ["mirror_install", "switchover"]
    assert at_switchover > before, "the guest wrote nothing while its disk migrated"
    # The guest goes on, on dst's export: its own checks after the switchover pass.
    wait_for("a guest check after the switchover", lambda: [r for r in verified_rounds(ns) if r > at_switchover], 60)

    code, back, err = migrate(ns, "src", "e2e")
    assert code == 0 and back["state"] == "success", (back, err)
    assert served_path(ns) == str(ns.root("src") / "var/lib/svlab/guest/e2e/disk0.raw")
    after_back = rounds(ns)
    wait_for("a guest check after coming back", lambda: [r for r in verified_rounds(ns) if r > after_back], 60)
    assert_guest_healthy(ns)

    # mon's Prometheus scraped both agents over the lab network and holds the migrations' series.
    ups = instant(ns, 'up{job="svmotion"}')
    assert sorted((s["metric"]["host"], s["value"][1]) for s in ups) == [("dst", "1"), ("src", "1")]
    stuns = wait_for("both migrations' stuns in Prometheus", lambda: {
        s["metric"]["kind"]: float(s["value"][1])
        for s in instant(ns, 'svmotion_stun_duration_seconds_count{vm="guest",host="src"}')
        if float(s["value"][1]) >= 2}, 30)
    assert set(stuns) == {"mirror_install", "switchover"}, stuns
    convergence = instant(ns, 'count_over_time(svmotion_dirty_bytes{vm="guest",disk="disk0"}[10m])')
    assert convergence and float(convergence[0]["value"][1]) > 0, convergence
    copied = instant(ns, 'svmotion_copied_bytes_total{vm="guest",kind="bulk"}')
    assert copied and float(copied[0]["value"][1]) > 0, copied


def test_refusals_are_one_line_with_exit_3(nslab: NsLab, tmp_path: Path) -> None:
    again = lab_cli(nslab.dir, "up")
    assert again.returncode == 3 and again.stderr.count("\n") == 1, again.stderr
    assert "already up" in again.stderr
    for args in (("down",), ("status",), ("migrate",), ("query", "up")):
        none = lab_cli(tmp_path / "nothing", *args)
        assert none.returncode == 3 and none.stderr.count("\n") == 1, (args, none.stderr)
        assert "no lab in" in none.stderr
    usage = lab_cli(nslab.dir, "migrate", "--to", "src")
    assert usage.returncode == 2 and "--name" in usage.stderr, usage.stderr


def test_a_lab_that_cannot_come_up_says_so_in_one_line_with_exit_9_and_leaves_nothing(tmp_path: Path) -> None:
    """A guest cache that cannot be made: the half-made lab (its namespaces) goes, its logs stay."""
    def namespaces() -> set[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.startswith("svlab-")}

    before = namespaces()
    done = lab_cli(tmp_path / "lab", "up", "--guest-cache", "/proc/svmotion-no-such-dir")
    assert done.returncode == 9, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("svlab: ")]
    assert len(errors) == 1 and errors[0].startswith("svmotion: error: cannot bring the lab up: "), done.stderr
    assert "/proc/svmotion-no-such-dir" in errors[0] and f"{tmp_path / 'lab'}/logs" in errors[0]
    assert namespaces() == before
    assert sorted(p.name for p in (tmp_path / "lab").iterdir()) == ["logs"]


@pytest.mark.parametrize("where, words", [("/proc/svmotion-no-such-dir", "cannot make the lab directory"),
                                          ("/tmp/svmotion lab", "characters other than")])
def test_a_lab_directory_that_cannot_serve_is_refused_in_one_line(where: str, words: str) -> None:
    done = lab_cli(Path(where), "up")
    assert done.returncode == 3 and done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert not Path(where).exists()


def tree_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every provisioned file under a host's root: content digest, mode, mtime (runtime data left out)."""
    out = {}
    for top in ("etc", "opt", "usr"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                st = path.stat()
                out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode,
                                                    st.st_mtime_ns)
    return out


def test_provisioning_twice_changes_nothing(nslab: NsLab) -> None:
    ns = nslab
    before = {role: tree_state(ns.root(role)) for role in ("src", "dst", "mon")}
    disk = ns.root("src") / "var/lib/svlab/guest/disk0.raw"
    disk_mtime = disk.stat().st_mtime_ns
    pids = ns.units()
    for role in ("dst", "src", "mon"):
        out = ns.provision(role)
        assert "changed:" not in out and out.rstrip().endswith("done, 0 change(s)"), out
    assert {role: tree_state(ns.root(role)) for role in ("src", "dst", "mon")} == before
    assert disk.stat().st_mtime_ns == disk_mtime       # the guest's first disk is never made again
    assert ns.units() == pids                          # nothing restarted
    # And the lab still works: there and back again, the guest still checking its files.
    for to in ("dst", "src"):
        code, record, err = migrate(ns, to, "again")
        assert code == 0 and record["state"] == "success", (record, err)
    now = rounds(ns)
    wait_for("a guest check after the second round trip", lambda: [r for r in verified_rounds(ns) if r > now], 60)
    assert_guest_healthy(ns)


def test_provisioned_units_pass_systemd_analyze(nslab: NsLab) -> None:
    """The units the supervisor ran here are the ones systemd runs on the Vagrant machines: systemd
    itself finds nothing wrong in them (keys, executables)."""
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    units = sorted(nslab.dir.glob("*/etc/systemd/system/*.service"))
    assert len(units) == 4, units
    for unit in units:
        done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and not done.stderr.strip(), f"{unit}: {done.stderr}"
        assert read_unit(unit).exec_start[0].startswith(("/usr/bin/", str(nslab.dir)))


def test_failed_host_alerts_on_mon_and_fails_the_migration_cleanly(nslab: NsLab) -> None:
    ns = nslab
    dst = ns.host("dst")
    agent_pid = ns.unit_pid("dst", "svmotion-agent.service")
    assert agent_pid is not None
    source = served_path(ns)
    # Slow enough that the bulk copy is still running when dst goes.
    out = subprocess.Popen([PYTHON, "-m", "agent.cli", "lab", "--dir", str(ns.dir), "migrate", "--to", "dst",
                            "--name", "doomed", "--json", "--rate", "256K"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the migration's bulk copy", lambda: (ns.agent_status("src")["vms"][0]["migration"] or {})
                 .get("phase") == "DiskCopy", 30)
        os.kill(agent_pid, signal.SIGKILL)
        dst.link_down()
        stdout, stderr = out.communicate(timeout=120)
    finally:
        if out.poll() is None:
            out.kill()
            out.communicate()
    try:
        record = json.loads(stdout)
        assert out.returncode == 5, stderr
        assert record["state"] == "failed" and "\n" not in record["error"], record
        assert served_path(ns) == source          # the guest runs on its intact source, on src
        # mon sees dst down (its link is): the project's `agent down` alert fires (for: 1m).
        alert = wait_for("SvmotionAgentDown firing for dst", lambda: [
            a for a in ns.prometheus("alerts")["alerts"]
            if a["labels"]["alertname"] == "SvmotionAgentDown" and a["state"] == "firing"
            and a["labels"].get("host") == "dst"], 150)
        assert alert[0]["labels"]["instance"] == f"{dst.address}:9815"
        assert_guest_healthy(ns)
    finally:
        dst.link_up()
    # The supervisor restarted dst's agent (Restart=on-failure); with its link back, mon scrapes it again.
    wait_for("dst's agent scraped again", lambda: [s for s in instant(ns, 'up{host="dst"}') if s["value"][1] == "1"], 60)
    assert ns.units()["dst/svmotion-agent.service"]["restarts"] >= 1


def test_down_leaves_nothing_behind(nslab: NsLab) -> None:
    ns = nslab
    # The guest's last word first: stopped (by PID), it checks every file once more and powers off.
    guest = ns.unit_pid("src", "svmotion-guest.service")
    assert guest is not None
    os.kill(guest, signal.SIGTERM)
    wait_for("the guest's final check", lambda: "WORKLOAD-OK" in console_lines(ns), 120)
    assert_guest_healthy(ns)

    pids = {rec["pid"]: rec["start_time"] for rec in ns.units().values() if rec.get("pid")}
    sup = ns.state()["supervisor"]
    pids[sup["pid"]] = sup["start_time"]
    for pid_file in [*ns.root("src").glob("var/lib/svmotion/*.pid"), *ns.root("dst").glob("var/lib/svmotion/*.pid")]:
        rec = json.loads(pid_file.read_text())
        pids[int(rec["pid"])] = int(rec["start_time"])
    assert len(pids) >= 5, pids      # supervisor, 3 units still running, src's and dst's nbdkit
    names = [h.netns for h in ns.lab.hosts.values()] + [f"{ns.lab.base}-switch"]

    done = lab_cli(ns.dir, "down")
    assert done.returncode == 0, done.stdout + done.stderr
    left_ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in names if n in left_ns], left_ns          # the bridge lived in the switch namespace
    assert not [pid for pid, start in pids.items() if process_start_time(pid) == start]
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(ns.dir) in line]
    assert not [dev for dev, backing in loop_backing_files().items() if backing.startswith(str(ns.dir))]
    assert not ns.dir.exists()
